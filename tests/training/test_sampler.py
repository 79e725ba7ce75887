"""Tests of the step-keyed batch order (src/dreamerv4/training/sampler.py).

    pytest tests/training/test_sampler.py -q -x
"""

from __future__ import annotations

from dreamerv4.training.sampler import StepBatchSampler


def test_batch_of_a_step_depends_only_on_seed_and_step():
    full = StepBatchSampler(10, 4, seed=7, start_step=0, total_steps=10)
    resumed = StepBatchSampler(10, 4, seed=7, start_step=6, total_steps=10)
    assert list(full)[6:] == list(resumed)
    positions = [i for batch in list(full)[:5] for i in batch]  # 20 samples = 2 epochs of 10
    assert sorted(positions[:10]) == list(range(10)) and sorted(positions[10:]) == list(range(10))
    assert positions[:10] != positions[10:]  # a new order each epoch
    assert list(StepBatchSampler(10, 4, seed=8, start_step=0, total_steps=10)) != list(full)
    # Two ranks of 2 split the global batch of 4 of each step.
    ranks = [StepBatchSampler(10, 2, seed=7, start_step=0, total_steps=10, rank=r, world_size=2) for r in (0, 1)]
    for step in range(10):
        assert ranks[0].indices(step) + ranks[1].indices(step) == full.indices(step)

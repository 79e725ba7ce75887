"""The batches of a training run: the batch of every step is a function of (seed, step) only.

    sampler = StepBatchSampler(len(dataset), batch_size, seed, start_step, total_steps)
    DataLoader(dataset, batch_sampler=sampler)    # yields the batches of steps start_step .. total_steps - 1

Global sample position p (step * global_batch + i) is dataset index perm_e[p mod N], where
e = p // N and perm_e = numpy default_rng([seed, e]).permutation(N): every window once per epoch,
in a fresh order each epoch. So a resumed run sees exactly the batches an uninterrupted one would.
With world_size > 1, rank r takes its slice of each global batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class StepBatchSampler(Sampler[list[int]]):
    """Index lists for steps start_step .. total_steps - 1; the batch of a step depends only on (seed, step)."""

    def __init__(
        self, dataset_len: int, batch_size: int, seed: int, start_step: int, total_steps: int,
        rank: int = 0, world_size: int = 1,
    ):
        if dataset_len < 1:
            raise ValueError("StepBatchSampler: the dataset is empty")
        self.n, self.batch_size, self.seed = dataset_len, batch_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.rank, self.world_size = rank, world_size
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        first = (step * self.world_size + self.rank) * self.batch_size
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.total_steps):
            yield self.indices(step)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

"""Shared fixtures. `tiny_crafter_root` is recorded once per test session; treat it as read-only and
use `tiny_crafter_copy` for tests that modify episodes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# Test models are tiny: with 2 threads torch spends more time in its thread pool than computing
# (a tokenizer test file took 4 s on 1 thread, 15-57 s on 2 while the machine was busy).
torch.set_num_threads(1)
# Subprocesses (kill/resume tests) must use the same thread count, or float sums differ bitwise.
os.environ["OMP_NUM_THREADS"] = "1"

TINY_CRAFTER_EPISODES = 3
TINY_CRAFTER_STEPS = 40
TINY_CRAFTER_SEED = 0


@pytest.fixture(scope="session")
def tiny_crafter_root(tmp_path_factory) -> Path:
    """3 real Crafter episodes of 40 steps (random policy, seed 0) in episode_00000..episode_00002."""
    from dreamerv4.data.crafter_record import record_crafter

    root = tmp_path_factory.mktemp("tiny_crafter")
    record_crafter(root, TINY_CRAFTER_EPISODES, seed=TINY_CRAFTER_SEED, policy="random",
                   max_steps=TINY_CRAFTER_STEPS, progress=False)
    return root


@pytest.fixture
def tiny_crafter_copy(tiny_crafter_root: Path, tmp_path: Path) -> Path:
    """A private, writable copy of tiny_crafter_root."""
    return Path(shutil.copytree(tiny_crafter_root, tmp_path / "crafter"))

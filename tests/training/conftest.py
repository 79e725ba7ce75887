"""The toy run every loop test compares against (tests/training/toy_run.py)."""

from __future__ import annotations

import pytest

from dreamerv4.checkpoint import load_checkpoint

from .toy_run import base_cfg, run_toy, train_curve


@pytest.fixture(scope="package")
def reference(tmp_path_factory):
    """One uninterrupted run: final model, normalizer, checkpoint and per-step metrics."""
    run_dir = tmp_path_factory.mktemp("reference")
    summary, model, norm = run_toy(run_dir, base_cfg())
    return {"summary": summary, "model": model, "norm": norm, "curve": train_curve(run_dir),
            "ckpt": load_checkpoint(run_dir / "checkpoint.pt")}

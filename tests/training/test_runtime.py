"""Tests of where and how a run computes (src/dreamerv4/training/runtime.py): precision, bf16
autocast through the loop, malloc tuning, torch.compile's fallback.

    pytest tests/training/test_runtime.py -q -x
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from dreamerv4.training import runtime
from dreamerv4.training.runtime import resolve_precision

from .toy_run import base_cfg, run_toy, train_curve


def test_precision_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision(base_cfg(precision="fp32"), cpu) is None
    assert resolve_precision(base_cfg(precision="bf16"), cpu) is torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: True)
    assert resolve_precision(base_cfg(precision="auto"), cpu) is torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: False)
    assert resolve_precision(base_cfg(precision="auto"), cpu) is None


def test_bf16_autocast_trains_with_fp32_parameters(tmp_path):
    seen = []

    def record_dtype(loss_fn):
        def wrapped(model, batch):
            loss, metrics = loss_fn(model, batch)
            seen.append(model.net[0](batch["x"]).dtype)
            return loss, metrics

        return wrapped

    summary, model, _ = run_toy(tmp_path, base_cfg(precision="bf16"), loss_wrapper=record_dtype)
    assert set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    curve = train_curve(tmp_path)
    assert np.mean([c[3] for c in curve[-3:]]) < 0.3 * np.mean([c[3] for c in curve[:3]])


MALLOC_PROBE = """
import resource, sys, torch
from dreamerv4.training.runtime import tune_malloc

def faults_per_cycle():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):  # three 16 MB activations, freed together: a training step in miniature
        blocks = [torch.empty(4 << 20).fill_(1.0) for _ in range(3)]
        del blocks
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5

faults_per_cycle()
default = faults_per_cycle()
assert tune_malloc() and tune_malloc()  # applies, and again
faults_per_cycle()
print(default, faults_per_cycle())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_tune_malloc_stops_page_faulting_freed_blocks_in_again():
    # A fresh process: the tuning is process-wide and cannot be undone.
    result = subprocess.run([sys.executable, "-c", MALLOC_PROBE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    default, tuned = map(float, result.stdout.split())
    # glibc's default usually trims the freed heap top and faults it in again (~8000 4 KB pages a
    # cycle here), but not always (it depends on the address-space layout), so only the tuned
    # process is held to a bound.
    assert tuned < 50 and tuned <= default


@pytest.mark.parametrize("has_compiler", [True, False])
def test_compile_falls_back_to_eager_without_a_cpp_compiler(tmp_path, monkeypatch, capsys, has_compiler):
    from dreamerv4.models import transformer

    calls = []
    monkeypatch.setattr(transformer, "compile_blocks", lambda model: calls.append(model) or 0)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(runtime.shutil, "which", lambda name: f"/usr/bin/{name}" if has_compiler else None)
    assert runtime.cpp_compiler() == ("/usr/bin/g++" if has_compiler else None)
    summary, _, _ = run_toy(tmp_path / "run", base_cfg(steps=3, compile=True))
    assert summary.done and summary.step == 3
    warned = "train.compile needs a C++ compiler" in capsys.readouterr().err
    assert len(calls) == (1 if has_compiler else 0) and warned == (not has_compiler)
    monkeypatch.setenv("CXX", "my-cxx")
    assert runtime.cpp_compiler() == ("/usr/bin/my-cxx" if has_compiler else None)

"""Tests of a training run's checkpoint and resume (src/dreamerv4/training/resume.py) through the
loop's toy run (tests/training/toy_run.py).

    pytest tests/training/test_resume.py -q -x

Exact resume is checked bitwise (fp32 on CPU) against an uninterrupted reference run: after an
in-process crash (num_workers 0 and 2) and after a real SIGKILL / SIGTERM of a training process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dreamerv4.checkpoint import load_checkpoint
from dreamerv4.errors import CheckpointError, UserError
from dreamerv4.training.logging import read_metrics
from dreamerv4.training.loop import train
from dreamerv4.training.loss_norm import RunningRMS
from dreamerv4.training.resume import checkpoint_finished, load_weights, run_finished

from .toy_run import (
    ToyDataset, ToyModel, assert_same_state, base_cfg, crash_on_call, make_loss, run_toy, train_curve,
)

TOY_FILE = Path(__file__).resolve().with_name("toy_run.py")
SRC_DIR = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_after_crash_is_bitwise_identical(tmp_path, reference, num_workers):
    cfg = base_cfg()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_toy(tmp_path, cfg, loss_wrapper=crash_on_call(24), num_workers=num_workers)  # dies in step 24
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 20
    assert not run_finished(tmp_path)

    torch.manual_seed(12345)  # the resumed process starts with other RNG states; the checkpoint restores them
    np.random.seed(12345)
    summary, model, norm = run_toy(tmp_path, cfg, resume=True, num_workers=num_workers)
    assert summary.step == 40 and summary.done
    assert_same_state(model, reference["model"])
    assert_same_state(norm, reference["norm"])
    # Steps 21-23 ran twice: metrics.jsonl keeps only the resumed run's lines, equal to the reference.
    assert train_curve(tmp_path) == reference["curve"]
    ours, ref = load_checkpoint(tmp_path / "checkpoint.pt")["optimizer"], reference["ckpt"]["optimizer"]
    for key, state in ref["state"].items():
        for name, value in state.items():
            assert torch.equal(ours["state"][key][name], value), (key, name)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_resume_after_killed_process_is_bitwise_identical(tmp_path, reference, signum):
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('toy_run', {str(TOY_FILE)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        f"module.subprocess_main({str(tmp_path)!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{SRC_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    ckpt_path = tmp_path / "checkpoint.pt"
    deadline = time.monotonic() + 60
    while not ckpt_path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint after 60 s"
        time.sleep(0.02)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    stopped = load_checkpoint(ckpt_path)
    assert 10 <= stopped["step"] < 40 and not stopped["done"], "the process finished before it was stopped"
    if signum == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert stopped["step"] % 10 == 0  # only periodic checkpoints
    else:  # graceful: the step in flight finishes, then a checkpoint at that step
        assert proc.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1]) == {"stop_reason": "signal", "step": stopped["step"]}

    summary, model, norm = run_toy(tmp_path, base_cfg(), resume=True)
    assert summary.step == 40 and summary.done
    assert_same_state(model, reference["model"])
    assert_same_state(norm, reference["norm"])
    assert train_curve(tmp_path) == reference["curve"]


def test_fresh_run_in_occupied_folder_raises_and_finished_run_resume_is_noop(tmp_path, capsys):
    cfg = base_cfg(steps=5)
    run_toy(tmp_path, cfg)
    with pytest.raises(UserError) as info:
        run_toy(tmp_path, cfg)
    assert str(tmp_path) in str(info.value) and "--resume" in str(info.value)

    ckpt_path = tmp_path / "checkpoint.pt"
    before = (ckpt_path.stat().st_mtime_ns, ckpt_path.read_bytes())
    capsys.readouterr()
    summary, _, _ = run_toy(tmp_path, cfg, resume=True)
    assert summary.stop_reason == "already_done" and summary.step == 5
    assert "already finished" in capsys.readouterr().err
    assert (ckpt_path.stat().st_mtime_ns, ckpt_path.read_bytes()) == before

    summary, _, _ = run_toy(tmp_path, base_cfg(steps=8), resume=True)  # more steps: training continues
    assert summary.step == 8 and summary.done


def test_checkpoint_that_does_not_fit_raises_checkpoint_error(tmp_path, reference):
    cfg = base_cfg(steps=10, ckpt_every=5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_toy(tmp_path, cfg, loss_wrapper=crash_on_call(7))
    norm = RunningRMS()
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        train(ToyModel(width=16), ToyDataset(), make_loss(norm), cfg, tmp_path, resume=True, extra_state={"mse": norm})
    # A later phase loads finished weights only, and only into a matching model.
    with pytest.raises(CheckpointError, match="before it finished"):
        load_weights(ToyModel(), tmp_path / "checkpoint.pt")
    load_weights(ToyModel(), tmp_path / "checkpoint.pt", require_done=False)
    finished = reference["summary"].checkpoint
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_weights(ToyModel(width=16), finished)
    model = ToyModel()
    assert load_weights(model, finished) == {"train": dataclasses.asdict(base_cfg())}
    assert_same_state(model, reference["model"])


def test_time_limit_stops_and_resume_continues_the_count(tmp_path):
    limit_s = 0.4
    cfg = base_cfg(steps=10_000, ckpt_every=10_000, time_limit_min=limit_s / 60)
    first, _, _ = run_toy(tmp_path, cfg, sleep_s=0.01)
    assert first.stop_reason == "time_limit" and 0 < first.step < 10_000
    assert limit_s <= first.train_time_min * 60 < limit_s + 0.5
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == first.step and not ckpt["done"] and ckpt["stop_reason"] == "time_limit"
    # The budget is spent: later phases may build on it (a run stopped by a signal is refused, below).
    assert checkpoint_finished(ckpt) and run_finished(tmp_path)

    again, _, _ = run_toy(tmp_path, cfg, resume=True, sleep_s=0.01)  # limit already used up
    assert again.stop_reason == "time_limit" and again.step == first.step

    longer = base_cfg(steps=10_000, ckpt_every=10_000, time_limit_min=2 * limit_s / 60)
    second, _, _ = run_toy(tmp_path, longer, resume=True, sleep_s=0.01)
    assert second.stop_reason == "time_limit" and second.step > first.step
    assert 2 * limit_s <= second.train_time_min * 60 < 2 * limit_s + 0.5
    records = read_metrics(tmp_path, "train")
    assert [r["step"] for r in records] == list(range(1, second.step + 1))
    elapsed = [r["elapsed_min"] for r in records]
    assert elapsed == sorted(elapsed) and elapsed[-1] * 60 >= limit_s


def test_only_the_last_step_or_the_time_limit_finish_a_run():
    assert checkpoint_finished({"done": True}) and checkpoint_finished({"done": False, "stop_reason": "time_limit"})
    assert not checkpoint_finished({"done": False, "stop_reason": "signal"})
    assert not checkpoint_finished({"done": False, "stop_reason": "running"}) and not checkpoint_finished({})

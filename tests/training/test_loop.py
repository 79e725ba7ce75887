"""Tests of the shared training loop (src/dreamerv4/training/loop.py) on a toy MLP regression
(tests/training/toy_run.py): the loss falls, non-finite steps are skipped, logs and hooks.

    pytest tests/training/test_loop.py -q -x
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from dreamerv4.checkpoint import load_checkpoint
from dreamerv4.media import image_grid
from dreamerv4.training.logging import read_metrics
from dreamerv4.training.loop import TrainingDivergedError
from dreamerv4.training.resume import run_finished

from .toy_run import ToyDataset, assert_same_state, base_cfg, fresh, run_toy


def test_loss_falls_and_run_is_marked_done(reference):
    curve = reference["curve"]
    first_mse = np.mean([c[3] for c in curve[:3]])
    last_mse = np.mean([c[3] for c in curve[-3:]])
    assert last_mse < 0.3 * first_mse, (first_mse, last_mse)
    summary = reference["summary"]
    assert (summary.step, summary.done, summary.stop_reason) == (40, True, "done")
    assert reference["ckpt"]["done"] is True and reference["ckpt"]["step"] == 40
    assert summary.metrics["mse"] == curve[-1][3]
    assert run_finished(summary.checkpoint.parent)


def test_nonfinite_loss_and_gradient_are_skipped_and_reported(tmp_path, capsys):
    def inject(loss_fn):
        calls = {"n": 0}

        def wrapped(model, batch):
            calls["n"] += 1
            loss, metrics = loss_fn(model, batch)
            if calls["n"] == 7:  # NaN loss
                loss = loss * float("nan")
            if calls["n"] == 12:  # finite loss, NaN gradient: d sqrt(p)/dp at p = 0 is inf, times 0
                loss = loss + 0.0 * torch.sqrt(model.offset * 0.0).sum()
            return loss, metrics

        return wrapped

    weights: dict[int, torch.Tensor] = {}

    def snapshot(step, model, batch):
        weights[step] = torch.cat([p.detach().flatten().clone() for p in model.parameters()])

    summary, model, norm = run_toy(tmp_path, base_cfg(steps=16, image_every=1), loss_wrapper=inject, on_image=snapshot)
    err = capsys.readouterr().err
    assert "non-finite loss or gradient at step 7" in err and "non-finite loss or gradient at step 12" in err
    assert summary.step == 16 and summary.done
    assert torch.equal(weights[7], weights[6]) and torch.equal(weights[12], weights[11])  # not trained on
    assert not torch.equal(weights[8], weights[7])  # training went on
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(norm.mean_square)  # the normalizer's NaN update was rolled back

    bad = read_metrics(tmp_path, "nonfinite")
    assert [r["step"] for r in bad] == [7, 12]
    assert bad[0]["loss"] == "nan" and math.isfinite(bad[0]["mse"])
    assert bad[1]["grad_norm"] == "nan" and math.isfinite(bad[1]["loss"])
    train_records = read_metrics(tmp_path, "train")
    assert [r["step"] for r in train_records] == [s for s in range(1, 17) if s not in (7, 12)]
    assert train_records[-1]["nonfinite_steps"] == 2


def test_persistent_nonfinite_loss_aborts_and_keeps_last_good_checkpoint(tmp_path):
    def nan_from_call_5(loss_fn):
        calls = {"n": 0}

        def wrapped(model, batch):
            calls["n"] += 1
            loss, metrics = loss_fn(model, batch)
            return (loss * float("nan") if calls["n"] >= 5 else loss), metrics

        return wrapped

    cfg = base_cfg(steps=20, ckpt_every=2, max_nonfinite_steps=3)
    with pytest.raises(TrainingDivergedError) as info:
        run_toy(tmp_path, cfg, loss_wrapper=nan_from_call_5)
    message = str(info.value)
    assert "3 consecutive steps" in message and "step 7" in message
    assert f"{tmp_path / 'checkpoint.pt'} (step 4)" in message
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 4 and not ckpt["done"]
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_metrics_hooks_and_files(tmp_path, reference):
    def eval_fn(model):
        torch.randn(100)  # hooks may draw random numbers without changing training
        with torch.no_grad():
            assert not model.training
            data = ToyDataset()
            return {"mse": F.mse_loss(model(torch.from_numpy(data.x)), torch.from_numpy(data.y)).item()}

    def on_image(step, model, batch):
        assert not model.training and not torch.is_grad_enabled()
        torch.rand(10)
        return {"inputs|x": image_grid(batch["x"][:, :3, None, None].expand(-1, 3, 4, 4).sigmoid())}

    config_dict = {"out_dir": str(tmp_path), "train": {"steps": 40}, "note": [1, 2]}
    cfg = base_cfg(log_every=5, eval_every=20, image_every=20, tensorboard=True)
    summary, model, _ = run_toy(tmp_path, cfg, config_dict=config_dict, eval_fn=eval_fn, on_image=on_image,
                                frames_per_sample=4)
    assert_same_state(model, reference["model"])  # logging cadence and hooks never change training

    records = read_metrics(tmp_path)
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [5, 10, 15, 20, 25, 30, 35, 40]
    expected = {"kind", "step", "elapsed_min", "lr", "loss", "grad_norm", "mse", "samples_per_s", "frames_per_s",
                "nonfinite_steps"}
    for r in train_records:
        assert set(r) == expected
        assert r["frames_per_s"] == pytest.approx(4 * r["samples_per_s"]) and r["samples_per_s"] > 0
    # Window averages: the record at step 5 is the mean of the reference's per-step values 1..5.
    assert train_records[0]["mse"] == pytest.approx(np.mean([c[3] for c in reference["curve"][:5]]), rel=1e-6)
    evals = [r for r in records if r["kind"] == "eval"]
    untrained = eval_fn(fresh()[0].eval())["mse"]
    assert [r["step"] for r in evals] == [20, 40] and evals[1]["mse"] < 0.5 * untrained
    assert summary.metrics["eval/mse"] == evals[-1]["mse"]

    assert (tmp_path / "images" / "inputs_x_0000020.png").is_file()
    assert (tmp_path / "images" / "inputs_x_0000040.png").is_file()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == config_dict
    assert load_checkpoint(tmp_path / "checkpoint.pt")["config"] == config_dict

"""Tests of the tokenizer evaluation (src/dreamerv4/evaluation/tokenizer.py) on a tiny trained checkpoint.

    pytest tests/evaluation/test_eval_tokenizer.py -q -x

The report's numbers are checked against an independent computation on the same frames, its
files (strict JSON, PNG) and the classifier cache are checked, and unusable inputs must give
one clear line and exit status 2 through the CLI.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from dreamerv4.cli import main
from dreamerv4.config import load_config
from dreamerv4.data.dataset import SequenceDataset
from dreamerv4.evaluation import tokenizer as eval_tokenizer
from dreamerv4.evaluation.cells import CellClassifier
from dreamerv4.evaluation.metrics import psnr, ssim
from dreamerv4.evaluation.tokenizer import evaluate_tokenizer
from dreamerv4.run_config import RunConfig
from dreamerv4.training.stages import load_tokenizer
from dreamerv4.training.tokenizer import train_tokenizer

NET = {"embed_dim": 32, "depth": 2, "num_heads": 2, "num_kv_heads": 2, "time_every": 2, "num_registers": 1}
FIT_STEPS = 30  # the classifier fit is the slow part; its quality is tested in test_cells.py


@pytest.fixture(scope="module")
def checkpoint(tiny_crafter_root, tmp_path_factory) -> Path:
    """A tokenizer trained for 20 steps; its run folder keeps only checkpoint.pt (no config.yaml)."""
    root = tmp_path_factory.mktemp("eval_run")
    config = {
        "out_dir": str(root / "run"),
        "data": {"path": str(tiny_crafter_root)},
        "tokenizer": {"model": {"encoder": NET, "decoder": NET},
                      "train": {"steps": 20, "batch_size": 2, "seq_len": 2, "lr": 3e-3, "warmup_steps": 2,
                                "image_every": 0, "precision": "fp32", "device": "cpu", "tensorboard": False},
                      "lpips_weight": 0.0}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(config))
    summary = train_tokenizer(load_config(RunConfig, root / "cfg.yaml"))
    (summary.checkpoint.parent / "config.yaml").unlink()  # evaluation must rebuild everything from the checkpoint
    return summary.checkpoint


def all_finite(value) -> bool:
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    return not isinstance(value, float) or math.isfinite(value)


def test_report_matches_an_independent_computation_and_is_written(checkpoint, tiny_crafter_root, tmp_path):
    out = tmp_path / "reports" / "eval.json"  # a folder that does not exist yet
    result = evaluate_tokenizer(checkpoint, tiny_crafter_root, split="val", max_frames=4096, fit_max_frames=200,
                                out=out, fit_steps=FIT_STEPS)

    written = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert written == json.loads(json.dumps(result))
    for key in ("psnr", "ssim", "lpips", "object_retention", "real_object_retention", "cell_accuracy", "references",
                "per_label"):
        assert key in result, key
    assert all_finite(result), result
    assert 5 < result["psnr"] < 60 and -1 <= result["ssim"] <= 1 and result["lpips"] >= 0
    assert result["object_cells"] > 0  # trees, water... are in view: retention is measured on something
    for key in ("object_retention", "real_object_retention", "cell_accuracy"):
        assert 0 <= result[key] <= 1, key
    refs = result["references"]
    assert set(refs) == {"mean_training_frame", "avg_pool_4x4"}
    for ref in refs.values():
        assert {"psnr", "ssim", "object_retention"} <= set(ref) and 0 <= ref["object_retention"] <= 1

    # Same numbers by hand: every val window (max_frames covers them all), reconstructed unmasked.
    model, cfg = load_tokenizer(checkpoint)
    windows = SequenceDataset(tiny_crafter_root, seq_len=2, stride=2, split="val")
    real = torch.stack([windows[i]["frames"] for i in range(len(windows))])
    with torch.no_grad():
        recon = model.decode(model.encode(real)).flatten(0, 1)
    real = real.flatten(0, 1)
    assert result["frames"] == len(real) == 2 * result["windows"]
    assert result["psnr"] == pytest.approx(float(psnr(real, recon).mean()), abs=1e-3)
    assert result["ssim"] == pytest.approx(float(ssim(real, recon).mean()), abs=1e-4)
    pooled = F.interpolate(F.avg_pool2d(real, 4), scale_factor=4, mode="nearest")
    assert refs["avg_pool_4x4"]["psnr"] == pytest.approx(float(psnr(real, pooled).mean()), abs=1e-3)

    png = Image.open(out.with_suffix(".png"))
    assert png.size == (8 * 66 + 2, 2 * 66 + 2)  # 8 real frames above their 8 reconstructions


def test_classifier_cache_is_reused_only_for_the_same_fit(checkpoint, tiny_crafter_root, tmp_path, monkeypatch):
    fits = []
    original_fit = CellClassifier.fit.__func__
    monkeypatch.setattr(CellClassifier, "fit", classmethod(
        lambda cls, *args, **kwargs: fits.append(kwargs["steps"]) or original_fit(cls, *args, **kwargs)))

    def evaluate(fit_steps: int, name: str) -> dict:
        return evaluate_tokenizer(checkpoint, tiny_crafter_root, max_frames=8, fit_max_frames=100,
                                  out=tmp_path / f"{name}.json", fit_steps=fit_steps)

    for name in ("cells.pt", "cells.json"):
        (checkpoint.parent / name).unlink(missing_ok=True)
    first = evaluate(10, "first")
    again = evaluate(10, "again")
    assert fits == [10]  # the second evaluation reused cells.pt
    assert again["object_retention"] == first["object_retention"]
    evaluate(12, "refit")
    assert fits == [10, 12]  # another fit setting does not silently reuse the old classifier
    assert json.loads((checkpoint.parent / "cells.json").read_text())["fit_steps"] == 12


def test_cli_evaluates_and_prints_a_summary(checkpoint, tiny_crafter_root, tmp_path, capsys, monkeypatch):
    original_fit = CellClassifier.fit.__func__
    monkeypatch.setattr(CellClassifier, "fit", classmethod(
        lambda cls, *args, **kwargs: original_fit(cls, *args, **{**kwargs, "steps": FIT_STEPS})))
    out = tmp_path / "cli.json"
    code = main(["eval", "tokenizer", "--checkpoint", str(checkpoint), "--data", str(tiny_crafter_root),
                 "--split", "all", "--max-frames", "8", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["split"] == "all" and report["frames"] == 8
    printed = capsys.readouterr().out
    assert f"PSNR {report['psnr']:.2f} dB" in printed and "reference avg_pool_4x4" in printed


def eval_cli(checkpoint: Path, data: Path, capsys) -> tuple[int, str]:
    code = main(["eval", "tokenizer", "--checkpoint", str(checkpoint), "--data", str(data), "--max-frames", "4"])
    return code, capsys.readouterr().err


def test_missing_checkpoint_exits_2_naming_it(tiny_crafter_root, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "checkpoint.pt"
    code, err = eval_cli(missing, tiny_crafter_root, capsys)
    assert code == 2
    assert err.startswith("error: ") and str(missing) in err and "not found" in err


def test_truncated_checkpoint_exits_2_naming_it(checkpoint, tiny_crafter_root, tmp_path, capsys):
    truncated = tmp_path / "checkpoint.pt"
    data = checkpoint.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    code, err = eval_cli(truncated, tiny_crafter_root, capsys)
    assert code == 2
    assert str(truncated) in err and "cannot read checkpoint" in err
    assert "Traceback" not in err


def test_checkpoint_of_something_else_exits_2(tiny_crafter_root, tmp_path, capsys):
    classifier = tmp_path / "cells.pt"
    CellClassifier(hidden=8).save(classifier)  # a valid checkpoint file, but not a tokenizer's
    code, err = eval_cli(classifier, tiny_crafter_root, capsys)
    assert code == 2
    assert str(classifier) in err and "not a `dreamerv4 train tokenizer` checkpoint" in err


def test_missing_data_folder_exits_2(checkpoint, tmp_path, capsys):
    code, err = eval_cli(checkpoint, tmp_path / "no-data", capsys)
    assert code == 2
    assert str(tmp_path / "no-data") in err


def test_json_report_has_no_nan(monkeypatch, checkpoint, tiny_crafter_root, tmp_path):
    """Frames without object cells give a NaN retention; the file must stay strict JSON (null)."""
    real_retention = eval_tokenizer.evaluate_reconstructions

    def without_objects(*args, **kwargs):
        result = real_retention(*args, **kwargs)
        if "object_retention" in result:
            result["object_retention"] = float("nan")
        return result

    monkeypatch.setattr(eval_tokenizer, "evaluate_reconstructions", without_objects)
    out = tmp_path / "nan.json"
    result = evaluate_tokenizer(checkpoint, tiny_crafter_root, max_frames=4, fit_max_frames=100, out=out, fit_steps=5)
    assert math.isnan(result["object_retention"])
    written = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert written["object_retention"] is None
    assert written["references"]["avg_pool_4x4"]["object_retention"] is None
    assert np.isfinite(written["psnr"])

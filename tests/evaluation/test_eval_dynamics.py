"""Tests of the dynamics evaluation (src/dreamerv4/evaluation/dynamics.py) on a tiny trained model.

    pytest tests/evaluation/test_eval_dynamics.py -q -x

The report must hold every horizon for the model and every baseline, the copy baseline must match
an independent computation, results must be reproducible, the sliding-window generation must equal
`generate` when everything fits, and a video must be written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageSequence

from dreamerv4.checkpoint import save_checkpoint
from dreamerv4.cli import main
from dreamerv4.config import from_dict, load_config, to_dict
from dreamerv4.data.crafter_layout import SEMANTIC_NAMES
from dreamerv4.data.episodes import load_frames
from dreamerv4.data.latents import frames_to_float
from dreamerv4.evaluation.dynamics import (
    BASELINES, HORIZONS, METHODS, PSNR_CAP, beatable_split, evaluate_dynamics, format_report, frame_scores, imagine,
    paired_difference,
)
from dreamerv4.training.stages import load_dynamics
from dreamerv4.training.tokenize import tokenize_dataset
from dreamerv4.evaluation.metrics import psnr
from dreamerv4.models.tokenizer import Tokenizer
from dreamerv4.run_config import RunConfig
from dreamerv4.training.dynamics import train_dynamics
from dreamerv4.training.resume import CHECKPOINT_FORMAT

NET = {"embed_dim": 32, "depth": 2, "num_heads": 2, "num_kv_heads": 2, "time_every": 2, "num_registers": 1}
CONTEXT = 4
FIT = dict(fit_max_frames=200, fit_steps=30)  # the classifier's quality is tested in test_cells.py


@pytest.fixture(scope="module")
def checkpoint(tiny_crafter_root, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_dyn")
    cfg = from_dict(RunConfig, {"tokenizer": {"model": {"encoder": NET, "decoder": NET}, "train": {"seq_len": 4}}})
    torch.manual_seed(0)
    save_checkpoint(root / "tok.pt", {"format": CHECKPOINT_FORMAT, "model": Tokenizer(cfg.tokenizer.model).state_dict(),
                                      "config": to_dict(cfg), "step": 1, "done": True})
    tokenize_dataset(root / "tok.pt", tiny_crafter_root, root / "latents", progress=False)
    config = {"out_dir": str(root / "run"), "data": {"path": str(tiny_crafter_root), "stride": 2},
              "dynamics": {"tokenizer_checkpoint": str(root / "tok.pt"), "latents": str(root / "latents"),
                           "model": {"transformer": NET},
                           "train": {"steps": 6, "batch_size": 4, "seq_len": 8, "lr": 3e-3, "warmup_steps": 2,
                                     "image_every": 0, "precision": "fp32", "device": "cpu", "tensorboard": False}}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(config))
    return train_dynamics(load_config(RunConfig, root / "cfg.yaml")).checkpoint


@pytest.fixture(scope="module")
def report(checkpoint, tiny_crafter_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports") / "sub" / "dyn.json"
    return {"out": out, "result": evaluate_dynamics(checkpoint, tiny_crafter_root, out=out, context=CONTEXT,
                                                    fit_data=tiny_crafter_root, **FIT)}


def test_report_has_every_horizon_and_baseline_and_is_strict_json(report):
    result = report["result"]
    written = json.loads(report["out"].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert written == json.loads(json.dumps(result))
    assert result["horizons"] == list(HORIZONS) and result["context"] == CONTEXT and result["window"] == 8
    assert result["windows"] == 9 and result["episodes"] == 3  # starts 0, 19 and 21 (the last) per episode
    assert set(result["results"]) == set(METHODS)
    for method in METHODS:
        assert set(result["results"][method]) == {str(h) for h in HORIZONS}
        for scores in result["results"][method].values():
            assert {"psnr", "psnr_mean_mse", "ssim", "object_retention", "cell_accuracy"} <= set(scores)
            assert 5 < scores["psnr"] <= PSNR_CAP and 0 <= scores["cell_accuracy"] <= 1
            assert math.isfinite(scores["psnr_mean_mse"])
    assert result["results"]["real"]["1"]["psnr"] == PSNR_CAP
    assert set(result["psnr_curve"]) == set(METHODS) - {"real"}
    assert all(len(v) == 15 for v in result["psnr_curve"].values())
    # the actions reach the model: shuffled actions change the imagined frames
    assert result["psnr_curve"]["model"] != result["psnr_curve"]["shuffled_actions"]


def test_copy_baseline_matches_an_independent_computation(report, tiny_crafter_root):
    # Windows of 19 steps at stride 19 in 40-step episodes: starts 0, 19 and 21 (the one ending at the end).
    real, copy = [], []
    for i in range(3):
        frames = frames_to_float(load_frames(tiny_crafter_root / f"episode_{i:05d}"))
        for start in (0, 19, 21):
            real.append(frames[start + CONTEXT + 8 - 1])
            copy.append(frames[start + CONTEXT - 1])
    expected = psnr(torch.stack(real), torch.stack(copy)).clamp(max=PSNR_CAP).mean()
    assert report["result"]["results"]["copy_last_frame"]["8"]["psnr"] == pytest.approx(float(expected), abs=1e-4)


def test_comparisons_pair_the_model_with_every_baseline(report):
    result = report["result"]
    assert set(result["comparisons"]) == set(BASELINES)
    for base in BASELINES:
        for h in map(str, HORIZONS):
            d = result["comparisons"][base][h]
            model, other = result["results"]["model"][h], result["results"][base][h]
            # Means are linear: the paired PSNR difference is the difference of the reported means ...
            assert d["psnr_diff"] == pytest.approx(model["psnr"] - other["psnr"], abs=1e-4)
            assert d["retention_diff"] == pytest.approx(model["object_retention"] - other["object_retention"], abs=1e-6)
            # ... and lies inside its own interval.
            assert d["psnr_diff_ci95"][0] <= d["psnr_diff"] + 1e-9 and d["psnr_diff"] <= d["psnr_diff_ci95"][1] + 1e-9


def test_beatable_split_on_hand_made_frames():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(4, 3, 64, 64, generator=g)

    def noisy(std: float) -> torch.Tensor:
        return (target + std * torch.randn(target.shape, generator=g)).clamp(0, 1)

    copy = torch.cat((target[:2], noisy(0.2)[2:]))  # exact on windows 0-1 (50 dB), ~14 dB on 2-3
    predicted = {"model": noisy(0.05), "copy_last_frame": copy, "copy_last_latent": noisy(0.1),
                 "shuffled_actions": noisy(0.1), "tokenizer_reconstruction": noisy(0.01), "real": target}
    split = beatable_split(target, predicted, None, None)
    assert split["frames"] == 2 and split["copy_above_ceiling_fraction"] == 0.5
    for method, frames in predicted.items():  # the scores of windows 2 and 3 alone
        assert split["results"][method] == frame_scores(target[2:], frames[2:], None, None)
    d = split["comparisons"]["copy_last_frame"]
    assert d["psnr_diff"] == pytest.approx(split["results"]["model"]["psnr"] - split["results"]["copy_last_frame"]["psnr"])
    assert d["psnr_diff"] > 10  # the model (~26 dB) beats the noisy copy where a decoded frame can
    nothing = beatable_split(target, {**predicted, "copy_last_frame": target}, None, None)
    assert nothing == {"copy_above_ceiling_fraction": 1.0, "frames": 0}


def test_report_splits_every_horizon_by_the_ceiling(report):
    result = report["result"]
    for h in map(str, HORIZONS):
        split = result["beatable_frames"][h]
        assert split["copy_above_ceiling_fraction"] == pytest.approx(1 - split["frames"] / result["windows"])
    text = format_report(result)
    assert "copy scores below the tokenizer's reconstruction" in text and "h15 " in text.splitlines()[-1]


class _FixedClassifier:
    """Stands in for the cell classifier: returns the labels it was given for each frame batch."""

    def __init__(self, answers: dict[int, np.ndarray]):
        self.answers = answers

    def predict(self, frames: torch.Tensor) -> np.ndarray:
        return self.answers[id(frames)]


def test_paired_difference_on_hand_made_frames():
    real = torch.full((4, 3, 64, 64), 0.5)
    close = real + 0.01  # 40 dB
    far = real + 0.1  # 20 dB
    same = paired_difference(real, close, close.clone(), None, None)
    assert same["psnr_diff"] == 0 and same["psnr_diff_ci95"] == [0, 0] and "retention_diff" not in same
    d = paired_difference(real, close, far, None, None)
    assert d["psnr_diff"] == pytest.approx(20.0, abs=1e-3) and d["psnr_diff_ci95"] == pytest.approx([20.0, 20.0], abs=1e-3)

    # Retention: every frame has 10 tree cells; the model keeps 8 of them in every frame, the baseline
    # 8 in two frames and 0 in the other two: +4 of 10 cells on average, and the interval is not a point.
    tree, grass = SEMANTIC_NAMES.index("tree"), SEMANTIC_NAMES.index("grass")
    labels = np.full((4, 7, 9), grass, np.uint8)
    labels[:, 0, :9] = tree
    labels[:, 1, :1] = tree
    model_says, base_says = labels.copy(), labels.copy()
    model_says[:, 0, :2] = grass
    base_says[:2, 0, :2] = grass
    base_says[2:, 0, :9] = grass
    base_says[2:, 1, :1] = grass
    clf = _FixedClassifier({id(close): model_says, id(far): base_says})
    d = paired_difference(real, close, far, labels, clf, resamples=500)
    assert d["retention_diff"] == pytest.approx(16 / 40)
    lo, hi = d["retention_diff_ci95"]
    assert 0 <= lo < 16 / 40 < hi <= 0.8


def test_results_are_reproducible(report, checkpoint, tiny_crafter_root, tmp_path):
    again = evaluate_dynamics(checkpoint, tiny_crafter_root, out=tmp_path / "again.json", context=CONTEXT,
                              fit_data=tiny_crafter_root, **FIT)
    assert again["results"] == report["result"]["results"]
    assert again["psnr_curve"] == report["result"]["psnr_curve"]
    assert again["comparisons"] == report["result"]["comparisons"]


def test_video_shows_context_and_imagined_frames(report):
    video = report["result"]["video"]
    assert video["panels"] == ["real", "model", "shuffled_actions"] and len(video["windows"]) == 4
    with Image.open(video["gif"]) as gif:
        durations = [frame.info["duration"] for frame in ImageSequence.Iterator(gif)]
        assert gif.size == (3 * (128 + 2) + 2, 4 * (128 + 2) + 2)
    assert sum(durations) == (CONTEXT + 15) * 250  # identical consecutive frames may be merged; time is kept
    if video["mp4"]:
        import imageio_ffmpeg

        assert imageio_ffmpeg.count_frames_and_secs(video["mp4"])[0] == CONTEXT + 15


def test_sliding_window_generation_equals_generate_when_everything_fits(checkpoint):
    model, _ = load_dynamics(checkpoint)
    g = torch.Generator().manual_seed(0)
    context = torch.randn(2, 3, 16, 32, generator=g).tanh()
    actions = torch.randint(0, 17, (2, 8), generator=g)
    fits = imagine(model, context, actions, horizon=5, window=8, generator=torch.Generator().manual_seed(1))
    direct = model.generate(context, actions[:, :3], actions[:, 3:], generator=torch.Generator().manual_seed(1))
    assert torch.equal(fits, direct)
    slides = imagine(model, context, actions, horizon=5, window=4, generator=torch.Generator().manual_seed(1))
    assert slides.shape == (2, 5, 16, 32) and torch.isfinite(slides).all()


def test_cli_errors(tmp_path, tiny_crafter_root, capsys):
    assert main(["eval", "dynamics", "--checkpoint", str(tmp_path / "missing.pt"), "--data", str(tiny_crafter_root)]) == 2
    assert "missing.pt" in capsys.readouterr().err

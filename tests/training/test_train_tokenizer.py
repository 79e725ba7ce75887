"""Integration tests of Phase 1A training (src/dreamerv4/training/tokenizer.py) on real Crafter episodes.

    pytest tests/training/test_train_tokenizer.py -q -x

Covers: the tokenizer learns to reconstruct through its latents (beyond what a decoder that ignores
them can reach); a training process killed with SIGKILL and resumed through the CLI ends bitwise
equal to an uninterrupted run (LPIPS, running-RMS normalizers, masks and image hooks included);
the resolved config lives in the run folder and in the checkpoint, which alone rebuilds the model;
a bf16 step runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dreamerv4.checkpoint import load_checkpoint
from dreamerv4.cli import main
from dreamerv4.config import load_config, to_dict
from dreamerv4.errors import ConfigError
from dreamerv4.data.dataset import SequenceDataset
from dreamerv4.models.tokenizer import Tokenizer
from dreamerv4.run_config import RunConfig
from dreamerv4.training.logging import read_metrics
from dreamerv4.data.episodes import write_episode
from dreamerv4.training.stages import load_tokenizer
from dreamerv4.training.tokenizer import dark_window_repeats, train_tokenizer

NET = {"embed_dim": 32, "depth": 2, "num_heads": 2, "num_kv_heads": 2, "time_every": 2, "num_registers": 1}
TIMING_KEYS = {"elapsed_min", "samples_per_s", "frames_per_s"}  # wall-clock figures differ between runs


def write_config(path: Path, out_dir: Path, data_path: Path, *, width: int = 32, lpips_weight: float = 0.0,
                 data: dict | None = None, model: dict | None = None, **train) -> Path:
    """A tiny Phase 1A config as YAML (the way users give it); `train` entries override TrainConfig."""
    net = {**NET, "embed_dim": width}
    config = {
        "out_dir": str(out_dir),
        "data": {"path": str(data_path), **(data or {})},
        "tokenizer": {
            "model": {"encoder": net, "decoder": net, "mask_mode": "fixed", "mask_rate": 0.25, **(model or {})},
            "train": {"steps": 6, "batch_size": 2, "seq_len": 2, "lr": 3e-3, "warmup_steps": 2, "log_every": 1,
                      "ckpt_every": 3, "image_every": 0, "precision": "fp32", "device": "cpu", "tensorboard": False,
                      "threads": 1, **train},
            "lpips_weight": lpips_weight,
        },
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def train_curve(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run_dir, "train")]


def window_mean(records: list[dict], key: str, first: int, last: int) -> float:
    return float(np.mean([r[key] for r in records if first <= r["step"] <= last]))


def test_tokenizer_learns_to_reconstruct_through_its_latents(tiny_crafter_root, tmp_path):
    # All 3 episodes train (val_fraction 0). One frame per item, so a decoder that ignored the
    # latents could at best output the mean training frame: `mean_frame_mse` is its floor.
    cfg = load_config(RunConfig, write_config(
        tmp_path / "cfg.yaml", tmp_path / "run", tiny_crafter_root, width=64, data={"val_fraction": 0.0},
        steps=800, batch_size=8, seq_len=1, warmup_steps=20, log_every=50))
    summary = train_tokenizer(cfg)
    assert summary.done and summary.step == 800

    records = read_metrics(tmp_path / "run" / "tokenizer", "train")
    assert [r["step"] for r in records] == list(range(50, 801, 50))
    early_mse, late_mse = window_mean(records, "mse", 1, 50), window_mean(records, "mse", 701, 800)
    data = SequenceDataset(tiny_crafter_root, seq_len=1, stride=1, split="train", val_fraction=0.0)
    frames = np.stack([data[i]["frames"].numpy() for i in range(len(data))])  # (N, 1, 3, 64, 64)
    mean_frame_mse = float(((frames - frames.mean(0)) ** 2).mean())

    assert late_mse < 0.2 * early_mse, (early_mse, late_mse)
    # Measured: late 0.0022 against a floor of 0.0053. The same run with the decoder fed zeros
    # instead of the latents passes the check above but ends at 0.0061 here, far from this bar.
    assert late_mse < 0.75 * mean_frame_mse, (late_mse, mean_frame_mse)
    assert window_mean(records, "recon_loss", 701, 800) < 0.2 * window_mean(records, "recon_loss", 1, 50)
    assert window_mean(records, "psnr_masked_train", 701, 800) > window_mean(records, "psnr_masked_train", 1, 50) + 7

    # The decoder reads the latents: a frame decoded from another episode's latents is worse.
    model, _ = load_tokenizer(tmp_path / "run" / "tokenizer" / "checkpoint.pt")
    x = torch.from_numpy(frames)
    with torch.no_grad():
        latents = model.encode(x)
        own = (model.decode(latents) - x).square().mean()
        shifted = latents.roll(len(x) // 2, dims=0)  # 60 frames away: always another episode
        other = (model.decode(shifted) - x).square().mean()
    assert own < 0.8 * other, (float(own), float(other))


@pytest.fixture(scope="module")
def reference_run(tiny_crafter_root, tmp_path_factory):
    """An uninterrupted 30-step run with LPIPS, per-image mask rates (RNG) and image hooks on."""
    root = tmp_path_factory.mktemp("reference")
    options = dict(lpips_weight=0.2, model={"mask_mode": "uniform", "mask_max": 0.9}, steps=30, ckpt_every=5,
                   image_every=4)
    cfg = load_config(RunConfig, write_config(root / "cfg.yaml", root / "run", tiny_crafter_root, **options))
    summary = train_tokenizer(cfg)
    run_dir = root / "run" / "tokenizer"
    return {"cfg": cfg, "options": options, "summary": summary, "run_dir": run_dir,
            "ckpt": load_checkpoint(run_dir / "checkpoint.pt"), "curve": train_curve(run_dir)}


def test_killed_and_resumed_training_is_bitwise_identical(reference_run, tiny_crafter_root, tmp_path):
    config = write_config(tmp_path / "cfg.yaml", tmp_path / "run", tiny_crafter_root, **reference_run["options"])
    run_dir = tmp_path / "run" / "tokenizer"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dreamerv4.cli", "train", "tokenizer", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.01)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    stopped = load_checkpoint(run_dir / "checkpoint.pt")
    assert stopped["step"] in (5, 10, 15, 20, 25) and not stopped["done"], "the process finished before the kill"

    torch.manual_seed(999)  # other RNG states than a fresh process: the checkpoint must restore them
    np.random.seed(999)
    assert main(["train", "tokenizer", "--config", str(config), "--resume"]) == 0

    ours, ref = load_checkpoint(run_dir / "checkpoint.pt"), reference_run["ckpt"]
    assert ours["step"] == 30 and ours["done"]
    assert train_curve(run_dir) == reference_run["curve"]  # every step's loss, mse, lpips, grad norm, lr
    for name, value in ref["model"].items():
        assert torch.equal(ours["model"][name], value), name
    # The running-RMS normalizers were restored, not restarted: they saw all 30 updates.
    assert {k: int(v["count"]) for k, v in ours["extra"].items()} == {"mse": 30, "lpips": 30}
    for norm in ("mse", "lpips"):
        assert torch.equal(ours["extra"][norm]["mean_square"], ref["extra"][norm]["mean_square"]), norm
    for key, state in ref["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(ours["optimizer"]["state"][key][name], value), (key, name)
    assert sorted(p.name for p in (run_dir / "images").iterdir()) == \
        sorted(p.name for p in (reference_run["run_dir"] / "images").iterdir())


def test_resolved_config_is_saved_and_the_checkpoint_alone_rebuilds_the_model(reference_run, tmp_path):
    cfg, run_dir, ckpt = reference_run["cfg"], reference_run["run_dir"], reference_run["ckpt"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == to_dict(cfg)
    assert ckpt["config"] == to_dict(cfg)
    assert ckpt["config"]["tokenizer"]["model"]["encoder"]["embed_dim"] == 32  # not the default 256

    alone = tmp_path / "elsewhere" / "checkpoint.pt"  # no config.yaml, no run folder beside it
    alone.parent.mkdir()
    alone.write_bytes((run_dir / "checkpoint.pt").read_bytes())
    model, rebuilt = load_tokenizer(alone)
    assert rebuilt == cfg
    assert not model.training
    assert model.state_dict().keys() == ckpt["model"].keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, ckpt["model"][name]), name


def test_bf16_step_runs_and_updates_fp32_parameters(tiny_crafter_root, tmp_path):
    cfg = load_config(RunConfig, write_config(tmp_path / "cfg.yaml", tmp_path / "run", tiny_crafter_root,
                                              lpips_weight=0.2, steps=1, precision="bf16"))
    summary = train_tokenizer(cfg)
    assert summary.done and summary.step == 1
    for key in ("loss", "mse", "lpips", "recon_loss", "grad_norm"):
        assert math.isfinite(summary.metrics[key]), (key, summary.metrics)
    assert summary.metrics["nonfinite_steps"] == 0  # the update was applied, not skipped

    torch.manual_seed(cfg.tokenizer.train.seed)
    initial = Tokenizer(cfg.tokenizer.model).state_dict()
    trained = load_checkpoint(summary.checkpoint)["model"]
    assert all(value.dtype == torch.float32 for value in trained.values())
    assert any(not torch.equal(trained[name], value) for name, value in initial.items())


def test_negative_lpips_weight_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"tokenizer": {"lpips_weight": -0.2}}))
    with pytest.raises(ConfigError, match="lpips_weight"):
        load_config(RunConfig, path)


def test_dark_windows_are_repeated(tmp_path):
    # One episode: 12 saturated day frames, then 12 grey (desaturated, as at night) ones.
    rng = np.random.default_rng(0)
    day = np.zeros((12, 64, 64, 3), np.uint8)
    day[..., 1] = rng.integers(150, 255, (12, 64, 64))  # green: saturation ~0.8
    night = np.repeat(rng.integers(20, 80, (12, 64, 64, 1), dtype=np.uint8), 3, axis=-1)
    write_episode(tmp_path / "data" / "episode_00000", np.concatenate([day, night]),
                  {"action": np.zeros(24, np.int64)}, np.zeros(24, np.float32))
    data = SequenceDataset(tmp_path / "data", seq_len=1, stride=4)
    assert [data.window(i)[1] for i in range(len(data))] == [0, 4, 8, 12, 16, 20, 23]
    assert dark_window_repeats(data, 3, chunk=2).tolist() == [1, 1, 1, 3, 3, 3, 3]
    with pytest.raises(ConfigError, match="dark_repeat must be >= 1"):
        load_config(RunConfig, None, ["tokenizer.dark_repeat=0"])

"""Evaluate a trained tokenizer: PSNR, SSIM, LPIPS and Crafter object retention at mask rate 0.

    dreamerv4 eval tokenizer --checkpoint runs/x/tokenizer/checkpoint.pt --data data/crafter-heldout --split all

Reconstructs held-out windows of the training sequence length (the tokenizer is causal in time,
so each frame is decoded with its own past as context), compares them with the real frames, and
applies the cell classifier (evaluation/cells.py, fitted on real TRAINING frames and cached next
to the checkpoint as cells.pt, with cells.json recording what it was fitted on: other fit
settings refit it) to count how many trees, cows, water... cells survive. Two reference points
computed on the same frames put the numbers in context: the mean training frame, and 4x4
average pooling. Writes JSON (default: eval.json next to the checkpoint) and a PNG of real and
reconstructed frames.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dreamerv4.data.dataset import SequenceDataset
from dreamerv4.data.episodes import load_frames, load_observations
from dreamerv4.evaluation.cells import CellClassifier, evaluate_reconstructions
from dreamerv4.media import image_grid, save_png
from dreamerv4.models.lpips import LPIPS
from dreamerv4.models.tokenizer import Tokenizer, unpatchify
from dreamerv4.run_config import RunConfig
from dreamerv4.training.stages import load_tokenizer

CELLS_CACHE = "cells.pt"  # the fitted cell classifier, next to the checkpoint
CELLS_CACHE_INFO = "cells.json"  # what it was fitted on; a different fit refits it


def fit_frames(root: str | Path, cfg: RunConfig, max_frames: int, seed: int = 0,
               with_labels: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Up to `max_frames` real training-split frames (N,64,64,3) uint8 and their labels (N,7,9)
    (None without `with_labels`: episodes other than Crafter's have none)."""
    data = SequenceDataset(root, seq_len=1, stride=1, split="train", val_fraction=cfg.data.val_fraction,
                           split_seed=cfg.data.split_seed, action_space=cfg.data.action_space)
    rng = np.random.default_rng(seed)
    per_episode = max(1, max_frames // len(data.episodes))
    frames, labels = [], []
    for info in data.episodes:
        pick = np.sort(rng.choice(info.length, size=min(per_episode, info.length), replace=False))
        frames.append(np.asarray(load_frames(info.path)[pick]))
        if with_labels:
            labels.append(load_observations(info.path, ("semantic",))["semantic"][pick])
    return np.concatenate(frames)[:max_frames], (np.concatenate(labels)[:max_frames] if with_labels else None)


@torch.no_grad()
def reconstruct(model: Tokenizer, frames: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """(N,T,3,64,64) -> reconstructions at mask rate 0, same shape, clamped to [0, 1]."""
    out = []
    for i in range(0, len(frames), batch):
        rec = model(frames[i: i + batch], mask_rate=0.0)["reconstructed"]
        out.append(unpatchify(rec.float(), model.cfg.patch_size).clamp(0, 1))
    return torch.cat(out)


def cell_classifier(cache_dir: Path, fit_root: Path, cfg: RunConfig, fit_max_frames: int,
                    fit_steps: int) -> CellClassifier:
    """The classifier cached in cache_dir when it was fitted with these settings, else a new fit (cached)."""
    cache, info_path = cache_dir / CELLS_CACHE, cache_dir / CELLS_CACHE_INFO
    settings = {"fit_data": str(fit_root.resolve()), "fit_max_frames": fit_max_frames, "fit_steps": fit_steps,
                "val_fraction": cfg.data.val_fraction, "split_seed": cfg.data.split_seed}
    try:
        cached = json.loads(info_path.read_text()) == settings and cache.is_file()
    except (OSError, ValueError):
        cached = False
    if cached:
        return CellClassifier.load(cache)
    fit_x, fit_y = fit_frames(fit_root, cfg, fit_max_frames)
    classifier = CellClassifier.fit(fit_x, fit_y, seed=0, steps=fit_steps)
    info_path.unlink(missing_ok=True)  # never leave a description of another classifier behind
    classifier.save(cache)
    info_path.write_text(json.dumps(settings, indent=2))
    return classifier


def _json_safe(value):
    """NaN/inf become null so the report is strict JSON (object_retention is NaN without object cells)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def evaluate_tokenizer(checkpoint: str | Path, data: str | Path, split: str = "val", fit_data: str | Path | None = None,
                       max_frames: int = 2048, fit_max_frames: int = 20000, out: str | Path | None = None,
                       fit_steps: int = 1000) -> dict:
    """Reconstruct up to `max_frames` frames of `data` (its `split`) with the checkpoint's tokenizer and score
    them (module docstring). The cell classifier is fitted for `fit_steps` steps on up to `fit_max_frames`
    training-split frames of `fit_data` (default: the run's data.path). Returns the report, also written as
    JSON to `out` (default: eval.json next to the checkpoint) with a PNG beside it. Keys: checkpoint, data,
    split, frames, windows, seq_len, psnr, ssim, lpips, object_retention, cell_accuracy, object_cells,
    real_object_retention, by_light, per_label, references {mean_training_frame, avg_pool_4x4: psnr, ssim, retention
    keys}, seconds. Raises CheckpointError / DataError (a UserError) for unusable inputs."""
    started = time.perf_counter()
    checkpoint = Path(checkpoint)
    model, cfg = load_tokenizer(checkpoint)
    seq_len = cfg.tokenizer.train.seq_len
    crafter = cfg.data.action_space == "crafter"  # object retention needs Crafter's semantic labels
    windows = SequenceDataset(data, seq_len=seq_len, stride=seq_len, split=split, val_fraction=cfg.data.val_fraction,
                              split_seed=cfg.data.split_seed, action_space=cfg.data.action_space, with_semantic=crafter)
    count = min(len(windows), max(1, max_frames // seq_len))
    picks = np.linspace(0, len(windows) - 1, count).round().astype(int)
    items = [windows[int(i)] for i in picks]
    real = torch.stack([it["frames"] for it in items])
    labels = np.concatenate([it["semantic"].numpy() for it in items]) if crafter else None
    recon = reconstruct(model, real).flatten(0, 1)
    real = real.flatten(0, 1)

    fit_root = Path(fit_data or cfg.data.path)
    classifier = cell_classifier(checkpoint.parent, fit_root, cfg, fit_max_frames, fit_steps) if crafter else None
    lpips = LPIPS(cfg.tokenizer.lpips_net).eval()  # reported even when the run trained without it
    metrics = evaluate_reconstructions(real, recon, labels, classifier, lpips)
    # Reference points on the same frames.
    fit_x, _ = fit_frames(fit_root, cfg, 2048, seed=1, with_labels=False)
    mean_frame = torch.from_numpy(fit_x.astype(np.float32).mean(0) / 255).permute(2, 0, 1).expand_as(real)
    pooled = F.interpolate(F.avg_pool2d(real, 4), scale_factor=4, mode="nearest")
    references = {
        "mean_training_frame": evaluate_reconstructions(real, mean_frame, labels, classifier),
        "avg_pool_4x4": evaluate_reconstructions(real, pooled, labels, classifier),
    }
    result = {
        "checkpoint": str(checkpoint),
        "data": str(data),
        "split": split,
        "frames": int(len(real)),
        "windows": int(count),
        "seq_len": seq_len,
        **{k: v for k, v in metrics.items() if k != "per_label"},
        "per_label": metrics.get("per_label"),
        "references": {name: {k: v for k, v in m.items() if k != "per_label"} for name, m in references.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(out) if out else checkpoint.parent / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_json_safe(result), indent=2, allow_nan=False))
    shown = torch.cat([real[:: max(1, len(real) // 8)][:8], recon[:: max(1, len(real) // 8)][:8]])
    save_png(out.with_suffix(".png"), image_grid(shown, ncols=8))
    return result


def cmd_eval(args) -> int:
    r = evaluate_tokenizer(args.checkpoint, args.data, args.split, args.fit_data, args.max_frames, out=args.out)
    print(f"{r['frames']} frames ({r['split']} split of {r['data']}): PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}, "
          f"LPIPS {r['lpips']:.3f}, object retention {100 * r['object_retention']:.1f}% "
          f"(classifier on real frames {100 * r['real_object_retention']:.1f}%)")
    for light, part in (r.get("by_light") or {}).items():
        if part["frames"]:
            print(f"  {light} frames: {part['frames']}, object cells {part['object_cells']}, retention "
                  f"{100 * part['object_retention']:.1f}% (real {100 * part['real_object_retention']:.1f}%)")
    for name, ref in r["references"].items():
        print(f"  reference {name}: PSNR {ref['psnr']:.2f} dB, object retention {100 * ref['object_retention']:.1f}%")
    return 0

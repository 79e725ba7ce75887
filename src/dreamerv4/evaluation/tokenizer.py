"""Evaluate a trained tokenizer: PSNR, SSIM, LPIPS and Crafter object retention at mask rate 0.

    dreamerv4 eval tokenizer --checkpoint runs/x/tokenizer/checkpoint.pt --data data/crafter-heldout --split all

Reconstructs held-out windows of the training sequence length (the tokenizer is causal in time,
so each frame is decoded with its own past as context), compares them with the real frames, and
applies the cell classifier (evaluation/cells.py, fitted on real TRAINING frames and cached next
to the checkpoint) to count how many trees, cows, water... cells survive. Two reference points
computed on the same frames put the numbers in context: the mean training frame, and 4x4
average pooling. Writes JSON (default: eval.json next to the checkpoint) and a PNG of real and
reconstructed frames.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dreamerv4.config import from_dict
from dreamerv4.data.dataset import SequenceDataset
from dreamerv4.data.episodes import load_frames, load_observations
from dreamerv4.evaluation.cells import CellClassifier, evaluate_reconstructions
from dreamerv4.models.tokenizer import Tokenizer, unpatchify
from dreamerv4.run_config import RunConfig
from dreamerv4.training.logging import image_grid, save_png
from dreamerv4.training.loop import load_weights


def load_tokenizer(checkpoint: str | Path, require_done: bool = False) -> tuple[Tokenizer, RunConfig]:
    """The tokenizer of a `train tokenizer` checkpoint and the run config stored inside it."""
    from dreamerv4.checkpoint import load_checkpoint

    config = load_checkpoint(checkpoint).get("config", {})
    cfg = from_dict(RunConfig, config, f"{checkpoint}:config")
    model = Tokenizer(cfg.tokenizer.model)
    load_weights(model, checkpoint, require_done=require_done)
    return model.eval(), cfg


def fit_frames(root: str | Path, cfg: RunConfig, max_frames: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to `max_frames` real training-split frames (N,64,64,3) uint8 and their labels (N,7,9)."""
    data = SequenceDataset(root, seq_len=1, stride=1, split="train", val_fraction=cfg.data.val_fraction,
                           split_seed=cfg.data.split_seed, action_space=cfg.data.action_space)
    rng = np.random.default_rng(seed)
    per_episode = max(1, max_frames // len(data.episodes))
    frames, labels = [], []
    for info in data.episodes:
        semantic = load_observations(info.path, ("semantic",))["semantic"]
        pick = np.sort(rng.choice(info.length, size=min(per_episode, info.length), replace=False))
        frames.append(np.asarray(load_frames(info.path)[pick]))
        labels.append(semantic[pick])
    return np.concatenate(frames)[:max_frames], np.concatenate(labels)[:max_frames]


@torch.no_grad()
def reconstruct(model: Tokenizer, frames: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """(N,T,3,64,64) -> reconstructions at mask rate 0, same shape, clamped to [0, 1]."""
    out = []
    for i in range(0, len(frames), batch):
        rec = model(frames[i: i + batch], mask_rate=0.0)["reconstructed"]
        out.append(unpatchify(rec.float(), model.cfg.patch_size).clamp(0, 1))
    return torch.cat(out)


def evaluate_tokenizer(checkpoint: str | Path, data: str | Path, split: str = "val", fit_data: str | Path | None = None,
                       max_frames: int = 2048, fit_max_frames: int = 20000, out: str | Path | None = None) -> dict:
    started = time.perf_counter()
    checkpoint = Path(checkpoint)
    model, cfg = load_tokenizer(checkpoint)
    seq_len = cfg.tokenizer.train.seq_len
    windows = SequenceDataset(data, seq_len=seq_len, stride=seq_len, split=split, val_fraction=cfg.data.val_fraction,
                              split_seed=cfg.data.split_seed, action_space=cfg.data.action_space, with_semantic=True)
    count = min(len(windows), max(1, max_frames // seq_len))
    picks = np.linspace(0, len(windows) - 1, count).round().astype(int)
    items = [windows[int(i)] for i in picks]
    real = torch.stack([it["frames"] for it in items])
    labels = np.concatenate([it["semantic"].numpy() for it in items])
    recon = reconstruct(model, real).flatten(0, 1)
    real = real.flatten(0, 1)

    fit_root = Path(fit_data or cfg.data.path)
    cache = checkpoint.parent / "cells.pt"
    if cache.is_file():
        classifier = CellClassifier.load(cache)
    else:
        fit_x, fit_y = fit_frames(fit_root, cfg, fit_max_frames)
        classifier = CellClassifier.fit(fit_x, fit_y, seed=0)
        classifier.save(cache)
    from dreamerv4.models.lpips import LPIPS  # reported even when the run trained without it

    lpips = LPIPS(cfg.tokenizer.lpips_net).eval()
    metrics = evaluate_reconstructions(real, recon, labels, classifier, lpips)
    # Reference points on the same frames.
    fit_x, _ = fit_frames(fit_root, cfg, 2048, seed=1)
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
    out.write_text(json.dumps(result, indent=2))
    shown = torch.cat([real[:: max(1, len(real) // 8)][:8], recon[:: max(1, len(real) // 8)][:8]])
    save_png(out.with_suffix(".png"), image_grid(shown, ncols=8))
    return result


def cmd_eval(args) -> int:
    r = evaluate_tokenizer(args.checkpoint, args.data, args.split, args.fit_data, args.max_frames, out=args.out)
    print(f"{r['frames']} frames ({r['split']} split of {r['data']}): PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}, "
          f"LPIPS {r['lpips']:.3f}, object retention {100 * r['object_retention']:.1f}% "
          f"(classifier on real frames {100 * r['real_object_retention']:.1f}%)")
    for name, ref in r["references"].items():
        print(f"  reference {name}: PSNR {ref['psnr']:.2f} dB, object retention {100 * ref['object_retention']:.1f}%")
    return 0

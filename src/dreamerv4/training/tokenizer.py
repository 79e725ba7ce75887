"""Phase 1A training: the causal masked-autoencoding tokenizer on episode frames.

    dreamerv4 train tokenizer --config configs/crafter-small.yaml [--resume] [key=value ...]

Loss (paper; docs/design.md, Models): MSE + lpips_weight * LPIPS on the full reconstructed frame, each term
divided by a running estimate of its RMS so neither dominates by scale. Writes to
`<out_dir>/tokenizer/`: checkpoint.pt, config.yaml, metrics.jsonl, tb/, images/ (input | masked |
reconstruction grids).

`tokenizer.dark_repeat` N > 1 draws the training windows whose first frame is dark (Crafter's
night or sleep view, `data.crafter_layout.dark_frames`) N times as often: a quarter of the recorded
frames, where objects differ from grass by a few grey levels.

Logged metrics: `loss` is the optimized, RMS-normalized total (it drifts towards 1 as training
settles, so it does not show progress); `recon_loss` = mse + lpips_weight * lpips before
normalization, `mse`, `lpips` and `psnr_masked_train` (PSNR of the whole frame reconstructed from
the masked input) do.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from dreamerv4.config import load_config, to_dict
from dreamerv4.data.crafter_layout import dark_frames
from dreamerv4.data.dataset import RepeatedWindows, SequenceDataset, collate_windows
from dreamerv4.media import image_grid
from dreamerv4.models.lpips import LPIPS
from dreamerv4.models.tokenizer import Tokenizer, patchify, unpatchify
from dreamerv4.run_config import RunConfig
from dreamerv4.training.loop import TrainSummary, train
from dreamerv4.training.loss_norm import RunningRMS
from dreamerv4.training.runtime import resolve_device


def masked_view(frames: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Frames (N,3,H,W) with the dropped patches (mask (N,P) True) painted mid-grey, for the grids."""
    patches = patchify(frames, patch_size)
    patches = torch.where(mask[..., None], torch.full_like(patches, 0.5), patches)
    return unpatchify(patches, patch_size)


def dark_window_repeats(data: SequenceDataset, repeat: int, chunk: int = 1024) -> np.ndarray:
    """Per window of `data`: `repeat` where its first frame is dark (night or sleep, `dark_frames`), else 1."""
    dark = [dark_frames(torch.stack([data[i]["frames"][0] for i in range(start, min(start + chunk, len(data)))]))
            for start in range(0, len(data), chunk)]
    return np.where(np.concatenate(dark), repeat, 1)


def train_tokenizer(cfg: RunConfig, resume: bool = False) -> TrainSummary:
    """Train cfg.tokenizer on the training split of cfg.data.path into <cfg.out_dir>/tokenizer (module doc);
    `resume` continues from its checkpoint exactly (model, optimizer, normalizers, RNG, data order)."""
    stage = cfg.tokenizer
    data = SequenceDataset(
        cfg.data.path, seq_len=stage.train.seq_len, stride=cfg.data.stride, split="train",
        val_fraction=cfg.data.val_fraction, split_seed=cfg.data.split_seed, action_space=cfg.data.action_space,
    )
    if stage.dark_repeat > 1:
        repeats = dark_window_repeats(data, stage.dark_repeat)
        dark = int((repeats > 1).sum())
        data = RepeatedWindows(data, repeats)
        print(f"tokenizer: {dark} of {len(repeats)} training windows are dark, drawn {stage.dark_repeat}x "
              f"as often ({stage.dark_repeat * dark / len(data):.0%} of draws)", file=sys.stderr)
    torch.manual_seed(stage.train.seed)
    model = Tokenizer(stage.model)
    device = resolve_device(stage.train)
    patch = stage.model.patch_size
    norms = {"mse": RunningRMS(), "lpips": RunningRMS()}
    lpips = None
    if stage.lpips_weight > 0:
        lpips = LPIPS(stage.lpips_net).to(device).eval().requires_grad_(False)

    def loss_fn(model: Tokenizer, batch: dict) -> tuple[torch.Tensor, dict]:
        frames = batch["frames"]
        out = model(frames)
        target = patchify(frames, patch)
        mse = (out["reconstructed"].float() - target).square().mean()
        loss = norms["mse"](mse)
        recon_loss = mse.detach()
        metrics = {"mse": mse.detach(), "psnr_masked_train": -10 * torch.log10(mse.detach().clamp_min(1e-10))}
        if lpips is not None:
            recon = unpatchify(out["reconstructed"], patch).flatten(0, 1)
            perceptual = lpips(recon, frames.flatten(0, 1)).mean().float()
            loss = loss + stage.lpips_weight * norms["lpips"](perceptual)
            recon_loss = recon_loss + stage.lpips_weight * perceptual.detach()
            metrics["lpips"] = perceptual.detach()
        metrics["recon_loss"] = recon_loss
        return loss, metrics

    def on_image(step: int, model: Tokenizer, batch: dict) -> dict:
        frames = batch["frames"][:8, :1].float()  # first frame of 8 sequences
        out = model(frames)
        mask = out["mask"].flatten(0, 1)
        flat = frames.flatten(0, 1)
        recon = unpatchify(out["reconstructed"].float(), patch).flatten(0, 1).clamp(0, 1)
        rows = torch.cat([flat, masked_view(flat, mask, patch), recon])  # 3 rows: input | masked | recon
        return {"input|masked|reconstruction": image_grid(rows, ncols=len(flat))}

    return train(
        model, data, loss_fn, stage.train, Path(cfg.out_dir) / "tokenizer",
        resume=resume, config_dict=to_dict(cfg), extra_state=norms, on_image=on_image,
        frames_per_sample=stage.train.seq_len, num_workers=cfg.data.num_workers, collate_fn=collate_windows,
    )


def cmd_train(args) -> int:
    cfg = load_config(RunConfig, args.config, args.overrides)
    summary = train_tokenizer(cfg, resume=args.resume)
    print(summary)
    return 0

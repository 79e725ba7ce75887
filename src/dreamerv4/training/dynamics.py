"""Phase 1B training: the shortcut-forcing dynamics model (world model) on tokenizer latents.

    dreamerv4 data tokenize --checkpoint runs/x/tokenizer/checkpoint.pt --data data/crafter --out runs/x/latents
    dreamerv4 train dynamics --config configs/crafter-small.yaml out_dir=runs/x [--resume] [key=value ...]

Reads the latent folder `dynamics.latents` (default `<out_dir>/latents`, made once by `data
tokenize`), windows of `dynamics.train.seq_len` steps of its training split (the same episode split
as the frames, `data.val_fraction` / `data.split_seed`), and minimizes `shortcut_forcing_loss`
(training/shortcut.py: DreamerV4 Eq. 6-8) with the shared loop (`training/loop.py`: progress,
metrics.jsonl + TensorBoard, checkpoints, exact resume, bf16, time limit). Writes
`<out_dir>/dynamics/`: checkpoint.pt, config.yaml, metrics.jsonl, tb/, images/.

The frozen tokenizer `dynamics.tokenizer_checkpoint` (default `<out_dir>/tokenizer/checkpoint.pt`)
is only used to draw pictures: every `train.image_every` steps a few training windows are rolled
out from `dynamics.image_context` real frames with the batch's actions (K = model.sampling_steps)
and decoded, saved as a grid (rows: real decoded | imagined) and a GIF in images/. Its weights
fingerprint must equal the one in the latent folder's manifest (latents of another tokenizer are
refused), and it is kept in the checkpoint (extra state "tokenizer") for the evaluation.

Logged: `loss` (the shortcut loss), `flow_loss` + `bootstrap_loss` (its two parts), `flow_mse`,
`bootstrap_mse`, `x_mse` (|x^ - z1|^2 over all frames) and, every `train.eval_every` steps,
`val_loss` / `val_x_mse` on fixed validation windows with fixed noise (comparable across steps).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from dreamerv4.config import load_config, to_dict
from dreamerv4.data.dataset import collate_windows
from dreamerv4.data.latents import LatentSequenceDataset, decode_latents, tokenizer_fingerprint
from dreamerv4.errors import ConfigError, DataError, UserError
from dreamerv4.media import context_borders, image_grid, write_side_by_side
from dreamerv4.models.dynamics import DynamicsModel
from dreamerv4.run_config import RunConfig
from dreamerv4.training.loop import TrainSummary, train
from dreamerv4.training.runtime import resolve_device
from dreamerv4.training.shortcut import sample_step_and_signal, shortcut_forcing_loss
from dreamerv4.training.stages import load_tokenizer, resolve_dynamics_paths

VAL_WINDOWS = 64  # validation windows scored by eval_fn
VAL_BATCH = 16


class TokenizerIdentity:
    """The tokenizer the latents came from, kept in the dynamics checkpoint (extra state). A resumed
    run whose latent folder was remade by another tokenizer is refused."""

    def __init__(self, fingerprint: str, checkpoint: str, context: int):
        self.state = {"fingerprint": fingerprint, "checkpoint": checkpoint, "context": int(context)}

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.state["fingerprint"]:
            raise UserError(f"the latents were made by another tokenizer (fingerprint {self.state['fingerprint'][:12]}) "
                            f"than this run started with ({str(state.get('fingerprint'))[:12]}); "
                            "train into another out_dir")


def _load_frozen_tokenizer(path: Path, manifest: dict, device: torch.device):
    """The tokenizer for the images, or None (with a note) when the checkpoint does not exist."""
    if not path.is_file():
        print(f"{path}: no tokenizer checkpoint; training without rollout images "
              "(set dynamics.tokenizer_checkpoint to get them)", file=sys.stderr)
        return None
    tokenizer, _ = load_tokenizer(path)
    if tokenizer_fingerprint(tokenizer) != manifest["tokenizer"]["fingerprint"]:
        raise UserError(f"{path}: is not the tokenizer that made the latents (their manifest names "
                        f"{manifest['tokenizer']['checkpoint']}); re-run `dreamerv4 data tokenize` or set "
                        "dynamics.tokenizer_checkpoint")
    return tokenizer.to(device).requires_grad_(False)


def spread_picks(n: int, count: int) -> np.ndarray:
    """Up to `count` distinct indices spread evenly over range(n)."""
    return np.unique(np.linspace(0, n - 1, min(n, count)).round().astype(int))


def measure_latent_scale(data: LatentSequenceDataset, windows: int = 256) -> float:
    """1 / std of the latents of up to `windows` evenly spread training windows, rounded to 4 digits
    (the value `dynamics.model.latent_scale: 0` resolves to)."""
    values = torch.cat([data[int(i)]["latents"].float().flatten() for i in spread_picks(len(data), windows)])
    std = float(values.std())
    if not (std > 0 and np.isfinite(std)):
        raise UserError(f"{data.root}: latents have std {std}; cannot scale them (dynamics.model.latent_scale)")
    return round(1.0 / std, 4)


def validation_windows(root: str | Path, seq_len: int, eval_every: int, **split) -> LatentSequenceDataset | None:
    """The val split of a latent folder for a stage's periodic evaluation; None when eval_every is 0
    or the split has no window (then with a note: training goes on without validation)."""
    if not eval_every:
        return None
    try:
        return LatentSequenceDataset(root, seq_len=seq_len, split="val", **split)
    except DataError as exc:
        print(f"no validation windows ({exc}); train.eval_every is ignored", file=sys.stderr)
        return None


def validation_batches(data: LatentSequenceDataset, k_max: int | None = None, bootstrap_fraction: float = 0.0,
                       seed: int = 0) -> list[dict]:
    """Up to VAL_WINDOWS evenly spread windows in batches of VAL_BATCH, each with fixed noise and,
    given k_max, fixed shortcut (tau, d): the same numbers at every evaluation."""
    generator = torch.Generator().manual_seed(seed)
    picks = spread_picks(len(data), VAL_WINDOWS)
    batches = []
    for i in range(0, len(picks), VAL_BATCH):
        batch = collate_windows([data[int(j)] for j in picks[i: i + VAL_BATCH]])
        if k_max is not None:
            b, t = batch["actions"].shape
            batch["tau"], batch["d"] = sample_step_and_signal(b, t, k_max, bootstrap_fraction, generator=generator)
        batch["noise"] = torch.randn(batch["latents"].shape, generator=generator)
        batches.append(batch)
    return batches


def train_dynamics(cfg: RunConfig, resume: bool = False) -> TrainSummary:
    """Train cfg.dynamics on the latent folder into <cfg.out_dir>/dynamics (module docstring)."""
    cfg = resolve_dynamics_paths(cfg)
    stage = cfg.dynamics
    if stage.model.action_space != cfg.data.action_space:
        raise ConfigError(f"dynamics.model.action_space {stage.model.action_space!r} differs from "
                          f"data.action_space {cfg.data.action_space!r}")
    if stage.train.seq_len < 2:
        raise ConfigError(f"dynamics.train.seq_len must be >= 2 (the model learns from sequences), got {stage.train.seq_len}")
    split = dict(stride=cfg.data.stride, val_fraction=cfg.data.val_fraction, split_seed=cfg.data.split_seed,
                 action_space=cfg.data.action_space)
    data = LatentSequenceDataset(stage.latents, seq_len=stage.train.seq_len, split="train", **split)
    manifest = data.manifest
    if data.latent_shape != (stage.model.num_latents, stage.model.latent_dim):
        raise ConfigError(f"{stage.latents}: latents are {data.latent_shape}, dynamics.model expects "
                          f"({stage.model.num_latents}, {stage.model.latent_dim})")
    if stage.model.latent_scale == 0:  # measured once; the checkpoint's config keeps the value
        stage = dataclasses.replace(stage, model=dataclasses.replace(stage.model, latent_scale=measure_latent_scale(data)))
        cfg = dataclasses.replace(cfg, dynamics=stage)
        print(f"dynamics.model.latent_scale = {stage.model.latent_scale:.4f} (1 / std of the training latents)",
              file=sys.stderr)
    device = resolve_device(stage.train)
    tokenizer = _load_frozen_tokenizer(Path(stage.tokenizer_checkpoint), manifest, device)
    identity = TokenizerIdentity(manifest["tokenizer"]["fingerprint"], manifest["tokenizer"]["checkpoint"],
                                 manifest["context"])
    torch.manual_seed(stage.train.seed)
    model = DynamicsModel(stage.model)
    run_dir = Path(cfg.out_dir) / "dynamics"

    def loss_fn(model: DynamicsModel, batch: dict) -> tuple[torch.Tensor, dict]:
        return shortcut_forcing_loss(model, batch["latents"], batch["actions"])

    def on_image(step: int, model: DynamicsModel, batch: dict) -> dict | None:
        latents, actions = batch["latents"][:4].float(), batch["actions"][:4]
        t = latents.shape[1]
        c = max(1, min(stage.image_context, t - 1))
        imagined = model.generate(latents[:, :c], actions[:, :c], actions[:, c:])
        real = decode_latents(tokenizer, latents, manifest["context"])
        dreamt = decode_latents(tokenizer, torch.cat((latents[:, :c], imagined.to(latents.dtype)), dim=1),
                                manifest["context"])
        write_side_by_side(run_dir / "images" / f"rollout_{step:07d}", [real, dreamt], fps=4, scale=2,
                           borders=[None, context_borders(c, t)], mp4=False)
        rows = torch.stack((real, dreamt), dim=1).flatten(0, 2)  # per sequence: real row, then imagined row
        return {"real_imagined": image_grid(rows, ncols=t)}

    eval_fn = None
    val = validation_windows(stage.latents, stage.train.seq_len, stage.train.eval_every, **split)
    if val is not None:
        val_batches = validation_batches(val, stage.model.k_max, stage.model.bootstrap_fraction)

        def eval_fn(model: DynamicsModel) -> dict:
            total, x_mse, frames = 0.0, 0.0, 0
            for batch in val_batches:
                b = {k: v.to(device) for k, v in batch.items()}
                loss, metrics = shortcut_forcing_loss(model, b["latents"], b["actions"], tau=b["tau"], d=b["d"],
                                                      noise=b["noise"])
                n = b["actions"].numel()
                total, x_mse, frames = total + float(loss) * n, x_mse + float(metrics["x_mse"]) * n, frames + n
            return {"val_loss": total / frames, "val_x_mse": x_mse / frames}

    return train(
        model, data, loss_fn, stage.train, run_dir, resume=resume, config_dict=to_dict(cfg),
        extra_state={"tokenizer": identity}, on_image=on_image if tokenizer is not None else None, eval_fn=eval_fn,
        frames_per_sample=stage.train.seq_len, num_workers=cfg.data.num_workers, collate_fn=collate_windows,
    )


def cmd_train(args) -> int:
    cfg = load_config(RunConfig, args.config, args.overrides)
    summary = train_dynamics(cfg, resume=args.resume)
    print(summary)
    return 0

"""Object retention: does a reconstruction keep Crafter's trees, cows, water...? (PSNR hides it.)

A small classifier, fitted on real frames against Crafter's semantic labels, names each of the
7x9 world cells (7x7 pixels each, see data/crafter_layout.py) from that cell's own pixels plus a
few whole-frame statistics (Crafter darkens, desaturates and adds noise at night). It sees no
neighbouring cells on purpose: a tree painted over with grass must read as grass, not be
guessed back from the forest around it. Retention = its accuracy on reconstructed frames,
measured against the TRUE labels, on the cells that are not background (grass, sand, path).

    clf = CellClassifier.fit(frames_uint8, labels, seed=0)        # (N,64,64,3), (N,7,9)
    clf.save("cells.pt"); clf = CellClassifier.load("cells.pt")
    retention(clf, recon_frames, labels)["object_retention"]
    evaluate_reconstructions(real, recon, labels, clf, LPIPS())   # PSNR, SSIM, LPIPS, retention

`python -m dreamerv4.evaluation.cells` plays random Crafter episodes, fits on some seeds and
reports held-out accuracy, fit time, and the scores of blurred and object-erased frames.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dreamerv4.data.crafter_layout import (
    BACKGROUND_LABELS, CELL_PX, GRID_COLS, GRID_ROWS, NUM_LABELS, SEMANTIC_NAMES, dark_frames, local_semantic,
)
from dreamerv4.data.crafter_record import make_crafter_env  # crafter.Env made reproducible
from dreamerv4.checkpoint import load_checkpoint, save_checkpoint
from dreamerv4.errors import CheckpointError
from dreamerv4.evaluation.metrics import psnr, ssim

FRAME_PX = 64
CELL_INPUTS = 3 * CELL_PX * CELL_PX
FRAME_STATS = 6  # per-channel mean and std of the world area: how dark and how noisy the frame is


def as_images(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Frames as float (N,3,64,64) in [0,1]. uint8 input is (N,64,64,3) as recorded; float input
    is (N,3,64,64) in [0,1] as the tokenizer emits (clamped, since reconstructions overshoot)."""
    x = torch.as_tensor(frames)
    if x.dtype == torch.uint8:
        if x.ndim != 4 or x.shape[1:] != (FRAME_PX, FRAME_PX, 3):
            raise ValueError(f"uint8 frames must be (N,{FRAME_PX},{FRAME_PX},3), got {tuple(x.shape)}")
        return x.permute(0, 3, 1, 2).float() / 255
    if not x.is_floating_point() or x.ndim != 4 or x.shape[1:] != (3, FRAME_PX, FRAME_PX):
        raise ValueError(f"float frames must be (N,3,{FRAME_PX},{FRAME_PX}) in [0,1], got {tuple(x.shape)} {x.dtype}")
    return x.float().clamp(0, 1)


def cell_inputs(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,3,64,64) -> per-cell pixels (N,7,9,147) and per-frame statistics (N,6), both centred."""
    world = images[:, :, : GRID_ROWS * CELL_PX, : GRID_COLS * CELL_PX]
    n = world.shape[0]
    cells = world.reshape(n, 3, GRID_ROWS, CELL_PX, GRID_COLS, CELL_PX).permute(0, 2, 4, 1, 3, 5)
    stats = torch.cat([world.mean(dim=(2, 3)), world.std(dim=(2, 3))], dim=1)
    return cells.reshape(n, GRID_ROWS, GRID_COLS, CELL_INPUTS) * 2 - 1, stats * 2 - 1


def _check_labels(labels: np.ndarray | torch.Tensor, n: int) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(labels)).long()
    if y.shape != (n, GRID_ROWS, GRID_COLS):
        raise ValueError(f"labels must be ({n},{GRID_ROWS},{GRID_COLS}), got {tuple(y.shape)}")
    if y.numel() and (y.min() < 0 or y.max() >= NUM_LABELS):
        raise ValueError(f"labels must lie in [0, {NUM_LABELS}), got [{int(y.min())}, {int(y.max())}]")
    return y


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread inside the block. On a shared 2-core machine two threads per tiny
    op made each fit step 6-9x slower (threads waiting on each other); an idle one gains little."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def degrade(images: torch.Tensor, generator: torch.Generator, max_blur: float, max_noise: float) -> torch.Tensor:
    """Per-frame random Gaussian blur (sigma in [0, max_blur] px), pixel noise and brightness shift."""
    n = images.shape[0]
    sigma = torch.rand(n, generator=generator) * max_blur
    offsets = torch.arange(-2, 3, dtype=torch.float32)
    taps = torch.exp(-offsets**2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    taps = taps / taps.sum(dim=1, keepdim=True)
    kernels = (taps[:, :, None] * taps[:, None, :]).repeat_interleave(3, dim=0)[:, None]  # (3n,1,5,5)
    blurred = F.conv2d(F.pad(images.reshape(1, 3 * n, FRAME_PX, FRAME_PX), (2, 2, 2, 2), mode="replicate"),
                       kernels, groups=3 * n).reshape(images.shape)
    noise = torch.randn(images.shape, generator=generator) * torch.rand(n, 1, 1, 1, generator=generator) * max_noise
    shift = (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.06  # +-0.03
    return (blurred + noise + shift).clamp(0, 1)


class CellClassifier(nn.Module):
    """MLP: one cell's 7x7x3 pixels + the frame's statistics -> logits over the 19 semantic labels."""

    def __init__(self, hidden: int = 256):
        super().__init__()
        self.hidden = hidden
        self.net = nn.Sequential(
            nn.Linear(CELL_INPUTS + FRAME_STATS, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, NUM_LABELS),
        )

    def forward(self, cells: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        """cells (..., 147), stats (..., 6) broadcastable to cells' leading shape -> (..., 19) logits."""
        stats = stats.expand(*cells.shape[:-1], FRAME_STATS)
        return self.net(torch.cat([cells, stats], dim=-1))

    @torch.no_grad()
    def predict(self, frames: np.ndarray | torch.Tensor, batch_size: int = 1024) -> np.ndarray:
        """(N,7,9) uint8 labels of frames given as uint8 (N,64,64,3) or float (N,3,64,64) in [0,1]."""
        self.eval()
        out = []
        for start in range(0, len(frames), batch_size):
            cells, stats = cell_inputs(as_images(frames[start: start + batch_size]))
            out.append(self(cells, stats[:, None, None, :]).argmax(-1).to(torch.uint8))
        if not out:
            return np.zeros((0, GRID_ROWS, GRID_COLS), np.uint8)
        return torch.cat(out).numpy()

    @classmethod
    def fit(cls, frames: np.ndarray, labels: np.ndarray, seed: int = 0, steps: int = 1000,
            batch_frames: int = 64, lr: float = 3e-3, hidden: int = 256, max_blur: float = 1.0,
            max_noise: float = 0.04, log_every: int = 0) -> "CellClassifier":
        """Fit on real frames (N,64,64,3) uint8 against their labels (N,7,9).

        Each step draws `batch_frames` frames, degrades them a little (Gaussian blur with sigma
        up to `max_blur` pixels, pixel noise up to `max_noise`, a small brightness shift) so that
        a recognizable but imperfect reconstruction of an object still counts as kept, and
        classifies all their cells. The loss weights each label by 1/sqrt(frequency) so rare
        objects (diamond, table, lava) are not drowned by grass.
        """
        frames_t = torch.as_tensor(np.asarray(frames))
        if len(frames_t) == 0:
            raise ValueError("CellClassifier.fit needs at least one frame")
        as_images(frames_t[:1])  # validates the layout without converting everything to float
        y = _check_labels(labels, frames_t.shape[0])
        counts = torch.bincount(y.reshape(-1), minlength=NUM_LABELS).float()
        label_weight = torch.where(counts > 0, counts.clamp(min=1).rsqrt(), torch.zeros(()))
        label_weight = label_weight / (label_weight[y].mean())  # mean weight 1 per cell

        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = cls(hidden)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0))))
        model.train()
        with single_thread():
            for step in range(steps):
                index = torch.randint(len(y), (batch_frames,), generator=generator)
                images = degrade(as_images(frames_t[index]), generator, max_blur, max_noise)
                cells, stats = cell_inputs(images)
                logits = model(cells, stats[:, None, None, :])
                loss = F.cross_entropy(logits.reshape(-1, NUM_LABELS), y[index].reshape(-1), weight=label_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                if log_every and (step % log_every == 0 or step == steps - 1):
                    print(f"cell classifier step {step} loss {loss.item():.4f}")
        return model.eval()

    def save(self, path: str | Path) -> None:
        """Atomic write of plain tensors and ints: loadable with torch.load(weights_only=True)."""
        save_checkpoint(path, {"kind": "cell_classifier", "hidden": self.hidden, "state_dict": self.state_dict()})

    @classmethod
    def load(cls, path: str | Path) -> "CellClassifier":
        saved = load_checkpoint(path)
        if saved.get("kind") != "cell_classifier":
            raise CheckpointError(f"{path}: not a cell classifier (kind {saved.get('kind')!r})")
        model = cls(int(saved["hidden"]))
        try:
            model.load_state_dict(saved["state_dict"])
        except (RuntimeError, KeyError) as e:
            raise CheckpointError(f"{path}: cell classifier weights do not fit ({e})") from e
        return model.eval()


def retention(classifier: CellClassifier, frames: np.ndarray | torch.Tensor, labels: np.ndarray) -> dict:
    """How many cells the classifier still recognizes in `frames`, scored against the TRUE labels.

    Returns object_retention (accuracy on cells whose true label is not grass/sand/path: the
    headline), cell_accuracy (all cells), object_cells (their count), and per_label
    {name: {"accuracy", "count"}} for every label present.
    """
    y = _check_labels(labels, len(frames)).numpy()
    return _scores(classifier.predict(frames), y)


def _object_scores(predicted: np.ndarray, y: np.ndarray) -> tuple[int, float]:
    """(object cells, object retention) of predicted labels against true labels y, both (N,7,9)."""
    is_object = ~np.isin(y, BACKGROUND_LABELS)
    correct = predicted[is_object] == y[is_object]
    return int(is_object.sum()), float(correct.mean()) if correct.size else float("nan")


def _scores(predicted: np.ndarray, y: np.ndarray) -> dict:
    """`retention`'s report from predicted labels."""
    correct = predicted == y
    per_label = {}
    for label in np.unique(y):
        mask = y == label
        per_label[SEMANTIC_NAMES[label]] = {"accuracy": float(correct[mask].mean()), "count": int(mask.sum())}
    object_cells, object_retention = _object_scores(predicted, y)
    return {
        "object_retention": object_retention,
        "cell_accuracy": float(correct.mean()) if correct.size else float("nan"),
        "object_cells": object_cells,
        "per_label": per_label,
    }


def retention_by_light(classifier: CellClassifier, real: torch.Tensor, recon: torch.Tensor, labels: np.ndarray) -> dict:
    """Object retention of `recon` on the light and on the dark (`dark_frames` of `real`) frames:
    {"light"|"dark": {"frames", "object_cells", "object_retention", "real_object_retention"}}."""
    y = _check_labels(labels, len(real)).numpy()
    return _by_light(classifier.predict(recon), classifier.predict(real), y, dark_frames(real))


def _by_light(predicted: np.ndarray, predicted_real: np.ndarray, y: np.ndarray, dark: np.ndarray) -> dict:
    out = {}
    for name, pick in (("light", ~dark), ("dark", dark)):
        frames = int(pick.sum())
        if frames == 0:
            out[name] = {"frames": 0, "object_cells": 0}
            continue
        object_cells, object_retention = _object_scores(predicted[pick], y[pick])
        out[name] = {"frames": frames, "object_cells": object_cells, "object_retention": object_retention,
                     "real_object_retention": _object_scores(predicted_real[pick], y[pick])[1]}
    return out


@torch.no_grad()
def evaluate_reconstructions(real: torch.Tensor, recon: torch.Tensor, labels: np.ndarray | None = None,
                             classifier: CellClassifier | None = None, lpips_model: nn.Module | None = None,
                             batch_size: int = 256) -> dict:
    """Mean PSNR, SSIM (and LPIPS, retention when given) of reconstructions of (N,3,64,64) in [0,1].

    Keys: psnr, ssim, [lpips], and with labels and a classifier: object_retention, cell_accuracy,
    object_cells, per_label (of the reconstructions), real_object_retention (the classifier on
    the real frames: the ceiling the reconstructions are compared with) and by_light (the same on
    the light and the dark frames apart, `retention_by_light`: night is where objects get lost).
    """
    real, recon = as_images(real), as_images(recon)
    if real.shape != recon.shape:
        raise ValueError(f"real {tuple(real.shape)} and recon {tuple(recon.shape)} differ in shape")
    chunks = [(real[i: i + batch_size], recon[i: i + batch_size]) for i in range(0, len(real), batch_size)]
    result = {
        "psnr": float(torch.cat([psnr(a, b) for a, b in chunks]).mean()),
        "ssim": float(torch.cat([ssim(a, b) for a, b in chunks]).mean()),
    }
    if lpips_model is not None:
        result["lpips"] = float(torch.cat([lpips_model(a, b) for a, b in chunks]).mean())
    if classifier is not None and labels is not None:
        y = _check_labels(labels, len(real)).numpy()
        predicted, predicted_real = classifier.predict(recon), classifier.predict(real)  # once each
        result.update(_scores(predicted, y))
        result["real_object_retention"] = _object_scores(predicted_real, y)[1]
        result["by_light"] = _by_light(predicted, predicted_real, y, dark_frames(real))
    return result


def play_random(seed: int, frames: int, max_episode_steps: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    """Frames (N,64,64,3) uint8 and labels (N,7,9) from uniformly random actions in Crafter
    worlds seeded seed, seed+1, ... (one world per episode). For tests and this module's report;
    recorded episodes carry the same labels in observations.npz['semantic']."""
    rng = np.random.default_rng(seed)
    out_frames, out_labels = [], []
    episode = 0
    while len(out_frames) < frames:
        env = make_crafter_env(seed + episode, max_episode_steps)
        env.reset()
        episode += 1
        done = False
        while not done and len(out_frames) < frames:
            obs, _, done, info = env.step(int(rng.integers(env.action_space.n)))
            out_frames.append(obs)
            out_labels.append(local_semantic(info["semantic"], info["player_pos"]))
    return np.stack(out_frames), np.stack(out_labels)


def erase_objects(frames: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Copies of frames (N,64,64,3) whose non-background cells are painted over with a grass cell
    of the same frame (same lighting); frames without grass are left as they are."""
    out = frames.copy()
    grass = SEMANTIC_NAMES.index("grass")
    for i in range(len(frames)):
        grass_cells = np.argwhere(labels[i] == grass)
        if len(grass_cells) == 0:
            continue
        gr, gc = grass_cells[0] * CELL_PX
        patch = frames[i, gr: gr + CELL_PX, gc: gc + CELL_PX]
        for r, c in np.argwhere(~np.isin(labels[i], BACKGROUND_LABELS)):
            out[i, r * CELL_PX: (r + 1) * CELL_PX, c * CELL_PX: (c + 1) * CELL_PX] = patch
    return out


def blur(frames: np.ndarray, factor: int = 4) -> np.ndarray:
    """Frames (N,64,64,3) uint8 average-pooled by `factor` and upsampled back (nearest)."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="nearest")
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Fit the cell classifier on random play and report held-out accuracy.")
    parser.add_argument("--fit-frames", type=int, default=20_000)
    parser.add_argument("--heldout-frames", type=int, default=3_000)
    parser.add_argument("--fit-seed", type=int, default=0)
    parser.add_argument("--heldout-seed", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--cache", default="", help="npz to read/write the played frames (saves replaying)")
    args = parser.parse_args()
    cache = Path(args.cache) if args.cache else None
    if cache and cache.is_file():
        data = np.load(cache)
        fit_frames, fit_labels, held_frames, held_labels = (data[k] for k in ("ff", "fl", "hf", "hl"))
    else:
        start = time.perf_counter()
        fit_frames, fit_labels = play_random(args.fit_seed, args.fit_frames)
        held_frames, held_labels = play_random(args.heldout_seed, args.heldout_frames)
        print(f"played {len(fit_frames) + len(held_frames)} frames in {time.perf_counter() - start:.1f}s")
        if cache:
            np.savez_compressed(cache, ff=fit_frames, fl=fit_labels, hf=held_frames, hl=held_labels)
    start = time.perf_counter()
    clf = CellClassifier.fit(fit_frames, fit_labels, seed=0, steps=args.steps, log_every=100)
    fit_s = time.perf_counter() - start
    report = {"fit_frames": len(fit_frames), "heldout_frames": len(held_frames), "fit_s": round(fit_s, 1)}
    for name, frames in (("real", held_frames), ("blur4", blur(held_frames)),
                         ("erased", erase_objects(held_frames, held_labels))):
        r = retention(clf, frames, held_labels)
        report[name] = {"object_retention": round(r["object_retention"], 4), "cell_accuracy": round(r["cell_accuracy"], 4),
                        "per_label": {k: [round(v["accuracy"], 3), v["count"]] for k, v in r["per_label"].items()}}
    report["train_object_retention"] = round(retention(clf, fit_frames[:3000], fit_labels[:3000])["object_retention"], 4)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

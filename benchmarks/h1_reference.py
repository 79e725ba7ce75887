"""What per-frame PSNR one frame ahead (h = 1) can a prediction decoded through a tokenizer reach?

    python benchmarks/h1_reference.py --checkpoint TOKENIZER.pt --data HELDOUT_CRAFTER [--pairs-per-episode 70]

`dreamerv4 eval dynamics` scores the world model against copying the last real frame. At h = 1 that
copy is hard to beat in mean per-frame PSNR: most Crafter frames barely change, the copy scores up to
the 50 dB cap there, and every prediction of the world model passes through the tokenizer's decoder.
This benchmark bounds the question without a world model. On random held-out frame pairs (t, t+1)
it scores, against frame t+1 (PSNR per frame, capped at 50 dB as in `eval dynamics`):

  copy                 frame t (the baseline of `eval dynamics`)
  shift_copy           frame t with its world area shifted by the player's true movement, read from
                       the recorded semantic maps (an oracle for the action's effect), the player's
                       tile kept at the centre; the strip of world that comes into view keeps frame
                       t's pixels
  *_via_tokenizer      the same frames encoded and decoded: the best a latent predictor that got
                       exactly that frame could score through this tokenizer
  tokenizer_ceiling    frame t+1 itself encoded and decoded (a perfect latent prediction)

each over all pairs and over the pairs where the view moved or stayed. Writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from dreamerv4.data.crafter_layout import CELL_PX, GRID_COLS, GRID_ROWS
from dreamerv4.data.episodes import find_episodes, load_frames, load_observations
from dreamerv4.evaluation.cells import as_images
from dreamerv4.evaluation.dynamics import PSNR_CAP
from dreamerv4.evaluation.metrics import psnr
from dreamerv4.evaluation.tokenizer import reconstruct
from dreamerv4.training.stages import load_tokenizer

RESULTS = Path(__file__).parent / "results" / "h1_reference.json"
MOVES = ((0, 1), (0, -1), (1, 0), (-1, 0))  # (rows, cols) the player moved by


def player_move(before: np.ndarray, after: np.ndarray, margin: float = 0.05) -> tuple[int, int]:
    """The one-cell move (or (0, 0)) under which the semantic map `before` (7,9) best matches `after`."""
    best, score = (0, 0), float((before == after).mean())
    for dy, dx in MOVES:  # moving by (dy, dx) shifts the view's content by (-dy, -dx)
        a = before[max(dy, 0): GRID_ROWS + min(dy, 0), max(dx, 0): GRID_COLS + min(dx, 0)]
        b = after[max(-dy, 0): GRID_ROWS + min(-dy, 0), max(-dx, 0): GRID_COLS + min(-dx, 0)]
        if (a == b).mean() > score + margin:
            best, score = (dy, dx), float((a == b).mean())
    return best


def shift_world(frame: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Frame (64,64,3) with its world area moved as the view moves when the player steps (dy, dx);
    the player's own tile stays where the view keeps it, at the centre."""
    out = frame.copy()
    h, w, y, x = GRID_ROWS * CELL_PX, GRID_COLS * CELL_PX, dy * CELL_PX, dx * CELL_PX
    out[max(-y, 0): h + min(-y, 0), max(-x, 0): w + min(-x, 0)] = \
        frame[max(y, 0): h + min(y, 0), max(x, 0): w + min(x, 0)]
    row, col = GRID_ROWS // 2 * CELL_PX, GRID_COLS // 2 * CELL_PX
    out[row: row + CELL_PX, col: col + CELL_PX] = frame[row: row + CELL_PX, col: col + CELL_PX]
    return out


def sample_pairs(root: str, per_episode: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Frames t, frames t+1, frames t shifted by the move (N,64,64,3) uint8, and whether the view moved (N,)."""
    rng = np.random.default_rng(seed)
    before, after, moves = [], [], []
    for episode in find_episodes(root):
        frames, semantic = load_frames(episode), load_observations(episode, ("semantic",))["semantic"]
        for t in rng.choice(len(frames) - 1, size=min(per_episode, len(frames) - 1), replace=False):
            before.append(frames[t])
            after.append(frames[t + 1])
            moves.append(player_move(semantic[t], semantic[t + 1]))
    shifted = np.stack([shift_world(f, *m) for f, m in zip(before, moves)])
    moved = np.array([m != (0, 0) for m in moves])
    return np.stack(before), np.stack(after), shifted, moved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a `dreamerv4 train tokenizer` checkpoint")
    parser.add_argument("--data", required=True, help="held-out Crafter episodes (with semantic maps)")
    parser.add_argument("--pairs-per-episode", type=int, default=70)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer, _ = load_tokenizer(args.checkpoint)
    before, after, shifted, moved = sample_pairs(args.data, args.pairs_per_episode, args.seed)

    def through_tokenizer(images: torch.Tensor) -> torch.Tensor:
        return reconstruct(tokenizer, images[:, None], batch=256)[:, 0]

    target = as_images(after)
    candidates = {"copy": as_images(before), "shift_copy": as_images(shifted)}
    candidates.update({f"{k}_via_tokenizer": through_tokenizer(v) for k, v in list(candidates.items())})
    candidates["tokenizer_ceiling"] = through_tokenizer(target)
    result = {"checkpoint": str(args.checkpoint), "data": str(args.data), "pairs": len(target),
              "moved_share": float(moved.mean()), "psnr_cap": PSNR_CAP, "psnr": {}}
    for name, frames in candidates.items():
        scores = psnr(target, frames).clamp(max=PSNR_CAP).double().numpy()
        result["psnr"][name] = {"all": scores.mean(), "moved": scores[moved].mean(), "still": scores[~moved].mean()}
        print(f"{name:28s} all {scores.mean():6.2f} dB   moved {scores[moved].mean():6.2f}   "
              f"still {scores[~moved].mean():6.2f}", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{len(target)} pairs, the view moved in {moved.mean():.0%}; wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

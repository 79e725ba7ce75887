"""Where Crafter draws the world in a 64x64 frame, and what the semantic labels mean.

Crafter (view 9x9, size 64) draws a 9-wide x 7-tall grid of world cells, 7x7 pixels each, at
pixels [0:49, 0:63] (row-major, y down), and the inventory in the two rows below. The player is
the centre cell (row 3, col 4). `info['semantic']` is the whole 64x64 world indexed [x, y];
`local_semantic` cuts out the visible 7x9 window so labels line up with the frame's cells;
`dark_frames` tells the frames of night and sleep (a desaturated view) from the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

CELL_PX = 7
GRID_ROWS = 7
GRID_COLS = 9
# Crafter's semantic ids: materials 0..12, then objects 13..18 (crafter.engine.SemanticView).
SEMANTIC_NAMES = (
    "unknown", "water", "grass", "stone", "path", "sand", "tree", "lava", "coal", "iron", "diamond",
    "table", "furnace", "player", "cow", "zombie", "skeleton", "arrow", "plant",
)
NUM_LABELS = len(SEMANTIC_NAMES)
# Ground the agent walks on: retention is measured on every other label (trees, cows, water...).
BACKGROUND_LABELS = tuple(SEMANTIC_NAMES.index(n) for n in ("grass", "sand", "path"))


def local_semantic(semantic: np.ndarray, player_pos) -> np.ndarray:
    """(GRID_ROWS, GRID_COLS) uint8 labels of the visible cells; cells off the world map are 0."""
    x0 = int(player_pos[0]) - GRID_COLS // 2
    y0 = int(player_pos[1]) - GRID_ROWS // 2
    out = np.zeros((GRID_ROWS, GRID_COLS), np.uint8)
    w, h = semantic.shape
    for r in range(GRID_ROWS):
        y = y0 + r
        if not 0 <= y < h:
            continue
        for c in range(GRID_COLS):
            x = x0 + c
            if 0 <= x < w:
                out[r, c] = semantic[x, y]
    return out


def cell_patches(frames: np.ndarray) -> np.ndarray:
    """(..., 64, 64, 3) frames -> (..., GRID_ROWS, GRID_COLS, CELL_PX, CELL_PX, 3) world-cell crops."""
    lead = frames.shape[:-3]
    world = frames[..., : GRID_ROWS * CELL_PX, : GRID_COLS * CELL_PX, :]
    world = world.reshape(*lead, GRID_ROWS, CELL_PX, GRID_COLS, CELL_PX, frames.shape[-1])
    return np.moveaxis(world, -3, -4).copy()


# Crafter's night (and sleep) desaturates the view: mean over the world area of each pixel's
# max - min channel. Day frames of the recorded held-out episodes: median 0.43; night ones < 0.2.
DARK_SATURATION = 0.2


def dark_frames(images: torch.Tensor) -> np.ndarray:
    """(N,) bool: real frames (N,3,64,64) in [0,1] whose world area is desaturated (night or sleep)."""
    world = images[:, :, : GRID_ROWS * CELL_PX, : GRID_COLS * CELL_PX]
    saturation = (world.amax(dim=1) - world.amin(dim=1)).mean(dim=(1, 2))
    return (saturation < DARK_SATURATION).numpy()

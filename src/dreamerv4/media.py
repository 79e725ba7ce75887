"""Pictures and videos of frames, shared by training (image hooks), evaluation and play.

    grid = image_grid(frames, ncols=8)            # (N, 3, H, W) float in [0, 1] or (N, H, W, 3) uint8 -> (H', W', 3) uint8
    save_png("out/recon.png", grid)
    paths = write_side_by_side("out/rollout", [real, imagined], fps=4, scale=2)
    # real, imagined: (N, T, 3, H, W) float in [0, 1] (or (T, 3, H, W), or uint8 (..., H, W, 3));
    # each video frame shows the N sequences as rows and the panels as columns.
    paths["gif"], paths["mp4"]   # Path, and Path or None when no MP4 encoder is available

Frames may carry a coloured border per panel (`borders`), e.g. to mark which frames are real
context and which are imagined. Pillow merges identical consecutive GIF frames into one longer
frame; the playback time stays T / fps. MP4 needs imageio-ffmpeg; without it only the GIF is written.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

PAD = 2  # white pixels between panels and rows


def as_uint8_frames(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, T, H, W, 3) uint8 from (N, T, 3, H, W) / (N, T, H, W, 3) float in [0, 1] or uint8;
    a (T, ...) sequence becomes N = 1."""
    array = frames.detach().float().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.ndim == 4:
        array = array[None]
    if array.ndim != 5:
        raise ValueError(f"expected frames (N, T, 3, H, W) or (T, 3, H, W), got shape {array.shape}")
    if array.shape[2] == 3 and array.shape[-1] != 3:
        array = array.transpose(0, 1, 3, 4, 2)
    if array.shape[-1] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return array


def tile_panels(panels: Sequence[torch.Tensor | np.ndarray], scale: int = 1,
                borders: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
    """Video frames (T, H', W', 3) uint8: sequence n of every panel side by side in row n.

    panels: each (N, T, ...) as `as_uint8_frames` takes; all the same N, T, H, W. scale: nearest-
    neighbour upscaling. borders: per panel None or (T, 3) uint8 colours of a 1-pixel frame border
    (per time step), drawn inside the panel.
    """
    if not panels:
        raise ValueError("tile_panels needs at least one panel")
    arrays = [as_uint8_frames(p) for p in panels]
    shape = arrays[0].shape
    for a in arrays[1:]:
        if a.shape != shape:
            raise ValueError(f"panels differ in shape: {shape} and {a.shape}")
    n, t, h, w, _ = shape
    if scale > 1:
        arrays = [a.repeat(scale, axis=2).repeat(scale, axis=3) for a in arrays]
        h, w = h * scale, w * scale
    for a, colours in zip(arrays, borders or [None] * len(arrays)):
        if colours is not None:
            colours = np.asarray(colours, dtype=np.uint8).reshape(t, 1, 3)  # broadcasts over (N, T, W or H, 3)
            a[:, :, 0], a[:, :, -1], a[:, :, :, 0], a[:, :, :, -1] = colours, colours, colours, colours
    cols = len(arrays)
    video = np.full((t, n * (h + PAD) + PAD, cols * (w + PAD) + PAD, 3), 255, dtype=np.uint8)
    for c, a in enumerate(arrays):
        for r in range(n):
            top, left = PAD + r * (h + PAD), PAD + c * (w + PAD)
            video[:, top: top + h, left: left + w] = a[r]
    return video


def write_gif(path: str | Path, video: np.ndarray, fps: float = 4.0) -> Path:
    """Write frames (T, H, W, 3) uint8 as a looping GIF (atomic: temp file, then rename)."""
    path = Path(path)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or len(video) == 0:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames with T >= 1, got {video.shape} {video.dtype}")
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(frame) for frame in video]
    tmp = path.with_name(f".{path.name}.tmp")
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=int(round(1000 / fps)),
                   loop=0)
    tmp.replace(path)
    return path


def write_mp4(path: str | Path, video: np.ndarray, fps: float = 4.0) -> Path | None:
    """Write frames (T, H, W, 3) uint8 as H.264 MP4 with imageio-ffmpeg; None (and a note on stderr)
    when no encoder is available. Odd sizes are padded with white to even ones (yuv420p needs it)."""
    path = Path(path)
    try:
        import imageio_ffmpeg
    except ImportError:
        print(f"{path}: MP4 skipped (imageio-ffmpeg is not installed)", file=sys.stderr)
        return None
    t, h, w, _ = video.shape
    padded = np.full((t, h + h % 2, w + w % 2, 3), 255, dtype=np.uint8)
    padded[:, :h, :w] = video
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    try:
        writer = imageio_ffmpeg.write_frames(str(tmp), (padded.shape[2], padded.shape[1]), fps=fps, codec="libx264",
                                             pix_fmt_out="yuv420p", macro_block_size=1, quality=8,
                                             output_params=["-loglevel", "error"])
        writer.send(None)
        for frame in padded:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        tmp.replace(path)
    except Exception as exc:  # a missing or broken ffmpeg binary: the GIF still carries the video
        tmp.unlink(missing_ok=True)
        print(f"{path}: MP4 skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None
    return path


def write_side_by_side(stem: str | Path, panels: Sequence[torch.Tensor | np.ndarray], fps: float = 4.0,
                       scale: int = 1, borders: Sequence[np.ndarray | None] | None = None,
                       mp4: bool = True) -> dict[str, Path | None]:
    """`tile_panels` written to <stem>.gif (and <stem>.mp4 when `mp4` and an encoder works).
    Returns {"gif": path, "mp4": path or None}."""
    stem = Path(stem)
    video = tile_panels(panels, scale=scale, borders=borders)
    gif = write_gif(stem.with_suffix(".gif"), video, fps)
    return {"gif": gif, "mp4": write_mp4(stem.with_suffix(".mp4"), video, fps) if mp4 else None}


def context_borders(context: int, total: int, real=(40, 160, 40), imagined=(200, 40, 40)) -> np.ndarray:
    """(total, 3) uint8 border colours: green for the first `context` (real) steps, red after them."""
    colours = np.empty((total, 3), dtype=np.uint8)
    colours[:context], colours[context:] = real, imagined
    return colours


def image_grid(images: torch.Tensor | np.ndarray, ncols: int = 8, pad: int = 2) -> np.ndarray:
    """Tile images (N, 3, H, W) or (N, H, W, 3), float in [0, 1] or uint8, into one (H', W', 3) uint8 grid."""
    array = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.ndim != 4:
        raise ValueError(f"image_grid expects 4 dims (N, C, H, W) or (N, H, W, C), got shape {array.shape}")
    if array.shape[1] == 3 and array.shape[-1] != 3:
        array = array.transpose(0, 2, 3, 1)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    n, h, w, c = array.shape
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = array[i]
    return grid


def save_png(path: str | Path, image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 array as PNG, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path)

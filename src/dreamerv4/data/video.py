"""Decode recordings (mp4) into (T, 64, 64, 3) uint8 frames with ffmpeg (through imageio_ffmpeg).

Shared by the converters (dreamerv4.data.minerl_convert, dreamerv4.data.vpt_convert); not a command.
A source already at 64x64 (MineRL v0.4) is read as is; any other size is resized to 64x64 inside ffmpeg
with its `area` filter (each output pixel is the mean of the source pixels it covers, so 640x360 VPT
frames are averaged, not aliased, and the 16:9 picture is squashed to the square, as VPT's own loader does).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dreamerv4.data.episodes import FRAME_SHAPE
from dreamerv4.errors import DataError

RESIZE_FILTER = f"scale={FRAME_SHAPE[1]}:{FRAME_SHAPE[0]}:flags=area"


class _ResizeNotice(logging.Filter):
    """imageio_ffmpeg warns on every resized read that output and source sizes differ: that is the point."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is different from the source frame size" not in record.getMessage()


logging.getLogger("imageio_ffmpeg").addFilter(_ResizeNotice())


def read_video(path: str | Path, skip: int = 0, keep: int | None = None, resize: bool = False) -> tuple[np.ndarray, int]:
    """Frames skip .. skip+keep-1 (all from `skip` when keep is None) as (n, 64, 64, 3) uint8, and the
    number of frames decoded. resize=False requires a 64x64 source; resize=True scales any size to 64x64.
    DataError naming the file when it is missing, undecodable or has fewer than skip + keep frames."""
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: missing")
    kept: list[np.ndarray] = []
    decoded = 0
    try:
        reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24",
                                            output_params=["-vf", RESIZE_FILTER] if resize else None)
        meta = next(reader)
        width, height = meta["size"]
        if not resize and (height, width, 3) != FRAME_SHAPE:
            raise DataError(f"{path}: frames are {width}x{height}, expected 64x64 (MineRL v0.4 data)")
        for raw in reader:
            if decoded >= skip and (keep is None or decoded < skip + keep):
                kept.append(np.frombuffer(raw, np.uint8).reshape(FRAME_SHAPE))
            decoded += 1
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot decode ({type(exc).__name__}: {str(exc).strip().splitlines()[-1:]})") from exc
    if keep is not None and decoded < skip + keep:
        raise DataError(f"{path}: {decoded} frames decoded, need {skip + keep} "
                        f"({skip} leading frames + {keep} steps)")
    frames = np.stack(kept) if kept else np.empty((0, *FRAME_SHAPE), np.uint8)
    return frames, decoded

"""Side-by-side videos (src/dreamerv4/media.py): layout, GIF frames and timing, MP4.

    pytest tests/test_media.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from dreamerv4.media import PAD, context_borders, tile_panels, write_gif, write_side_by_side


def distinct_frames(n: int, t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, t, 3, 16, 16, generator=g)


def test_panels_are_tiled_side_by_side_with_rows_per_sequence():
    real, imagined = distinct_frames(2, 5, 0), distinct_frames(2, 5, 1)
    video = tile_panels([real, imagined], scale=2)
    assert video.shape == (5, 2 * (32 + PAD) + PAD, 2 * (32 + PAD) + PAD, 3) and video.dtype == np.uint8
    expected = (real[1, 3].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8).repeat(2, 0).repeat(2, 1)
    top, left = PAD + (32 + PAD), PAD  # row 1 (second sequence), column 0 (real)
    assert np.array_equal(video[3, top: top + 32, left: left + 32], expected)
    bordered = tile_panels([real, imagined], borders=[None, context_borders(2, 5)])
    left = PAD + 16 + PAD
    assert (bordered[1, PAD, left] == (40, 160, 40)).all() and (bordered[4, PAD, left] == (200, 40, 40)).all()
    with pytest.raises(ValueError, match="differ in shape"):
        tile_panels([real, imagined[:, :4]])


def test_gif_is_valid_with_every_frame_and_mp4_has_them_too(tmp_path):
    panels = [distinct_frames(3, 7, 0), distinct_frames(3, 7, 1)]
    paths = write_side_by_side(tmp_path / "out" / "rollout", panels, fps=5)
    with Image.open(paths["gif"]) as gif:
        assert gif.format == "GIF" and gif.n_frames == 7
        frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(gif)]
    assert frames[0].shape == (3 * (16 + PAD) + PAD, 2 * (16 + PAD) + PAD, 3)
    assert not np.array_equal(frames[0], frames[1])
    if paths["mp4"] is not None:  # imageio-ffmpeg is a dependency; only a broken binary returns None
        import imageio_ffmpeg

        assert imageio_ffmpeg.count_frames_and_secs(str(paths["mp4"]))[0] == 7


def test_identical_frames_keep_the_playback_time(tmp_path):
    still = np.zeros((4, 8, 8, 3), np.uint8)
    path = write_gif(tmp_path / "still.gif", still, fps=4)
    with Image.open(path) as gif:
        assert sum(f.info["duration"] for f in ImageSequence.Iterator(gif)) == 4 * 250
    with pytest.raises(ValueError):
        write_gif(tmp_path / "bad.gif", still.astype(np.float32))

"""MineRL v0.4 conversion on small fake episodes in the official layout (mp4 + rendered.npz + metadata.json)."""

from __future__ import annotations

import json
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from dreamerv4.actions import KEYS, get_action_space
from dreamerv4.cli import main
from dreamerv4.data.episodes import load_actions, load_frames, load_observations, load_rewards, validate_root
from dreamerv4.data.minerl_convert import convert_episode
from dreamerv4.errors import DataError

LEVEL_STEP = 12  # each video frame is one flat grey level, so its index survives lossy coding


def frame_level(index: int) -> int:
    return 10 + LEVEL_STEP * index


def frame_index(frame: np.ndarray) -> int:
    return int(round((float(frame.mean()) - 10) / LEVEL_STEP))


def make_minerl_episode(folder: Path, steps: int = 12, leading: int = 3, seed: int = 0) -> dict:
    """A fake MineRL v0.4 folder: `leading` frames before the experiment, then steps + 1 state frames."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    video_frames = leading + steps + 1
    writer = imageio_ffmpeg.write_frames(str(folder / "recording.mp4"), (64, 64), fps=20, macro_block_size=1)
    writer.send(None)
    for i in range(video_frames):
        writer.send(np.full((64, 64, 3), frame_level(i), np.uint8).tobytes())
    writer.close()
    rendered = {f"action${k}": rng.integers(0, 2, steps).astype(np.int64) for k in KEYS}
    camera = rng.uniform(-8, 8, (steps, 2)).astype(np.float32)
    camera[1] = [0.0, 45.0]  # beyond +-10: clipped and counted
    rendered["action$camera"] = camera
    craft = np.array(["none"] * steps, dtype="<U14")
    craft[2], craft[4] = "planks", "stick"
    place = np.array(["none"] * steps, dtype="<U14")
    place[4], place[5] = "crafting_table", "dirt"  # step 4: two item actions; dirt: unrepresentable
    rendered.update({"action$craft": craft, "action$place": place,
                     "action$equip": np.array(["none"] * steps), "action$nearbyCraft": np.array(["none"] * steps),
                     "action$nearbySmelt": np.array(["none"] * steps)})
    rendered["reward"] = rng.choice([0.0, 1.0, 2.0], steps)
    rendered["observation$inventory$log"] = np.arange(steps + 1, dtype=np.int64)
    rendered["observation$equipped_items.mainhand.type"] = np.array(["none"] * (steps + 1))
    np.savez(folder / "rendered.npz", **rendered)
    (folder / "metadata.json").write_text(json.dumps({"true_video_frame_count": video_frames, "success": False,
                                                       "duration_steps": steps, "stream_name": folder.name}))
    return rendered


def test_convert_aligns_frames_actions_rewards_like_minerls_loader(tmp_path, capsys):
    rendered = make_minerl_episode(tmp_path / "src" / "v3_fake_stream", steps=12, leading=3)
    assert main(["data", "convert-minerl", str(tmp_path / "src" / "v3_fake_stream"), str(tmp_path / "dst")]) == 0
    out = capsys.readouterr().out
    assert "12 steps (3 leading frames dropped" in out and "unknown items: place:dirt 1" in out
    episode = tmp_path / "dst" / "v3_fake_stream"
    frames = load_frames(episode)
    # The first 3 video frames are dropped; frames[t] is video frame 3 + t; the final state is dropped.
    assert [frame_index(f) for f in frames] == [3 + t for t in range(12)]
    actions = load_actions(episode)
    for key, value in rendered.items():
        if key.startswith("action$"):
            np.testing.assert_array_equal(actions[key], value)
    np.testing.assert_array_equal(load_rewards(episode), rendered["reward"].astype(np.float32))
    observations = load_observations(episode)
    np.testing.assert_array_equal(observations["observation$inventory$log"], np.arange(12))
    assert observations["observation$equipped_items.mainhand.type"].shape == (12,)

    summary = validate_root(tmp_path / "dst")
    assert summary["problems"] == [] and summary["action_space"] == "minerl"
    assert summary["unrepresentable"]["camera_clipped"] == 1
    assert summary["unrepresentable"]["multiple_item_actions"] == 1
    assert summary["unrepresentable"]["unrepresentable_items"] == {"place:dirt": 1}
    codes, _ = get_action_space("minerl").codes_from_actions(actions)
    assert len(np.unique(codes)) > 6


def test_folder_of_episodes_and_overwrite_rules(tmp_path, capsys):
    make_minerl_episode(tmp_path / "src" / "a", steps=6, leading=0, seed=1)
    make_minerl_episode(tmp_path / "src" / "b", steps=7, leading=2, seed=2)
    assert main(["data", "convert-minerl", str(tmp_path / "src"), str(tmp_path / "dst")]) == 0
    assert [len(load_frames(tmp_path / "dst" / n)) for n in ("a", "b")] == [6, 7]
    before = load_frames(tmp_path / "dst" / "a").copy()
    capsys.readouterr()
    assert main(["data", "convert-minerl", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    assert "dst/a: episode already exists" in capsys.readouterr().err
    np.testing.assert_array_equal(load_frames(tmp_path / "dst" / "a"), before)
    assert main(["data", "convert-minerl", str(tmp_path / "src"), str(tmp_path / "dst"), "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["a", "b"]


def test_bad_episodes_are_reported_by_file(tmp_path, capsys):
    make_minerl_episode(tmp_path / "src" / "good", steps=6, leading=1)
    short = tmp_path / "src" / "short_video"
    make_minerl_episode(short, steps=6, leading=1)
    (short / "metadata.json").write_text(json.dumps({"true_video_frame_count": 40}))  # claims 33 leading frames
    assert main(["data", "convert-minerl", str(tmp_path / "src"), str(tmp_path / "dst")]) == 1
    out = capsys.readouterr().out
    assert "failed: " in out and "short_video/recording.mp4: 8 frames decoded, need 39" in out
    assert (tmp_path / "dst" / "good").is_dir() and not (tmp_path / "dst" / "short_video").exists()

    broken = tmp_path / "broken"
    make_minerl_episode(broken, steps=6, leading=1)
    (broken / "metadata.json").write_text(json.dumps({"true_video_frame_count": 3}))
    with pytest.raises(DataError, match="metadata.json: true_video_frame_count 3 is less than the 7 states"):
        convert_episode(broken, tmp_path / "out")
    (broken / "metadata.json").write_text("{}")
    with pytest.raises(DataError, match="metadata.json: no readable true_video_frame_count"):
        convert_episode(broken, tmp_path / "out")
    (broken / "metadata.json").write_text(json.dumps({"true_video_frame_count": 8}))
    arrays = dict(np.load(broken / "rendered.npz"))
    arrays["action$camera"][0, 0] = np.nan
    np.savez(broken / "rendered.npz", **arrays)
    with pytest.raises(DataError, match="rendered.npz: action\\$camera: 1 steps are NaN or inf"):
        convert_episode(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_object_enum_columns_are_stored_as_plain_strings(tmp_path):
    src = tmp_path / "src"
    make_minerl_episode(src, steps=6, leading=0)
    arrays = dict(np.load(src / "rendered.npz"))
    arrays["action$craft"] = arrays["action$craft"].astype(object)  # readable only with pickle
    np.savez(src / "rendered.npz", **arrays)
    convert_episode(src, tmp_path / "dst")
    craft = load_actions(tmp_path / "dst")["action$craft"]  # loaded with allow_pickle=False
    assert craft.dtype.kind == "U" and list(craft[[2, 4]]) == ["planks", "stick"]

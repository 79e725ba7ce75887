"""VPT contractor conversion on small fake recordings in the published layout (640x360 mp4 + jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from dreamerv4.actions import ITEM_ACTIONS, KEYS, get_action_space
from dreamerv4.cli import main
from dreamerv4.data.episodes import load_actions, load_frames, load_observations, load_rewards, validate_root
from dreamerv4.data.vpt_convert import convert_vpt

LEVEL_STEP = 12  # each video frame is one flat grey level, so its index survives lossy coding and resizing


def frame_index(frame: np.ndarray) -> int:
    return int(round((float(frame.mean()) - 10) / LEVEL_STEP))


def write_video(path: Path, frames: list[np.ndarray]) -> None:
    height, width = frames[0].shape[:2]
    writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=20, macro_block_size=1)
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame).tobytes())
    writer.close()


def tick(keys=(), dx=0.0, dy=0.0, buttons=(), new_buttons=(), gui=False, hotbar=0) -> dict:
    return {"mouse": {"x": 640.0, "y": 360.0, "dx": dx, "dy": dy, "buttons": list(buttons),
                      "newButtons": list(new_buttons)},
            "keyboard": {"keys": [f"key.keyboard.{k}" for k in keys], "newKeys": []},
            "isGuiOpen": gui, "hotbar": hotbar, "yaw": 0.0, "pitch": 0.0}


TICKS = [
    tick(buttons=[0], new_buttons=[0]),      # 0: attack held since before the recording: stuck, dropped
    tick(keys=["w"], buttons=[0]),           # 1: still stuck (no new press)
    tick(keys=["w", "space"], dx=20.0),      # 2: yaw 3 deg
    tick(buttons=[0], new_buttons=[0]),      # 3: attack pressed anew: kept from here on
    tick(keys=["e"], dy=-100.0, gui=True),   # 4: inventory key; pitch -15 deg (clipped); GUI open
    tick(buttons=[1], gui=True),             # 5: use (right button); GUI open
    tick(keys=["left.shift", "d"], hotbar=2),  # 6: hotbar slot change to 3
    tick(hotbar=2),                          # 7: null tick, kept (the slot stays 3)
    tick(keys=["left.control", "s", "a"], dx=-3.0, dy=4.0, hotbar=2),  # 8
    tick(keys=["q"], buttons=[0], hotbar=2),  # 9: drop; attack
]
EXPECTED_KEYS = {  # tick -> keys pressed after conversion
    0: set(), 1: {"forward"}, 2: {"forward", "jump"}, 3: {"attack"}, 4: set(), 5: set(),
    6: {"sneak", "right"}, 7: set(), 8: {"sprint", "back", "left"}, 9: {"attack"},
}


def make_recording(folder: Path, name: str, ticks: list[dict] = TICKS, frames: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    count = len(ticks) if frames is None else frames
    write_video(folder / f"{name}.mp4", [np.full((360, 640, 3), 10 + LEVEL_STEP * i, np.uint8) for i in range(count)])
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(t) + "\n" for t in ticks))
    return folder / f"{name}.mp4"


def test_actions_camera_bins_and_frames_match_the_jsonl(tmp_path, capsys):
    make_recording(tmp_path / "src" / "batch0", "Player1-abc-20210723")
    assert main(["data", "convert-vpt", str(tmp_path / "src"), str(tmp_path / "dst"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "10 steps (2 with the GUI open" in out and "stuck-attack ticks dropped 2" in out
    episode = tmp_path / "dst" / "batch0" / "Player1-abc-20210723"
    assert [frame_index(f) for f in load_frames(episode)] == list(range(10))  # frames[t] <-> jsonl line t
    actions = load_actions(episode)
    for t, expected in EXPECTED_KEYS.items():
        assert {k for k in KEYS if actions[f"action${k}"][t]} == expected, t
    scale = 360 / 2400
    expected_camera = [[TICKS[t]["mouse"]["dy"] * scale, TICKS[t]["mouse"]["dx"] * scale] for t in range(10)]
    np.testing.assert_allclose(actions["action$camera"], expected_camera, rtol=1e-6)
    np.testing.assert_array_equal(load_rewards(episode), np.zeros(10, np.float32))

    space = get_action_space("minerl")
    codes, report = space.codes_from_actions(actions)
    camera_class = space.unpack(codes)["camera"]
    # mu-law bins (0..10, 5 = still): yaw +3 deg -> 8; pitch -15 deg clipped to the edge -> 0; pitch +0.6, yaw -0.45 -> 6, 4.
    assert camera_class[2] == 5 * 11 + 8 and camera_class[4] == 0 * 11 + 5 and camera_class[8] == 6 * 11 + 4
    assert camera_class[0] == 60 and report.camera_clipped == 1
    assert (space.unpack(codes)["item"] == ITEM_ACTIONS.index("none")).all()

    np.testing.assert_array_equal(actions["vpt$use"], [0, 0, 0, 0, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(actions["vpt$hotbar"], [0, 0, 0, 0, 0, 0, 3, 0, 0, 0])
    observations = load_observations(episode)
    np.testing.assert_array_equal(np.flatnonzero(observations["vpt$isGuiOpen"]), [4, 5])

    summary = validate_root(tmp_path / "dst")
    assert summary["problems"] == []
    assert convert_vpt(tmp_path / "src", tmp_path / "again", progress=False)["unrepresentable"] == {
        "steps": 10, "camera_clipped": 1, "multiple_item_actions": 0,
        "unrepresentable_items": {"drop": 1, "hotbar.3": 1, "inventory": 1, "use": 1}, "total": 5}


def test_resize_averages_the_whole_frame_into_64x64(tmp_path):
    frame = np.zeros((360, 640, 3), np.uint8)
    frame[180:] = 200  # bottom half bright
    frame[:, :320, 0] = 0
    (tmp_path / "src").mkdir()
    write_video(tmp_path / "src" / "r.mp4", [frame, frame])
    (tmp_path / "src" / "r.jsonl").write_text(json.dumps(tick()) + "\n" + json.dumps(tick()) + "\n")
    convert_vpt(tmp_path / "src", tmp_path / "dst", progress=False)
    out = load_frames(tmp_path / "dst" / "r")[0].astype(int)
    assert out.shape == (64, 64, 3)
    assert out[:30].mean() < 8 and abs(out[34:, :, 1].mean() - 200) < 8  # rows keep their half (squashed 16:9)
    assert out[34:, 34:, 0].mean() > 190 and out[34:, :30, 0].mean() < 10  # columns too


def test_bad_inputs_name_file_and_line_and_others_still_convert(tmp_path, capsys):
    src = tmp_path / "src"
    make_recording(src, "good")
    bad_json = make_recording(src, "badline")
    lines = bad_json.with_suffix(".jsonl").read_text().splitlines()
    lines[2] = lines[2][:-5]  # truncated JSON on line 3
    bad_json.with_suffix(".jsonl").write_text("\n".join(lines) + "\n")
    missing_field = make_recording(src, "nofield")
    broken = dict(TICKS[0], mouse={"dy": 0, "buttons": []})
    missing_field.with_suffix(".jsonl").write_text(json.dumps(TICKS[0]) + "\n" + json.dumps(broken) + "\n")
    (src / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    (src / "corrupt.jsonl").write_text(json.dumps(tick()) + "\n")
    make_recording(src, "nojsonl").with_suffix(".jsonl").unlink()

    assert main(["data", "convert-vpt", str(src), str(tmp_path / "dst"), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert f"failed: {src / 'badline.jsonl'}:3: not valid JSON" in out
    assert f"failed: {src / 'nofield.jsonl'}:2: no mouse.dx" in out
    assert f"failed: {src / 'corrupt.mp4'}: cannot decode" in out
    assert f"failed: {src / 'nojsonl.jsonl'}: missing" in out
    assert "converted 1 recording(s), 10 steps" in out
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["good"]


def test_resume_skips_converted_recordings_and_overwrite_redoes_them(tmp_path, capsys):
    src = tmp_path / "src"
    make_recording(src, "a")
    make_recording(src, "b", frames=12)  # video longer than the jsonl: the jsonl decides
    assert main(["data", "convert-vpt", str(src), str(tmp_path / "dst"), "--workers", "1"]) == 0
    assert "video 12 frames vs jsonl 10 ticks: kept 10" in capsys.readouterr().out
    marker = tmp_path / "dst" / "a" / "frames.npy"
    before = marker.stat().st_mtime_ns
    (tmp_path / "dst" / "b").rename(tmp_path / "dst" / ".b-moved")  # as if the run stopped before b
    assert main(["data", "convert-vpt", str(src), str(tmp_path / "dst"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "converted 1 recording(s)" in out and "(1 already converted, skipped)" in out
    assert marker.stat().st_mtime_ns == before and (tmp_path / "dst" / "b" / "frames.npy").is_file()
    assert main(["data", "convert-vpt", str(src), str(tmp_path / "dst"), "--overwrite", "--workers", "1"]) == 0
    assert "converted 2 recording(s)" in capsys.readouterr().out
    assert marker.stat().st_mtime_ns != before

"""Episode folders: atomic writes, reading, finding, and `dreamerv4 data validate` on good and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dreamerv4.actions import KEYS
from dreamerv4.cli import main
from dreamerv4.data.episodes import (
    find_episodes,
    load_actions,
    load_frames,
    load_observations,
    load_rewards,
    validate_root,
    write_episode,
)
from dreamerv4.errors import DataError


def small_episode(steps: int = 5, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "frames": rng.integers(0, 256, (steps, 64, 64, 3), dtype=np.uint8),
        "actions": {"action": rng.integers(0, 17, steps).astype(np.int64)},
        "rewards": rng.normal(size=steps).astype(np.float32),
        "observations": {"semantic": rng.integers(0, 19, (steps, 7, 9), dtype=np.uint8)},
    }


def minerl_actions(steps: int) -> dict[str, np.ndarray]:
    actions = {f"action${k}": np.zeros(steps, np.int64) for k in KEYS}
    actions["action$forward"][::2] = 1
    actions["action$camera"] = np.zeros((steps, 2), np.float32)
    actions["action$camera"][1] = [25.0, 0.0]  # beyond +-10: clipped, counted
    actions["action$place"] = np.array(["none"] * steps)
    actions["action$place"][2] = "dirt"  # not in the 15 item actions: counted
    return actions


def test_write_then_read_round_trip(tmp_path):
    ep = small_episode()
    dest = write_episode(tmp_path / "ep", ep["frames"], ep["actions"], ep["rewards"], ep["observations"])
    frames = load_frames(dest)
    assert isinstance(frames, np.memmap)  # memory-mapped, not read whole
    np.testing.assert_array_equal(frames, ep["frames"])
    np.testing.assert_array_equal(load_actions(dest)["action"], ep["actions"]["action"])
    np.testing.assert_array_equal(load_rewards(dest), ep["rewards"])
    np.testing.assert_array_equal(load_observations(dest)["semantic"], ep["observations"]["semantic"])
    assert list(load_observations(dest, ("semantic",))) == ["semantic"]
    with pytest.raises(DataError, match="no inventory"):
        load_observations(dest, ("inventory",))


def test_write_refuses_existing_unless_overwrite_and_leaves_no_temporaries(tmp_path):
    first, second = small_episode(seed=0), small_episode(steps=7, seed=1)
    dest = write_episode(tmp_path / "ep", first["frames"], first["actions"], first["rewards"])
    with pytest.raises(DataError, match="already exists"):
        write_episode(dest, second["frames"], second["actions"], second["rewards"])
    np.testing.assert_array_equal(load_frames(dest), first["frames"])
    write_episode(dest, second["frames"], second["actions"], second["rewards"], overwrite=True)
    np.testing.assert_array_equal(load_frames(dest), second["frames"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ep"]


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    ep = small_episode()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", broken)
    with pytest.raises(OSError, match="disk full"):
        write_episode(tmp_path / "ep", ep["frames"], ep["actions"], ep["rewards"], ep["observations"])
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_mismatched_lengths_and_bad_frames(tmp_path):
    ep = small_episode()
    with pytest.raises(DataError, match="rows"):
        write_episode(tmp_path / "a", ep["frames"], {"action": ep["actions"]["action"][:-1]}, ep["rewards"])
    with pytest.raises(DataError, match="uint8"):
        write_episode(tmp_path / "b", ep["frames"].astype(np.float32), ep["actions"], ep["rewards"])
    assert list(tmp_path.iterdir()) == []


def test_find_episodes_sorted_nested_and_ignores_hidden(tmp_path):
    ep = small_episode(steps=2)
    for name in ["b/ep2", "a", "b/ep1", ".hidden"]:
        write_episode(tmp_path / name, ep["frames"], ep["actions"], ep["rewards"])
    assert [p.relative_to(tmp_path).as_posix() for p in find_episodes(tmp_path)] == ["a", "b/ep1", "b/ep2"]
    assert find_episodes(tmp_path / "a") == [tmp_path / "a"]


def test_validate_clean_recorded_dataset(tiny_crafter_root, tmp_path, capsys):
    summary_path = tmp_path / "summary.json"
    assert main(["data", "validate", str(tiny_crafter_root), "--json", str(summary_path)]) == 0
    out = capsys.readouterr().out
    assert "3 episode(s), 3 valid, 120 frames" in out and "problems: 0" in out
    summary = json.loads(summary_path.read_text())
    assert summary["problems"] == [] and summary["action_space"] == "crafter"
    counts = summary["action_statistics"]["crafter"]["action"]
    assert sum(counts.values()) == 120 and len(counts) == 17
    on_disk = np.concatenate([load_actions(p)["action"] for p in find_episodes(tiny_crafter_root)])
    assert counts["do"] == int((on_disk == 5).sum())
    rewards = sum(float(load_rewards(p).sum()) for p in find_episodes(tiny_crafter_root))
    assert summary["reward_sum"] == pytest.approx(rewards)


def test_validate_reports_unrepresentable_minerl_values(tmp_path, capsys):
    ep = small_episode(steps=6)
    write_episode(tmp_path / "mc", ep["frames"], minerl_actions(6), ep["rewards"])
    assert main(["data", "validate", str(tmp_path), "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "unrepresentable values: 2" in out and "place:dirt 1" in out
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["unrepresentable"]["camera_clipped"] == 1
    assert summary["action_statistics"]["minerl"]["keys"]["forward"] == pytest.approx(0.5)


# --- bad input: every case must give a non-zero exit and a line naming the culprit -----------------
def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def resave(path: Path, key: str, value: np.ndarray) -> None:
    arrays = dict(np.load(path))
    arrays[key] = value
    np.savez(path, **arrays)


EP = "episode_00001"
CASES = {
    "missing frames": (lambda r: (r / EP / "frames.npy").unlink(), f"{EP}/frames.npy: missing"),
    "missing actions": (lambda r: (r / EP / "actions.npz").unlink(), f"{EP}/actions.npz: missing"),
    "truncated frames": (lambda r: truncate(r / EP / "frames.npy"), f"{EP}/frames.npy: unreadable or truncated"),
    "truncated header": (lambda r: truncate(r / EP / "frames.npy", 0.0005), f"{EP}/frames.npy: unreadable"),
    "truncated actions": (lambda r: truncate(r / EP / "actions.npz"), f"{EP}/actions.npz: unreadable or truncated"),
    "truncated rewards": (lambda r: truncate(r / EP / "rewards.npy", 0.9), f"{EP}/rewards.npy: unreadable or truncated"),
    "frames dtype": (lambda r: np.save(r / EP / "frames.npy", np.zeros((40, 64, 64, 3), np.float32)),
                     f"{EP}/frames.npy: expected (T, 64, 64, 3) uint8"),
    "frames shape": (lambda r: np.save(r / EP / "frames.npy", np.zeros((40, 32, 32, 3), np.uint8)),
                     f"{EP}/frames.npy: expected (T, 64, 64, 3) uint8"),
    "rewards dtype": (lambda r: np.save(r / EP / "rewards.npy", np.zeros(40, np.float64)),
                      f"{EP}/rewards.npy: expected (T,) float32"),
    "actions dtype": (lambda r: resave(r / EP / "actions.npz", "action", np.zeros(40, np.float32)),
                      f"{EP}/actions.npz: action: expected (T,) int64"),
    "length mismatch": (lambda r: np.save(r / EP / "rewards.npy", np.zeros(39, np.float32)),
                        f"{EP}: lengths differ (frames.npy 40, rewards.npy 39, actions.npz 40)"),
    "nan reward": (lambda r: np.save(r / EP / "rewards.npy", np.r_[np.zeros(39), np.nan].astype(np.float32)),
                   f"{EP}/rewards.npy: 1 NaN or inf rewards (first at step 39)"),
    "code out of range": (lambda r: resave(r / EP / "actions.npz", "action", np.full(40, 17, np.int64)),
                          f"{EP}/actions.npz: action: value 17 outside 0..16"),
    "no action keys": (lambda r: np.savez(r / EP / "actions.npz", move=np.zeros(40, np.int64)),
                       f"{EP}/actions.npz: neither Crafter's 'action' nor MineRL"),
    "observation rows": (lambda r: np.savez(r / EP / "observations.npz", semantic=np.zeros((3, 7, 9), np.uint8)),
                         f"{EP}/observations.npz: semantic has 3 rows, frames.npy has 40"),
    "stray folder": (lambda r: (r / "notes").mkdir() or (r / "notes" / "readme.txt").write_text("x"),
                     "notes: not an episode folder"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validate_flags_bad_input(case, tiny_crafter_copy, capsys):
    corrupt, message = CASES[case]
    corrupt(tiny_crafter_copy)
    assert main(["data", "validate", str(tiny_crafter_copy)]) != 0
    out = capsys.readouterr().out
    problems = [line for line in out.splitlines() if line.startswith("problem: ")]
    assert any(message in line for line in problems), out
    assert all(str(tiny_crafter_copy) in line for line in problems)


def write_minerl(root: Path, camera: np.ndarray) -> None:
    ep = small_episode(steps=len(camera))
    actions = minerl_actions(len(camera))
    actions["action$camera"] = camera.astype(np.float32)
    write_episode(root / "mc", ep["frames"], actions, ep["rewards"])


def test_validate_flags_nonfinite_camera(tmp_path, capsys):
    write_minerl(tmp_path, np.array([[0, 0], [np.inf, 0], [0, np.nan]]))
    assert main(["data", "validate", str(tmp_path)]) == 1
    assert "mc/actions.npz: action$camera: 2 steps are NaN or inf" in capsys.readouterr().out


def test_validate_flags_empty_episode_empty_folder_and_mixed_layouts(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "validate", str(empty)]) == 1
    assert f"problem: {empty}: empty folder" in capsys.readouterr().out

    ep = small_episode(steps=0)
    write_episode(tmp_path / "zero" / "ep", ep["frames"], ep["actions"], ep["rewards"])
    assert main(["data", "validate", str(tmp_path / "zero")]) == 1
    assert "ep: empty episode (0 steps" in capsys.readouterr().out

    mixed = tmp_path / "mixed"
    write_minerl(mixed, np.zeros((3, 2)))
    ep = small_episode(steps=3)
    write_episode(mixed / "crafter", ep["frames"], ep["actions"], ep["rewards"])
    assert main(["data", "validate", str(mixed)]) == 1
    assert "episodes mix action layouts (crafter 1, minerl 1)" in capsys.readouterr().out


def test_validate_missing_dir_is_a_user_error(tmp_path, capsys):
    assert main(["data", "validate", str(tmp_path / "nope")]) == 2
    assert "nope: not a folder" in capsys.readouterr().err


def test_validate_as_a_subprocess_exits_non_zero(tiny_crafter_copy):
    truncate(tiny_crafter_copy / EP / "frames.npy")
    result = subprocess.run([sys.executable, "-m", "dreamerv4.cli", "data", "validate", str(tiny_crafter_copy)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"{EP}/frames.npy: unreadable or truncated" in result.stdout
    assert validate_root(tiny_crafter_copy)["valid_episodes"] == 2

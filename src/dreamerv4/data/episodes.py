"""Episode folders: find, read (frames memory-mapped), write (atomically) and validate them.

An episode folder holds (docs/design.md, Data contract):
    frames.npy        (T, 64, 64, 3) uint8
    actions.npz       MineRL keys (`action$forward`, ..., `action$camera` (T, 2) degrees, optional enum
                      keys) or, for Crafter, `action` (T,) int64 in 0..16
    rewards.npy       (T,) float32
    observations.npz  optional; arrays with T rows (Crafter: inventory, achievements, semantic, terminal)
`actions[t]` is taken after seeing `frames[t]`; `rewards[t]` is received on that step.

A root folder holds episode folders at any depth; folders whose names start with "." are ignored
(write_episode builds each episode in a hidden temporary folder and renames it into place).

    dreamerv4 data validate DIR [--json summary.json]

prints a summary (episodes, frames, rewards, action statistics, values the action layout cannot
represent) and one line per problem naming the file and what is wrong; the exit status is 1 if any.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from dreamerv4.actions import ActionReport, get_action_space, layout_of
from dreamerv4.errors import DataError

FRAMES_FILE = "frames.npy"
ACTIONS_FILE = "actions.npz"
REWARDS_FILE = "rewards.npy"
OBSERVATIONS_FILE = "observations.npz"
EPISODE_FILES = (FRAMES_FILE, ACTIONS_FILE, REWARDS_FILE)
FRAME_SHAPE = (64, 64, 3)
SEMANTIC_SHAPE = (7, 9)  # Crafter's visible world cells (dreamerv4.data.crafter_layout)


# --- finding ----------------------------------------------------------------------------------------
def is_episode_dir(path: str | Path) -> bool:
    """A folder holding any of the episode files (a broken episode still counts, so validate sees it)."""
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in EPISODE_FILES)


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan(path: Path, episodes: list[Path], strays: list[Path]) -> bool:
    """Collect episode folders below `path`; folders beside them that hold none go to `strays`."""
    if is_episode_dir(path):
        episodes.append(path)
        return True
    children = _subdirs(path)
    found = [_scan(child, episodes, strays) for child in children]
    if any(found):
        strays.extend(child for child, ok in zip(children, found) if not ok)
    return any(found)


def find_episodes(root: str | Path) -> list[Path]:
    """Episode folders under `root` (or `root` itself), sorted by path: deterministic everywhere."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    episodes: list[Path] = []
    _scan(root, episodes, [])
    return sorted(episodes)


def episode_name(root: str | Path, episode: str | Path) -> str:
    """The episode's path relative to its root ("." for a root that is itself an episode)."""
    return Path(episode).relative_to(root).as_posix()


# --- reading ----------------------------------------------------------------------------------------
def _require(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: missing")
    return path


def load_frames(episode: str | Path) -> np.ndarray:
    """(T, 64, 64, 3) uint8 frames, memory-mapped read-only (pages are read only when touched)."""
    path = _require(Path(episode) / FRAMES_FILE)
    try:
        frames = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{path}: unreadable or truncated ({type(exc).__name__}: {exc})") from exc
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != FRAME_SHAPE:
        raise DataError(f"{path}: expected (T, 64, 64, 3) uint8, got {frames.shape} {frames.dtype}")
    return frames


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(_require(path), allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: unreadable or truncated ({type(exc).__name__}: {exc})") from exc


def load_actions(episode: str | Path) -> dict[str, np.ndarray]:
    """The raw arrays of actions.npz (MineRL keys, or Crafter's `action`)."""
    return _load_npz(Path(episode) / ACTIONS_FILE)


def load_rewards(episode: str | Path) -> np.ndarray:
    """(T,) float32 rewards."""
    path = _require(Path(episode) / REWARDS_FILE)
    try:
        rewards = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{path}: unreadable or truncated ({type(exc).__name__}: {exc})") from exc
    if rewards.dtype != np.float32 or rewards.ndim != 1:
        raise DataError(f"{path}: expected (T,) float32, got {rewards.shape} {rewards.dtype}")
    return rewards


def has_observations(episode: str | Path) -> bool:
    return (Path(episode) / OBSERVATIONS_FILE).is_file()


def load_observations(episode: str | Path, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Arrays of observations.npz, all or only `keys` (Crafter: inventory (T,16) int16, achievements
    (T,22) uint8, semantic (T,7,9) uint8, terminal (T,) bool; MineRL: its `observation$...` keys).
    DataError if the file or a requested key is missing."""
    path = _require(Path(episode) / OBSERVATIONS_FILE)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys or () if k not in npz.files]
            if missing:
                raise DataError(f"{path}: no {', '.join(missing)} (has {', '.join(npz.files)})")
            return {key: npz[key] for key in (keys or npz.files)}
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: unreadable or truncated ({type(exc).__name__}: {exc})") from exc


@dataclass
class EpisodeInfo:
    """What the dataset needs from an episode, read and checked once."""

    path: Path
    length: int
    layout: str  # action space the actions.npz keys belong to: "crafter" or "minerl"
    codes: np.ndarray  # (T,) int64 packed action codes
    rewards: np.ndarray  # (T,) float32
    report: ActionReport = field(default_factory=ActionReport)
    has_observations: bool = False


def inspect_episode(
    episode: str | Path, action_space: str | None = None, deep: bool = False
) -> tuple[EpisodeInfo | None, list[str]]:
    """Check one episode folder. Returns (info or None, problems); each problem names the file.

    deep also reads every observations.npz array (CRC-checked) and checks its rows; frames are
    always only memory-mapped, which still catches a truncated file (the header promises more bytes).
    """
    episode = Path(episode)
    problems: list[str] = []
    lengths: dict[str, int] = {}

    def attempt(loader):
        try:
            return loader(episode)
        except DataError as exc:
            problems.append(str(exc))
            return None

    frames = attempt(load_frames)
    if frames is not None:
        lengths[FRAMES_FILE] = len(frames)

    rewards = attempt(load_rewards)
    if rewards is not None:
        lengths[REWARDS_FILE] = len(rewards)
        bad = ~np.isfinite(rewards)
        if bad.any():
            problems.append(f"{episode / REWARDS_FILE}: {int(bad.sum())} NaN or inf rewards (first at step {int(np.argmax(bad))})")

    actions = attempt(load_actions)
    codes, report, layout = None, ActionReport(), None
    if actions is not None:
        actions_path = episode / ACTIONS_FILE
        layout = layout_of(actions)
        if layout is None:
            problems.append(f"{actions_path}: neither Crafter's 'action' nor MineRL 'action$...' keys "
                            f"(found {sorted(actions)[:8]})")
        elif action_space is not None and layout != action_space:
            problems.append(f"{actions_path}: {layout} actions, but the {action_space} action space was asked for")
        else:
            rows = {len(v) if v.ndim else 0 for v in actions.values()}
            if len(rows) > 1:
                problems.append(f"{actions_path}: arrays of different lengths "
                                f"({', '.join(f'{k} {len(v) if v.ndim else 0}' for k, v in actions.items())})")
            else:
                try:
                    codes, report = get_action_space(layout).codes_from_actions(actions)
                    lengths[ACTIONS_FILE] = len(codes)
                except ValueError as exc:
                    problems.append(f"{actions_path}: {exc}")

    if len(set(lengths.values())) > 1:
        problems.append(f"{episode}: lengths differ ({', '.join(f'{k} {n}' for k, n in lengths.items())})")
    elif lengths and next(iter(lengths.values())) == 0:
        problems.append(f"{episode}: empty episode (0 steps in {', '.join(lengths)})")

    observations_present = has_observations(episode)
    if observations_present and deep:
        observations = attempt(load_observations)
        steps = lengths.get(FRAMES_FILE)
        for key, value in (observations or {}).items():
            if steps is not None and (value.ndim == 0 or len(value) != steps):
                problems.append(f"{episode / OBSERVATIONS_FILE}: {key} has {len(value) if value.ndim else 0} rows, "
                                f"frames.npy has {steps}")
        semantic = (observations or {}).get("semantic")
        if semantic is not None and (semantic.dtype != np.uint8 or semantic.shape[1:] != SEMANTIC_SHAPE):
            problems.append(f"{episode / OBSERVATIONS_FILE}: semantic expected (T, 7, 9) uint8, "
                            f"got {semantic.shape} {semantic.dtype}")

    if problems:
        return None, problems
    info = EpisodeInfo(episode, len(codes), layout, codes, rewards, report, observations_present)
    return info, []


def read_episode_info(episode: str | Path, action_space: str | None = None) -> EpisodeInfo:
    """inspect_episode that raises DataError (first problem, plus how many more) instead of listing."""
    info, problems = inspect_episode(episode, action_space)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s); run `dreamerv4 data validate`)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    return info


# --- writing ----------------------------------------------------------------------------------------
def write_episode(
    dest: str | Path,
    frames: np.ndarray,
    actions: Mapping[str, np.ndarray],
    rewards: np.ndarray,
    observations: Mapping[str, np.ndarray] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an episode folder atomically: build it in a hidden temporary folder beside `dest`, then
    rename it into place. An existing `dest` is an error unless overwrite=True."""
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise DataError(f"{dest}: episode already exists (pass overwrite=True / --overwrite to replace it)")
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != FRAME_SHAPE:
        raise DataError(f"{dest}: frames must be (T, 64, 64, 3) uint8, got {frames.shape} {frames.dtype}")
    steps = len(frames)
    rewards = np.asarray(rewards, dtype=np.float32)
    columns = {"rewards": rewards, **{f"actions[{k!r}]": v for k, v in actions.items()},
               **{f"observations[{k!r}]": v for k, v in (observations or {}).items()}}
    for name, value in columns.items():
        value = np.asarray(value)
        if value.ndim == 0 or len(value) != steps:
            raise DataError(f"{dest}: {name} has {len(value) if value.ndim else 0} rows, frames have {steps}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        np.save(tmp / FRAMES_FILE, frames)
        np.savez(tmp / ACTIONS_FILE, **{k: np.asarray(v) for k, v in actions.items()})
        np.save(tmp / REWARDS_FILE, rewards)
        if observations:
            np.savez_compressed(tmp / OBSERVATIONS_FILE, **{k: np.asarray(v) for k, v in observations.items()})
        publish_folder(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def publish_folder(tmp: Path, dest: Path) -> None:
    """Move the finished folder `tmp` to `dest` by renames only, replacing an existing `dest`: a reader
    sees the old folder or the new one, never a mix (the old one is moved aside, then deleted)."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)


# --- validating -------------------------------------------------------------------------------------
def validate_root(root: str | Path) -> dict:
    """Check every episode under `root`; returns the summary dict (its "problems" list may be empty)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    episodes: list[Path] = []
    strays: list[Path] = []
    problems: list[str] = []
    if not _scan(root, episodes, strays):
        what = "empty folder" if not any(root.iterdir()) else "no episode folders found"
        problems.append(f"{root}: {what} (an episode folder holds {', '.join(EPISODE_FILES)})")
    for stray in strays:
        problems.append(f"{stray}: not an episode folder (none of {', '.join(EPISODE_FILES)})")

    infos: list[EpisodeInfo] = []
    for episode in sorted(episodes):
        info, episode_problems = inspect_episode(episode, deep=True)
        problems.extend(episode_problems)
        if info is not None:
            infos.append(info)

    layouts = sorted({info.layout for info in infos})
    if len(layouts) > 1:
        counts = {name: sum(info.layout == name for info in infos) for name in layouts}
        problems.append(f"{root}: episodes mix action layouts ({', '.join(f'{k} {n}' for k, n in counts.items())})")

    lengths = [info.length for info in infos]
    summary: dict = {
        "root": str(root),
        "episodes": len(episodes),
        "valid_episodes": len(infos),
        "frames": int(sum(lengths)),
        "episode_length": {"min": min(lengths), "mean": float(np.mean(lengths)), "max": max(lengths)} if lengths else None,
        "reward_sum": float(sum(float(info.rewards.sum()) for info in infos)),
        "nonzero_rewards": int(sum(int((info.rewards != 0).sum()) for info in infos)),
        "action_space": layouts[0] if len(layouts) == 1 else layouts,
        "action_statistics": {},
        "unrepresentable": ActionReport().to_dict(),
        "with_observations": int(sum(info.has_observations for info in infos)),
        "problems": problems,
    }
    for name in layouts:
        group = [info for info in infos if info.layout == name]
        codes = np.concatenate([info.codes for info in group])
        report = ActionReport()
        for info in group:
            report = report.merge(info.report)
        summary["action_statistics"][name] = get_action_space(name).statistics(codes)
        if name == "minerl" or len(layouts) == 1:
            summary["unrepresentable"] = report.to_dict()
    return summary


def _format_counts(counts: dict, total: int, top: int) -> str:
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    shown = [f"{k} {v} ({100 * v / max(total, 1):.1f}%)" for k, v in ranked[:top] if v > 0]
    rest = sum(1 for _, v in ranked[top:] if v > 0)
    return ", ".join(shown) + (f", ... {rest} more values used" if rest else "")


def format_summary(summary: dict) -> str:
    lines = [f"{summary['root']}: {summary['episodes']} episode(s), {summary['valid_episodes']} valid, "
             f"{summary['frames']} frames"]
    if summary["episode_length"]:
        el = summary["episode_length"]
        lines.append(f"  episode length min {el['min']} mean {el['mean']:.1f} max {el['max']}")
    lines.append(f"  reward sum {summary['reward_sum']:.3f} ({summary['nonzero_rewards']} non-zero steps)")
    lines.append(f"  action space: {summary['action_space'] or 'none'}; episodes with observations.npz: "
                 f"{summary['with_observations']}")
    for name, stats in summary["action_statistics"].items():
        for component, values in stats.items():
            if all(isinstance(v, float) for v in values.values()):
                rates = ", ".join(f"{k} {100 * v:.1f}%" for k, v in values.items())
                lines.append(f"  {name} {component} pressed: {rates}")
            else:
                top = len(values) if len(values) <= 20 else 6  # Crafter's 17 actions, MineRL's 15 items; 6 camera classes
                lines.append(f"  {name} {component}: {_format_counts(values, sum(values.values()), top)}")
    rep = summary["unrepresentable"]
    items = ", ".join(f"{k} {v}" for k, v in rep["unrepresentable_items"].items()) or "none"
    lines.append(f"  unrepresentable values: {rep['total']} (camera beyond +-10 deg clipped {rep['camera_clipped']}, "
                 f"several item actions at one tick {rep['multiple_item_actions']}, unknown items: {items})")
    lines.append(f"  problems: {len(summary['problems'])}")
    return "\n".join(lines)


def cmd_validate(args) -> int:
    """`dreamerv4 data validate DIR [--json F]`: exit status 1 when any problem is found."""
    summary = validate_root(args.dir)
    print(format_summary(summary))
    for problem in summary["problems"]:
        print(f"problem: {problem}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2))
    return 1 if summary["problems"] else 0

"""Convert official MineRL v0.4 episode folders into the extracted episode layout (dreamerv4.data.episodes).

    dreamerv4 data convert-minerl data/MineRLObtainDiamond-v0 data/minerl [--overwrite]

A MineRL v0.4 folder (20 fps, 64x64) holds:
    recording.mp4   the video: one frame per state, plus leading frames before the experiment starts
    rendered.npz    `reward` (T,), `action$forward` ... `action$attack` (T,), `action$camera` (T, 2) degrees,
                    enum actions `action$craft`, `action$nearbyCraft`, `action$nearbySmelt`, `action$place`,
                    `action$equip` (strings), and `observation$...` arrays (inventory counts, equipped item)
    metadata.json   `true_video_frame_count` among other fields
Alignment, as in MineRL's own loader (minerl/data/data_pipeline.py): there are T + 1 states for T
actions; the first `true_video_frame_count - (T + 1)` video frames are dropped; the next T frames are
frames[0..T-1] and pair with actions[t] and reward[t]; the final state's frame is dropped.
SRC is one such folder or a folder holding them at any depth; each becomes DST/<its path below SRC>
(DST/<name> when SRC is itself an episode). Existing destinations are never replaced without --overwrite.
Action values the 144-logit layout cannot represent are counted and printed, never silently dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dreamerv4.actions import ActionReport, get_action_space
from dreamerv4.data.episodes import write_episode
from dreamerv4.data.video import read_video
from dreamerv4.errors import DataError

VIDEO_FILE = "recording.mp4"
RENDERED_FILE = "rendered.npz"
METADATA_FILE = "metadata.json"


def find_minerl_episodes(src: str | Path) -> list[Path]:
    """Folders holding a recording.mp4: `src` itself, or every one below it, sorted."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: not a folder")
    if (src / VIDEO_FILE).is_file():
        return [src]
    return sorted(p.parent for p in src.rglob(VIDEO_FILE) if not any(part.startswith(".") for part in p.parts))


def _load_rendered(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except ValueError as exc:
        if "allow_pickle" not in str(exc):
            raise DataError(f"{path}: unreadable ({exc})") from exc
    except Exception as exc:
        raise DataError(f"{path}: unreadable or truncated ({type(exc).__name__}: {exc})") from exc
    # Some releases store the enum columns as object arrays; MineRL's loader reads them with pickle too.
    with np.load(path, allow_pickle=True) as npz:
        return {k: npz[k] for k in npz.files}


def _column(key: str, value: np.ndarray, steps: int, path: Path) -> np.ndarray:
    if value.ndim == 0 or len(value) < steps:
        raise DataError(f"{path}: {key} has {len(value) if value.ndim else 0} rows, reward has {steps}")
    value = value[:steps]
    return value.astype(str) if value.dtype.kind == "O" else value


def convert_episode(src: str | Path, dest: str | Path, overwrite: bool = False) -> dict:
    """Convert one MineRL v0.4 folder to an episode folder; returns what was done and counted."""
    src, dest = Path(src), Path(dest)
    if dest.exists() and not overwrite:
        raise DataError(f"{dest}: episode already exists (pass --overwrite to replace it)")
    meta_path = src / METADATA_FILE
    try:
        meta = json.loads(meta_path.read_text())
        true_count = int(meta["true_video_frame_count"])
    except FileNotFoundError as exc:
        raise DataError(f"{meta_path}: missing") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{meta_path}: no readable true_video_frame_count ({type(exc).__name__}: {exc})") from exc

    rendered_path = src / RENDERED_FILE
    rendered = _load_rendered(rendered_path)
    if "reward" not in rendered:
        raise DataError(f"{rendered_path}: no 'reward' array")
    rewards = np.asarray(rendered["reward"], dtype=np.float32).reshape(-1)
    steps = len(rewards)
    if steps == 0:
        raise DataError(f"{rendered_path}: empty episode (reward has 0 steps)")
    if not np.isfinite(rewards).all():
        raise DataError(f"{rendered_path}: NaN or inf rewards")
    skip = true_count - (steps + 1)
    if skip < 0:
        raise DataError(f"{meta_path}: true_video_frame_count {true_count} is less than the {steps + 1} states "
                        f"implied by {steps} rewards")

    actions = {k: _column(k, v, steps, rendered_path) for k, v in rendered.items() if k.startswith("action$")}
    if "action$camera" in actions:
        actions["action$camera"] = actions["action$camera"].astype(np.float32)
    try:
        _, report = get_action_space("minerl").codes_from_actions(actions)
    except ValueError as exc:
        raise DataError(f"{rendered_path}: {exc}") from exc
    observations = {k: _column(k, v, steps, rendered_path) for k, v in rendered.items() if k.startswith("observation$")}

    frames, decoded = read_video(src / VIDEO_FILE, skip, steps)
    write_episode(dest, frames, actions, rewards, observations or None, overwrite=overwrite)
    return {
        "src": str(src),
        "dest": str(dest),
        "steps": steps,
        "leading_frames_dropped": skip,
        "video_frames": decoded,
        "true_video_frame_count": true_count,
        "unrepresentable": report.to_dict(),
    }


def convert_minerl(src: str | Path, dst: str | Path, overwrite: bool = False, progress: bool = True) -> dict:
    """Convert every MineRL folder under `src` into `dst`; a failing episode is reported and skipped."""
    from tqdm import tqdm

    src, dst = Path(src), Path(dst)
    sources = find_minerl_episodes(src)
    if not sources:
        raise DataError(f"{src}: no MineRL episode folders (a folder holding {VIDEO_FILE})")
    targets = [dst / (s.name if s == src else s.relative_to(src).as_posix()) for s in sources]
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise DataError(f"{existing[0]}: episode already exists ({len(existing)} of {len(targets)} do); "
                        f"pass --overwrite to replace them")
    converted, failures = [], []
    for source, target in tqdm(list(zip(sources, targets)), desc="convert-minerl", unit="episode", disable=not progress):
        try:
            result = convert_episode(source, target, overwrite)
        except DataError as exc:
            failures.append(str(exc))
            continue
        converted.append(result)
    return conversion_summary(src, dst, converted, failures)


def conversion_summary(src: Path, dst: Path, converted: list[dict], failures: list[str], **extra) -> dict:
    """What a converter returns: its results, failures, steps, `extra` counts and the merged ActionReport."""
    report = ActionReport()
    for c in converted:
        report = report.merge(ActionReport.from_dict(c["unrepresentable"]))
    return {"src": str(src), "dst": str(dst), "converted": converted, "failures": failures,
            "steps": sum(c["steps"] for c in converted), **extra, "unrepresentable": report.to_dict()}


def cmd_convert(args) -> int:
    """`dreamerv4 data convert-minerl SRC DST [--overwrite]`: exit status 1 if any episode failed."""
    summary = convert_minerl(args.src, args.dst, args.overwrite)
    for c in summary["converted"]:
        print(f"{c['src']} -> {c['dest']}: {c['steps']} steps ({c['leading_frames_dropped']} leading frames dropped, "
              f"{c['unrepresentable']['total']} unrepresentable values)")
    rep = summary["unrepresentable"]
    items = ", ".join(f"{k} {v}" for k, v in rep["unrepresentable_items"].items()) or "none"
    print(f"converted {len(summary['converted'])} episode(s), {summary['steps']} steps into {summary['dst']}; "
          f"unrepresentable: camera beyond +-10 deg {rep['camera_clipped']}, several item actions at one tick "
          f"{rep['multiple_item_actions']}, unknown items: {items}")
    for failure in summary["failures"]:
        print(f"failed: {failure}")
    return 1 if summary["failures"] else 0

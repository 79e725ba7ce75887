"""Convert OpenAI VPT contractor recordings (mp4 + jsonl) into the extracted episode layout (dreamerv4.data.episodes).

    dreamerv4 data convert-vpt SRC DST [--workers 4] [--overwrite]

A recording is `NAME.mp4` (640x360, 20 fps) beside `NAME.jsonl`, one JSON action dict per tick:
    {"mouse": {"dx": .., "dy": .., "buttons": [0, ..], "newButtons": [..]},
     "keyboard": {"keys": ["key.keyboard.w", ..]}, "isGuiOpen": false, "hotbar": 0, ...}
Alignment, as in VPT's own loader (data_loader.py): video frame t is read together with jsonl line t,
so frames[t] pairs with actions[t] (the action taken after seeing frame t). When the video and the jsonl
disagree in length the shorter one decides and the difference is printed.
Actions:
    keys      w s a d space left.shift left.control -> forward back left right jump sneak sprint;
              mouse button 0 -> attack
    camera    [dy, dx] mouse counts x 360/2400 -> [pitch, yaw] degrees (float32 in actions.npz); the
              action space bins them with the VPT mu-law scheme (dreamerv4.actions.camera_to_bins)
    the rest  use (button 1), pickItem (button 2), drop, inventory, swapHands, ESC and hotbar changes
              have no place in the 144-logit layout: they are stored as `vpt$...` columns of
              actions.npz and counted per tick as unrepresentable items, never silently dropped.
As in VPT's loader, attack held down since before the recording started (first tick's newButtons == [0])
is dropped until attack is pressed anew (the "stuck attack" recording bug); those ticks are counted.
Ticks with the GUI open (inventory, crafting table) are kept, counted, and flagged in observations.npz
(`vpt$isGuiOpen`, with `vpt$hotbar`); the mouse then moves the cursor, and the camera column holds the
same scaled mouse motion. VPT draws a cursor image onto GUI frames; this converter does not.
Rewards are zero (the recordings have none). Frames are resized to 64x64 with ffmpeg's area filter
(dreamerv4.data.video).

SRC is a folder holding recordings at any depth; each becomes DST/<its path below SRC, without .mp4>.
Recordings whose destination exists are skipped, so an interrupted run resumes where it stopped;
--overwrite converts them again. A recording that fails (undecodable video, a jsonl line that does not
parse) is reported with its file and line, and the others still convert; the exit status is then 1.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dreamerv4.actions import KEYS, ActionReport, get_action_space
from dreamerv4.data.episodes import write_episode
from dreamerv4.data.minerl_convert import conversion_summary
from dreamerv4.data.video import read_video
from dreamerv4.errors import DataError

CAMERA_DEGREES_PER_MOUSE_COUNT = 360.0 / 2400.0
KEYBOARD_TO_KEY = {
    "key.keyboard.w": "forward", "key.keyboard.s": "back", "key.keyboard.a": "left", "key.keyboard.d": "right",
    "key.keyboard.space": "jump", "key.keyboard.left.shift": "sneak", "key.keyboard.left.control": "sprint",
}
KEYBOARD_UNREPRESENTABLE = {
    "key.keyboard.escape": "ESC", "key.keyboard.q": "drop", "key.keyboard.e": "inventory",
    "key.keyboard.f": "swapHands", **{f"key.keyboard.{n}": f"hotbar.{n}" for n in range(1, 10)},
}
ATTACK_BUTTON, USE_BUTTON, PICK_ITEM_BUTTON = 0, 1, 2
# Unrepresentable VPT actions kept as `vpt$<name>` columns (0/1 per tick; hotbar: the slot 1..9 chosen, 0 none).
VPT_EXTRA_ACTIONS = ("use", "pickItem", "drop", "inventory", "swapHands", "ESC", "hotbar")


@dataclass
class VptActions:
    """One recording's parsed actions, T ticks."""

    columns: dict[str, np.ndarray]  # actions.npz content: action$<key>, action$camera, vpt$<extra>
    gui_open: np.ndarray  # (T,) bool
    hotbar: np.ndarray  # (T,) int64 slot 0..8 as recorded
    attack_stuck_ticks: int  # ticks whose held attack was dropped (the stuck-attack bug)
    null_ticks: int  # ticks with no key, button or mouse motion at all (kept; VPT's loader skips them)


def _field(tick: dict, path: tuple[str, ...], where: str):
    value = tick
    for name in path:
        if not isinstance(value, dict) or name not in value:
            raise DataError(f"{where}: no {'.'.join(path)}")
        value = value[name]
    return value


def parse_vpt_jsonl(path: str | Path) -> VptActions:
    """Read a VPT jsonl into action columns. DataError naming the file and line of the first bad tick."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: missing (each recording needs its .jsonl beside the .mp4)")
    ticks = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ticks.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not ticks:
        raise DataError(f"{path}: no ticks (empty jsonl)")
    steps = len(ticks)
    keys = {k: np.zeros(steps, np.int64) for k in KEYS}
    extra = {k: np.zeros(steps, np.int64) for k in VPT_EXTRA_ACTIONS}
    camera = np.zeros((steps, 2), np.float32)
    gui_open = np.zeros(steps, bool)
    hotbar = np.zeros(steps, np.int64)
    attack_stuck, stuck_ticks, last_hotbar = False, 0, 0
    null = np.zeros(steps, bool)
    for t, (number, tick) in enumerate(ticks):
        where = f"{path}:{number}"
        if not isinstance(tick, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(tick).__name__}")
        try:
            dx, dy = float(_field(tick, ("mouse", "dx"), where)), float(_field(tick, ("mouse", "dy"), where))
            buttons = [int(b) for b in _field(tick, ("mouse", "buttons"), where)]
            new_buttons = [int(b) for b in tick["mouse"].get("newButtons", [])]
            pressed = [str(k) for k in _field(tick, ("keyboard", "keys"), where)]
            gui_open[t] = bool(tick.get("isGuiOpen", False))
            hotbar[t] = int(tick.get("hotbar", last_hotbar))
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: malformed tick ({type(exc).__name__}: {exc})") from exc
        if not (np.isfinite(dx) and np.isfinite(dy)):
            raise DataError(f"{where}: mouse dx/dy not finite ({dx}, {dy})")
        if t == 0:
            attack_stuck = new_buttons == [ATTACK_BUTTON]
        elif attack_stuck and ATTACK_BUTTON in new_buttons:
            attack_stuck = False
        if attack_stuck and ATTACK_BUTTON in buttons:
            buttons = [b for b in buttons if b != ATTACK_BUTTON]
            stuck_ticks += 1
        for name in pressed:
            if name in KEYBOARD_TO_KEY:
                keys[KEYBOARD_TO_KEY[name]][t] = 1
            elif name in KEYBOARD_UNREPRESENTABLE:
                target = KEYBOARD_UNREPRESENTABLE[name]
                if not target.startswith("hotbar."):  # hotbar keys: the slot change below records them
                    extra[target][t] = 1
        keys["attack"][t] = int(ATTACK_BUTTON in buttons)
        extra["use"][t] = int(USE_BUTTON in buttons)
        extra["pickItem"][t] = int(PICK_ITEM_BUTTON in buttons)
        if hotbar[t] != last_hotbar:
            extra["hotbar"][t] = hotbar[t] + 1
        last_hotbar = int(hotbar[t])
        camera[t] = (dy * CAMERA_DEGREES_PER_MOUSE_COUNT, dx * CAMERA_DEGREES_PER_MOUSE_COUNT)
        null[t] = not pressed and not buttons and dx == 0 and dy == 0 and extra["hotbar"][t] == 0
    columns = {f"action${k}": v for k, v in keys.items()}
    columns["action$camera"] = camera
    columns.update({f"vpt${k}": v for k, v in extra.items()})
    return VptActions(columns, gui_open, hotbar, stuck_ticks, int(null.sum()))


def vpt_report(actions: VptActions) -> ActionReport:
    """The action space's report (camera clipping) plus the VPT actions it cannot represent, per tick."""
    _, report = get_action_space("minerl").codes_from_actions(actions.columns)
    for name in VPT_EXTRA_ACTIONS:
        column = actions.columns[f"vpt${name}"]
        if name == "hotbar":
            for slot in np.unique(column[column > 0]):
                report.unrepresentable_items[f"hotbar.{slot}"] += int((column == slot).sum())
        elif column.any():
            report.unrepresentable_items[name] += int(column.sum())
    return report


def convert_recording(video: str | Path, dest: str | Path, overwrite: bool = False) -> dict:
    """Convert one VPT recording (video and the .jsonl beside it) to an episode folder."""
    video, dest = Path(video), Path(dest)
    if dest.exists() and not overwrite:
        raise DataError(f"{dest}: episode already exists (pass --overwrite to replace it)")
    actions = parse_vpt_jsonl(video.with_suffix(".jsonl"))
    frames, decoded = read_video(video, resize=True)
    lines = len(actions.gui_open)
    steps = min(decoded, lines)
    if steps == 0:
        raise DataError(f"{video}: no frames decoded")
    columns = {k: v[:steps] for k, v in actions.columns.items()}
    trimmed = VptActions(columns, actions.gui_open[:steps], actions.hotbar[:steps],
                         actions.attack_stuck_ticks, actions.null_ticks)
    report = vpt_report(trimmed)
    observations = {"vpt$isGuiOpen": trimmed.gui_open, "vpt$hotbar": trimmed.hotbar}
    write_episode(dest, frames[:steps], columns, np.zeros(steps, np.float32), observations, overwrite=overwrite)
    return {
        "src": str(video),
        "dest": str(dest),
        "steps": steps,
        "video_frames": decoded,
        "jsonl_ticks": lines,
        "gui_ticks": int(trimmed.gui_open.sum()),
        "attack_stuck_ticks": actions.attack_stuck_ticks,
        "null_ticks": actions.null_ticks,
        "unrepresentable": report.to_dict(),
    }


def find_vpt_recordings(src: str | Path) -> list[Path]:
    """Every .mp4 below `src` (or `src` itself when it is one), sorted; hidden folders are ignored."""
    src = Path(src)
    if src.is_file() and src.suffix == ".mp4":
        return [src]
    if not src.is_dir():
        raise DataError(f"{src}: not a folder or an .mp4")
    return sorted(p for p in src.rglob("*.mp4") if not any(part.startswith(".") for part in p.relative_to(src).parts))


def _convert_or_fail(video: Path, dest: Path, overwrite: bool) -> dict | str:
    try:
        return convert_recording(video, dest, overwrite)
    except DataError as exc:
        return str(exc)


def convert_vpt(src: str | Path, dst: str | Path, overwrite: bool = False, workers: int = 1,
                progress: bool = True) -> dict:
    """Convert every VPT recording under `src` into `dst` with `workers` processes; existing episodes
    are skipped (resume) unless overwrite; a failing recording is reported and the others go on."""
    from tqdm import tqdm

    src, dst = Path(src), Path(dst)
    videos = find_vpt_recordings(src)
    if not videos:
        raise DataError(f"{src}: no VPT recordings (NAME.mp4 beside NAME.jsonl)")
    root = src if src.is_dir() else src.parent
    targets = [dst / v.relative_to(root).with_suffix("").as_posix() for v in videos]
    todo = [(v, t) for v, t in zip(videos, targets) if overwrite or not t.exists()]
    skipped = len(videos) - len(todo)
    results: list[dict | str] = []
    bar = tqdm(total=len(todo), desc="convert-vpt", unit="recording", disable=not progress)
    if workers <= 1:
        for video, target in todo:
            results.append(_convert_or_fail(video, target, overwrite))
            bar.update()
    else:
        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(_convert_or_fail, v, t, overwrite) for v, t in todo]
            for future in as_completed(futures):
                results.append(future.result())
                bar.update()
    bar.close()
    converted = sorted((r for r in results if isinstance(r, dict)), key=lambda r: r["src"])
    failures = sorted(r for r in results if isinstance(r, str))
    return conversion_summary(src, dst, converted, failures, skipped_existing=skipped,
                              gui_ticks=sum(c["gui_ticks"] for c in converted),
                              attack_stuck_ticks=sum(c["attack_stuck_ticks"] for c in converted))


def cmd_convert(args) -> int:
    """`dreamerv4 data convert-vpt SRC DST [--workers N] [--overwrite]`: exit status 1 if any recording failed."""
    workers = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)
    summary = convert_vpt(args.src, args.dst, args.overwrite, workers)
    for c in summary["converted"]:
        mismatch = "" if c["video_frames"] == c["jsonl_ticks"] else \
            f", video {c['video_frames']} frames vs jsonl {c['jsonl_ticks']} ticks: kept {c['steps']}"
        print(f"{c['src']} -> {c['dest']}: {c['steps']} steps ({c['gui_ticks']} with the GUI open, "
              f"{c['unrepresentable']['total']} unrepresentable values{mismatch})")
    rep = summary["unrepresentable"]
    items = ", ".join(f"{k} {v}" for k, v in rep["unrepresentable_items"].items()) or "none"
    print(f"converted {len(summary['converted'])} recording(s), {summary['steps']} steps into {summary['dst']} "
          f"({summary['skipped_existing']} already converted, skipped); GUI-open ticks {summary['gui_ticks']}, "
          f"stuck-attack ticks dropped {summary['attack_stuck_ticks']}; unrepresentable: camera beyond +-10 deg "
          f"{rep['camera_clipped']}, VPT actions outside the layout: {items}")
    for failure in summary["failures"]:
        print(f"failed: {failure}")
    return 1 if summary["failures"] else 0

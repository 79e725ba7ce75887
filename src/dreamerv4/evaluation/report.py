"""The run report: one self-contained `report.html` and an updated `summary.json` for a run folder.

    from dreamerv4.evaluation.report import write_report
    write_report("runs/crafter-small")      # -> runs/crafter-small/report.html, updates summary.json

`dreamerv4 run` calls it after its last stage. It only reads what the run left on disk; a section
whose files are absent says "not run" (nothing is made up). What it reads, relative to the run folder:
    config.yaml                      resolved config (pipeline.py); else the first <stage>/config.yaml
    summary.json                     {"stages": {name: {"seconds": wall time, **stage result}}} (pipeline.py)
    <stage>/metrics.jsonl            training records of the loop (training/logging.py): loss curves
    <stage>/eval.json                per-stage evaluation tables (e.g. evaluation/tokenizer.py)
    tokenizer/eval.png               held-out reconstruction grid (top row real, bottom reconstructed)
    <stage>/images/<name>_<step>.png latest training-time image of each name
    dynamics/**/*.gif|mp4|webm|png   real-vs-imagined rollouts (evaluation/dynamics.py writes dynamics/eval.gif
                                     and .mp4: the MP4 is shown); imagine/** too
    eval/crafter_<policy>.json       real-game evaluation, one file per policy (CRAFTER_EVAL_FILES)

Real-game evaluation files (written by the Crafter evaluation, read here), JSON objects with keys:
    mean_return     float         mean episode return
    return_ci95     [low, high]   95% confidence interval of the mean return (a number: its half-width)
    crafter_score   float         Crafter score in percent: exp(mean(log(1 + success%))) - 1
    achievements    {name: rate}  success rate in [0, 1] of each of the 22 achievements
    episodes        int           episodes played
Other keys are kept in summary.json and shown with the table; a missing key shows as "missing".

Everything in the page is inline: images and videos are base64 data URIs, plots are inline SVG, the
stylesheet is embedded; no scripts, no external CSS/JS/fonts. summary.json keeps the pipeline's
"stages" and gets: config, training (per stage: steps, train time, last train and eval records),
stage_evals (each <stage>/eval.json), crafter_eval (per policy), report (file, sections filled, problems).
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from dreamerv4.errors import UserError

REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"  # training/logging.py METRICS_FILE; not imported: that pulls in torch
STAGE_EVAL_FILE = "eval.json"  # <stage>/eval.json, the default output of every `dreamerv4 eval STAGE`
TRAINING_STAGES = ("tokenizer", "dynamics", "agent", "imagine")  # folder names, pipeline order
RECONSTRUCTION_IMAGE = "tokenizer/eval.png"  # evaluation/tokenizer.py: eval.json's PNG beside it
VIDEO_DIRS = ("dynamics", "imagine")
VIDEO_PREFERENCE = (".mp4", ".webm", ".gif")  # one video per stem: evaluation/video.py writes both GIF and MP4
EVAL_DIR = "eval"
CRAFTER_EVAL_FILES = {  # policy -> file under the run folder; the writers use these names
    "random": f"{EVAL_DIR}/crafter_random.json",
    "bc": f"{EVAL_DIR}/crafter_bc.json",
    "imagine": f"{EVAL_DIR}/crafter_imagine.json",
}
CRAFTER_EVAL_LABELS = {"random": "random policy", "bc": "behaviour cloning", "imagine": "imagination-trained"}
CRAFTER_EVAL_KEYS = ("mean_return", "return_ci95", "crafter_score", "achievements", "episodes")
MAX_EMBED_BYTES = 25 * 2**20  # a bigger media file is listed, not embedded
MAX_PLOTS_PER_STAGE = 16
MAX_PLOT_POINTS = 400
NOT_RUN = "not run"
MIME = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
        ".mp4": "video/mp4", ".webm": "video/webm"}
# Train-record keys that are not worth a curve (time and throughput); the rest are plotted.
UNPLOTTED = {"step", "kind", "elapsed_min", "samples_per_s", "frames_per_s", "nonfinite_steps"}
SECTIONS = {  # id -> heading, in page order
    "config": "Resolved config",
    "stages": "Stages: wall time and metrics",
    "curves": "Loss curves",
    "reconstructions": "Reconstructions",
    "rollouts": "Real vs imagined rollouts",
    "stage-evals": "Stage evaluations",
    "crafter-eval": "Real-game evaluation (Crafter)",
    "imagination-instrument": "Imagination vs the real game: the exploitation instrument",
}
INSTRUMENT_FILES = {"bc": f"{EVAL_DIR}/imagination_bc.json", "imagine": f"{EVAL_DIR}/imagination_imagine.json"}
INSTRUMENT_ROWS = (  # key in evaluation/imagination.py's report -> row label
    ("imagined_return", "imagined return over the horizon"),
    ("real_return", "real return of the same actions"),
    ("imagined_unlocks", "imagined unlocks per start (reward > 0.5)"),
    ("real_unlocks", "real unlocks per start"),
    ("unlock_precision", "unlock precision of the reward head"),
    ("unlock_recall", "unlock recall of the reward head"),
    ("imagined_reward_on_unlock", "imagined reward on real first unlocks"),
    ("imagined_reward_on_repeat", "imagined reward on repeats (the game pays 0)"),
    ("imagined_reward_on_other", "imagined reward on other steps"),
    ("imagined_health_reward", "imagined health reward"),
    ("real_health_reward", "real health reward"),
    ("imagined_death_rate", "imagined deaths (1 - prod c_t)"),
    ("real_death_rate", "real deaths"),
    ("continue_on_death_steps", "c_t on real death steps"),
    ("continue_on_other_steps", "c_t on other steps"),
    ("starts", "start states"),
)


def crafter_eval_path(run_dir: str | Path, policy: str) -> Path:
    """Where the real-game evaluation of `policy` ("random", "bc" or "imagine") goes in a run folder."""
    return Path(run_dir) / CRAFTER_EVAL_FILES[policy]


# ---------------------------------------------------------------------------------------------
# Reading the run folder


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a line cut short by a kill is skipped (read_metrics would raise)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _number(value: Any) -> float | None:
    """A finite float, or None (bools, strings such as "nan" written for non-finite values, None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def stage_dirs(run: Path) -> list[Path]:
    """Stage folders holding a metrics.jsonl or eval.json: the known stages in pipeline order, then others."""
    known = [run / name for name in TRAINING_STAGES]
    others = sorted(p for p in run.iterdir() if p.is_dir() and p not in known) if run.is_dir() else []
    return [p for p in known + others if (p / METRICS_FILE).is_file() or (p / STAGE_EVAL_FILE).is_file()]


def training_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Steps, training time, the last train and eval records and the skipped-update count of one stage."""
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    last_step = max((int(r["step"]) for r in records if _number(r.get("step")) is not None), default=None)
    elapsed = [_number(r.get("elapsed_min")) for r in train + evals]
    elapsed = [e for e in elapsed if e is not None]
    return {
        "step": last_step,
        "train_time_min": round(max(elapsed), 3) if elapsed else None,
        "last_train": {k: v for k, v in train[-1].items() if k != "kind"} if train else None,
        "last_eval": {k: v for k, v in evals[-1].items() if k != "kind"} if evals else None,
        "nonfinite_steps": sum(r.get("kind") == "nonfinite" for r in records),
    }


def curves(records: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """(step, value) series per metric: train keys by name (loss first), eval keys as "eval/<key>"."""
    series: dict[str, list[tuple[float, float]]] = {}
    for record in records:
        kind, step = record.get("kind"), _number(record.get("step"))
        if kind not in ("train", "eval") or step is None:
            continue
        for key, value in record.items():
            y = _number(value)
            if key in UNPLOTTED or y is None:
                continue
            series.setdefault(key if kind == "train" else f"eval/{key}", []).append((step, y))
    order = {"loss": 0, "grad_norm": 2, "lr": 3}
    return dict(sorted(series.items(), key=lambda kv: (kv[0].startswith("eval/"), order.get(kv[0], 1))))


def latest_images(folder: Path) -> list[Path]:
    """The newest <name>_<step>.png of each name in `folder` (the loop's images/ folder)."""
    newest: dict[str, tuple[int, Path]] = {}
    for path in folder.glob("*.png"):
        match = re.fullmatch(r"(.+)_(\d+)", path.stem)
        name, step = (match.group(1), int(match.group(2))) if match else (path.stem, -1)
        if name not in newest or step > newest[name][0]:
            newest[name] = (step, path)
    return [newest[name][1] for name in sorted(newest)]


def media_files(run: Path) -> list[Path]:
    """Rollout media (GIF/MP4/WebM videos, PNG strips) below the dynamics and imagination folders,
    leaving out the training loop's images/ folders; of videos sharing a stem only the first of
    VIDEO_PREFERENCE is kept (MP4: smaller, with playback controls)."""
    found = []
    for name in VIDEO_DIRS:
        folder = run / name
        if folder.is_dir():
            found += sorted(p for p in folder.rglob("*") if p.suffix.lower() in MIME and p.is_file()
                            and "images" not in p.relative_to(folder).parts[:-1])
    rank = {suffix: i for i, suffix in enumerate(VIDEO_PREFERENCE)}
    best: dict[Path, Path] = {}
    for path in found:
        if path.suffix.lower() in rank:
            stem = path.with_suffix("")
            if stem not in best or rank[path.suffix.lower()] < rank[best[stem].suffix.lower()]:
                best[stem] = path
    return [p for p in found if p.suffix.lower() not in rank or best[p.with_suffix("")] == p]


def _load_json(path: Path, problems: list[str]) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: unreadable JSON ({exc})")
        return None


def collect(run_dir: str | Path) -> dict[str, Any]:
    """Everything the report shows, read from the run folder (JSON-able; paths relative to it)."""
    run = Path(run_dir)
    problems: list[str] = []
    data: dict[str, Any] = {"run_dir": str(run), "problems": problems}

    data["config"], data["config_file"] = None, None
    for path in [run / CONFIG_FILE] + [run / name / CONFIG_FILE for name in TRAINING_STAGES]:
        if path.is_file():
            try:
                data["config"], data["config_file"] = yaml.safe_load(path.read_text()), str(path.relative_to(run))
                break
            except yaml.YAMLError as exc:
                problems.append(f"{path}: unreadable YAML ({exc})")

    summary = _load_json(run / SUMMARY_FILE, problems) if (run / SUMMARY_FILE).is_file() else None
    if summary is not None and not isinstance(summary, dict):
        problems.append(f"{run / SUMMARY_FILE}: expected a JSON object, got {type(summary).__name__}")
    stages = summary.get("stages") if isinstance(summary, dict) else None
    data["stages"] = stages if isinstance(stages, dict) else None

    data["training"], data["curves"], data["stage_evals"] = {}, {}, {}
    for folder in stage_dirs(run):
        if (folder / METRICS_FILE).is_file():
            records = read_jsonl(folder / METRICS_FILE)
            data["training"][folder.name] = training_summary(records)
            data["curves"][folder.name] = curves(records)
        if (folder / STAGE_EVAL_FILE).is_file():
            result = _load_json(folder / STAGE_EVAL_FILE, problems)
            if result is not None:
                data["stage_evals"][folder.name] = result

    data["reconstruction"] = RECONSTRUCTION_IMAGE if (run / RECONSTRUCTION_IMAGE).is_file() else None
    data["training_images"] = {folder.name: [str(p.relative_to(run)) for p in latest_images(folder / "images")]
                               for folder in stage_dirs(run) if (folder / "images").is_dir()}
    data["training_images"] = {k: v for k, v in data["training_images"].items() if v}
    data["rollouts"] = [str(p.relative_to(run)) for p in media_files(run)]

    data["crafter_eval"] = {}
    for policy, name in CRAFTER_EVAL_FILES.items():
        result = _load_json(run / name, problems) if (run / name).is_file() else None
        if result is not None and not isinstance(result, dict):
            problems.append(f"{run / name}: expected a JSON object, got {type(result).__name__}")
            result = None
        data["crafter_eval"][policy] = result
    data["instrument"] = {}
    for policy, name in INSTRUMENT_FILES.items():
        result = _load_json(run / name, problems) if (run / name).is_file() else None
        data["instrument"][policy] = result if isinstance(result, dict) else None
    return data


# ---------------------------------------------------------------------------------------------
# Plots: a small SVG line-plot helper (no plotting library)


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) inside [low, high], about `count` of them (at least 2)."""
    if high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _fmt_tick(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{value:.4g}"


def _thin(points: Sequence[tuple[float, float]], limit: int) -> list[tuple[float, float]]:
    if len(points) <= limit:
        return list(points)
    stride = math.ceil(len(points) / limit)
    return list(points[::stride]) + ([points[-1]] if (len(points) - 1) % stride else [])


PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf")


def svg_line_plot(series: Mapping[str, Sequence[tuple[float, float]]], title: str, xlabel: str = "step",
                  width: int = 340, height: int = 210, log_y: bool | None = None) -> str:
    """An inline <svg> line plot of (x, y) series. Non-finite points are dropped; `log_y` None picks a log
    axis when every value is positive and they span at least two decades."""
    clean = {name: [(float(x), float(y)) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
             for name, pts in series.items()}
    clean = {name: pts for name, pts in clean.items() if pts}
    left, right, top, bottom = 52, 10, 24, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    out = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
           f'<text x="{width / 2}" y="15" class="title" text-anchor="middle">{html.escape(title)}</text>']
    if not clean:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="axis">no finite values</text>')
        return "".join(out) + "</svg>"
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [y for pts in clean.values() for _, y in pts]
    if log_y is None:
        log_y = min(ys) > 0 and max(ys) / min(ys) >= 100
    if log_y and min(ys) <= 0:
        log_y = False
    ty = (lambda y: math.log10(y)) if log_y else (lambda y: y)
    x0, x1 = min(xs), max(xs)
    y0, y1 = ty(min(ys)), ty(max(ys))
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = abs(y0) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    else:
        pad = (y1 - y0) * 0.05
        y0, y1 = y0 - pad, y1 + pad

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + (1 - (ty(y) - y0) / (y1 - y0)) * plot_h

    if log_y:
        yticks = [10.0 ** k for k in range(math.ceil(y0), math.floor(y1) + 1)]
        if len(yticks) < 2:
            yticks = [10 ** t for t in _nice_ticks(y0, y1)]
    else:
        yticks = _nice_ticks(y0, y1)
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="frame"/>')
    for tick in yticks:
        y = py(tick)
        if top - 0.5 <= y <= top + plot_h + 0.5:
            out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                       f'<text x="{left - 4}" y="{y + 3:.1f}" text-anchor="end" class="axis">{_fmt_tick(tick)}</text>')
    for tick in _nice_ticks(x0, x1, 4):
        x = px(tick)
        if left - 0.5 <= x <= left + plot_w + 0.5:
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" class="tick"/>'
                       f'<text x="{x:.1f}" y="{top + plot_h + 15}" text-anchor="middle" class="axis">{_fmt_tick(tick)}</text>')
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle" class="axis">'
               f'{html.escape(xlabel)}{" (log y)" if log_y else ""}</text>')
    for i, (name, pts) in enumerate(clean.items()):
        color = PALETTE[i % len(PALETTE)]
        pts = _thin(pts, MAX_PLOT_POINTS)
        if len(pts) == 1:
            out.append(f'<circle cx="{px(pts[0][0]):.1f}" cy="{py(pts[0][1]):.1f}" r="3" fill="{color}"/>')
        else:
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        if len(clean) > 1:
            out.append(f'<text x="{left + 6}" y="{top + 12 + 12 * i}" class="axis" fill="{color}">'
                       f'{html.escape(name)}</text>')
    return "".join(out) + "</svg>"


# ---------------------------------------------------------------------------------------------
# HTML


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;max-width:1180px;
margin:0 auto;padding:16px 24px 48px;background:#fff}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;
margin-top:32px}h3{font-size:15px;margin:18px 0 6px}
.meta,.note{color:#666;font-size:12px}nav a{margin-right:12px}
.not-run{color:#999;font-style:italic}.problem{color:#b00020}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;border:1px solid #e5e5e5;padding:8px;overflow:auto;max-height:420px;font-size:12px}
.plots{display:flex;flex-wrap:wrap;gap:8px}svg.plot{border:1px solid #eee;background:#fff}
svg .title{font-size:12px;font-weight:600;fill:#222}svg .axis{font-size:10px;fill:#555}
svg .grid{stroke:#eee}svg .frame{fill:none;stroke:#bbb}svg .tick{stroke:#999}
figure{display:inline-block;margin:6px 12px 6px 0;vertical-align:top}
figcaption{font-size:12px;color:#555}
figure img,figure video{image-rendering:pixelated;max-width:100%;height:auto;border:1px solid #ddd}
figure video{min-width:320px}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay whole."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{_esc(_fmt(c))}</td>' if i >= numeric_from and (_number(c) is not None or c is None)
        else f"<td>{_esc(_fmt(c))}</td>" for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _not_run(what: str) -> str:
    return f'<p class="not-run">{NOT_RUN}: {_esc(what)}</p>'


def _data_uri(path: Path) -> str:
    return f"data:{MIME[path.suffix.lower()]};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _figure(run: Path, rel: str, caption: str, problems: list[str]) -> str:
    path = run / rel
    size = path.stat().st_size
    if size > MAX_EMBED_BYTES:
        problems.append(f"{path}: {size / 2**20:.0f} MiB, too large to embed")
        return f'<p class="problem">{_esc(rel)}: {size / 2**20:.0f} MiB, too large to embed</p>'
    uri = _data_uri(path)
    if MIME[path.suffix.lower()].startswith("video/"):
        media = f'<video src="{uri}" controls autoplay loop muted playsinline></video>'
    else:
        media = f'<img src="{uri}" alt="{_esc(rel)}"{_display_width(path)}>'
    return f"<figure>{media}<figcaption>{_esc(caption)}</figcaption></figure>"


def _display_width(path: Path) -> str:
    """A width attribute that shows small frames (64x64 games) at 2x, up to the page width."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            width = image.width
    except (OSError, ValueError):
        return ""  # the browser shows it at its own size, or as broken (the test's load check catches that)
    return f' width="{min(2 * width, 1100)}"' if width < 550 else ""


def _duration(seconds: Any) -> str:
    s = _number(seconds)
    if s is None:
        return "—"
    minutes, sec = divmod(round(s), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}" if hours else f"{minutes}:{sec:02d}"


def _section_config(data: dict) -> tuple[bool, str]:
    if data["config"] is None:
        return False, _not_run("no config.yaml in the run folder or its stage folders")
    text = yaml.safe_dump(data["config"], sort_keys=False, default_flow_style=False)
    return True, f'<p class="note">from {_esc(data["config_file"])}</p><pre>{_esc(text)}</pre>'


def _section_stages(data: dict) -> tuple[bool, str]:
    parts = []
    stages = data["stages"]
    if stages:
        rows = []
        for name, result in stages.items():
            result = result if isinstance(result, dict) else {"result": result}
            metrics = _flatten({k: v for k, v in result.items() if k != "seconds"})
            shown = "; ".join(f"{k} = {_fmt(v)}" for k, v in metrics.items()) or "—"
            rows.append((name, _duration(result.get("seconds")), shown))
        total = sum(_number(r.get("seconds")) or 0.0 for r in stages.values() if isinstance(r, dict))
        parts.append(_table(("stage", "wall time", "result"), rows, numeric_from=1))
        parts.append(f'<p class="note">total wall time {_duration(total)} (h:mm:ss), from summary.json</p>')
    else:
        parts.append(_not_run("no summary.json with stage results (written by `dreamerv4 run`)"))
    if data["training"]:
        rows = []
        for name, t in data["training"].items():
            last = t["last_train"] or {}
            last_eval = t["last_eval"] or {}
            evals = "; ".join(f"{k} = {_fmt(v)}" for k, v in last_eval.items() if k not in ("step", "elapsed_min"))
            rows.append((name, t["step"], t["train_time_min"], last.get("loss"), t["nonfinite_steps"], evals or "—"))
        parts.append("<h3>Training (from each stage's metrics.jsonl)</h3>")
        parts.append(_table(("stage", "steps", "train time (min)", "last loss", "skipped non-finite updates",
                             "last eval"), rows))
    return bool(stages) or bool(data["training"]), "".join(parts)


def _section_curves(data: dict) -> tuple[bool, str]:
    parts = []
    for name in TRAINING_STAGES + tuple(k for k in data["curves"] if k not in TRAINING_STAGES):
        series = data["curves"].get(name)
        parts.append(f"<h3>{_esc(name)}</h3>")
        if not series:
            parts.append(_not_run(f"no {name}/metrics.jsonl with train records"))
            continue
        plots = [svg_line_plot({key: pts}, f"{name}: {key}") for key, pts in list(series.items())[:MAX_PLOTS_PER_STAGE]]
        parts.append('<div class="plots">' + "".join(plots) + "</div>")
        if len(series) > MAX_PLOTS_PER_STAGE:
            parts.append(f'<p class="note">{len(series) - MAX_PLOTS_PER_STAGE} more metrics in metrics.jsonl</p>')
    return any(data["curves"].values()), "".join(parts)


def _section_reconstructions(data: dict, run: Path) -> tuple[bool, str]:
    parts = []
    if data["reconstruction"]:
        parts.append(_figure(run, data["reconstruction"], "held-out frames: top row real, bottom row "
                             "reconstructed by the tokenizer (mask rate 0)", data["problems"]))
    else:
        parts.append(_not_run(f"no {RECONSTRUCTION_IMAGE} (written by `dreamerv4 eval tokenizer`)"))
    for stage, images in data["training_images"].items():
        parts.append(f"<h3>Latest training images: {_esc(stage)}</h3>")
        parts += [_figure(run, rel, Path(rel).name, data["problems"]) for rel in images]
    return bool(data["reconstruction"] or data["training_images"]), "".join(parts)


def _section_rollouts(data: dict, run: Path) -> tuple[bool, str]:
    if not data["rollouts"]:
        return False, _not_run("no GIF/MP4/WebM/PNG under " + " or ".join(f"{d}/" for d in VIDEO_DIRS)
                               + " (written by `dreamerv4 eval dynamics`)")
    return True, "".join(_figure(run, rel, rel, data["problems"]) for rel in data["rollouts"])


def _section_stage_evals(data: dict) -> tuple[bool, str]:
    parts = []
    names = TRAINING_STAGES + tuple(k for k in data["stage_evals"] if k not in TRAINING_STAGES)
    for name in names:
        parts.append(f"<h3>{_esc(name)}</h3>")
        result = data["stage_evals"].get(name)
        if result is None and name == "imagine" and data["crafter_eval"].get("imagine"):
            # Imagination training has no offline evaluation of its own: its test is the real game.
            parts.append('<p class="note">evaluated in the real game: see "Real-game evaluation (Crafter)"</p>')
            continue
        if result is None:
            parts.append(_not_run(f"no {name}/{STAGE_EVAL_FILE}"))
            continue
        if not isinstance(result, dict):
            parts.append(f"<pre>{_esc(json.dumps(result, indent=1))}</pre>")
            continue
        scalars = {k: v for k, v in result.items() if not isinstance(v, dict)}
        parts.append(_table(("key", "value"), list(scalars.items())))
        for key, value in result.items():
            if isinstance(value, dict):
                parts.append(f'<p class="note">{_esc(key)}</p>' + _table(("key", "value"), list(_flatten(value).items())))
    return bool(data["stage_evals"]), "".join(parts)


def _ci_text(ci: Any) -> str:
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_number(c) is not None for c in ci):
        return f"[{ci[0]:.3g}, {ci[1]:.3g}]"
    if _number(ci) is not None:
        return f"± {ci:.3g}"
    return "missing"


def _section_crafter_eval(data: dict) -> tuple[bool, str]:
    results = data["crafter_eval"]
    rows, missing_keys = [], []
    for policy, label in CRAFTER_EVAL_LABELS.items():
        r = results.get(policy)
        if r is None:
            rows.append(f'<tr><td>{_esc(label)}</td><td colspan="4" class="not-run">{NOT_RUN} '
                        f'(no {_esc(CRAFTER_EVAL_FILES[policy])})</td></tr>')
            continue
        absent = [k for k in CRAFTER_EVAL_KEYS if k not in r]
        if absent:
            missing_keys.append(f"{CRAFTER_EVAL_FILES[policy]}: missing {', '.join(absent)}")
        cells = [_fmt(r["mean_return"]) if "mean_return" in r else "missing",
                 _ci_text(r.get("return_ci95")),
                 _fmt(r["crafter_score"]) if "crafter_score" in r else "missing",
                 _fmt(r["episodes"]) if "episodes" in r else "missing"]
        rows.append(f"<tr><td>{_esc(label)}</td>" + "".join(f'<td class="num">{_esc(c)}</td>' for c in cells) + "</tr>")
    parts = ['<table><thead><tr><th>policy</th><th>mean return</th><th>95% CI</th><th>Crafter score (%)</th>'
             '<th>episodes</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>"]
    parts += [f'<p class="problem">{_esc(m)}</p>' for m in missing_keys]
    ran = {p: r for p, r in results.items() if r is not None}
    names = sorted({name for r in ran.values() if isinstance(r.get("achievements"), dict) for name in r["achievements"]})
    if names:
        head = "".join(f"<th>{_esc(CRAFTER_EVAL_LABELS[p])}</th>" for p in ran)
        body = ""
        for name in names:
            cells = []
            for r in ran.values():
                rate = _number((r.get("achievements") or {}).get(name))
                cells.append(f'<td class="num">{"—" if rate is None else f"{100 * rate:.1f}%"}</td>')
            body += f"<tr><td>{_esc(name)}</td>{''.join(cells)}</tr>"
        parts.append(f"<h3>Achievement success rates</h3><table><thead><tr><th>achievement</th>{head}</tr></thead>"
                     f"<tbody>{body}</tbody></table>")
    extras = {p: {k: v for k, v in r.items() if k not in CRAFTER_EVAL_KEYS} for p, r in ran.items()}
    for policy, extra in extras.items():
        if extra:
            parts.append(f'<p class="note">{_esc(CRAFTER_EVAL_FILES[policy])}: other keys</p>'
                         + _table(("key", "value"), list(_flatten(extra).items())))
    return bool(ran), "".join(parts)


def _section_instrument(data: dict) -> tuple[bool, str]:
    results = {p: r for p, r in data["instrument"].items() if r is not None}
    parts = []
    curves_ = data["curves"].get("imagine") or {}
    series = {name: curves_[key] for key, name in (("imagined_reward", "imagined reward per rollout (H steps)"),
                                                    ("eval/crafter_return", "real-game return per episode"))
              if key in curves_}
    if series:
        parts.append('<div class="plots">' + svg_line_plot(series, "imagination training: imagined vs real")
                     + "</div>")
    if not results:
        parts.append(_not_run(f"no {' or '.join(INSTRUMENT_FILES.values())} (written by `dreamerv4 eval imagination`)"))
        return bool(series), "".join(parts)
    head = "".join(f"<th>{_esc(CRAFTER_EVAL_LABELS[p])}</th>" for p in results)
    body = "".join(f"<tr><td>{_esc(label)}</td>" + "".join(
        f'<td class="num">{_esc(_fmt(r.get(key)) if r.get(key) is not None else "n/a")}</td>' for r in results.values())
        + "</tr>" for key, label in INSTRUMENT_ROWS)
    first = next(iter(results.values()))
    parts.append(f'<p class="note">From {first.get("starts")} held-out states, replayed in the game, each policy acts '
                 f'{first.get("horizon")} steps in the world model; the same actions are then played in the real '
                 'game. Imagined return far above the real one is model exploitation.</p>'
                 f"<table><thead><tr><th>per start</th>{head}</tr></thead><tbody>{body}</tbody></table>")
    drift = {CRAFTER_EVAL_LABELS[p]: [(h["h"], h["psnr"]) for h in r.get("per_horizon", []) if _number(h.get("psnr"))]
             for p, r in results.items()}
    if any(drift.values()):
        parts.append('<div class="plots">' + svg_line_plot(drift, "imagined vs real frame: PSNR (dB)", xlabel="h")
                     + "</div>")
    return True, "".join(parts)


def render_html(data: dict[str, Any], run: Path) -> tuple[str, dict[str, bool]]:
    """The page and, per section id, whether it holds data (False: "not run")."""
    builders = {
        "config": lambda: _section_config(data),
        "stages": lambda: _section_stages(data),
        "curves": lambda: _section_curves(data),
        "reconstructions": lambda: _section_reconstructions(data, run),
        "rollouts": lambda: _section_rollouts(data, run),
        "stage-evals": lambda: _section_stage_evals(data),
        "crafter-eval": lambda: _section_crafter_eval(data),
        "imagination-instrument": lambda: _section_instrument(data),
    }
    filled, body = {}, []
    for sid, heading in SECTIONS.items():
        filled[sid], content = builders[sid]()
        body.append(f'<section id="{sid}" data-filled="{str(filled[sid]).lower()}"><h2>{_esc(heading)}</h2>'
                    f"{content}</section>")
    problems = "".join(f'<p class="problem">{_esc(p)}</p>' for p in data["problems"])
    nav = "".join(f'<a href="#{sid}">{_esc(h.split(":")[0])}</a>' for sid, h in SECTIONS.items())
    generated = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>dreamerv4 run report: {_esc(run.resolve().name)}</title><style>{STYLE}</style></head><body>"
            f"<h1>dreamerv4 run report</h1><p class=\"meta\">run folder {_esc(run.resolve())} · generated {generated}"
            f"</p><nav>{nav}</nav>{problems}{''.join(body)}</body></html>\n")
    return page, filled


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_report(run_dir: str | Path) -> Path:
    """Write <run_dir>/report.html from what the run folder holds and merge the report's data into
    <run_dir>/summary.json (keeping its "stages"). Returns the report's path.

    Call it after the pipeline has written summary.json for its last stage, not from inside a stage:
    the pipeline rewrites summary.json from its in-memory copy after each stage."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"{run}: no such run folder")
    data = collect(run)
    page, filled = render_html(data, run)
    report = run / REPORT_FILE
    _atomic_write(report, page)

    summary_path = run / SUMMARY_FILE
    try:
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"stages": {}}
    except ValueError:
        return report  # listed in the report's problems; an unreadable summary.json is left as it is
    if not isinstance(summary, dict):
        return report
    summary.update(_json_safe({
        "config": data["config"],
        "training": data["training"],
        "stage_evals": data["stage_evals"],
        "crafter_eval": data["crafter_eval"],
        "instrument": data["instrument"],
        "report": {"file": REPORT_FILE, "sections": filled, "reconstruction": data["reconstruction"],
                   "rollouts": data["rollouts"], "problems": data["problems"],
                   "generated": datetime.datetime.now().astimezone().isoformat(timespec="seconds")},
    }))
    _atomic_write(summary_path, json.dumps(summary, indent=2, allow_nan=False, default=str))
    return report

"""The run report: one self-contained `report.html` and an updated `summary.json` for a run folder.

    dreamerv4 report runs/crafter-small                     # -> runs/crafter-small/report.html, updates summary.json
    dreamerv4 report runs/crafter-small --out /tmp/r.html   # the run folder is only read

    from dreamerv4.evaluation.report import write_report
    write_report("runs/crafter-small")

`dreamerv4 run` calls it after its last stage. It only reads what the run left on disk
(evaluation/report_data.py); a part whose files are absent says "not run" (nothing is made up), so a
run that stopped early still gets a page.

The page reads top down as a result:
1. the headline: real-game return of the random, behaviour-cloning and imagination-trained policies
   with 95% intervals as a chart, their Crafter scores, and the achievements whose success rate moved
   most between behaviour cloning and imagination training (report_data.headline);
2. one section per stage (tokenizer, world model, agent, imagination training, the exploitation
   instrument): three or four key numbers beside the baseline each should beat (report_data's
   tokenizer_numbers, dynamics_numbers, agent_numbers, imagine_numbers, instrument_rows), and the
   stage's plot, image or video (plots: evaluation/svg.py);
3. collapsed <details> at the end: every raw metric (stage wall times, training records and curves,
   each eval file) and the resolved config.

What it reads, relative to the run folder:
    config.yaml                      resolved config (pipeline.py); else the first <stage>/config.yaml
    summary.json                     {"stages": {name: {"seconds": wall time, **stage result}}} (pipeline.py)
    <stage>/metrics.jsonl            training records of the loop (training/logging.py): loss curves
    <stage>/eval.json                per-stage evaluations (evaluation/tokenizer.py, dynamics.py, agent.py)
    tokenizer/eval.png               held-out reconstruction grid (top row real, bottom reconstructed)
    <stage>/images/<name>_<step>.png latest training-time image of each name
    dynamics/**/*.gif|mp4|webm|png   real-vs-imagined rollouts (evaluation/dynamics.py writes dynamics/eval.gif
                                     and .mp4: the MP4 is shown); imagine/** too
    eval/crafter_<policy>.json       real-game evaluation, one file per policy (CRAFTER_EVAL_FILES)
    eval/imagination_<policy>.json   the exploitation instrument (evaluation/imagination.py; INSTRUMENT_FILES)

Real-game evaluation files (written by the Crafter evaluation, read here), JSON objects with keys:
    mean_return     float         mean episode return
    return_ci95     [low, high]   95% confidence interval of the mean return (a number: its half-width)
    crafter_score   float         Crafter score in percent: exp(mean(log(1 + success%))) - 1
    achievements    {name: rate}  success rate in [0, 1] of each of the 22 achievements
    episodes        int           episodes played
Other keys are kept in summary.json and shown with the raw metrics; a missing key shows as "missing".

Everything in the page is inline: images and videos are base64 data URIs, plots are inline SVG, the
stylesheet is embedded; no scripts, no external CSS/JS/fonts. summary.json keeps the pipeline's
"stages" and gets: config, training (per stage: steps, train time, last train and eval records),
stage_evals (each <stage>/eval.json), crafter_eval (per policy), instrument, headline (`headline`),
report (file, sections filled, problems).
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from dreamerv4.errors import UserError
from dreamerv4.evaluation.report_data import (CRAFTER_EVAL_FILES, CRAFTER_EVAL_KEYS, INSTRUMENT_FILES, MIME,
                                              STAGE_EVAL_FILE, SUMMARY_FILE, TRAINING_STAGES,
                                              KeyNumber, agent_numbers, collect, crafter_eval_path, dig,
                                              dynamics_numbers, finite, headline, horizons, imagine_numbers,
                                              imagine_return_series, instrument_rows, tokenizer_numbers)
from dreamerv4.evaluation.svg import svg_interval_chart, svg_line_plot

# crafter_eval_path is imported above for pipeline.py, which takes it from here.

REPORT_FILE = "report.html"
CRAFTER_EVAL_LABELS = {"random": "random policy", "bc": "behaviour cloning", "imagine": "imagination-trained"}
MAX_EMBED_BYTES = 25 * 2**20  # a bigger media file is listed, not embedded
MAX_PLOTS_PER_STAGE = 16
NOT_RUN = "not run"
SECTIONS = {  # id -> heading, in page order; "crafter-eval" is the headline
    "crafter-eval": "Result: return in the real game (Crafter)",
    "tokenizer": "Tokenizer",
    "dynamics": "World model",
    "agent": "Agent: behaviour cloning and reward head",
    "imagine": "Imagination training",
    "imagination-instrument": "Imagination vs the real game: the exploitation instrument",
    "raw-metrics": "Raw metrics",
    "config": "Resolved config",
}
PIPELINE_STAGES = {"tokenizer": ("tokenizer", "eval_tokenizer"), "dynamics": ("dynamics", "eval_dynamics"),
                   "agent": ("agent", "eval_agent"), "imagine": ("imagine", "crafter_imagine"),
                   "imagination-instrument": ("eval_imagination",)}
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
POLICY_COLORS = {"random": "#8c8c8c", "bc": "#1f77b4", "imagine": "#e6730f"}  # the headline chart


# ---------------------------------------------------------------------------------------------
# HTML


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;max-width:1180px;
margin:0 auto;padding:16px 24px 48px;background:#fff}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;
margin-top:32px}h3{font-size:15px;margin:18px 0 6px}
.meta,.note{color:#666;font-size:12px}nav{margin:6px 0 0}nav a{margin-right:12px;font-size:13px}
.not-run{color:#999;font-style:italic}.problem{color:#b00020}
.lede{font-size:15px;margin:8px 0}.lede b{font-variant-numeric:tabular-nums}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.beats{color:#1a7f37}td.below{color:#b00020}td.over,td.under{color:#9a6700}td.within-noise,td.equal{color:#777}
td.up{color:#1a7f37}td.down{color:#b00020}
pre{background:#f7f7f7;border:1px solid #e5e5e5;padding:8px;overflow:auto;max-height:420px;font-size:12px}
.plots{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}svg.plot{border:1px solid #eee;background:#fff}
svg.chart{border:none}svg .label{font-size:13px;fill:#222}svg .value{font-size:12px;fill:#222}
svg .missing{font-style:italic;fill:#999;font-size:12px}svg .legend{font-size:10px;fill:#333}svg .zero{stroke:#888}
svg .title{font-size:12px;font-weight:600;fill:#222}svg .axis{font-size:10px;fill:#555}
svg .grid{stroke:#eee}svg .frame{fill:none;stroke:#bbb}svg .tick{stroke:#999}
figure{display:inline-block;margin:6px 12px 6px 0;vertical-align:top}
figcaption{font-size:12px;color:#555}
figure img,figure video{image-rendering:pixelated;max-width:100%;height:auto;border:1px solid #ddd}
figure video{min-width:320px}
details{margin:6px 0;border:1px solid #e5e5e5;border-radius:4px;padding:4px 10px}
details>summary{cursor:pointer;font-weight:600;font-size:13px;padding:2px 0}
details details{border-color:#eee}
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
        f'<td class="num">{_esc(_fmt(c))}</td>' if i >= numeric_from and (finite(c) is not None or c is None)
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
    s = finite(seconds)
    if s is None:
        return "—"
    minutes, sec = divmod(round(s), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}" if hours else f"{minutes}:{sec:02d}"


def _number_text(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


VERDICT_TEXT = {"beats": "✓ beats it", "below": "✗ below it", "within noise": "≈ within noise",
                "equal": "= equal",
                "over": "imagines more", "under": "imagines less"}


def _key_table(rows: Sequence[KeyNumber]) -> str:
    body = []
    for row in rows:
        verdict = row.verdict()
        text = VERDICT_TEXT.get(verdict, "") if verdict else "no baseline"
        if verdict in ("over", "under"):
            text = f"{text} by {abs(row.value - row.baseline_value):.3g}"
        if row.diff_ci is not None:
            low, high = row.diff_ci
            text += f" (difference {row.value - row.baseline_value:+.3g}, 95% CI [{low:+.3g}, {high:+.3g}])"
        elif verdict == "within noise":
            text += " (the 95% intervals overlap)"
        if row.note:
            text += f" ({row.note})"
        value = _number_text(row.value) + (f" [{row.value_ci[0]:.3g}, {row.value_ci[1]:.3g}]" if row.value_ci else "")
        base = _number_text(row.baseline_value) + (f" [{row.baseline_ci[0]:.3g}, {row.baseline_ci[1]:.3g}]"
                                                   if row.baseline_ci else "")
        body.append(f"<tr><td>{_esc(row.measure)}</td><td class=\"num\">{_esc(value)}</td>"
                    f"<td class=\"num\">{_esc(base)}</td><td>{_esc(row.baseline)}</td>"
                    f"<td class=\"{(verdict or 'none').replace(' ', '-')}\">{_esc(text)}</td></tr>")
    return ('<table class="key"><thead><tr><th>measure</th><th>this run</th><th>baseline</th><th>baseline is</th>'
            f'<th></th></tr></thead><tbody>{"".join(body)}</tbody></table>')


def _stage_meta(data: dict, section: str) -> str:
    """"370 steps in 6.8 min of training (stopped: time_limit) · wall time 7:10 + eval 1:34"."""
    bits = []
    training = data["training"].get(section) if section in TRAINING_STAGES else None
    stages = data["stages"] or {}
    if training:
        text = f"{training['step']} steps" if training["step"] is not None else "no steps"
        if training["train_time_min"] is not None:
            text += f" in {training['train_time_min']:.1f} min of training"
        stop = dig(stages.get(section), "stop_reason")
        bits.append(text + (f" (stopped: {stop})" if isinstance(stop, str) else ""))
        if training["nonfinite_steps"]:
            bits.append(f"{training['nonfinite_steps']} non-finite updates skipped")
    walls = [f"{name} {_duration(dig(stages.get(name), 'seconds'))}" for name in PIPELINE_STAGES[section]
             if isinstance(stages.get(name), dict)]
    if walls:
        bits.append("wall time " + ", ".join(walls))
    return f'<p class="meta">{_esc(" · ".join(bits))}</p>' if bits else ""


def _curve_plots(data: dict, stage: str, keys: Sequence[str], title: str | None = None) -> str:
    """One plot of the stage's training curves named in `keys` (those it logged), or ""."""
    found = {key: pts for key, pts in (data["curves"].get(stage) or {}).items() if key in keys}
    if not found:
        return ""
    return svg_line_plot(found, title or f"{stage} training: {', '.join(found)}")


def _plots(*svgs: str) -> str:
    svgs = tuple(s for s in svgs if s)
    return '<div class="plots">' + "".join(svgs) + "</div>" if svgs else ""


def _key_numbers(stage: str, rows: list, result: dict | None, command: str) -> str:
    """A stage's key-number table, or why there is none (no eval file, or one without the numbers)."""
    if rows:
        return _key_table(rows)
    if result is None:
        return _not_run(f"no {stage}/{STAGE_EVAL_FILE} (written by `{command}`)")
    return f'<p class="note">{stage}/{STAGE_EVAL_FILE} holds none of the key numbers: see Raw metrics</p>'


def _curves_missing(data: dict, stage: str) -> str:
    return "" if stage in data["curves"] else _not_run(f"no {stage}/metrics.jsonl with train records")


def _section_headline(data: dict, result: dict) -> tuple[bool, str]:
    policies = result["policies"]
    parts = []
    if any(r is not None for r in policies.values()):
        episodes = sorted({r["episodes"] for r in policies.values() if r and r["episodes"] is not None})
        each = f", {'/'.join(map(str, episodes))} episodes each" if episodes else ""
        rows = [(CRAFTER_EVAL_LABELS[p], (r or {}).get("mean_return"), (r or {}).get("ci95"), POLICY_COLORS[p])
                for p, r in policies.items()]
        parts.append(svg_interval_chart(rows, "Real-game return per episode: mean and 95% interval",
                                        f"mean episode return in Crafter{each}", element_id="headline-chart"))
        parts += [f'<p class="lede">{sentence}</p>' for sentence in _headline_sentences(result)]
    parts.append(_crafter_table(data))
    parts.append(_moved_table(result))
    return any(r is not None for r in policies.values()), "".join(parts)


def _headline_sentences(result: dict) -> list[str]:
    out = []
    names = {"bc_vs_random": ("bc", "random"), "imagine_vs_bc": ("imagine", "bc")}
    for key, (a, b) in names.items():
        comparison = result["comparisons"][key]
        if comparison is None:
            continue
        ra, rb = result["policies"][a], result["policies"][b]
        text = (f"{_esc(CRAFTER_EVAL_LABELS[a]).capitalize()} <b>{ra['mean_return']:.2f}</b> against "
                f"{_esc(CRAFTER_EVAL_LABELS[b])} <b>{rb['mean_return']:.2f}</b> ({comparison['diff']:+.2f})")
        if comparison["disjoint"] is None:
            text += "; no interval to judge it by."
        elif comparison["disjoint"]:
            text += f": the 95% intervals do not overlap, {'higher' if comparison['diff'] > 0 else 'lower'}."
        else:
            text += ": the 95% intervals overlap, so this run does not separate them."
        paired = result["paired"][key]
        if paired is not None and paired["ci95"] is not None:
            low, high = paired["ci95"]
            verdict = "above zero" if low > 0 else "below zero" if high < 0 else "includes zero"
            text += (f" Paired over the same {paired['episodes']} worlds: {paired['diff']:+.2f} "
                     f"(95% interval {low:+.2f} to {high:+.2f}, {verdict}).")
        out.append(text)
    return out


def _ci_text(ci: Any) -> str:
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(finite(c) is not None for c in ci):
        return f"[{ci[0]:.3g}, {ci[1]:.3g}]"
    if finite(ci) is not None:
        return f"± {ci:.3g}"
    return "missing"


def _crafter_table(data: dict) -> str:
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
    return ('<table><thead><tr><th>policy</th><th>mean return</th><th>95% CI</th><th>Crafter score (%)</th>'
            '<th>episodes</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>"
            + "".join(f'<p class="problem">{_esc(m)}</p>' for m in missing_keys))


def _pct(rate: float | None) -> str:
    return "—" if rate is None else f"{100 * rate:.1f}%"


def _moved_table(result: dict) -> str:
    bc, imagine = result["policies"]["bc"], result["policies"]["imagine"]
    head = "<h3>Achievements that moved most from behaviour cloning to imagination training</h3>"
    if bc is None or imagine is None:
        return head + _not_run(f"needs both {CRAFTER_EVAL_FILES['bc']} and {CRAFTER_EVAL_FILES['imagine']}")
    if not result["moved"]:
        return head + '<p class="note">no achievement\'s success rate differs between the two policies</p>'
    body = "".join(
        f"<tr><td>{_esc(m['name'])}</td><td class=\"num\">{_pct(m['random'])}</td>"
        f"<td class=\"num\">{_pct(m['bc'])}</td>"
        f"<td class=\"num\">{_pct(m['imagine'])}</td><td class=\"num {'up' if m['change'] > 0 else 'down'}\">"
        f"{100 * m['change']:+.1f} points</td></tr>" for m in result["moved"])
    episodes = imagine["episodes"]
    note = (f'<p class="note">success rate: the share of episodes in which the achievement was unlocked at least '
            f"once; one episode of {episodes} is {100 / episodes:.1f} points. Every achievement is under Raw "
            "metrics.</p>"
            if episodes else "")
    return (head + "<table><thead><tr><th>achievement</th><th>random policy</th><th>behaviour cloning</th>"
            f"<th>imagination-trained</th><th>change</th></tr></thead><tbody>{body}</tbody></table>{note}")


def _section_tokenizer(data: dict, run: Path) -> tuple[bool, str]:
    result = data["stage_evals"].get("tokenizer")
    parts = [_stage_meta(data, "tokenizer")]
    rows = tokenizer_numbers(result)
    parts.append(_key_numbers("tokenizer", rows, result, "dreamerv4 eval tokenizer"))
    if rows:
        notes = []
        if finite(dig(result, "lpips")) is not None:
            notes.append(f"LPIPS {dig(result, 'lpips'):.3g} (lower is better)")
        mean_frame = dig(result, "references", "mean_training_frame")
        if finite(dig(mean_frame, "psnr")) is not None:
            notes.append(f"the mean training frame scores PSNR {dig(mean_frame, 'psnr'):.3g} dB")
        if finite(dig(result, "real_object_retention")) is not None:
            notes.append(f"the cell classifier keeps {dig(result, 'real_object_retention'):.3g} of object cells "
                         "on the real frames (the ceiling of object retention)")
        if finite(dig(result, "frames")) is not None:
            notes.append(f"{dig(result, 'frames')} held-out frames")
        parts.append(f'<p class="note">{_esc("; ".join(notes))}</p>' if notes else "")
    if data["reconstruction"]:
        parts.append(_figure(run, data["reconstruction"], "held-out frames: top row real, bottom row "
                             "reconstructed by the tokenizer (mask rate 0)", data["problems"]))
    parts.append(_plots(_curve_plots(data, "tokenizer", ("loss",))))
    parts.append(_curves_missing(data, "tokenizer"))
    filled = bool(result is not None or data["reconstruction"] or data["curves"].get("tokenizer"))
    return filled, "".join(parts)


def _section_dynamics(data: dict, run: Path) -> tuple[bool, str]:
    result = data["stage_evals"].get("dynamics")
    parts = [_stage_meta(data, "dynamics")]
    rows = dynamics_numbers(result)
    parts.append(_key_numbers("dynamics", rows, result, "dreamerv4 eval dynamics"))
    if rows:
        last = horizons(result)[-1]
        ceiling = finite(dig(result, "results", "tokenizer_reconstruction", last, "psnr"))
        if ceiling is not None:
            parts.append(f'<p class="note">the tokenizer allows at most {ceiling:.3g} dB {last} frames ahead '
                         "(the real future latents decoded); PSNR per frame is capped at 50 dB</p>")
    curve = dig(result, "psnr_curve")
    horizon_plot = ""
    if isinstance(curve, Mapping):
        series = {name: [(h + 1, v) for h, v in enumerate(values) if finite(v) is not None]
                  for name, values in curve.items() if isinstance(values, list)}
        if any(series.values()):
            horizon_plot = svg_line_plot(series, "imagined frame vs real: PSNR (dB)", xlabel="frames ahead",
                                         width=460, height=260)
    parts.append(_plots(horizon_plot, _curve_plots(data, "dynamics", ("loss",))))
    media = [rel for rel in data["rollouts"] if Path(rel).parts[0] == "dynamics"]
    panels = dig(result, "video", "panels")
    panels = " | ".join(map(str, panels)) if isinstance(panels, list) and panels else "real | imagined"
    parts += [_figure(run, rel, f"{rel}: {panels}" if Path(rel).parent.name == "dynamics" else rel, data["problems"])
              for rel in media]
    parts.append(_curves_missing(data, "dynamics"))
    return bool(result is not None or media or data["curves"].get("dynamics")), "".join(parts)


def _section_agent(data: dict, run: Path) -> tuple[bool, str]:
    result = data["stage_evals"].get("agent")
    parts = [_stage_meta(data, "agent")]
    rows = agent_numbers(result)
    parts.append(_key_numbers("agent", rows, result, "dreamerv4 eval agent"))
    if rows:
        steps = dig(result, "steps")
        if steps is not None:
            parts.append(f'<p class="note">{_esc(steps)} held-out steps; baselines fitted on '
                         f'{_esc(dig(result, "baseline_source") or "the training split")}</p>')
    parts.append(_plots(_curve_plots(data, "agent", ("loss", "bc_nll"))))
    parts.append(_curves_missing(data, "agent"))
    return bool(result is not None or data["curves"].get("agent")), "".join(parts)


def _section_imagine(data: dict, run: Path) -> tuple[bool, str]:
    parts = [_stage_meta(data, "imagine")]
    rows = imagine_numbers(data)
    if rows:
        parts.append(_key_table(rows))
    else:
        parts.append(_not_run(f"no {CRAFTER_EVAL_FILES['imagine']} (written by `dreamerv4 eval crafter` with the "
                              "imagination checkpoint)"))
    curves_ = data["curves"].get("imagine") or {}
    series = imagine_return_series(data)
    title = "imagination training: " + (" vs ".join(series) if len(series) == 1 else "imagined vs real")
    plot = svg_line_plot(series, title, width=460, height=260) if series else ""
    parts.append(_plots(plot, _curve_plots(data, "imagine", ("loss",))))
    media = [rel for rel in data["rollouts"] if Path(rel).parts[0] == "imagine"]
    parts += [_figure(run, rel, rel, data["problems"]) for rel in media]
    if not curves_:
        parts.append(_not_run("no imagine/metrics.jsonl with train records"))
    return bool(data["crafter_eval"].get("imagine") or curves_ or media), "".join(parts)


def _section_instrument(data: dict) -> tuple[bool, str]:
    results = {p: r for p, r in data["instrument"].items() if r is not None}
    if not results:
        return False, _stage_meta(data, "imagination-instrument") + _not_run(
            f"no {' or '.join(INSTRUMENT_FILES.values())} (written by `dreamerv4 eval imagination`)")
    first = next(iter(results.values()))
    parts = [_stage_meta(data, "imagination-instrument"),
             f'<p class="note">From {_esc(first.get("starts"))} held-out real states each policy acts '
             f'{_esc(first.get("horizon"))} steps in the world model; the same actions are then played in the real '
             "game. Imagined return far above the real one is model exploitation.</p>"]
    head = "".join(f'<th>{_esc(CRAFTER_EVAL_LABELS[p])}: imagined</th><th>real game</th>' for p in results)
    body = ""
    for label, values in instrument_rows(results):
        body += f"<tr><td>{_esc(label)}</td>" + "".join(
            f'<td class="num">{_number_text(imagined)}</td><td class="num">{_number_text(real)}</td>'
            for imagined, real in values.values()) + "</tr>"
    parts.append(f'<table class="key"><thead><tr><th>per start</th>{head}</tr></thead><tbody>{body}</tbody></table>')
    recall = [f"{CRAFTER_EVAL_LABELS[p]}: recall {_fmt(finite(r.get('unlock_recall')))}, precision "
              f"{_fmt(finite(r.get('unlock_precision')))}" for p, r in results.items()]
    parts.append(f'<p class="note">the reward head on real first unlocks (imagined reward &gt; 0.5): '
                 f'{_esc("; ".join(recall))}. Every measure is under Raw metrics.</p>')
    drift = {CRAFTER_EVAL_LABELS[p]: [(h["h"], h["psnr"]) for h in r.get("per_horizon", [])
                                      if isinstance(h, Mapping) and finite(h.get("psnr")) is not None]
             for p, r in results.items() if isinstance(r.get("per_horizon"), list)}
    reward = {}
    for p, r in results.items():
        per_horizon = r.get("per_horizon") if isinstance(r.get("per_horizon"), list) else []
        steps = [h for h in per_horizon if isinstance(h, Mapping)]
        for key, what in (("imagined_reward", "imagined"), ("real_reward", "real")):
            pts = [(h["h"], h[key]) for h in steps if finite(h.get(key)) is not None and finite(h.get("h")) is not None]
            if pts:
                reward[f"{CRAFTER_EVAL_LABELS[p]}: {what}"] = pts
    drift_plot = svg_line_plot(drift, "imagined vs real frame: PSNR (dB)", xlabel="h") if any(drift.values()) else ""
    reward_plot = svg_line_plot(reward, "reward per step: imagined vs real", xlabel="h") if reward else ""
    parts.append(_plots(drift_plot, reward_plot))
    return True, "".join(parts)


def _details(summary: str, content: str) -> str:
    return f"<details><summary>{_esc(summary)}</summary>{content}</details>"


def _yaml(value: Any) -> str:
    text = yaml.safe_dump(_json_safe(value), sort_keys=False, default_flow_style=None, width=120, allow_unicode=True)
    return f"<pre>{_esc(text)}</pre>"


def _section_raw(data: dict, run: Path) -> tuple[bool, str]:
    parts = []
    stages = data["stages"]
    if stages:
        rows = []
        for name, result in stages.items():
            result = result if isinstance(result, dict) else {"result": result}
            stop = result.get("stop_reason")
            rows.append((name, _duration(result.get("seconds")), stop if isinstance(stop, str) else ""))
        total = sum(finite(r.get("seconds")) or 0.0 for r in stages.values() if isinstance(r, dict))
        parts.append(_details(f"Pipeline stages: wall time {_duration(total)} (h:mm:ss) in all, from summary.json",
                              _table(("stage", "wall time", "stopped"), rows, numeric_from=1) + _yaml(stages)))
    else:
        parts.append(_not_run("no summary.json with stage results (written by `dreamerv4 run`)"))
    if data["training"]:
        rows = [(name, t["step"], t["train_time_min"], dig(t["last_train"], "loss"), t["nonfinite_steps"])
                for name, t in data["training"].items()]
        last = {name: {"last_train": t["last_train"], "last_eval": t["last_eval"]}
                for name, t in data["training"].items()}
        parts.append(_details("Training: steps, time and the last records of each stage's metrics.jsonl",
                              _table(("stage", "steps", "train time (min)", "last loss", "skipped non-finite updates"),
                                     rows) + _yaml(last)))
    curve_parts = []
    for name in TRAINING_STAGES + tuple(k for k in data["curves"] if k not in TRAINING_STAGES):
        series = data["curves"].get(name)
        if not series:
            curve_parts.append(f"<h3>{_esc(name)}</h3>" + _not_run(f"no {name}/metrics.jsonl with train records"))
            continue
        plots = [svg_line_plot({key: pts}, f"{name}: {key}") for key, pts in list(series.items())[:MAX_PLOTS_PER_STAGE]]
        curve_parts.append(f"<h3>{_esc(name)}</h3>" + '<div class="plots">' + "".join(plots) + "</div>")
        if len(series) > MAX_PLOTS_PER_STAGE:
            curve_parts.append(f'<p class="note">{len(series) - MAX_PLOTS_PER_STAGE} more metrics in metrics.jsonl</p>')
    if any(data["curves"].values()):
        parts.append(_details("Training curves: every logged metric", "".join(curve_parts)))
    if data["training_images"]:
        images = "".join(f"<h3>{_esc(stage)}</h3>" + "".join(_figure(run, rel, Path(rel).name, data["problems"])
                                                             for rel in rels)
                         for stage, rels in data["training_images"].items())
        parts.append(_details("Latest training images", images))
    for name, result in data["stage_evals"].items():
        parts.append(_details(f"{name}/{STAGE_EVAL_FILE}", _yaml(result)))
    ran = {p: r for p, r in data["crafter_eval"].items() if r is not None}
    if ran:
        parts.append(_details("Real-game evaluation: every achievement and key", _achievement_table(ran)
                              + "".join(_details(CRAFTER_EVAL_FILES[p], _yaml(r)) for p, r in ran.items())))
    instrument = {p: r for p, r in data["instrument"].items() if r is not None}
    if instrument:
        parts.append(_details("Exploitation instrument: every measure", _instrument_table(instrument)
                              + "".join(_details(INSTRUMENT_FILES[p], _yaml(r)) for p, r in instrument.items())))
    filled = bool(stages or data["training"] or data["stage_evals"] or ran or instrument)
    return filled, "".join(parts)


def _achievement_table(ran: dict[str, dict]) -> str:
    names = sorted({n for r in ran.values() if isinstance(r.get("achievements"), dict) for n in r["achievements"]})
    if not names:
        return '<p class="note">no achievement rates in the files</p>'
    head = "".join(f"<th>{_esc(CRAFTER_EVAL_LABELS[p])}</th>" for p in ran)
    body = "".join(f"<tr><td>{_esc(name)}</td>" + "".join(
        f'<td class="num">{_pct(finite((r.get("achievements") or {}).get(name)))}</td>' for r in ran.values())
        + "</tr>" for name in names)
    return f"<table><thead><tr><th>achievement</th>{head}</tr></thead><tbody>{body}</tbody></table>"


def _instrument_table(results: dict[str, dict]) -> str:
    head = "".join(f"<th>{_esc(CRAFTER_EVAL_LABELS[p])}</th>" for p in results)
    body = "".join(f"<tr><td>{_esc(label)}</td>" + "".join(
        f'<td class="num">{_esc(_fmt(r.get(key)) if r.get(key) is not None else "n/a")}</td>' for r in results.values())
        + "</tr>" for key, label in INSTRUMENT_ROWS)
    return f"<table><thead><tr><th>per start</th>{head}</tr></thead><tbody>{body}</tbody></table>"


def _section_config(data: dict) -> tuple[bool, str]:
    if data["config"] is None:
        return False, _not_run("no config.yaml in the run folder or its stage folders")
    text = yaml.safe_dump(data["config"], sort_keys=False, default_flow_style=False)
    return True, _details(f"config as resolved for this run (from {data['config_file']})", f"<pre>{_esc(text)}</pre>")


def render_html(data: dict[str, Any], run: Path) -> tuple[str, dict[str, bool]]:
    """The page and, per section id, whether it holds data (False: "not run")."""
    result = headline(data)
    builders = {
        "crafter-eval": lambda: _section_headline(data, result),
        "tokenizer": lambda: _section_tokenizer(data, run),
        "dynamics": lambda: _section_dynamics(data, run),
        "agent": lambda: _section_agent(data, run),
        "imagine": lambda: _section_imagine(data, run),
        "imagination-instrument": lambda: _section_instrument(data),
        "raw-metrics": lambda: _section_raw(data, run),
        "config": lambda: _section_config(data),
    }
    filled, body = {}, []
    for sid, heading in SECTIONS.items():
        filled[sid], content = builders[sid]()
        body.append(f'<section id="{sid}" data-filled="{str(filled[sid]).lower()}"><h2>{_esc(heading)}</h2>'
                    f"{content}</section>")
        if sid == "crafter-eval" and data["problems"]:  # below the headline: it stays the first thing seen
            body.append('<div class="problems">' + "".join(f'<p class="problem">{_esc(p)}</p>'
                                                           for p in data["problems"]) + "</div>")
    nav = "".join(f'<a href="#{sid}">{_esc(h.split(":")[0])}</a>' for sid, h in SECTIONS.items())
    generated = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    total = sum(finite(r.get("seconds")) or 0.0 for r in (data["stages"] or {}).values() if isinstance(r, dict))
    meta = f"run folder {run.resolve()} · generated {generated}"
    if data["stages"]:
        meta += f" · {len(data['stages'])} pipeline stages, wall time {_duration(total)}"
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>dreamerv4 run report: {_esc(run.resolve().name)}</title><style>{STYLE}</style></head><body>"
            f"<h1>dreamerv4 run report: {_esc(run.resolve().name)}</h1><p class=\"meta\">{_esc(meta)}</p>"
            f"<nav>{nav}</nav>{''.join(body)}</body></html>\n")
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


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write <run_dir>/report.html from what the run folder holds and merge the report's data into
    <run_dir>/summary.json (keeping its "stages"). Returns the report's path.

    With `out` (a file path) the page goes there instead and the run folder is only read: summary.json
    is left as it is (a finished or read-only run folder).

    Call it after the pipeline has written summary.json for its last stage, not from inside a stage:
    the pipeline rewrites summary.json from its in-memory copy after each stage."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"{run}: no such run folder")
    data = collect(run)
    page, filled = render_html(data, run)
    report = Path(out) if out is not None else run / REPORT_FILE
    if out is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(report, page)
    if out is not None:
        return report

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
        "headline": headline(data),
        "report": {"file": REPORT_FILE, "sections": filled, "reconstruction": data["reconstruction"],
                   "rollouts": data["rollouts"], "problems": data["problems"],
                   "generated": datetime.datetime.now().astimezone().isoformat(timespec="seconds")},
    }))
    _atomic_write(summary_path, json.dumps(summary, indent=2, allow_nan=False, default=str))
    return report


def cmd_report(args) -> int:
    """`dreamerv4 report RUN [--out FILE]`: (re)write a run folder's report."""
    print(f"report: {write_report(args.run, out=args.out)}")
    return 0

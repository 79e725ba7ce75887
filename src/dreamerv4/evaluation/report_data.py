"""What the run report shows, as data: everything read from a run folder (`collect`), the headline
result (`headline`) and each stage's key numbers beside their baselines (`KeyNumber`,
`tokenizer_numbers`, `dynamics_numbers`, `agent_numbers`, `imagine_numbers`, `instrument_rows`).

    from dreamerv4.evaluation.report_data import collect, headline
    result = headline(collect("runs/crafter-small"))   # per policy: mean_return, ci95, crafter_score, ...

Pure reading, no HTML and no torch: evaluation/report.py renders it. A file that is absent gives None
(the page says "not run"); one that is unreadable is listed in data["problems"], never fatal.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"  # training/logging.py METRICS_FILE; not imported: that pulls in torch
STAGE_EVAL_FILE = "eval.json"  # <stage>/eval.json, the default output of every `dreamerv4 eval STAGE`
TRAINING_STAGES = ("tokenizer", "dynamics", "agent", "imagine")  # folder names, pipeline order
RECONSTRUCTION_IMAGE = "tokenizer/eval.png"  # evaluation/tokenizer.py: eval.json's PNG beside it
VIDEO_DIRS = ("dynamics", "imagine")
VIDEO_PREFERENCE = (".mp4", ".webm", ".gif")  # one video per stem: media.py writes both GIF and MP4
EVAL_DIR = "eval"
CRAFTER_EVAL_FILES = {  # policy -> file under the run folder; the writers use these names
    "random": f"{EVAL_DIR}/crafter_random.json",
    "bc": f"{EVAL_DIR}/crafter_bc.json",
    "imagine": f"{EVAL_DIR}/crafter_imagine.json",
}
CRAFTER_EVAL_KEYS = ("mean_return", "return_ci95", "crafter_score", "achievements", "episodes")
INSTRUMENT_FILES = {"bc": f"{EVAL_DIR}/imagination_bc.json", "imagine": f"{EVAL_DIR}/imagination_imagine.json"}
MIME = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
        ".mp4": "video/mp4", ".webm": "video/webm"}
# Train-record keys that are not worth a curve (time and throughput); the rest are plotted.
UNPLOTTED = {"step", "kind", "elapsed_min", "samples_per_s", "frames_per_s", "nonfinite_steps"}


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


def finite(value: Any) -> float | None:
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
    last_step = max((int(r["step"]) for r in records if finite(r.get("step")) is not None), default=None)
    elapsed = [finite(r.get("elapsed_min")) for r in train + evals]
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
        kind, step = record.get("kind"), finite(record.get("step"))
        if kind not in ("train", "eval") or step is None:
            continue
        for key, value in record.items():
            y = finite(value)
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
# The headline and each stage's key numbers: pure functions of what collect() read

POLICIES = tuple(CRAFTER_EVAL_FILES)  # random, bc, imagine: the headline's rows, in this order
TOP_MOVED = 6  # achievements the headline lists


def dig(value: Any, *keys: str) -> Any:
    """value[k1][k2]...; None where a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def ci_bounds(mean: Any, ci: Any) -> tuple[float, float] | None:
    """A 95% interval as (low, high): from [low, high], or from a half-width around `mean`; None if unusable."""
    if isinstance(ci, (list, tuple)):
        if len(ci) != 2:
            return None
        low, high = finite(ci[0]), finite(ci[1])
        return (low, high) if low is not None and high is not None and low <= high else None
    half, m = finite(ci), finite(mean)
    return (m - abs(half), m + abs(half)) if half is not None and m is not None else None


def policy_result(result: Any) -> dict[str, Any] | None:
    """The headline numbers of one eval/crafter_<policy>.json: mean_return, ci95 (low, high), crafter_score,
    episodes and achievements {name: success rate}; a number the file lacks is None (an achievement: left
    out). None when there is no result (the file is absent or unreadable)."""
    if not isinstance(result, Mapping):
        return None
    achievements = result.get("achievements")
    rates = {str(k): finite(v) for k, v in achievements.items()} if isinstance(achievements, Mapping) else {}
    mean = finite(result.get("mean_return"))
    episodes = finite(result.get("episodes"))
    return {"mean_return": mean, "ci95": ci_bounds(mean, result.get("return_ci95")),
            "crafter_score": finite(result.get("crafter_score")),
            "episodes": int(episodes) if episodes is not None else None,
            "achievements": {k: v for k, v in rates.items() if v is not None}}


def moved_achievements(bc: dict | None, imagine: dict | None, random: dict | None = None,
                       top: int = TOP_MOVED) -> list[dict[str, Any]]:
    """The `top` achievements whose success rate changed most from behaviour cloning to imagination
    training (policy_result dicts), largest |change| first, ties by name; unchanged ones are left out.
    Each: {name, random (None without it), bc, imagine, change = imagine - bc}."""
    if bc is None or imagine is None:
        return []
    rows = []
    for name in sorted(set(bc["achievements"]) & set(imagine["achievements"])):
        change = imagine["achievements"][name] - bc["achievements"][name]
        if abs(change) > 1e-9:
            rows.append({"name": name, "random": (random or {}).get("achievements", {}).get(name),
                         "bc": bc["achievements"][name], "imagine": imagine["achievements"][name], "change": change})
    rows.sort(key=lambda r: (-round(abs(r["change"]), 9), r["name"]))  # rates are k/episodes: ties are common
    return rows[:top]


def compare_returns(a: dict | None, b: dict | None) -> dict[str, Any] | None:
    """Policy a against b: the difference of mean returns and whether their 95% intervals are disjoint
    (None when an interval is missing). None when either mean is missing."""
    if a is None or b is None or a["mean_return"] is None or b["mean_return"] is None:
        return None
    ci_a, ci_b = a["ci95"], b["ci95"]
    disjoint = None if ci_a is None or ci_b is None else bool(ci_a[0] > ci_b[1] or ci_b[0] > ci_a[1])
    return {"diff": a["mean_return"] - b["mean_return"], "disjoint": disjoint}


def paired_returns(a: Any, b: Any) -> dict[str, Any] | None:
    """Policy a against b episode by episode, from two `eval crafter` results on the same worlds (the same
    `env_seeds` in the same order): the mean of the per-world differences a - b with its 95% interval
    (normal approximation, like each policy's own interval; None for one world), the ratio of the means
    and the number of worlds. Pairing removes the worlds' own spread, so it separates policies that two
    overlapping intervals cannot. None when either result lacks its returns or the worlds differ."""
    if not isinstance(a, Mapping) or not isinstance(b, Mapping):
        return None
    ra, rb = a.get("returns"), b.get("returns")
    if not isinstance(ra, list) or not isinstance(rb, list) or not ra or len(ra) != len(rb):
        return None
    if a.get("env_seeds") is None or a.get("env_seeds") != b.get("env_seeds"):
        return None
    diffs = [finite(x) - finite(y) if finite(x) is not None and finite(y) is not None else None for x, y in zip(ra, rb)]
    if any(d is None for d in diffs):
        return None
    n = len(diffs)
    mean = sum(diffs) / n
    half = 1.96 * math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else None
    mean_b = sum(rb) / n
    return {"diff": mean, "ci95": None if half is None else (mean - half, mean + half),
            "ratio": sum(ra) / n / mean_b if mean_b > 0 else None, "episodes": n}


def headline(data: Mapping[str, Any]) -> dict[str, Any]:
    """The page's opening result from collect()'s data: per policy (random, bc, imagine) its policy_result
    (None: not run), the achievements that moved most between BC and imagination training, and the two
    comparisons that matter: BC against random, imagination training against BC, by their intervals
    (`comparisons`) and world by world (`paired`, None where the evaluations cannot be paired)."""
    raw = data.get("crafter_eval") or {}
    policies = {p: policy_result(raw.get(p)) for p in POLICIES}
    return {"policies": policies,
            "moved": moved_achievements(policies["bc"], policies["imagine"], policies["random"]),
            "comparisons": {"bc_vs_random": compare_returns(policies["bc"], policies["random"]),
                            "imagine_vs_bc": compare_returns(policies["imagine"], policies["bc"])},
            "paired": {"bc_vs_random": paired_returns(raw.get("bc"), raw.get("random")),
                       "imagine_vs_bc": paired_returns(raw.get("imagine"), raw.get("bc"))}}


@dataclass(frozen=True)
class KeyNumber:
    """One of a stage's key numbers beside the baseline it should beat.

    `higher_is_better` None: the baseline is the truth the value estimates (imagined vs real return), so
    the verdict says by how much it over- or underestimates instead of whether it beats it."""

    measure: str
    value: float | None
    baseline: str  # what the baseline is, in words
    baseline_value: float | None
    higher_is_better: bool | None = True
    diff_ci: tuple[float, float] | None = None  # 95% interval of value - baseline_value, where the evaluation gives one
    value_ci: tuple[float, float] | None = None
    baseline_ci: tuple[float, float] | None = None
    note: str = ""  # shown with the verdict, e.g. that the numbers come without an interval

    def verdict(self) -> str | None:
        """"beats", "below", "within noise" (the interval of the difference holds 0, or the two intervals
        overlap), "equal"; "over"/"under"/"equal" against a truth; None when a number is missing."""
        if self.value is None or self.baseline_value is None:
            return None
        diff = self.value - self.baseline_value
        if self.higher_is_better is None:
            return "over" if diff > 0 else "under" if diff < 0 else "equal"
        sign = 1.0 if self.higher_is_better else -1.0
        if self.diff_ci is not None:
            low, high = sorted((sign * self.diff_ci[0], sign * self.diff_ci[1]))
            return "beats" if low > 0 else "below" if high < 0 else "within noise"
        if self.value_ci is not None and self.baseline_ci is not None:
            if self.value_ci[0] <= self.baseline_ci[1] and self.baseline_ci[0] <= self.value_ci[1]:
                return "within noise"
        if sign * diff > 0:
            return "beats"
        return "below" if sign * diff < 0 else "equal"


def tokenizer_numbers(result: Any) -> list[KeyNumber]:
    """PSNR, SSIM and object retention of held-out reconstructions (evaluation/tokenizer.py's eval.json)
    beside 4x4 average pooling of the same frames."""
    pool = dig(result, "references", "avg_pool_4x4")
    base = "4×4 average pooling of the same frames"
    rows = [KeyNumber("PSNR (dB)", finite(dig(result, "psnr")), base, finite(dig(pool, "psnr"))),
            KeyNumber("SSIM", finite(dig(result, "ssim")), base, finite(dig(pool, "ssim"))),
            KeyNumber("object retention (cells kept)", finite(dig(result, "object_retention")), base,
                      finite(dig(pool, "object_retention")))]
    return [r for r in rows if r.value is not None]


def horizons(result: Any) -> list[str]:
    """The horizons (frames ahead, as the JSON keys "1", "4", ...) of a dynamics eval.json, ascending."""
    model = dig(result, "results", "model")
    return [str(h) for h in sorted(int(k) for k in model if str(k).isdigit())] if isinstance(model, Mapping) else []


def dynamics_numbers(result: Any) -> list[KeyNumber]:
    """Imagined frames against the real future (evaluation/dynamics.py's eval.json): PSNR at the first and
    last horizon and object retention at the last, beside copying the last real frame; PSNR at the last
    horizon beside the same model fed another window's actions (does it use the actions?). The intervals
    are the evaluation's bootstrap intervals of the paired difference."""
    steps = horizons(result)
    if not steps:
        return []
    first, last = steps[0], steps[-1]
    copy, shuffled = "copying the last real frame", "the same model fed another window's actions"

    def score(method: str, h: str, key: str) -> float | None:
        return finite(dig(result, "results", method, h, key))

    def diff_ci(method: str, h: str, key: str) -> tuple[float, float] | None:
        ci = dig(result, "comparisons", method, h, key)
        return ci_bounds(None, ci) if isinstance(ci, (list, tuple)) else None

    rows = [KeyNumber(f"PSNR {first} frame{'s' if first != '1' else ''} ahead (dB)", score("model", first, "psnr"),
                      copy, score("copy_last_frame", first, "psnr"),
                      diff_ci=diff_ci("copy_last_frame", first, "psnr_diff_ci95"))]
    if last != first:
        rows.append(KeyNumber(f"PSNR {last} frames ahead (dB)", score("model", last, "psnr"), copy,
                              score("copy_last_frame", last, "psnr"),
                              diff_ci=diff_ci("copy_last_frame", last, "psnr_diff_ci95")))
    rows.append(KeyNumber(f"object retention {last} frame{'s' if last != '1' else ''} ahead",
                          score("model", last, "object_retention"), copy,
                          score("copy_last_frame", last, "object_retention"),
                          diff_ci=diff_ci("copy_last_frame", last, "retention_diff_ci95")))
    rows.append(KeyNumber(f"PSNR {last} frame{'s' if last != '1' else ''} ahead (dB)", score("model", last, "psnr"),
                          shuffled, score("shuffled_actions", last, "psnr"),
                          diff_ci=diff_ci("shuffled_actions", last, "psnr_diff_ci95")))
    return [r for r in rows if r.value is not None]


def agent_numbers(result: Any) -> list[KeyNumber]:
    """Behaviour cloning and reward prediction on held-out episodes (evaluation/agent.py's eval.json) beside
    the best constant predictors fitted on the training split, and reward AUROC beside chance."""
    action, reward = dig(result, "action"), dig(result, "reward")
    components = dig(action, "components")
    majority = (finite(dig(next(iter(components.values())), "majority_accuracy"))
                if isinstance(components, Mapping) and len(components) == 1 else None)
    auroc = finite(dig(reward, "auroc"))
    rows = [KeyNumber("action log-likelihood (nats/step)", finite(dig(action, "log_likelihood")),
                      "the training actions' marginal", finite(dig(action, "marginal_log_likelihood"))),
            KeyNumber("action accuracy", finite(dig(action, "accuracy")), "always the most frequent action", majority),
            KeyNumber("reward AUROC of achievement unlocks", auroc, "chance", 0.5 if auroc is not None else None),
            KeyNumber("reward MAE", finite(dig(reward, "mae")), "the training mean reward, constant",
                      finite(dig(reward, "baseline_mae")), higher_is_better=False)]
    return [r for r in rows if r.value is not None]


def imagine_numbers(data: Mapping[str, Any]) -> list[KeyNumber]:
    """Imagination training's result: real-game return and Crafter score of its policy beside behaviour
    cloning's, and the return it imagines from real states beside the real return of the same actions
    (the exploitation instrument's headline)."""
    policies = headline(data)["policies"]
    imagine, bc = policies["imagine"] or {}, policies["bc"] or {}
    instrument = (data.get("instrument") or {}).get("imagine")
    horizon = dig(instrument, "horizon")
    rows = [KeyNumber("real-game return", imagine.get("mean_return"), "behaviour cloning", bc.get("mean_return"),
                      value_ci=imagine.get("ci95"), baseline_ci=bc.get("ci95")),
            KeyNumber("Crafter score (%)", imagine.get("crafter_score"), "behaviour cloning", bc.get("crafter_score"),
                      note="no interval given"),
            KeyNumber(f"imagined return over {horizon} steps" if horizon else "imagined return",
                      finite(dig(instrument, "imagined_return")), "real return of the same actions",
                      finite(dig(instrument, "real_return")), higher_is_better=None)]
    return [r for r in rows if r.value is not None]


def imagine_return_series(data: Mapping[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """The imagined-vs-real plot of imagination training: the imagined reward per rollout at every logged
    step, and the real-game return per episode. The real series is the training's own monitoring
    (`imagine.eval_episodes` > 0) where it ran; otherwise the two real-game evaluations bracket the
    training: behaviour cloning (the policy imagination starts from) at step 0 and the final policy at
    the last logged step. Series without points are left out."""
    curves_ = (data.get("curves") or {}).get("imagine") or {}
    imagined = list(curves_.get("imagined_reward") or [])
    series = {"imagined reward per rollout (H steps)": imagined} if imagined else {}
    if curves_.get("eval/crafter_return"):
        series["real-game return per episode"] = list(curves_["eval/crafter_return"])
        return series
    policies = headline(data)["policies"]
    bc, final = (dig(policies, p, "mean_return") for p in ("bc", "imagine"))
    last = max((x for x, _ in imagined), default=None)
    if bc is not None and final is not None and last is not None and last > 0:
        series["real-game return per episode (BC at step 0, final policy)"] = [(0.0, bc), (float(last), final)]
    return series


def instrument_rows(results: Mapping[str, Any]) -> list[tuple[str, dict[str, tuple[float | None, float | None]]]]:
    """The exploitation instrument's key rows: (measure, {policy: (imagined, real)}) for return over the
    horizon, achievement unlocks and deaths per start."""
    keys = (("return over the horizon", "imagined_return", "real_return"),
            ("achievement unlocks per start", "imagined_unlocks", "real_unlocks"),
            ("deaths per start", "imagined_death_rate", "real_death_rate"))
    return [(label, {p: (finite(dig(r, imagined)), finite(dig(r, real))) for p, r in results.items()})
            for label, imagined, real in keys]

"""`dreamerv4 run`: every stage of the pipeline, in order, into one run folder.

    dreamerv4 run --config configs/crafter-small.yaml [key=value ...]

Stages, in order. record and validate run every time (record leaves existing episodes alone);
the others are skipped once <out_dir>/summary.json lists them, and resume when interrupted:
    record      record Crafter episodes into data.path (and a held-out set with another seed),
                unless data.path already holds episodes (then they are used as they are)
    validate    check every episode; any problem stops the run
    tokenizer   train the tokenizer (Phase 1A) into <out_dir>/tokenizer, until tokenizer.train.steps or
                its time_limit_min (either finishes the stage; Ctrl-C leaves it to resume)
    eval_tokenizer    evaluate the tokenizer on held-out episodes -> <out_dir>/tokenizer/eval.json
    tokenize          encode data.path with the frozen tokenizer -> <out_dir>/latents (latent dataset)
    dynamics          train the shortcut-forcing world model (Phase 1B) -> <out_dir>/dynamics
    eval_dynamics     imagined vs real frames at several horizons, baselines, video -> dynamics/eval.json
    agent             behaviour cloning + reward/value heads (Phase 2) -> <out_dir>/agent
    eval_agent        held-out action likelihood / reward AUROC -> agent/eval.json
    crafter_random    the uniform random policy in the real game -> eval/crafter_random.json
    crafter_bc        the behaviour-cloning policy in the real game -> eval/crafter_bc.json
    imagine           RL in imagination, PMPO + TD(lambda) (Phase 3) -> <out_dir>/imagine
    crafter_imagine   the imagination-trained policy in the real game -> eval/crafter_imagine.json
    eval_imagination  the exploitation instrument for the BC and the imagination policy: the same
                      actions from replayed held-out states in the world model and the real game
                      -> eval/imagination_bc.json, eval/imagination_imagine.json (evaluation/imagination.py)
Then report.html and summary.json (evaluation/report.py) are written, also after a failed stage.
Real-game evaluations play `eval.crafter_episodes` episodes from the same seeds for every policy.

Under torchrun (docs/distributed.md) the training stages run on every process; the others run on
rank 0 only while the rest wait, and only rank 0 writes summary.json and the report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from dreamerv4.config import load_config, save_config
from dreamerv4.errors import DataError, UserError
from dreamerv4.run_config import RunConfig

INCOMPLETE_MARKER = ".incomplete-recording"  # present while the pipeline records into a folder


def heldout_path(cfg: RunConfig) -> Path:
    return Path(cfg.data.heldout_path or f"{cfg.data.path.rstrip('/')}-heldout")


def _record_into(path: Path, episodes: int, seed: int, cfg: RunConfig) -> dict:
    """Record into `path` unless it already holds someone's episodes; finish an interrupted recording.
    Returns {"recorded": bool, "episodes": n, ...}."""
    from dreamerv4.data.crafter_record import record_crafter
    from dreamerv4.data.episodes import find_episodes

    marker = path / INCOMPLETE_MARKER
    if path.is_dir() and not marker.exists():
        present = find_episodes(path)
        if present:
            print(f"[record] {path}: episodes present, using them as they are")
            return {"recorded": False, "episodes": len(present)}
    path.mkdir(parents=True, exist_ok=True)
    marker.touch()
    # Recording is deterministic in (seed, episode index), so redoing an interrupted one is exact.
    summary = record_crafter(path, episodes, seed, cfg.record.policy, cfg.record.max_steps, overwrite=True)
    marker.unlink()
    print(f"[record] {path}: {summary['episodes']} episodes, {summary['frames']} frames, "
          f"mean return {summary['mean_return']:.2f}, crafter score {summary['crafter_score']:.2f}%")
    return {"recorded": True, "episodes": summary["episodes"], "frames": summary["frames"]}


def stage_record(cfg: RunConfig) -> dict:
    if cfg.record.episodes == 0:  # e.g. converted MineRL data: nothing to record
        print(f"[record] record.episodes is 0: using the episodes in {cfg.data.path}")
        return {}
    results = {cfg.data.path: _record_into(Path(cfg.data.path), cfg.record.episodes, cfg.record.seed, cfg)}
    if cfg.record.heldout_episodes > 0:
        heldout = heldout_path(cfg)
        results[str(heldout)] = _record_into(heldout, cfg.record.heldout_episodes, cfg.record.heldout_seed, cfg)
    return results


def stage_validate(cfg: RunConfig) -> dict:
    from dreamerv4.data.episodes import format_summary, validate_root

    results = {}
    paths = [Path(cfg.data.path)] + ([heldout_path(cfg)] if heldout_path(cfg).is_dir() else [])
    for path in paths:
        summary = validate_root(path)
        print(format_summary(summary))
        if summary["problems"]:
            raise DataError(f"{path}: {len(summary['problems'])} problem(s) found; see above")
        results[str(path)] = {k: summary[k] for k in ("episodes", "frames") if k in summary}
    return results


def stage_tokenizer(cfg: RunConfig) -> dict:
    from dreamerv4.training.tokenizer import train_tokenizer

    # The time limit is the training budget the config asks for, so reaching it finishes the stage
    # (training time adds up across resumes: running again would stop at once, forever). Only an
    # interruption (SIGINT/SIGTERM) leaves the stage unfinished.
    return _finished(train_tokenizer(cfg, resume=True), "tokenizer")


def _finished(summary, name: str) -> dict:
    if not summary.done and summary.stop_reason != "time_limit":
        raise SystemExit(f"[{name}] stopped ({summary.stop_reason}) at step {summary.step}; run again to resume")
    return {**summary.metrics, "step": summary.step, "done": summary.done, "stop_reason": summary.stop_reason,
            "train_time_min": round(summary.train_time_min, 2)}


def stage_tokenize(cfg: RunConfig) -> dict:
    from dreamerv4.training.stages import resolve_dynamics_paths
    from dreamerv4.training.tokenize import tokenize_dataset

    stage = resolve_dynamics_paths(cfg).dynamics
    manifest = tokenize_dataset(stage.tokenizer_checkpoint, cfg.data.path, stage.latents)
    return {"latents": stage.latents, "episodes": len(manifest.get("episodes", []))}


def stage_dynamics(cfg: RunConfig) -> dict:
    from dreamerv4.training.dynamics import train_dynamics

    return _finished(train_dynamics(cfg, resume=True), "dynamics")


def _heldout_or_val(cfg: RunConfig) -> Path:
    heldout = heldout_path(cfg)
    return heldout if heldout.is_dir() else Path(cfg.data.path)


def stage_eval_dynamics(cfg: RunConfig) -> dict:
    from dreamerv4.evaluation.dynamics import evaluate_dynamics, format_report

    report = evaluate_dynamics(Path(cfg.out_dir) / "dynamics" / "checkpoint.pt", _heldout_or_val(cfg),
                               fit_data=Path(cfg.data.path))
    print(format_report(report))
    keys = ("psnr", "object_retention")
    return {method: {h: {k: scores.get(k) for k in keys} for h, scores in by_horizon.items()}
            for method, by_horizon in report["results"].items()}


def stage_agent(cfg: RunConfig) -> dict:
    from dreamerv4.training.agent import train_agent

    return _finished(train_agent(cfg, resume=True), "agent")


def stage_eval_agent(cfg: RunConfig) -> dict:
    from dreamerv4.evaluation.agent import evaluate_agent

    report = evaluate_agent(Path(cfg.out_dir) / "agent" / "checkpoint.pt", _heldout_or_val(cfg))
    action, reward = report["action"], report["reward"]
    return {"action_log_likelihood": action["log_likelihood"], "marginal_log_likelihood": action["marginal_log_likelihood"],
            "action_accuracy": action["accuracy"], "reward_auroc": reward["auroc"], "reward_mae": reward["mae"],
            "reward_baseline_mae": reward["baseline_mae"]}


def _crafter(cfg: RunConfig, label: str, checkpoint: str) -> dict:
    from dreamerv4.evaluation.crafter import evaluate_crafter
    from dreamerv4.evaluation.report import crafter_eval_path

    if cfg.data.action_space != "crafter":  # e.g. MineRL data: there is no game to play here
        print(f"[crafter_{label}] data.action_space is {cfg.data.action_space!r}: no real-game evaluation")
        return {"skipped": f"action space {cfg.data.action_space}"}

    out = crafter_eval_path(Path(cfg.out_dir), label)
    report = evaluate_crafter(checkpoint, cfg.eval.crafter_episodes, seed=cfg.eval.crafter_seed,
                              max_steps=cfg.eval.crafter_max_steps, out=out)
    keys = ("mean_return", "return_ci95", "crafter_score", "episodes")
    return {k: report[k] for k in keys if k in report}


def stage_crafter_random(cfg: RunConfig) -> dict:
    return _crafter(cfg, "random", "random")


def stage_crafter_bc(cfg: RunConfig) -> dict:
    return _crafter(cfg, "bc", str(Path(cfg.out_dir) / "agent" / "checkpoint.pt"))


def stage_imagine(cfg: RunConfig) -> dict:
    from dreamerv4.training.imagine import train_imagine

    return _finished(train_imagine(cfg, resume=True), "imagine")


def stage_crafter_imagine(cfg: RunConfig) -> dict:
    return _crafter(cfg, "imagine", str(Path(cfg.out_dir) / "imagine" / "checkpoint.pt"))


def stage_eval_tokenizer(cfg: RunConfig) -> dict:
    from dreamerv4.evaluation.tokenizer import evaluate_tokenizer

    heldout = heldout_path(cfg)
    data, split = (heldout, "all") if heldout.is_dir() else (Path(cfg.data.path), "val")
    result = evaluate_tokenizer(Path(cfg.out_dir) / "tokenizer" / "checkpoint.pt", data, split=split,
                                fit_data=Path(cfg.data.path))
    print(f"[eval_tokenizer] {result['frames']} held-out frames: PSNR {result['psnr']:.2f} dB, "
          f"SSIM {result['ssim']:.3f}, LPIPS {result['lpips']:.3f}, "
          + (f"object retention {100 * result['object_retention']:.1f}%" if "object_retention" in result
             else "no object retention (not Crafter)"))
    return result


def stage_eval_imagination(cfg: RunConfig) -> dict:
    from dreamerv4.evaluation.imagination import evaluate_imagination, format_report

    heldout = heldout_path(cfg)
    if cfg.data.action_space != "crafter" or cfg.eval.imagination_starts == 0 or not heldout.is_dir():
        print("[eval_imagination] needs recorded held-out Crafter episodes and eval.imagination_starts > 0: skipped")
        return {"skipped": "no held-out Crafter recording or eval.imagination_starts 0"}
    results = {}
    for label, stage in (("bc", "agent"), ("imagine", "imagine")):
        report = evaluate_imagination(Path(cfg.out_dir) / stage / "checkpoint.pt", heldout,
                                      starts=cfg.eval.imagination_starts, horizon=cfg.imagine.horizon,
                                      sampling_steps=cfg.imagine.sampling_steps, seed=cfg.eval.imagination_seed,
                                      reward=cfg.imagine.reward)
        print(format_report(report))
        results[label] = {k: v for k, v in report.items() if k not in ("per_horizon", "out")}
    return results


STAGES: list[tuple[str, Callable[[RunConfig], dict]]] = [
    ("record", stage_record),
    ("validate", stage_validate),
    ("tokenizer", stage_tokenizer),
    ("eval_tokenizer", stage_eval_tokenizer),
    ("tokenize", stage_tokenize),
    ("dynamics", stage_dynamics),
    ("eval_dynamics", stage_eval_dynamics),
    ("agent", stage_agent),
    ("eval_agent", stage_eval_agent),
    ("crafter_random", stage_crafter_random),
    ("crafter_bc", stage_crafter_bc),
    ("imagine", stage_imagine),
    ("crafter_imagine", stage_crafter_imagine),
    ("eval_imagination", stage_eval_imagination),
]
TRAINING_STAGES = {"tokenizer", "dynamics", "agent", "imagine"}  # run on every torchrun process


def run_pipeline(cfg: RunConfig, stages: list[str] | None = None) -> dict:
    """Run the stages in order; a stage whose result is in <out_dir>/summary.json is skipped."""
    from dreamerv4.training import distributed
    from dreamerv4.training.runtime import resolve_device

    if distributed.env_world_size() > 1:  # join torchrun's group now: stages wait on each other
        distributed.setup(resolve_device(cfg.tokenizer.train))
    main = distributed.is_main_process()
    out = Path(cfg.out_dir)
    summary_path = out / "summary.json"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    distributed.barrier()
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"stages": {}}
    names = [name for name, _ in STAGES]
    try:
        for i, (name, fn) in enumerate(STAGES, 1):
            if stages is not None and name not in stages:
                continue
            if name in summary["stages"] and name not in ("record", "validate"):
                print(f"[{i}/{len(names)}] {name}: done, skipped")
                continue
            if name not in TRAINING_STAGES and not main:
                distributed.barrier()  # rank 0 runs it
                continue
            print(f"[{i}/{len(names)}] {name}")
            started = time.perf_counter()
            result = fn(cfg)
            summary["stages"][name] = {"seconds": round(time.perf_counter() - started, 1), **result}
            # Stage seconds summed: with resumed or skipped stages, the time this run folder took in all.
            summary["total_seconds"] = round(sum(float(s.get("seconds", 0.0)) for s in summary["stages"].values()), 1)
            if main:
                tmp = summary_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(summary, indent=2, default=str))
                tmp.replace(summary_path)
            if name not in TRAINING_STAGES:
                distributed.barrier()
    finally:
        # Also after a failed or interrupted stage: the report shows what exists and marks the rest "not run".
        if main:
            from dreamerv4.evaluation.report import write_report

            print(f"report: {write_report(out)}")
    return json.loads(summary_path.read_text()) if summary_path.is_file() else summary


def cmd_run(args) -> int:
    cfg = load_config(RunConfig, args.config, args.overrides)
    names = [name for name, _ in STAGES]
    until = getattr(args, "until", None)
    if until is not None and until not in names:
        raise UserError(f"--until {until!r}: unknown stage; stages are {', '.join(names)}")
    summary = run_pipeline(cfg, names[: names.index(until) + 1] if until else None)
    print(f"run folder: {cfg.out_dir} ({summary.get('total_seconds', 0.0) / 60:.1f} min of stages in all)")
    return 0

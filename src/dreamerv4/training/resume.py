"""A training run's checkpoint: what it holds, writing it, resuming from it, and whether it finished.

    save_run_checkpoint(run_dir / CHECKPOINT_FILE, progress, done=False, ...)   # atomic (checkpoint.py)
    ckpt = read_for_resume(ckpt_path, ctx)        # every rank reads the same file, or all stop
    progress = restore(ckpt, ...)                 # model, optimizer, scheduler, extra state, RNG, step
    load_weights(model, path)                     # a later phase: the finished weights only
    run_finished(run_dir)                         # a pipeline skips a finished stage

A checkpoint (format CHECKPOINT_FORMAT) holds model, optimizer, scheduler, `extra` (each extra_state
object's state_dict), step, done, stop_reason, RNG states (Python, NumPy, torch; under torchrun also
every rank's, "rng_ranks"), the resolved run config ("config") and train section ("train_config"),
the training time so far ("elapsed_s"), the non-finite step count, the open log window and the last
logged metrics. Restored, a run continues exactly where it stopped (bitwise on CPU in fp32).
A run is finished when it reached its last step or spent its time limit; a signal leaves it unfinished.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from torch import nn

from dreamerv4.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from dreamerv4.errors import CheckpointError
from dreamerv4.training import distributed
from dreamerv4.training.config import TrainConfig
from dreamerv4.training.runtime import unwrap

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.yaml"
CHECKPOINT_FORMAT = "dreamerv4.train/1"


class Stateful(Protocol):
    """What an extra_state object of the loop provides (e.g. RunningRMS): checkpointed and restored."""

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass
class Progress:
    """Where a run stands, beyond its weights: what a checkpoint keeps for an exact resume."""

    step: int = 0  # completed updates
    elapsed_before_s: float = 0.0  # training time of the earlier calls (a resumed run adds its own)
    nonfinite_steps: int = 0  # skipped updates so far
    window: dict[str, Any] = field(default_factory=lambda: {"sums": {}, "count": 0})  # open log window
    last_metrics: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Finished or not


def checkpoint_finished(ckpt: dict[str, Any]) -> bool:
    """A run is finished when it reached its last step (`done`) or spent its time budget
    (time_limit_min): either is what its config asked for. A signal leaves it unfinished."""
    return bool(ckpt.get("done", False)) or ckpt.get("stop_reason") == "time_limit"


def require_finished(ckpt: dict[str, Any], path: str | Path) -> None:
    """CheckpointError unless the checkpoint at `path` is finished (`checkpoint_finished`)."""
    if not checkpoint_finished(ckpt):
        raise CheckpointError(
            f"{path}: training stopped at step {ckpt.get('step')} before it finished (neither its last step "
            "nor its time limit); resume it first (or pass require_done=False)"
        )


def run_finished(run_dir: str | Path) -> bool:
    """True when run_dir/checkpoint.pt exists and is finished (lets a pipeline skip a stage)."""
    path = Path(run_dir) / CHECKPOINT_FILE
    return path.is_file() and checkpoint_finished(load_checkpoint(path))


def load_model_state(model: nn.Module, state: Mapping[str, Any] | None, path: str | Path) -> None:
    """A checkpoint's weights `state` into `model` (strict); CheckpointError naming `path` when they
    do not fit (or are missing)."""
    try:
        if not isinstance(state, Mapping):
            raise KeyError("no model weights")
        unwrap(model).load_state_dict(state)
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: does not match the model ({exc})") from exc


def load_weights(model: nn.Module, path: str | Path, *, require_done: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by `train` into `model` (strict) for a later phase; returns the
    checkpoint's config dict. `require_done` refuses a run that stopped before its last step."""
    ckpt = load_checkpoint(path)
    if require_done:
        require_finished(ckpt, path)
    load_model_state(model, ckpt.get("model"), path)
    return ckpt.get("config", {})


# ---------------------------------------------------------------------------------------------
# Writing


def write_run_config(run_dir: Path, config_dict: Mapping[str, Any]) -> None:
    """run_dir/config.yaml: the resolved run config (atomic)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{CONFIG_FILE}.tmp"
    tmp.write_text(yaml.safe_dump(dict(config_dict), sort_keys=False))
    tmp.replace(run_dir / CONFIG_FILE)


def save_run_checkpoint(path: Path, progress: Progress, *, done: bool, reason: str | None, model: nn.Module,
                        optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                        extra_state: Mapping[str, Stateful], cfg: TrainConfig, config_dict: Mapping[str, Any],
                        elapsed_s: float, ctx: distributed.DistContext) -> None:
    """Write the run's checkpoint at progress.step (rank 0 writes; every rank must call it at the same
    step). `reason`: the stop reason to record (default "done" or "running")."""
    rank_rng: list[Any] = []
    if ctx.enabled:  # collectives: every rank calls this at the same steps
        # The saved window holds the means over ranks; averaging later with the ranks' further
        # (local) sums stays exact because the mean is linear.
        window = progress.window
        progress.window = {"sums": ctx.mean_of_dicts(window["sums"]), "count": window["count"]}
        rank_rng = ctx.all_gather(rng_state())
    if ctx.is_main:
        window = progress.window
        save_checkpoint(path, {
            "format": CHECKPOINT_FORMAT, "model": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "extra": {k: v.state_dict() for k, v in extra_state.items()},
            "step": progress.step, "done": done, "stop_reason": reason or ("done" if done else "running"),
            "rng": rng_state(), "config": dict(config_dict), "train_config": dataclasses.asdict(cfg),
            "elapsed_s": elapsed_s, "nonfinite_steps": progress.nonfinite_steps,
            "log_window": {"sums": {k: float(v) for k, v in window["sums"].items()}, "count": window["count"]},
            "last_metrics": progress.last_metrics,
            **({"rng_ranks": rank_rng} if ctx.enabled else {}),
        })
    if ctx.enabled:
        distributed.barrier()  # nobody runs ahead (or exits) before the checkpoint is complete


# ---------------------------------------------------------------------------------------------
# Resuming


def read_for_resume(ckpt_path: Path, ctx: distributed.DistContext) -> dict[str, Any]:
    """The checkpoint to resume from; CheckpointError for another format. Under torchrun every rank
    must have read the same one, or all stop (none waits for the others forever)."""
    ckpt, error = None, None
    try:
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{ckpt_path}: not a training-loop checkpoint (format {ckpt.get('format')!r})")
    except CheckpointError as exc:
        if not ctx.enabled:
            raise
        error = CheckpointError(f"{exc} (to resume, run_dir must be on a filesystem every node sees)")
    if ctx.enabled:
        ctx.raise_if_any(error, f"reading {ckpt_path}")
        steps_seen = ctx.all_gather(int(ckpt["step"]))
        if len(set(steps_seen)) > 1:
            raise CheckpointError(f"{ckpt_path}: ranks read different checkpoints (steps {steps_seen})")
    return ckpt


def restore(ckpt: dict[str, Any], ckpt_path: Path, cfg: TrainConfig, model: nn.Module,
            optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
            extra_state: Mapping[str, Stateful], ctx: distributed.DistContext) -> Progress:
    """Put model, optimizer, scheduler, extra state and RNG streams back where the checkpoint left
    them; returns the run's progress. Hyper-parameters come from the current cfg."""
    try:
        unwrap(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        for name, obj in extra_state.items():
            obj.load_state_dict(ckpt["extra"][name])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{ckpt_path}: does not fit this model/config ({type(exc).__name__}: {exc})") from exc
    # Bitwise the same values as before when the config is unchanged.
    step = int(ckpt["step"])
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group, decay in zip(optimizer.param_groups, (cfg.weight_decay, 0.0)):
        group.update(initial_lr=cfg.lr, lr=cfg.lr * scheduler.lr_lambdas[0](step), betas=(cfg.beta1, cfg.beta2),
                     weight_decay=decay)
    set_rng_state(ckpt["rng"])
    if ctx.enabled:
        rank_rng = ckpt.get("rng_ranks") or []
        if len(rank_rng) == ctx.world_size:
            set_rng_state(rank_rng[ctx.rank])  # each rank continues its own streams: exact resume
        else:  # written with another number of processes: rank 0 continues, the others re-derive
            distributed.diverge_rng(ctx.rank)
            if ctx.is_main:
                print(f"{ckpt_path.parent}: checkpoint written by {len(rank_rng) or 1} process(es), resumed by "
                      f"{ctx.world_size}: same data order, other random streams", file=sys.stderr)
    return Progress(step=step, elapsed_before_s=float(ckpt["elapsed_s"]),
                    nonfinite_steps=int(ckpt.get("nonfinite_steps", 0)), window=ckpt["log_window"],
                    last_metrics=dict(ckpt["last_metrics"]))


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """"key: old -> new" for every flattened key whose value differs between two run configs."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out

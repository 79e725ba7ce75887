"""The training loop every phase shares (tokenizer, dynamics, agent, imagination): one function, `train`.

A phase supplies a model, a dataset, a loss function and its resolved config; the loop supplies
AdamW with warmup + cosine decay (schedule.py), gradient clipping, bf16 autocast and torch.compile
(runtime.py), exactly resumable checkpoints (resume.py), a time limit, non-finite loss handling, a
progress bar, metrics.jsonl + TensorBoard (logging.py), image and validation hooks. Example (what
`training/tokenizer.py` does for Phase 1A):

    from dreamerv4.config import to_dict
    from dreamerv4.training.loop import train
    from dreamerv4.training.loss_norm import RunningRMS
    from dreamerv4.training.runtime import resolve_device
    from dreamerv4.media import image_grid

    stage = run_cfg.tokenizer                                     # TokenizerStage
    data = SequenceDataset(...)                                   # items: frames (T,3,64,64) float32,
                                                                  #   actions (T,) int64, rewards (T,) float32
    model = Tokenizer(stage.model)
    lpips = LPIPS(stage.lpips_net).to(resolve_device(stage.train)).eval().requires_grad_(False)
    norms = {"mse": RunningRMS(), "lpips": RunningRMS()}          # checkpointed, restored on resume

    def loss_fn(model, batch):                                    # batch: collated dict on the device
        out = model(batch["frames"])                              # runs under autocast (bf16 or off)
        mse, perceptual = ..., lpips(...)
        loss = norms["mse"](mse) + stage.lpips_weight * norms["lpips"](perceptual)
        return loss, {"mse": mse.detach(), "lpips": perceptual.detach()}   # floats or 0-d tensors

    def on_image(step, model, batch):                             # eval mode, no_grad, RNG isolated
        return {"recon": image_grid(...)}                         # or None (hook saved files itself)

    summary = train(model, data, loss_fn, stage.train, Path(run_cfg.out_dir) / "tokenizer",
                    resume=args.resume, config_dict=to_dict(run_cfg), extra_state=norms,
                    on_image=on_image, eval_fn=None, frames_per_sample=stage.train.seq_len,
                    num_workers=run_cfg.data.num_workers)

Contract and policies:
- Step numbering: `step` counts completed updates; logs, checkpoints and reports use it. The batch
  of update `step + 1` is `StepBatchSampler.indices(step)` (sampler.py), a function of (cfg.seed,
  step) only, so a resumed run sees exactly the batches an uninterrupted one would.
- Exact resume (resume.py): hooks (`on_image`, `eval_fn`) run with the RNG state saved and restored,
  so they never shift training randomness. On CPU in fp32 a resumed run is bitwise identical to an
  uninterrupted one (tests check it).
- Files in `run_dir`: checkpoint.pt (latest; written every `ckpt_every` steps, at the end, on a time
  limit and on SIGINT/SIGTERM), config.yaml, metrics.jsonl, tb/ (TensorBoard), images/.
- A fresh run in a folder that has checkpoint.pt raises UserError (use resume or another folder).
  `resume=True` with no checkpoint starts fresh; resuming a finished run (done, step >= cfg.steps)
  does nothing. Raising cfg.steps and resuming a finished run continues it.
- Non-finite loss or gradient norm: the update is skipped (weights, optimizer and extra_state stay
  as before the step; the step and the lr schedule still advance), a warning names the step and
  the metric values, and a "nonfinite" record goes to metrics.jsonl. After
  `cfg.max_nonfinite_steps` consecutive ones the run aborts with TrainingDivergedError; the last
  good checkpoint is left untouched.
- time_limit_min counts training time across resumes; when reached the loop checkpoints and stops.
- SIGINT/SIGTERM: the current step finishes, a checkpoint is written and `train` returns
  (stop_reason "signal"); a second SIGINT interrupts at once. (With num_workers > 0, send SIGTERM to
  the main process only: workers killed by a signal make the DataLoader raise.)
- Distributed (torchrun, docs/distributed.md, training/distributed.py): with WORLD_SIZE > 1 the loop
  joins the process group (NCCL on CUDA, gloo on CPU; kept for later stages, ended at exit), and each rank
  trains on its batch_size / W share of every step's global batch (cfg.batch_size stays global).
  loss_fn runs inside DistributedDataParallel's forward and receives the raw model (it may call
  submodules and methods); pass find_unused_parameters=True when a loss leaves parameters without
  gradient. The logged loss and metrics are means over ranks; floating-point tensors of extra_state
  are averaged across ranks after every update; a non-finite loss on any rank skips the update on
  all; time limits and signals stop all ranks after the same step. Rank 0 alone writes run_dir and
  runs on_image / eval_fn; checkpoints hold every rank's RNG state (exact resume with the same W)
  and are followed by a barrier; every rank resumes from the same checkpoint (run_dir must be on a
  filesystem all nodes see to resume). With one process nothing of this runs (bitwise as before).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dreamerv4.checkpoint import rng_state, set_rng_state
from dreamerv4.errors import ConfigError, UserError
from dreamerv4.training import distributed
from dreamerv4.training.config import TrainConfig
from dreamerv4.training.logging import MetricsLog, NoLog
from dreamerv4.training.resume import (
    CHECKPOINT_FILE, Progress, Stateful, config_changes, read_for_resume, restore, save_run_checkpoint,
    write_run_config,
)
from dreamerv4.training.runtime import autocast_for, maybe_compile, resolve_device, resolve_precision, set_up_process
from dreamerv4.training.sampler import StepBatchSampler
from dreamerv4.training.schedule import make_optimizer, make_scheduler, time_up

# Names the loop logs itself; a loss_fn metric may not take them.
RESERVED_METRICS = {"step", "kind", "elapsed_min", "lr", "loss", "grad_norm", "samples_per_s", "frames_per_s",
                    "nonfinite_steps"}


class TrainingDivergedError(UserError):
    """Loss or gradients stayed non-finite for `max_nonfinite_steps` consecutive steps."""


LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, Mapping[str, float | torch.Tensor]]"]
ImageHook = Callable[[int, nn.Module, Any], "Mapping[str, np.ndarray] | None"]
EvalFn = Callable[[nn.Module], Mapping[str, float]]


@dataclass
class TrainSummary:
    step: int  # completed updates
    done: bool  # step reached cfg.steps
    stop_reason: Literal["done", "time_limit", "signal", "already_done"]
    metrics: dict[str, float]  # last logged train metrics, plus "eval/<key>" of the last evaluation
    wall_time_s: float  # this call, set-up included
    train_time_min: float  # training time summed over every resume
    checkpoint: Path


def train(
    model: nn.Module,
    dataset: Dataset,
    loss_fn: LossFn,
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    config_dict: Mapping[str, Any] | None = None,
    extra_state: Mapping[str, Stateful] | None = None,
    on_image: ImageHook | None = None,
    eval_fn: EvalFn | None = None,
    frames_per_sample: int = 1,
    num_workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    find_unused_parameters: bool = False,
) -> TrainSummary:
    """Train `model` on `dataset` with `loss_fn` for cfg.steps updates, writing everything to `run_dir`.

    model: moved to the training device; parameters stay fp32. It is in train mode for loss_fn.
    dataset: map-style, deterministic `__getitem__(i)` (no randomness) and `__len__`; items are
        collated by `collate_fn` (default: torch's default collate; dicts of tensors stack into (B, ...)).
    loss_fn(model, batch) -> (loss, metrics): batch is on the device; called under autocast. metrics
        values are floats or 0-d tensors, averaged over each log window (names must not clash with
        RESERVED_METRICS: "step", "kind", "elapsed_min", "lr", "loss", "grad_norm", "samples_per_s",
        "frames_per_s", "nonfinite_steps").
    extra_state: named objects with state_dict/load_state_dict (e.g. RunningRMS normalizers used
        inside loss_fn), checkpointed and restored; nn.Modules among them are moved to the device.
    on_image(step, model, batch): every cfg.image_every steps in eval mode under no_grad; it may return
        {name: (H, W, 3) uint8 image}, saved as images/<name>_<step>.png and to TensorBoard.
    eval_fn(model) -> {name: float}: every cfg.eval_every steps and at the last step, in eval mode
        under no_grad; logged as kind "eval" (TensorBoard "eval/<name>").
    config_dict: the resolved run config, saved as config.yaml and inside every checkpoint.
    frames_per_sample: frames in one dataset item (seq_len for sequences) for the frames/s figure.
    num_workers: DataLoader worker processes (pass DataConfig.num_workers).
    find_unused_parameters: only matters under torchrun (several processes): set it when loss_fn may
        leave trainable parameters without a gradient in a step (DDP then searches the graph).
    Returns a TrainSummary (on every rank); raises UserError for an occupied run_dir, CheckpointError for a checkpoint
    that does not fit, TrainingDivergedError after too many non-finite steps.
    """
    call_start = time.monotonic()
    device = resolve_device(cfg)
    ctx = distributed.setup(device)  # a disabled context for a single process
    run = _Run(model, loss_fn, cfg, Path(run_dir), device, ctx, extra_state, config_dict)
    if run.claim(resume):
        already = run.resume(call_start)
        if already is not None:
            return already
    run.open_log()
    return run.steps(dataset, num_workers, collate_fn, call_start, frames_per_sample=frames_per_sample,
                     on_image=on_image, eval_fn=eval_fn, find_unused_parameters=find_unused_parameters)


class _Run:
    """One call of `train`: the objects every step uses (set up in this order: run_dir, runtime,
    model, optimizer, then resume), and the steps themselves."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, cfg: TrainConfig, run_dir: Path, device: torch.device,
                 ctx: distributed.DistContext, extra_state: Mapping[str, Stateful] | None,
                 config_dict: Mapping[str, Any] | None):
        self.model, self.loss_fn, self.cfg, self.run_dir, self.device, self.ctx = model, loss_fn, cfg, run_dir, device, ctx
        self.ckpt_path = run_dir / CHECKPOINT_FILE
        self.extra_state = dict(extra_state or {})
        self.config_dict = dict(config_dict) if config_dict is not None else {"train": dataclasses.asdict(cfg)}
        self.progress = Progress()
        self.resumed = False  # progress came from a checkpoint
        self.log: MetricsLog | NoLog = NoLog()

    def claim(self, resume: bool) -> bool:
        """Check run_dir, then set up the process, model and optimizer; True when resuming a checkpoint."""
        cfg, ctx, run_dir = self.cfg, self.ctx, self.run_dir
        if ctx.enabled and cfg.batch_size % ctx.world_size:
            raise ConfigError(f"train.batch_size {cfg.batch_size} (the global batch) is not divisible by the "
                              f"{ctx.world_size} processes; choose a multiple of {ctx.world_size}")
        has_ckpt = self.ckpt_path.exists()
        if ctx.enabled:
            has_ckpt = ctx.broadcast(has_ckpt)  # rank 0's view decides, so every rank takes the same branch
        if has_ckpt and not resume:
            raise UserError(
                f"{run_dir}: already holds a training checkpoint ({CHECKPOINT_FILE}); pass --resume to continue "
                "it, or choose another out_dir"
            )
        set_up_process(cfg, self.device)
        self.autocast = autocast_for(resolve_precision(cfg, self.device), self.device)
        self.model.to(self.device).train()
        maybe_compile(self.model, cfg, self.device, run_dir)
        for obj in self.extra_state.values():
            if isinstance(obj, nn.Module):
                obj.to(self.device)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        if not has_ckpt:
            if ctx.enabled:
                distributed.diverge_rng(ctx.rank)
            if resume and ctx.is_main:
                print(f"{run_dir}: no checkpoint to resume; starting fresh", file=sys.stderr)
        return has_ckpt

    def resume(self, call_start: float) -> TrainSummary | None:
        """Restore the checkpoint; a TrainSummary ("already_done") when the run has nothing left to do."""
        ckpt = read_for_resume(self.ckpt_path, self.ctx)
        step = int(ckpt["step"])
        if ckpt["done"] and step >= self.cfg.steps:
            if self.ctx.is_main:
                print(f"{self.run_dir}: training already finished at step {step}; nothing to do", file=sys.stderr)
            return TrainSummary(step, True, "already_done", dict(ckpt["last_metrics"]),
                                time.monotonic() - call_start, ckpt["elapsed_s"] / 60.0, self.ckpt_path)
        self.progress = restore(ckpt, self.ckpt_path, self.cfg, self.model, self.optimizer, self.scheduler,
                                self.extra_state, self.ctx)
        self.resumed = True
        changes = config_changes(ckpt.get("config", {}), self.config_dict)
        if self.ctx.is_main:
            print(f"{self.run_dir}: resuming from step {step}"
                  + (f"; config changed: {'; '.join(changes)}" if changes else ""), file=sys.stderr)
        return None

    def open_log(self) -> None:
        if self.ctx.is_main:  # rank 0 alone writes run_dir
            write_run_config(self.run_dir, self.config_dict)
            self.log = MetricsLog(self.run_dir, tensorboard=self.cfg.tensorboard,
                                  resume_step=self.progress.step if self.resumed else None)

    def save(self, done: bool, reason: str | None = None) -> None:
        save_run_checkpoint(self.ckpt_path, self.progress, done=done, reason=reason, model=self.model,
                            optimizer=self.optimizer, scheduler=self.scheduler, extra_state=self.extra_state,
                            cfg=self.cfg, config_dict=self.config_dict, elapsed_s=self.elapsed_s(), ctx=self.ctx)
        self.saved_step = self.progress.step

    def elapsed_s(self) -> float:
        """Training time of this run so far, over every resume."""
        return self.progress.elapsed_before_s + time.monotonic() - self.train_start

    def steps(self, dataset: Dataset, num_workers: int, collate_fn: Callable[[list[Any]], Any] | None,
              call_start: float, *, frames_per_sample: int, on_image: ImageHook | None, eval_fn: EvalFn | None,
              find_unused_parameters: bool) -> TrainSummary:
        """Train from progress.step to cfg.steps (or a stop), checkpointing on the way."""
        cfg, ctx, progress = self.cfg, self.ctx, self.progress
        sampler = StepBatchSampler(len(dataset), cfg.batch_size // ctx.world_size, cfg.seed, progress.step,
                                   cfg.steps, rank=ctx.rank, world_size=ctx.world_size)
        loader = DataLoader(
            dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=self.device.type == "cuda",
            collate_fn=collate_fn,
            # Own generator: creating the iterator must not draw from the global torch RNG.
            generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + progress.step),
        )
        self.train_start = time.monotonic()
        # -1 forces a final save: a fresh run, or a resumed one whose train.steps was lowered to its step.
        self.saved_step = progress.step if self.resumed and progress.step < cfg.steps else -1
        self.consecutive_bad = 0
        self.window_start, self.window_start_step, self.last_line = time.monotonic(), progress.step, 0.0
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        # batch -> loss_fn(model, batch); under torchrun inside DDP's forward (gradients averaged over ranks).
        self.compute_loss = distributed.wrap_loss(self.model, self.loss_fn, ctx,
                                                  find_unused_parameters=find_unused_parameters)
        self.bar = tqdm(total=cfg.steps, initial=progress.step, desc=self.run_dir.name, dynamic_ncols=True,
                        disable=None if ctx.is_main else True, file=sys.stderr)
        stop_reason = "done"
        batches = iter(loader)
        try:
            with _StopSignal() as stop:
                self.stop = stop
                if ctx.enabled:  # ranks stop together: flags are summed over ranks (first here, then per step)
                    self.agreed_stop = ctx.sum_(torch.tensor(self.stop_flags(), dtype=torch.float64,
                                                             device=self.device)).tolist()
                while progress.step < cfg.steps:
                    if ctx.enabled:
                        time_limit, signalled = self.agreed_stop[0] > 0, self.agreed_stop[1] > 0
                    else:
                        time_limit, signalled = time_up(cfg, self.elapsed_s()), stop.signum is not None
                    if time_limit or signalled:
                        stop_reason = "time_limit" if time_limit else "signal"
                        break
                    try:
                        batch = next(batches)
                    except Exception:
                        if stop.signum is not None:  # workers died from the same Ctrl-C; state is consistent
                            stop_reason = "signal"
                            break
                        raise
                    self.step(_to_device(batch, self.device), frames_per_sample, on_image, eval_fn)
                # Time limit or signal between periodic checkpoints; a time limit is always recorded, since
                # it finishes the run's budget (`checkpoint_finished`).
                if self.saved_step != progress.step or stop_reason == "time_limit":
                    self.save(done=progress.step >= cfg.steps, reason=stop_reason)
        finally:
            self.bar.close()
            self.log.close()
            del batches  # shuts DataLoader workers down

        done = progress.step >= cfg.steps
        if stop_reason != "done" and ctx.is_main:
            print(f"{self.run_dir}: stopped at step {progress.step}/{cfg.steps} ({stop_reason.replace('_', ' ')}); "
                  f"checkpoint {self.ckpt_path}; continue with --resume", file=sys.stderr)
        return TrainSummary(progress.step, done, "done" if done else stop_reason, progress.last_metrics,
                            time.monotonic() - call_start, self.elapsed_s() / 60.0, self.ckpt_path)

    def stop_flags(self) -> list[float]:
        """[time limit reached, signal received] on this rank."""
        return [float(time_up(self.cfg, self.elapsed_s())), float(self.stop.signum is not None)]

    def step(self, batch: Any, frames_per_sample: int, on_image: ImageHook | None, eval_fn: EvalFn | None) -> None:
        """One update on `batch`, then its logs, hooks and checkpoint."""
        cfg, progress = self.cfg, self.progress
        loss, grad_norm, metrics, lr, finite = self.update(batch)
        progress.step += 1
        if finite:
            self.accumulate(loss, grad_norm, metrics)
        else:
            self.report_nonfinite(loss, grad_norm, metrics)
        self.bar.update(1)
        if (progress.step % cfg.log_every == 0 or progress.step == cfg.steps) and progress.window["count"] > 0:
            self.write_train_record(lr, frames_per_sample)
        self.run_hooks(batch, on_image, eval_fn)
        # No periodic checkpoint inside a streak of skipped steps: the last good one stays.
        if (progress.step % cfg.ckpt_every == 0 and self.consecutive_bad == 0) or progress.step == cfg.steps:
            self.save(done=progress.step >= cfg.steps)

    def update(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, Mapping[str, Any], float, bool]:
        """Forward, backward, clip and (when loss and gradient norm are finite) the optimizer step;
        the lr schedule advances either way. Returns loss, gradient norm, metrics, the lr used, finite."""
        ctx, extra_state = self.ctx, self.extra_state
        snapshot = {k: _clone_state(v.state_dict()) for k, v in extra_state.items()}
        with self.autocast():
            loss, metrics = self.compute_loss(batch)
        loss = loss.float()
        loss.backward()
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)  # same on every rank (DDP)
        if ctx.enabled:
            # One all-reduce: mean loss (NaN anywhere -> NaN everywhere, so all ranks skip
            # together), the stop flags, and extra_state's float tensors (kept in sync).
            loss, self.agreed_stop, synced_extra = distributed.reduce_step(ctx, loss.detach(), self.stop_flags(),
                                                                           extra_state)
        finite = bool(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))  # the one sync per step
        if finite:
            if ctx.enabled:
                for name, state in synced_extra.items():
                    extra_state[name].load_state_dict(state)
            self.optimizer.step()
            self.consecutive_bad = 0
        else:
            for name, obj in extra_state.items():
                obj.load_state_dict(snapshot[name])
            self.progress.nonfinite_steps += 1
            self.consecutive_bad += 1
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return loss, grad_norm, metrics, lr, finite

    def accumulate(self, loss: torch.Tensor, grad_norm: torch.Tensor, metrics: Mapping[str, Any]) -> None:
        """Add a finite step's values to the open log window."""
        clashes = RESERVED_METRICS.intersection(metrics)
        if clashes:
            raise ValueError(f"loss_fn metric names {sorted(clashes)} clash with names the loop logs")
        window = self.progress.window
        sums = window["sums"]
        for key, value in (("loss", loss.detach()), ("grad_norm", grad_norm.detach()), *metrics.items()):
            value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
            sums[key] = sums[key] + value if key in sums else value
        window["count"] += 1

    def report_nonfinite(self, loss: torch.Tensor, grad_norm: torch.Tensor, metrics: Mapping[str, Any]) -> None:
        """Log and announce a skipped step; TrainingDivergedError after too many in a row."""
        step, total = self.progress.step, self.progress.nonfinite_steps
        report = {"loss": float(loss.detach()), "grad_norm": float(grad_norm), **{k: float(v) for k, v in metrics.items()}}
        self.log.write({"kind": "nonfinite", "step": step, **report})
        if self.ctx.is_main:
            tqdm.write(f"{self.run_dir}: non-finite loss or gradient at step {step}, update skipped "
                       f"({self.consecutive_bad} in a row, {total} in total): {_fmt(report)}", file=sys.stderr)
        if self.consecutive_bad >= self.cfg.max_nonfinite_steps:
            where = f"{self.ckpt_path} (step {self.saved_step})" if self.saved_step >= 0 else "none written yet"
            raise TrainingDivergedError(
                f"{self.run_dir}: training diverged: loss or gradient non-finite for {self.consecutive_bad} "
                f"consecutive steps, the last at step {step} ({_fmt(report)}). Last good checkpoint: "
                f"{where}. Lower train.lr, raise train.warmup_steps or check the data, then resume."
            )

    def write_train_record(self, lr: float, frames_per_sample: int) -> None:
        """Close the log window: one "train" record of its means, the bar's figures, a line without a bar."""
        cfg, ctx, progress = self.cfg, self.ctx, self.progress
        step, window = progress.step, progress.window
        now = time.monotonic()
        n, window_time = window["count"], max(now - self.window_start, 1e-9)
        samples_per_s = (step - self.window_start_step) * cfg.batch_size / window_time
        record: dict[str, Any] = {"kind": "train", "step": step, "elapsed_min": self.elapsed_s() / 60.0, "lr": lr}
        sums = ctx.mean_of_dicts(window["sums"]) if ctx.enabled else window["sums"]
        record.update({k: float(v) / n for k, v in sums.items()})
        record.update(samples_per_s=samples_per_s, frames_per_s=samples_per_s * frames_per_sample,
                      nonfinite_steps=progress.nonfinite_steps)
        self.log.write(record)
        progress.last_metrics.update({k: v for k, v in record.items() if k != "kind"})
        self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4g}", lr=f"{lr:.2e}",
                             fps=f"{record['frames_per_s']:.0f}")
        if ctx.is_main and self.bar.disable and (now - self.last_line >= 10.0 or step == cfg.steps):
            print(f"step {step}/{cfg.steps} " + _fmt({k: v for k, v in record.items() if k not in ("kind", "step")}),
                  file=sys.stderr)
            self.last_line = now
        progress.window, self.window_start, self.window_start_step = {"sums": {}, "count": 0}, now, step

    def run_hooks(self, batch: Any, on_image: ImageHook | None, eval_fn: EvalFn | None) -> None:
        """on_image every cfg.image_every steps (rank 0), eval_fn every cfg.eval_every steps and at the last."""
        cfg, ctx, step = self.cfg, self.ctx, self.progress.step
        if on_image is not None and cfg.image_every and step % cfg.image_every == 0 and ctx.is_main:
            with _inference(self.model, self.autocast):
                images = on_image(step, self.model, batch)
            for name, image in (images or {}).items():
                self.log.write_image(name, step, image)
        if eval_fn is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            results = {}
            if ctx.is_main:  # the others wait in the next step's all-reduce (see distributed.py)
                with _inference(self.model, self.autocast):
                    results = {k: float(v) for k, v in eval_fn(self.model).items()}
            if ctx.enabled:
                results = ctx.broadcast(results)
            self.log.write({"kind": "eval", "step": step, "elapsed_min": self.elapsed_s() / 60.0, **results})
            self.progress.last_metrics.update({f"eval/{k}": v for k, v in results.items()})
            if ctx.is_main:
                tqdm.write(f"step {step} eval: {_fmt(results)}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Small helpers


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _clone_state(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else _clone_state(v) if isinstance(v, Mapping) else v
            for k, v in state.items()}


@contextlib.contextmanager
def _inference(model: nn.Module, autocast: Callable[[], contextlib.AbstractContextManager]) -> Iterator[None]:
    """Eval mode, no_grad, autocast, and the training RNG streams left where they were (hooks never
    change training)."""
    was_training = model.training
    model.eval()
    state = rng_state()
    try:
        with torch.no_grad(), autocast():
            yield
    finally:
        set_rng_state(state)
        model.train(was_training)


class _StopSignal:
    """SIGINT/SIGTERM set a flag checked between steps; a second SIGINT raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        tqdm.write(f"{signal.Signals(signum).name}: stopping after this step (checkpoint follows)", file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _fmt(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())

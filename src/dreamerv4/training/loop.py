"""The training loop every phase shares (tokenizer, dynamics, agent, imagination): one function, `train`.

A phase supplies a model, a dataset, a loss function and its resolved config; the loop supplies
AdamW with warmup + cosine decay, gradient clipping, bf16 autocast, exactly resumable checkpoints,
a time limit, non-finite loss handling, a progress bar, metrics.jsonl + TensorBoard, image and
validation hooks. Example (what `training/tokenizer.py` does for Phase 1A):

    from dreamerv4.config import to_dict
    from dreamerv4.training.loop import train, resolve_device
    from dreamerv4.training.loss_norm import RunningRMS
    from dreamerv4.training.logging import image_grid

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
  of update `step + 1` is `StepBatchSampler.indices(step)`, a function of (cfg.seed, step) only:
  global sample positions step*B .. step*B+B-1 walk a permutation of the dataset per epoch, keyed by
  (seed, epoch). So a resumed run sees exactly the batches an uninterrupted one would.
- Exact resume: the checkpoint holds model, optimizer, scheduler, `extra_state`, step, RNG state
  (Python, NumPy, torch), the log window, elapsed training time and `done`; with `ema_decay` also the
  weight average ("ema_model"), which `load_weights` and the hooks use (training/ema.py). Hooks (`on_image`,
  `eval_fn`) run with the RNG state saved and restored, so they never shift training randomness.
  On CPU in fp32 a resumed run is bitwise identical to an uninterrupted one (tests check it).
- Files in `run_dir`: checkpoint.pt (latest; written every `ckpt_every` steps, at the end, on a time
  limit and on SIGINT/SIGTERM), config.yaml, metrics.jsonl, tb/ (TensorBoard), images/.
- A fresh run in a folder that has checkpoint.pt raises UserError (use resume or another folder).
  `resume=True` with no checkpoint starts fresh; resuming a finished run (done, step >= cfg.steps)
  does nothing. Raising cfg.steps and resuming a finished run continues it.
- `cfg.fit_steps_to_time` (with a time limit): the updates are timed over `fit_window` (and again up
  to `refit_at`) and the schedule shortened (`fitted_steps`, never beyond cfg.steps) so its decay ends inside the limit;
  checkpoints keep the fitted length ("fitted_steps") and a resumed run uses it.
- Non-finite loss or gradient norm: the update is skipped (weights, optimizer and extra_state stay
  as before the step; the step and the lr schedule still advance), a warning names the step and
  the metric values, and a "nonfinite" record goes to metrics.jsonl. After
  `cfg.max_nonfinite_steps` consecutive ones the run aborts with TrainingDivergedError; the last
  good checkpoint is left untouched.
- time_limit_min counts training time across resumes; when reached the loop checkpoints and stops.
- SIGINT/SIGTERM: the current step finishes, a checkpoint is written and `train` returns
  (stop_reason "signal"); a second SIGINT interrupts at once. (With num_workers > 0, send SIGTERM to
  the main process only: workers killed by a signal make the DataLoader raise.)
- Weight decay applies to the weights of nn.Linear and nn.ConvNd only; biases, norms, embeddings and
  bare nn.Parameters (learned tokens, positions) are not decayed. Frozen parameters are not optimized.
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
import ctypes
import dataclasses
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from dreamerv4.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from dreamerv4.errors import CheckpointError, ConfigError, UserError
from dreamerv4.training import distributed
from dreamerv4.training.ema import WeightEMA, inference_state
from dreamerv4.training.logging import MetricsLog

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.yaml"
CHECKPOINT_FORMAT = "dreamerv4.train/1"


@dataclass
class TrainConfig:
    steps: int = 10_000
    time_limit_min: float = 0.0  # stop after this many minutes of training (0: no limit); resumable
    batch_size: int = 16
    seq_len: int = 16
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 500
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping; the norm is still logged)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where the device supports it
    threads: int = 0  # torch CPU threads (0: leave torch's default)
    log_every: int = 10
    image_every: int = 500  # steps between on_image calls (0: never)
    ckpt_every: int = 250
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA if available, else CPU
    eval_every: int = 0  # steps between eval_fn calls (0: never); also runs at the last step
    max_nonfinite_steps: int = 10  # consecutive skipped (non-finite) updates that abort the run
    tensorboard: bool = True  # also write TensorBoard events to run_dir/tb
    # torch.compile every transformer block (models/transformer.py compile_blocks): faster steps
    # after some seconds of compilation in the first steps (docs/results.md, Speed); off in tests.
    compile: bool = False
    # glibc only: keep freed blocks of up to 32 MB in the heap (`tune_malloc`) instead of handing
    # them back to the OS and page-faulting them in again at the next step (a few percent faster
    # tokenizer steps: docs/results.md, Speed).
    tune_malloc: bool = True
    # Keep an exponential moving average of the weights with this decay (0: none); checkpoints carry
    # it as "ema_model", later phases and the image/eval hooks use it (training/ema.py).
    ema_decay: float = 0.0
    # With a time limit: time the first updates after warm-up, then shorten the schedule (`steps` is
    # the most) so its cosine decay ends within time_limit_min on this machine, instead of the limit
    # cutting it off half-decayed on a slower one. The fitted length is checkpointed and kept on resume
    # (where `steps`, not the clock, bound it, a raised `steps` still extends the run).
    fit_steps_to_time: bool = False

    def __post_init__(self) -> None:
        # ValueError: config.from_dict turns it into a ConfigError naming the file and section.
        for name in ("steps", "batch_size", "log_every", "ckpt_every", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "image_every", "eval_every", "threads", "seed", "time_limit_min"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.fit_steps_to_time and self.time_limit_min <= 0:
            raise ValueError("fit_steps_to_time needs a time limit (time_limit_min > 0)")


# What `tune_malloc` sets: glibc's largest allowed mmap threshold, and a heap-trim threshold no
# step reaches. (glibc also reads them from MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_.)
MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD = 32 << 20, (1 << 31) - 1


def tune_malloc() -> bool:
    """Make glibc malloc serve the training step's large, short-lived buffers from the heap.

    By default glibc returns every freed block over its mmap threshold (dynamic, up to 32 MB) to
    the OS, so each step page-faults its activations in again (seen as system time: ~0.5-3 s of a
    7-10 s tokenizer step at the reference sizes). Fixing the threshold at its maximum (32 MB) and
    never trimming the heap keeps those pages mapped; peak memory stays the same. Process-wide
    and idempotent; returns False (and changes nothing) off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD))


class TrainingDivergedError(UserError):
    """Loss or gradients stayed non-finite for `max_nonfinite_steps` consecutive steps."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


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


# ---------------------------------------------------------------------------------------------
# Devices, precision, schedule, optimizer


CPP_COMPILERS = ("g++", "c++", "clang++")  # what torch inductor looks for on CPU, after $CXX


def cpp_compiler() -> str | None:
    """Path of the C++ compiler torch.compile would build CPU kernels with, or None."""
    names = ([os.environ["CXX"]] if os.environ.get("CXX") else []) + list(CPP_COMPILERS)
    return next((path for path in map(shutil.which, names) if path), None)


def resolve_device(cfg: TrainConfig) -> torch.device:
    """The device the loop trains on: cfg.device, where "auto" means CUDA if available, else CPU.

    Under torchrun with several processes, CUDA means cuda:LOCAL_RANK, which also becomes the current
    device (so tensors a phase creates with device="cuda" land on this process's GPU)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' was asked for but torch sees no CUDA device")
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda" and distributed.env_world_size() > 1:
        device = torch.device("cuda", distributed.local_rank())
        torch.cuda.set_device(device)
    return device


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 instructions (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (torch.bfloat16) or None for plain fp32. Parameters always stay fp32."""
    if cfg.precision == "fp32":
        return None
    if cfg.precision == "bf16":
        return torch.bfloat16  # forced: on CPUs without native bf16 it runs, only slower
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_supports_bf16() else None


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of cfg.lr for the update at 0-based index `step`: linear warmup, then cosine decay.

    Warmup: (step + 1) / warmup_steps, so the first update is not wasted at lr 0. Cosine: from 1 at
    `warmup_steps` down to min_lr_ratio at `total_steps` (and flat after it).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _schedule(cfg: TrainConfig, total_steps: Callable[[], int]) -> Callable[[int], float]:
    """lr_factor over a schedule whose length `total_steps()` is read at every step (it may be fitted)."""
    return lambda step: lr_factor(
        step, warmup_steps=cfg.warmup_steps, total_steps=total_steps(), min_lr_ratio=cfg.min_lr_ratio
    )


FIT_MARGIN = 0.97  # of the remaining time the fitted schedule plans for: checkpoints and hooks take the rest


def fitted_steps(cfg: TrainConfig, step: int, elapsed_s: float, seconds_per_step: float) -> int:
    """The schedule length that ends within cfg.time_limit_min at `seconds_per_step`, at most cfg.steps."""
    remaining = max(0.0, cfg.time_limit_min * 60.0 - elapsed_s) * FIT_MARGIN
    return min(cfg.steps, step + int(remaining / max(seconds_per_step, 1e-9)))


def fit_window(cfg: TrainConfig, start_step: int) -> tuple[int, int]:
    """Steps (first, last) between which `fit_steps_to_time` first times the updates: after the first
    compiled steps, ending where warm-up ends (for a fresh run), so the cosine has not started yet."""
    half = max(10, cfg.warmup_steps // 2)
    return start_step + half, start_step + 2 * half


def refit_at(fitted_at: int, total_steps: int, min_window: int) -> int:
    """The step of the second, final fit: a fifth of the way through the first fitted schedule (at least
    `min_window` steps on), timed since the first fit, so that checkpoints, hooks and slow early steps
    weigh in as they will on average (the cosine's length then moves a little, early in its decay)."""
    return fitted_at + max(min_window, (total_steps - fitted_at) // 5)


class _StepTimer:
    """The timing behind `fit_steps_to_time`: `fit_window`, then one more window up to `refit_at`."""

    def __init__(self, cfg: TrainConfig, start_step: int):
        self.first, self.last = fit_window(cfg, start_step)
        self.started = self.stopped = 0.0
        self.windows_left = 2

    def seconds_per_step(self, step: int) -> float | None:
        """Call after each update: the mean seconds per update when `step` closes a window, else None."""
        if step == self.first:
            self.started = time.monotonic()
        elif step == self.last:
            self.stopped = time.monotonic()
            return (self.stopped - self.started) / (self.last - self.first)
        return None

    def fitted(self, step: int, total_steps: int) -> bool:
        """Record the fit made at `step`; True when it was the final one (else the next window opens)."""
        self.windows_left -= 1
        if self.windows_left:
            window = self.last - self.first
            self.first, self.last, self.started = step, refit_at(step, total_steps, window), self.stopped
        return not self.windows_left


_DECAYED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weights of Linear/Conv layers decay; everything else (biases, norms, embeddings,
    learned tokens) does not. Frozen and shared parameters are handled (each trainable one once)."""
    decayed_ids = {
        id(module.weight)
        for module in model.modules()
        if isinstance(module, _DECAYED_MODULES) and module.weight is not None
    }
    decay, no_decay = [], []
    for param in model.parameters():  # parameters() already yields each shared tensor once
        if param.requires_grad:
            (decay if id(param) in decayed_ids else no_decay).append(param)
    if not decay and not no_decay:
        raise ConfigError("the model has no trainable parameters")
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=device.type in ("cuda", "cpu") or None,  # fused CPU AdamW: 3.5x faster update than foreach
    )


# ---------------------------------------------------------------------------------------------
# Data order


class StepBatchSampler(Sampler[list[int]]):
    """Index lists for steps start_step .. total_steps - 1; the batch of a step depends only on (seed, step).

    Global sample position p (step * global_batch + i) is dataset index perm_e[p mod N], where
    e = p // N and perm_e = numpy default_rng([seed, e]).permutation(N): every window once per epoch,
    in a fresh order each epoch. With world_size > 1, rank r takes its slice of each global batch.
    """

    def __init__(
        self, dataset_len: int, batch_size: int, seed: int, start_step: int, total_steps: int,
        rank: int = 0, world_size: int = 1,
    ):
        if dataset_len < 1:
            raise ValueError("StepBatchSampler: the dataset is empty")
        self.n, self.batch_size, self.seed = dataset_len, batch_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.rank, self.world_size = rank, world_size
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        first = (step * self.world_size + self.rank) * self.batch_size
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.total_steps):
            yield self.indices(step)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


# ---------------------------------------------------------------------------------------------
# Small helpers


@contextlib.contextmanager
def _isolated_rng() -> Iterator[None]:
    """Run a hook without moving the training RNG streams (so hooks never change training)."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


@contextlib.contextmanager
def _inference(model: nn.Module, autocast: Callable[[], contextlib.AbstractContextManager]) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with _isolated_rng(), torch.no_grad(), autocast():
            yield
    finally:
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


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _fmt(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def load_weights(model: nn.Module, path: str | Path, *, require_done: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by `train` into `model` (strict) for a later phase; returns the
    checkpoint's config dict. `require_done` refuses a run that stopped before its last step."""
    ckpt = load_checkpoint(path)
    if require_done:
        require_finished(ckpt, path)
    try:
        _unwrap(model).load_state_dict(inference_state(ckpt))
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: does not match the model ({exc})") from exc
    return ckpt.get("config", {})


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


def _restore(ckpt: dict[str, Any], ckpt_path: Path, cfg: TrainConfig, model: nn.Module,
             optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
             extra_state: Mapping[str, Stateful], ema: WeightEMA | None) -> None:
    """Put model, optimizer, scheduler, extra state, weight average and RNG streams back where the
    checkpoint left them."""
    try:
        _unwrap(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        for name, obj in extra_state.items():
            obj.load_state_dict(ckpt["extra"][name])
        if ema is not None and "ema_model" in ckpt:
            ema.load_model_state(ckpt["ema_model"], ckpt["ema_updates"])
        elif ema is not None:  # ema_decay switched on at resume: average from the restored weights
            ema.load_model_state(ckpt["model"], 0)
            print(f"{ckpt_path}: has no weight average; train.ema_decay starts one from step {ckpt['step']}",
                  file=sys.stderr)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{ckpt_path}: does not fit this model/config ({type(exc).__name__}: {exc})") from exc
    # Hyper-parameters come from the current config (bitwise the same values when it is unchanged).
    step = int(ckpt["step"])
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group, decay in zip(optimizer.param_groups, (cfg.weight_decay, 0.0)):
        group.update(initial_lr=cfg.lr, lr=cfg.lr * scheduler.lr_lambdas[0](step), betas=(cfg.beta1, cfg.beta2),
                     weight_decay=decay)
    set_rng_state(ckpt["rng"])


# ---------------------------------------------------------------------------------------------
# The loop


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
        "step", "kind", "elapsed_min", "lr", "loss", "grad_norm", "samples_per_s", "frames_per_s",
        "nonfinite_steps").
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
    return _train(model, dataset, loss_fn, cfg, run_dir, resume=resume, config_dict=config_dict,
                  extra_state=extra_state, on_image=on_image, eval_fn=eval_fn,
                  frames_per_sample=frames_per_sample, num_workers=num_workers, collate_fn=collate_fn,
                  find_unused_parameters=find_unused_parameters, device=device, ctx=ctx, call_start=call_start)


def _train(
    model: nn.Module, dataset: Dataset, loss_fn: LossFn, cfg: TrainConfig, run_dir: str | Path, *, resume: bool,
    config_dict: Mapping[str, Any] | None, extra_state: Mapping[str, Stateful] | None,
    on_image: ImageHook | None, eval_fn: EvalFn | None, frames_per_sample: int, num_workers: int,
    collate_fn: Callable[[list[Any]], Any] | None, find_unused_parameters: bool, device: torch.device,
    ctx: distributed.DistContext, call_start: float,
) -> TrainSummary:
    """The body of `train`; ctx says which rank this process is (disabled for a single process)."""
    run_dir = Path(run_dir)
    ckpt_path = run_dir / CHECKPOINT_FILE
    extra_state = dict(extra_state or {})
    config_dict = dict(config_dict) if config_dict is not None else {"train": dataclasses.asdict(cfg)}
    reserved = {"step", "kind", "elapsed_min", "lr", "loss", "grad_norm", "samples_per_s", "frames_per_s",
                "nonfinite_steps"}

    if ctx.enabled and cfg.batch_size % ctx.world_size:
        raise ConfigError(f"train.batch_size {cfg.batch_size} (the global batch) is not divisible by the "
                          f"{ctx.world_size} processes; choose a multiple of {ctx.world_size}")
    has_ckpt = ckpt_path.exists()
    if ctx.enabled:
        has_ckpt = ctx.broadcast(has_ckpt)  # rank 0's view decides, so every rank takes the same branch
    if has_ckpt and not resume:
        raise UserError(
            f"{run_dir}: already holds a training checkpoint ({CHECKPOINT_FILE}); pass --resume to continue "
            "it, or choose another out_dir"
        )
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.tune_malloc and device.type == "cpu":
        tune_malloc()
    autocast_dtype = resolve_precision(cfg, device)

    def autocast() -> contextlib.AbstractContextManager:
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast_dtype)

    model.to(device).train()
    if cfg.compile:
        from dreamerv4.models.transformer import compile_blocks

        if device.type == "cpu" and cpp_compiler() is None:
            print(f"{run_dir}: train.compile needs a C++ compiler on CPU (torch inductor; none of $CXX, "
                  f"{', '.join(CPP_COMPILERS)} found): training eagerly. Install one (e.g. g++) or set "
                  "train.compile=false to silence this.", file=sys.stderr)
        else:
            compile_blocks(model)
    for obj in extra_state.values():
        if isinstance(obj, nn.Module):
            obj.to(device)
    optimizer = make_optimizer(model, cfg, device)
    # The schedule's length: cfg.steps, unless fit_steps_to_time shortens it (here or in a checkpoint).
    total = {"steps": cfg.steps, "fitted": False}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, lambda: total["steps"]))
    ema = WeightEMA(_unwrap(model), cfg.ema_decay) if cfg.ema_decay > 0 else None

    def averaged() -> contextlib.AbstractContextManager:  # hooks see the weights later phases load
        return ema.swapped_into() if ema is not None else contextlib.nullcontext()

    step, elapsed_before_s, nonfinite_total = 0, 0.0, 0
    window: dict[str, Any] = {"sums": {}, "count": 0}
    last_metrics: dict[str, float] = {}
    resumed = resume and has_ckpt
    if resumed:
        ckpt, error = None, None
        try:
            ckpt = load_checkpoint(ckpt_path)
            if ckpt.get("format") != CHECKPOINT_FORMAT:
                raise CheckpointError(f"{ckpt_path}: not a training-loop checkpoint (format {ckpt.get('format')!r})")
        except CheckpointError as exc:
            if not ctx.enabled:
                raise
            error = CheckpointError(f"{exc} (to resume, run_dir must be on a filesystem every node sees)")
        if ctx.enabled:  # every rank must have read it, or all stop (none waits for the others forever)
            ctx.raise_if_any(error, f"reading {ckpt_path}")
            steps_seen = ctx.all_gather(int(ckpt["step"]))
            if len(set(steps_seen)) > 1:
                raise CheckpointError(f"{ckpt_path}: ranks read different checkpoints (steps {steps_seen})")
        step = int(ckpt["step"])
        if cfg.fit_steps_to_time and ckpt.get("fitted_steps") is not None:
            fitted, old_cap = int(ckpt["fitted_steps"]), int(ckpt["train_config"]["steps"])
            # A fit that train.steps capped did not bind: a raised train.steps still continues the run.
            total.update(steps=cfg.steps if fitted >= old_cap else min(cfg.steps, fitted), fitted=True)
        if ckpt["done"] and step >= total["steps"]:
            if ctx.is_main:
                print(f"{run_dir}: training already finished at step {step}; nothing to do", file=sys.stderr)
            return TrainSummary(step, True, "already_done", dict(ckpt["last_metrics"]),
                                time.monotonic() - call_start, ckpt["elapsed_s"] / 60.0, ckpt_path)
        _restore(ckpt, ckpt_path, cfg, model, optimizer, scheduler, extra_state, ema)
        if ctx.enabled:
            rank_rng = ckpt.get("rng_ranks") or []
            if len(rank_rng) == ctx.world_size:
                set_rng_state(rank_rng[ctx.rank])  # each rank continues its own streams: exact resume
            else:  # written with another number of processes: rank 0 continues, the others re-derive
                distributed.diverge_rng(ctx.rank)
                if ctx.is_main:
                    print(f"{run_dir}: checkpoint written by {len(rank_rng) or 1} process(es), resumed by "
                          f"{ctx.world_size}: same data order, other random streams", file=sys.stderr)
        elapsed_before_s = float(ckpt["elapsed_s"])
        nonfinite_total = int(ckpt.get("nonfinite_steps", 0))
        window, last_metrics = ckpt["log_window"], dict(ckpt["last_metrics"])
        changes = _config_changes(ckpt.get("config", {}), config_dict)
        if ctx.is_main:
            print(f"{run_dir}: resuming from step {step}"
                  + (f"; config changed: {'; '.join(changes)}" if changes else ""), file=sys.stderr)
        del ckpt
    else:
        if ctx.enabled:
            distributed.diverge_rng(ctx.rank)
        if resume and ctx.is_main:
            print(f"{run_dir}: no checkpoint to resume; starting fresh", file=sys.stderr)

    if ctx.is_main:  # rank 0 alone writes run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".{CONFIG_FILE}.tmp"
        tmp.write_text(yaml.safe_dump(config_dict, sort_keys=False))
        tmp.replace(run_dir / CONFIG_FILE)
        log: MetricsLog | _NoLog = MetricsLog(run_dir, tensorboard=cfg.tensorboard,
                                              resume_step=step if resumed else None)
    else:
        log = _NoLog()

    sampler = StepBatchSampler(len(dataset), cfg.batch_size // ctx.world_size, cfg.seed, step, cfg.steps,
                               rank=ctx.rank, world_size=ctx.world_size)
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=device.type == "cuda",
        collate_fn=collate_fn,
        # Own generator: creating the iterator must not draw from the global torch RNG.
        generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + step),
    )

    train_start = time.monotonic()
    elapsed_s = lambda: elapsed_before_s + time.monotonic() - train_start  # noqa: E731
    # -1 forces a final save: a fresh run, or a resumed one whose train.steps was lowered to its step.
    saved_step = step if resumed and step < total["steps"] else -1
    timer = _StepTimer(cfg, step) if cfg.fit_steps_to_time and not total["fitted"] else None
    consecutive_bad = 0
    window_start, window_start_step = time.monotonic(), step
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    # batch -> loss_fn(model, batch); under torchrun inside DDP's forward (gradients averaged over ranks).
    compute_loss = distributed.wrap_loss(model, loss_fn, ctx, find_unused_parameters=find_unused_parameters)

    def save(done: bool, reason: str | None = None) -> None:
        nonlocal saved_step, window
        rank_rng: list[Any] = []
        if ctx.enabled:  # collectives: every rank calls save() at the same steps
            # The saved window holds the means over ranks; averaging later with the ranks' further
            # (local) sums stays exact because the mean is linear.
            window = {"sums": ctx.mean_of_dicts(window["sums"]), "count": window["count"]}
            rank_rng = ctx.all_gather(rng_state())
        if ctx.is_main:
            save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "model": _unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "extra": {k: v.state_dict() for k, v in extra_state.items()},
                "step": step, "done": done, "stop_reason": reason or ("done" if done else "running"),
                "rng": rng_state(), "config": config_dict,
                "train_config": dataclasses.asdict(cfg), "elapsed_s": elapsed_s(), "nonfinite_steps": nonfinite_total,
                "log_window": {"sums": {k: float(v) for k, v in window["sums"].items()}, "count": window["count"]},
                "last_metrics": last_metrics, "fitted_steps": total["steps"] if total["fitted"] else None,
                **({"rng_ranks": rank_rng} if ctx.enabled else {}),
                **({"ema_model": ema.model_state(), "ema_updates": ema.updates} if ema else {}),
            })
        if ctx.enabled:
            distributed.barrier()  # nobody runs ahead (or exits) before the checkpoint is complete
        saved_step = step

    bar = tqdm(total=total["steps"], initial=step, desc=run_dir.name, dynamic_ncols=True,
               disable=None if ctx.is_main else True, file=sys.stderr)
    last_line = 0.0
    stop_reason = "done"
    batches = iter(loader)
    try:
        with _StopSignal() as stop:

            def stop_flags() -> list[float]:  # [time limit reached, signal received] on this rank
                return [float(cfg.time_limit_min > 0 and elapsed_s() >= cfg.time_limit_min * 60.0),
                        float(stop.signum is not None)]

            if ctx.enabled:  # ranks stop together: flags are summed over ranks (first here, then per step)
                agreed_stop = ctx.sum_(torch.tensor(stop_flags(), dtype=torch.float64, device=device)).tolist()
            while step < total["steps"]:
                if ctx.enabled:
                    time_up, signalled = agreed_stop[0] > 0, agreed_stop[1] > 0
                else:
                    time_up = cfg.time_limit_min > 0 and elapsed_s() >= cfg.time_limit_min * 60.0
                    signalled = stop.signum is not None
                if time_up:
                    stop_reason = "time_limit"
                    break
                if signalled:
                    stop_reason = "signal"
                    break
                try:
                    batch = next(batches)
                except Exception:
                    if stop.signum is not None:  # workers died from the same Ctrl-C; state is consistent
                        stop_reason = "signal"
                        break
                    raise
                batch = _to_device(batch, device)
                snapshot = {k: _clone_state(v.state_dict()) for k, v in extra_state.items()}

                with autocast():
                    loss, metrics = compute_loss(batch)
                loss = loss.float()
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # same on every rank (DDP)
                if ctx.enabled:
                    # One all-reduce: mean loss (NaN anywhere -> NaN everywhere, so all ranks skip
                    # together), the stop flags, and extra_state's float tensors (kept in sync).
                    loss, agreed_stop, synced_extra = _reduce_step(ctx, loss.detach(), stop_flags(), extra_state)
                finite = bool(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))  # the one sync per step
                if finite:
                    if ctx.enabled:
                        for name, state in synced_extra.items():
                            extra_state[name].load_state_dict(state)
                    optimizer.step()
                    if ema is not None:
                        ema.update()
                    consecutive_bad = 0
                else:
                    for name, obj in extra_state.items():
                        obj.load_state_dict(snapshot[name])
                    nonfinite_total += 1
                    consecutive_bad += 1
                optimizer.zero_grad(set_to_none=True)
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                step += 1
                seconds_per_step = timer.seconds_per_step(step) if timer is not None else None
                if seconds_per_step is not None:
                    fitted = fitted_steps(cfg, step, elapsed_s(), seconds_per_step)
                    if ctx.enabled:
                        fitted = ctx.broadcast(fitted)  # rank 0's timing decides for all
                    total.update(steps=max(step, fitted), fitted=True)
                    final = timer.fitted(step, total["steps"])
                    for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):  # the next update's
                        group["lr"] = base_lr * scheduler.lr_lambdas[0](step)
                    bar.total = total["steps"]
                    bar.refresh()
                    if ctx.is_main:
                        tqdm.write(f"{run_dir}: {seconds_per_step:.3f} s per step: schedule fitted to the "
                                   f"{cfg.time_limit_min:g}-minute limit, {total['steps']} steps "
                                   f"(train.steps {cfg.steps}{'; final' if final else ''})", file=sys.stderr)

                if not finite:
                    report = {"loss": float(loss.detach()), "grad_norm": float(grad_norm),
                              **{k: float(v) for k, v in metrics.items()}}
                    log.write({"kind": "nonfinite", "step": step, **report})
                    if ctx.is_main:
                        tqdm.write(f"{run_dir}: non-finite loss or gradient at step {step}, update skipped "
                                   f"({consecutive_bad} in a row, {nonfinite_total} in total): {_fmt(report)}",
                                   file=sys.stderr)
                    if consecutive_bad >= cfg.max_nonfinite_steps:
                        where = f"{ckpt_path} (step {saved_step})" if saved_step >= 0 else "none written yet"
                        raise TrainingDivergedError(
                            f"{run_dir}: training diverged: loss or gradient non-finite for {consecutive_bad} "
                            f"consecutive steps, the last at step {step} ({_fmt(report)}). Last good checkpoint: "
                            f"{where}. Lower train.lr, raise train.warmup_steps or check the data, then resume."
                        )
                else:
                    clashes = reserved.intersection(metrics)
                    if clashes:
                        raise ValueError(f"loss_fn metric names {sorted(clashes)} clash with names the loop logs")
                    sums = window["sums"]
                    for key, value in (("loss", loss.detach()), ("grad_norm", grad_norm.detach()), *metrics.items()):
                        value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
                        sums[key] = sums[key] + value if key in sums else value
                    window["count"] += 1
                bar.update(1)

                if (step % cfg.log_every == 0 or step == total["steps"]) and window["count"] > 0:
                    now = time.monotonic()
                    n, window_time = window["count"], max(now - window_start, 1e-9)
                    samples_per_s = (step - window_start_step) * cfg.batch_size / window_time
                    record: dict[str, Any] = {"kind": "train", "step": step, "elapsed_min": elapsed_s() / 60.0,
                                              "lr": lr}
                    sums = ctx.mean_of_dicts(window["sums"]) if ctx.enabled else window["sums"]
                    record.update({k: float(v) / n for k, v in sums.items()})
                    record.update(samples_per_s=samples_per_s, frames_per_s=samples_per_s * frames_per_sample,
                                  nonfinite_steps=nonfinite_total)
                    log.write(record)
                    last_metrics.update({k: v for k, v in record.items() if k != "kind"})
                    bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4g}", lr=f"{lr:.2e}",
                                    fps=f"{record['frames_per_s']:.0f}")
                    if ctx.is_main and bar.disable and (now - last_line >= 10.0 or step == total["steps"]):
                        print(f"step {step}/{total['steps']} " + _fmt({k: v for k, v in record.items()
                              if k not in ("kind", "step")}), file=sys.stderr)
                        last_line = now
                    window, window_start, window_start_step = {"sums": {}, "count": 0}, now, step

                if on_image is not None and cfg.image_every and step % cfg.image_every == 0 and ctx.is_main:
                    with _inference(model, autocast), averaged():
                        images = on_image(step, model, batch)
                    for name, image in (images or {}).items():
                        log.write_image(name, step, image)
                if eval_fn is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == total["steps"]):
                    results = {}
                    if ctx.is_main:  # the others wait in the next step's all-reduce (see distributed.py)
                        with _inference(model, autocast), averaged():
                            results = {k: float(v) for k, v in eval_fn(model).items()}
                    if ctx.enabled:
                        results = ctx.broadcast(results)
                    log.write({"kind": "eval", "step": step, "elapsed_min": elapsed_s() / 60.0, **results})
                    last_metrics.update({f"eval/{k}": v for k, v in results.items()})
                    if ctx.is_main:
                        tqdm.write(f"step {step} eval: {_fmt(results)}", file=sys.stderr)

                # No periodic checkpoint inside a streak of skipped steps: the last good one stays.
                if (step % cfg.ckpt_every == 0 and consecutive_bad == 0) or step == total["steps"]:
                    save(done=step >= total["steps"])
            # Time limit or signal between periodic checkpoints; a time limit is always recorded, since
            # it finishes the run's budget (`checkpoint_finished`).
            if saved_step != step or stop_reason == "time_limit":
                save(done=step >= total["steps"], reason=stop_reason)
    finally:
        bar.close()
        log.close()
        del batches  # shuts DataLoader workers down

    done = step >= total["steps"]
    if stop_reason != "done" and ctx.is_main:
        print(f"{run_dir}: stopped at step {step}/{total['steps']} ({stop_reason.replace('_', ' ')}); "
              f"checkpoint {ckpt_path}; continue with --resume", file=sys.stderr)
    return TrainSummary(step, done, "done" if done else stop_reason, last_metrics,
                        time.monotonic() - call_start, elapsed_s() / 60.0, ckpt_path)


class _NoLog:
    """What ranks other than 0 log to: nothing (only rank 0 writes run_dir)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def write_image(self, name: str, step: int, image: np.ndarray) -> None:
        pass

    def close(self) -> None:
        pass


def _reduce_step(ctx: distributed.DistContext, loss: torch.Tensor, stop_flags: list[float],
                 extra_state: Mapping[str, Stateful]) -> tuple[torch.Tensor, list[float], dict[str, dict[str, Any]]]:
    """Sum over ranks, in one all-reduce, of [loss, stop flags, extra_state float tensors].

    Returns the mean loss (0-d float32), the summed stop flags and, per extra_state entry with float
    tensors, its state_dict with those tensors replaced by their mean over ranks."""
    states = {name: obj.state_dict() for name, obj in extra_state.items()}
    floats = [(name, key, value) for name, state in states.items() for key, value in state.items()
              if isinstance(value, torch.Tensor) and value.is_floating_point()]
    parts = [loss.reshape(1).double(), torch.tensor(stop_flags, dtype=torch.float64, device=loss.device)]
    parts += [value.detach().reshape(-1).to(loss.device, torch.float64) for _, _, value in floats]
    total = ctx.sum_(torch.cat(parts)) / ctx.world_size
    mean_loss = total[0].float()
    flags = (total[1:3] * ctx.world_size).tolist()
    synced: dict[str, dict[str, Any]] = {}
    offset = 3
    for name, key, value in floats:
        mean = total[offset:offset + value.numel()].view(value.shape).to(value.device, value.dtype)
        offset += value.numel()
        synced.setdefault(name, dict(states[name]))[key] = mean
    return mean_loss, flags, synced


def _clone_state(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else _clone_state(v) if isinstance(v, Mapping) else v
            for k, v in state.items()}

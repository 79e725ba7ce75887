"""Data-parallel training under `torchrun`: the process-group plumbing `training/loop.py` uses.

Any training stage runs on several GPUs (or CPU processes) unchanged; `train()` reads torchrun's
environment (WORLD_SIZE, RANK, LOCAL_RANK), so launching is all there is to it (docs/distributed.md):

    torchrun --standalone --nproc_per_node 8 -m dreamerv4.cli train tokenizer --config configs/x.yaml

What a phase author needs to know (the rest is the loop's business):
- `train.batch_size` is the *global* batch; each of the W ranks gets batch_size / W samples of every
  step's global batch (`StepBatchSampler(rank, world_size)`), so results do not depend on W.
- The loop wraps `loss_fn(model, batch)` itself in DistributedDataParallel (`LossModule`), and
  `loss_fn` receives the raw model. So loss functions may call the model's forward, its submodules
  or any custom method (`model.encode(...)`, `model.head(...)`), several times and under no_grad:
  everything inside `loss_fn` runs within DDP's forward, so every gradient is averaged across ranks.
  Calling the model anywhere else (e.g. outside `loss_fn` with grad enabled) is not synchronized.
- Parameters that get no gradient in a step (a head a loss term skips) make DDP fail at the next
  step; pass `train(..., find_unused_parameters=True)` for such losses (slower: it walks the graph).
  Frozen parameters (requires_grad False) are fine either way.
- Losses should be means over the local batch (then the average over ranks is the global mean).
- Only rank 0 writes to run_dir and runs `on_image` / `eval_fn` (on the raw model).
- Outside `train`, use `is_main_process()` / `barrier()` for work only one process should do.
"""

from __future__ import annotations

import atexit
import datetime
import inspect
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dreamerv4.errors import CheckpointError

# Rank 0 runs the image/eval hooks while the others wait in the next step's gradient all-reduce;
# NCCL's default 10 min timeout would abort a long evaluation.
TIMEOUT_ENV = "DREAMERV4_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 60.0


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """LOCAL_RANK as torchrun sets it: the GPU index this process uses on its node (0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on global rank 0, and in any process not started by torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


@dataclass
class DistContext:
    """This process's place in the job. `enabled` is False for a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives (call on every rank, in the same order) --------------------------------

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._object_device())
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def raise_if_any(self, error: BaseException | None, what: str) -> None:
        """Collective error check: if any rank failed at `what`, every rank raises (none hangs)."""
        errors = self.all_gather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            rank, message = failed[0]
            raise CheckpointError(f"rank {rank} failed at {what}: {message}")

    def sum_(self, values: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks of a 1-d float tensor on this rank's device."""
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def mean_of_dicts(self, values: Mapping[str, Any]) -> dict[str, float]:
        """Per-key mean over ranks of {name: float or 0-d tensor} (keys missing on a rank are averaged
        over the ranks that have them)."""
        local = {k: float(v) for k, v in values.items()}
        totals: dict[str, list[float]] = {}
        for gathered in self.all_gather(local):
            for k, v in gathered.items():
                totals.setdefault(k, []).append(v)
        return {k: sum(v) / len(v) for k, v in totals.items()}

    def _object_device(self) -> torch.device | None:
        return self.device if dist.get_backend() == "nccl" else None


def setup(device: torch.device) -> DistContext:
    """Join the job torchrun started (NCCL on CUDA, gloo on CPU) unless a process group exists already.

    The group lives until the process exits (then `shutdown` ends it), so the stages of a pipeline
    that call `train` one after another share it: a torchrun job cannot reliably build a second
    default group after destroying the first (stale rendezvous keys). Returns a disabled context for
    a single process (no torchrun, or WORLD_SIZE 1)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), device)
    if env_world_size() <= 1:
        return DistContext(device=device)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    minutes = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_MIN))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=minutes))
    atexit.register(shutdown)
    return DistContext(dist.get_rank(), dist.get_world_size(), device)


def shutdown() -> None:
    """End the process group (registered at exit by `setup`; safe to call more than once)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def diverge_rng(rank: int) -> None:
    """Give rank r > 0 its own Python/NumPy/torch RNG streams, derived from the current (shared) state.

    Phases seed before building the model, so every rank starts with the same streams; without this,
    every rank would draw the same dropout masks, noise levels and masks for different data. Rank 0
    keeps its streams (it matches a single-process run as far as randomness allows)."""
    if rank == 0:
        return
    base = int(torch.randint(0, 2**62, ()))
    words = np.random.SeedSequence([base, rank]).generate_state(2, dtype=np.uint64)
    torch.manual_seed(int(words[0]) & (2**63 - 1))
    np.random.seed(int(words[1]) & (2**32 - 1))
    random.seed(int(words[1]))


class LossModule(nn.Module):
    """`loss_fn(model, batch)` as a module, so that DDP's forward covers the whole loss computation
    (including calls to submodules and custom methods of `model`, which bypass DDP's own forward)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Any]):
        super().__init__()
        self.model = model
        self.__dict__["loss_fn"] = loss_fn  # never registered as a submodule (its parameters are not DDP's)

    def forward(self, batch: Any) -> Any:
        return self.loss_fn(self.model, batch)


def wrap_loss(model: nn.Module, loss_fn: Callable[[nn.Module, Any], Any], ctx: DistContext, *,
              find_unused_parameters: bool = False) -> Callable[[Any], Any]:
    """batch -> loss_fn(model, batch), with gradients averaged across ranks when ctx is enabled."""
    if not ctx.enabled:
        return lambda batch: loss_fn(model, batch)
    ddp_class = nn.parallel.DistributedDataParallel
    # The models' buffers are constants (synced once when DDP is built); running statistics live in
    # extra_state, which the loop averages across ranks itself. Re-broadcasting buffers before every
    # forward would only cost time. torch >= 2.13 renamed the switch.
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(ddp_class.__init__).parameters
                      else {"broadcast_buffers": False})
    ddp = ddp_class(
        LossModule(model, loss_fn),
        device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
        **no_buffer_sync,
    )

    def compute(batch: Any) -> Any:
        try:
            return ddp(batch)
        except RuntimeError as exc:
            if "find_unused_parameters" in str(exc) and not find_unused_parameters:
                raise RuntimeError(
                    "distributed training: some parameters got no gradient in the previous step. If the "
                    "loss skips parts of the model on purpose, pass train(..., find_unused_parameters=True); "
                    f"otherwise freeze those parameters (requires_grad_(False)). DDP said: {exc}"
                ) from exc
            raise

    compute.ddp = ddp  # type: ignore[attr-defined]
    return compute


def reduce_step(ctx: DistContext, loss: torch.Tensor, stop_flags: list[float],
                extra_state: Mapping[str, Any]) -> tuple[torch.Tensor, list[float], dict[str, dict[str, Any]]]:
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

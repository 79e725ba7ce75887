"""Where and how a training run computes: device, CPU threads, glibc malloc, bf16 autocast, torch.compile.

    device = resolve_device(cfg)                  # cfg: TrainConfig; CUDA (cuda:LOCAL_RANK) or CPU
    set_up_process(cfg, device)                   # torch threads, malloc tuning (CPU)
    autocast = autocast_for(resolve_precision(cfg, device), device)
    with autocast():                              # bf16 autocast, or nothing in fp32
        loss = ...
    maybe_compile(model, cfg, device, run_dir)    # train.compile; eager with a note without a C++ compiler

Parameters always stay fp32; only the autocast regions compute in bf16.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dreamerv4.errors import ConfigError
from dreamerv4.models import transformer
from dreamerv4.training import distributed
from dreamerv4.training.config import TrainConfig

# What `tune_malloc` sets: glibc's largest allowed mmap threshold, and a heap-trim threshold no
# step reaches. (glibc also reads them from MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_.)
MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD = 32 << 20, (1 << 31) - 1
CPP_COMPILERS = ("g++", "c++", "clang++")  # what torch inductor looks for on CPU, after $CXX


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


def set_up_process(cfg: TrainConfig, device: torch.device) -> None:
    """train.threads (0: torch's default) and, on CPU, train.tune_malloc."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.tune_malloc and device.type == "cpu":
        tune_malloc()


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


def autocast_for(dtype: torch.dtype | None, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts in `dtype` on `device` (null contexts for fp32)."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def cpp_compiler() -> str | None:
    """Path of the C++ compiler torch.compile would build CPU kernels with, or None."""
    names = ([os.environ["CXX"]] if os.environ.get("CXX") else []) + list(CPP_COMPILERS)
    return next((path for path in map(shutil.which, names) if path), None)


def maybe_compile(model: nn.Module, cfg: TrainConfig, device: torch.device, run_dir: Path) -> None:
    """With train.compile, torch.compile every transformer block of `model` in place; on a CPU
    without a C++ compiler (inductor needs one) train eagerly and say so."""
    if not cfg.compile:
        return
    if device.type == "cpu" and cpp_compiler() is None:
        print(f"{run_dir}: train.compile needs a C++ compiler on CPU (torch inductor; none of $CXX, "
              f"{', '.join(CPP_COMPILERS)} found): training eagerly. Install one (e.g. g++) or set "
              "train.compile=false to silence this.", file=sys.stderr)
        return
    transformer.compile_blocks(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The module itself when torch.compile wrapped it (its state dict has no "_orig_mod." prefix)."""
    return getattr(model, "_orig_mod", model)

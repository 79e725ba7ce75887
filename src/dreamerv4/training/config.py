"""`TrainConfig`: the `<stage>.train` section every training stage shares (the loop's settings).

A plain dataclass with no torch import, so `run_config.py` (and anything that only reads configs)
can nest it without loading the training code. The loop (`training/loop.py`) reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


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
    # glibc only: keep freed blocks of up to 32 MB in the heap (`runtime.tune_malloc`) instead of
    # handing them back to the OS and page-faulting them in again at the next step (a few percent
    # faster tokenizer steps: docs/results.md, Speed).
    tune_malloc: bool = True

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


# `<stage>.train` options this version no longer has (docs/design.md, "Training-loop options").
# Checkpoints written before store them in their run config; `drop_retired` lets those still load.
RETIRED = ("ema_decay", "fit_steps_to_time")


def drop_retired(run_config: dict) -> dict:
    """A checkpoint's stored run config (a nested dict) without the RETIRED `<stage>.train` keys."""
    out = {}
    for name, section in run_config.items():
        if isinstance(section, dict) and isinstance(section.get("train"), dict):
            section = {**section, "train": {k: v for k, v in section["train"].items() if k not in RETIRED}}
        out[name] = section
    return out

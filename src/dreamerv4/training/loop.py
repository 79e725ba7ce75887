"""The training loop every phase shares. (Owned by the training work; stub fixes the config.)"""

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
    grad_clip: float = 1.0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where the device supports it
    threads: int = 0  # torch CPU threads (0: leave torch's default)
    log_every: int = 10
    image_every: int = 500
    ckpt_every: int = 250
    seed: int = 0

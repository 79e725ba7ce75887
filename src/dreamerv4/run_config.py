"""The root config of a run: one section per stage, each owned by the module it configures.

configs/*.yaml mirror this nesting; `dreamerv4 run` and each `dreamerv4 train STAGE` read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dreamerv4.data.crafter_record import RecordConfig
from dreamerv4.data.dataset import DataConfig
from dreamerv4.models.tokenizer import TokenizerConfig
from dreamerv4.training.loop import TrainConfig


@dataclass
class TokenizerStage:
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lpips_weight: float = 0.2  # 0 switches the perceptual term off (explicitly, never silently)
    lpips_net: str = "alexnet"


@dataclass
class RunConfig:
    out_dir: str = "runs/default"  # one run folder: every stage writes below it
    record: RecordConfig = field(default_factory=RecordConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerStage = field(default_factory=TokenizerStage)

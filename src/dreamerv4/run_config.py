"""The root config of a run: one section per stage, each owned by the module it configures.

configs/*.yaml mirror this nesting; `dreamerv4 run` and each `dreamerv4 train STAGE` read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dreamerv4.data.crafter_record import RecordConfig
from dreamerv4.data.dataset import DataConfig
from dreamerv4.models.agent import AgentConfig
from dreamerv4.models.dynamics import DynamicsConfig
from dreamerv4.models.tokenizer import TokenizerConfig
from dreamerv4.training.config import TrainConfig


@dataclass
class TokenizerStage:
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lpips_weight: float = 0.2  # 0 switches the perceptual term off (explicitly, never silently)
    lpips_net: str = "alexnet"
    # Training windows whose first frame is dark (Crafter's night or sleep view: `dark_frames`) are
    # drawn this many times as often as the others (1: the data as recorded).
    dark_repeat: int = 1

    def __post_init__(self) -> None:
        if self.lpips_weight < 0:
            raise ValueError(f"tokenizer.lpips_weight must be >= 0, got {self.lpips_weight}")
        if self.dark_repeat < 1:
            raise ValueError(f"tokenizer.dark_repeat must be >= 1, got {self.dark_repeat}")


@dataclass
class DynamicsStage:
    model: DynamicsConfig = field(default_factory=DynamicsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tokenizer_checkpoint: str = ""  # the frozen tokenizer ("": <out_dir>/tokenizer/checkpoint.pt)
    latents: str = ""  # latent folder made by `dreamerv4 data tokenize` ("": <out_dir>/latents)
    image_context: int = 4  # real frames before the imagined ones in the training rollout images/GIFs


@dataclass
class AgentStage:
    model: AgentConfig = field(default_factory=AgentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dynamics_checkpoint: str = ""  # the dynamics run to start from ("": <out_dir>/dynamics/checkpoint.pt)
    latents: str = ""  # latent folder ("": the dynamics stage's, dynamics.latents or <out_dir>/latents)


@dataclass
class ImagineStage:
    """Phase 3, RL in imagination (training/imagine.py); train.seq_len is the real context length."""

    train: TrainConfig = field(default_factory=TrainConfig)
    agent_checkpoint: str = ""  # the BC agent run to start from ("": <out_dir>/agent/checkpoint.pt)
    latents: str = ""  # latent folder of the contexts ("": the one the agent was trained on)
    horizon: int = 15  # H imagined steps per context
    sampling_steps: int = 4  # K shortcut steps per imagined frame
    # Frames the transformer sees at once; a full context restarts from its last half, as in real play
    # (0: agent.train.seq_len, the windows the agent trained on and the cap `eval crafter` plays with).
    max_context: int = 0
    gamma: float = 0.997
    lam: float = 0.95  # lambda of the returns (paper: unstated)
    alpha: float = 0.5  # PMPO weight of the positive-advantage set (1 - alpha: the negative one)
    beta: float = 0.3  # weight of the reverse KL to the frozen behaviour-cloning policy
    value_weight: float = 1.0
    fresh_value: bool = False  # start the value head from zero instead of the BC agent's (paper: trained in imagination)
    # "head": r_t from the reward head; "unlocks": from the unlock head, paying an achievement only
    # while it is not yet unlocked (needs agent.model.num_achievements; training/imagine.py)
    reward: str = "head"
    # > 0: pessimistic imagined reward: each frame sampled twice, r = mean - disagreement x |r_a - r_b|
    # (0.5: the smaller of the two; doubles a rollout's cost; training/imagine.py)
    disagreement: float = 0.0
    center_advantages: bool = False  # subtract the batch mean from A_t before PMPO takes signs (deviation)
    eval_episodes: int = 0  # real Crafter episodes every train.eval_every steps (0: no real-game evaluation)
    eval_seed: int = 200000  # first environment seed of those episodes (not eval crafter's 100000: no tuning on it)
    eval_max_steps: int = 10000  # episode length cap of those episodes (Crafter's own: 10000)

    def __post_init__(self) -> None:
        if self.max_context < 0 or self.max_context == 1:
            raise ValueError(f"max_context must be 0 (the agent's seq_len) or >= 2, got {self.max_context}")
        if self.horizon < 1 or self.eval_episodes < 0 or self.eval_max_steps < 1:
            raise ValueError(f"horizon and eval_max_steps must be >= 1 and eval_episodes >= 0, got {self.horizon}, "
                             f"{self.eval_max_steps}, {self.eval_episodes}")
        if self.sampling_steps < 1 or self.sampling_steps & (self.sampling_steps - 1):
            raise ValueError(f"sampling_steps must be a power of two, got {self.sampling_steps}")
        for name in ("gamma", "lam", "alpha"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.beta < 0 or self.value_weight < 0 or self.disagreement < 0:
            raise ValueError(f"beta, value_weight and disagreement must be >= 0, got {self.beta}, "
                             f"{self.value_weight}, {self.disagreement}")
        if self.reward not in ("head", "unlocks"):
            raise ValueError(f"reward must be 'head' or 'unlocks', got {self.reward!r}")


@dataclass
class EvalStage:
    """Real-game evaluation of `dreamerv4 run` (evaluation/crafter.py): every policy plays the same seeds."""

    crafter_episodes: int = 100
    crafter_seed: int = 100000  # episode i plays environment seed crafter_seed + i
    crafter_max_steps: int = 10000  # Crafter's own episode cap
    imagination_starts: int = 64  # held-out states of the exploitation instrument per policy (0: skip it)
    imagination_seed: int = 0  # seed of those start states and the policies' draws

    def __post_init__(self) -> None:
        if self.imagination_starts < 0:
            raise ValueError(f"imagination_starts must be >= 0, got {self.imagination_starts}")
        if self.crafter_episodes < 1 or self.crafter_max_steps < 1:
            raise ValueError(f"crafter_episodes and crafter_max_steps must be >= 1, got "
                             f"{self.crafter_episodes}, {self.crafter_max_steps}")


@dataclass
class RunConfig:
    out_dir: str = "runs/default"  # one run folder: every stage writes below it
    record: RecordConfig = field(default_factory=RecordConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerStage = field(default_factory=TokenizerStage)
    dynamics: DynamicsStage = field(default_factory=DynamicsStage)
    agent: AgentStage = field(default_factory=AgentStage)
    imagine: ImagineStage = field(default_factory=ImagineStage)
    eval: EvalStage = field(default_factory=EvalStage)

"""The finished stages of a run, loaded with one signature: the tokenizer, the world model, the agent
and the imagination-trained agent.

    tokenizer, run = load_tokenizer(path)                  # Tokenizer, eval mode
    world, run = load_dynamics(path, require_done=True)    # DynamicsModel
    agent, run = load_agent(path)                          # AgentModel of `train agent` or `train imagine`

Each reads the checkpoint once (weights_only), names the stage it holds when that is another than
the command needs (`checkpoint.require_stage`: one line naming both), rebuilds the model from the
run config stored inside it and loads the weights strictly. `run` is that config; for a world
model or an agent its dynamics paths (the tokenizer, the latents) are resolved from its out_dir.
`require_done` refuses a run that stopped before its last step or time limit. Every problem is one
CheckpointError naming the file.

Also here: where a run keeps what a stage reads (`resolve_dynamics_paths`, `resolve_agent_paths`),
the tokenizer a world model was trained with (`tokenizer_identity`) and the frames per encoding
chunk of a run's latents (`tokenizer_context`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from torch import nn

from dreamerv4.checkpoint import STAGES, load_checkpoint, require_stage
from dreamerv4.config import from_dict
from dreamerv4.data.latents import MANIFEST_FILE
from dreamerv4.errors import CheckpointError, ConfigError
from dreamerv4.models.agent import AgentModel
from dreamerv4.models.dynamics import DynamicsModel
from dreamerv4.models.tokenizer import Tokenizer
from dreamerv4.run_config import RunConfig
from dreamerv4.training.config import drop_retired
from dreamerv4.training.resume import CHECKPOINT_FILE, CHECKPOINT_FORMAT, load_model_state, require_finished

SECTIONS = {"tokenizer": "tokenizer", "dynamics": "dynamics", "agent": "agent", "imagine": "agent"}  # of the run config


def load_tokenizer(path: str | Path, require_done: bool = False) -> tuple[Tokenizer, RunConfig]:
    """The Tokenizer of a `train tokenizer` checkpoint (eval mode) and the run config inside it."""
    return _load(path, ("tokenizer",), require_done)


def load_dynamics(path: str | Path, require_done: bool = False) -> tuple[DynamicsModel, RunConfig]:
    """The DynamicsModel of a `train dynamics` checkpoint (eval mode) and the run config inside it."""
    return _load(path, ("dynamics",), require_done)


def load_agent(path: str | Path, require_done: bool = False) -> tuple[AgentModel, RunConfig]:
    """The AgentModel of a `train agent` or `train imagine` checkpoint (or of a later stage that saves an
    AgentModel state dict as its model, optionally under an "agent." prefix; eval mode) and the run
    config inside it, whose `dynamics` section is the dynamics run the agent started from."""
    return _load(path, ("agent", "imagine"), require_done)


def _load(path: str | Path, stages: tuple[str, ...], require_done: bool) -> tuple[Any, RunConfig]:
    ckpt = load_checkpoint(path)
    stage = require_stage(ckpt, path, *stages) or stages[0]  # None: weights of no known stage; the load decides
    config = ckpt.get("config")
    if ckpt.get("format") != CHECKPOINT_FORMAT or not isinstance(config, dict) or SECTIONS[stage] not in config \
            or (stage == "dynamics" and not isinstance((ckpt.get("extra") or {}).get("tokenizer"), dict)):
        commands = " or ".join(STAGES[s] for s in stages)  # train dynamics keeps its tokenizer's identity
        raise CheckpointError(f"{path}: not a {commands} checkpoint (no training-loop format, run config or "
                              "stage state inside)")
    if require_done:
        require_finished(ckpt, path)
    try:
        run = from_dict(RunConfig, drop_retired(config), f"{path}:config")
        model = _build(stage, run)
    except (ConfigError, ValueError) as exc:
        raise CheckpointError(f"{path}: its run config does not rebuild the {stage} model ({exc})") from exc
    state = ckpt["model"]
    if isinstance(model, AgentModel) and isinstance(state, dict) and not any(k.startswith("agent_tokens") for k in state):
        state = {k[len("agent."):]: v for k, v in state.items() if k.startswith("agent.")} or state
    load_model_state(model, state, path)
    del ckpt, state  # optimizer state and all
    return model.eval(), (run if stage == "tokenizer" else resolve_dynamics_paths(run))


def _build(stage: str, run: RunConfig) -> nn.Module:
    if stage == "tokenizer":
        return Tokenizer(run.tokenizer.model)
    if stage == "dynamics":
        return DynamicsModel(run.dynamics.model)
    return AgentModel(DynamicsModel(run.dynamics.model), run.agent.model)


def tokenizer_identity(path: str | Path) -> dict[str, Any]:
    """The tokenizer a `train dynamics` checkpoint was trained with: {"fingerprint", "checkpoint",
    "context"} of its latents (extra state "tokenizer") and "step", the dynamics training step."""
    ckpt = load_checkpoint(path)
    identity = (ckpt.get("extra") or {}).get("tokenizer")
    if not isinstance(identity, dict):
        raise CheckpointError(f"{path}: not a {STAGES['dynamics']} checkpoint (no tokenizer identity inside)")
    return {**identity, "step": int(ckpt.get("step", -1))}


def resolve_dynamics_paths(cfg: RunConfig) -> RunConfig:
    """cfg with dynamics.tokenizer_checkpoint and dynamics.latents filled in from out_dir when empty."""
    stage = cfg.dynamics
    out = Path(cfg.out_dir)
    stage = dataclasses.replace(
        stage,
        tokenizer_checkpoint=stage.tokenizer_checkpoint or str(out / "tokenizer" / CHECKPOINT_FILE),
        latents=stage.latents or str(out / "latents"),
    )
    return dataclasses.replace(cfg, dynamics=stage)


def resolve_agent_paths(cfg: RunConfig) -> RunConfig:
    """cfg with agent.dynamics_checkpoint (<out_dir>/dynamics/checkpoint.pt) and agent.latents (the
    dynamics stage's) filled in when empty."""
    dyn = resolve_dynamics_paths(cfg).dynamics
    stage = dataclasses.replace(
        cfg.agent,
        dynamics_checkpoint=cfg.agent.dynamics_checkpoint or str(Path(cfg.out_dir) / "dynamics" / CHECKPOINT_FILE),
        latents=cfg.agent.latents or dyn.latents,
    )
    return dataclasses.replace(cfg, agent=stage)


def tokenizer_context(run: RunConfig, tokenizer_cfg: RunConfig) -> int:
    """Frames per encoding chunk: the context of the agent's latent folder when it exists, else the
    tokenizer's training seq_len (what `data tokenize` uses by default)."""
    manifest = Path(run.agent.latents or run.dynamics.latents) / MANIFEST_FILE
    if manifest.is_file():
        try:
            return int(json.loads(manifest.read_text())["context"])
        except (OSError, ValueError, KeyError):
            pass
    return int(tokenizer_cfg.tokenizer.train.seq_len)

"""A tiny finished run folder with random weights (tokenizer, dynamics, agent) for the play tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dreamerv4.checkpoint import save_checkpoint
from dreamerv4.config import from_dict, to_dict
from dreamerv4.models.agent import AgentModel
from dreamerv4.models.dynamics import DynamicsModel
from dreamerv4.models.tokenizer import Tokenizer
from dreamerv4.run_config import RunConfig
from dreamerv4.training.resume import CHECKPOINT_FORMAT

NET = {"embed_dim": 32, "depth": 2, "num_heads": 2, "num_kv_heads": 2, "time_every": 2, "num_registers": 1}


def make_run(root: Path, action_space: str = "crafter", done: bool = True, agent: bool = True) -> Path:
    """<root>/{tokenizer,dynamics,agent}/checkpoint.pt as `dreamerv4 run` leaves them, random weights."""
    cfg = from_dict(RunConfig, {
        "out_dir": str(root),
        "tokenizer": {"model": {"patch_size": 16, "encoder": NET, "decoder": NET}, "train": {"seq_len": 3}},
        "dynamics": {"model": {"transformer": NET, "action_space": action_space},
                     "tokenizer_checkpoint": str(root / "tokenizer" / "checkpoint.pt"),
                     "latents": str(root / "latents"), "train": {"seq_len": 6}},
        "agent": {"model": {"mtp_length": 2, "head_hidden": 16}, "train": {"seq_len": 4}},
    })
    torch.manual_seed(0)
    base = {"format": CHECKPOINT_FORMAT, "config": to_dict(cfg), "done": done, "step": 1}
    tokenizer = Tokenizer(cfg.tokenizer.model)
    with torch.no_grad():  # a decoder that reads its latents strongly, so dream frames differ visibly
        for p in tokenizer.parameters():
            p.mul_(3.0)
    save_checkpoint(root / "tokenizer" / "checkpoint.pt", {**base, "done": True, "model": tokenizer.state_dict()})
    dynamics = DynamicsModel(cfg.dynamics.model)
    with torch.no_grad():  # actions that move the prediction, so the dream answers the keys
        for embed in dynamics.action_embeds:
            embed.weight.normal_(0.0, 1.0)
    identity = {"fingerprint": "0" * 64, "checkpoint": str(root / "tokenizer" / "checkpoint.pt"), "context": 3}
    save_checkpoint(root / "dynamics" / "checkpoint.pt",
                    {**base, "model": dynamics.state_dict(), "extra": {"tokenizer": identity}})
    if agent:
        model = AgentModel(dynamics, cfg.agent.model)
        with torch.no_grad():  # policy and value far from uniform / zero, so the page has something to show
            model.policy_head.out.weight.normal_(0.0, 3.0)
            model.value_head.out.weight.normal_(0.0, 0.5)
            model.reward_head.out.weight.normal_(0.0, 0.5)
        save_checkpoint(root / "agent" / "checkpoint.pt", {**base, "model": model.state_dict()})
    return root


@pytest.fixture(scope="session")
def make_tiny_run():
    """make_run itself, for tests that need a run folder of their own (another action space, unfinished)."""
    return make_run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("play") / "run")

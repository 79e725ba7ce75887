"""Loading finished stages (src/dreamerv4/training/stages.py): one signature for the tokenizer, the
world model, the agent and the imagination-trained agent; one kind of error.

    pytest tests/training/test_stages.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dreamerv4.checkpoint import save_checkpoint
from dreamerv4.config import from_dict, to_dict
from dreamerv4.errors import CheckpointError
from dreamerv4.models.agent import AgentModel
from dreamerv4.models.dynamics import DynamicsModel
from dreamerv4.models.tokenizer import Tokenizer
from dreamerv4.run_config import RunConfig
from dreamerv4.training.resume import CHECKPOINT_FORMAT
from dreamerv4.training.stages import (
    load_agent, load_dynamics, load_tokenizer, resolve_agent_paths, resolve_dynamics_paths, tokenizer_identity,
)

NET = {"embed_dim": 32, "depth": 2, "num_heads": 2, "num_kv_heads": 2, "time_every": 2, "num_registers": 1}
IDENTITY = {"fingerprint": "f" * 64, "checkpoint": "tok.pt", "context": 3}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """Untrained tiny checkpoints of every stage in one run folder, as the training loop writes them."""
    root = tmp_path_factory.mktemp("run")
    cfg = from_dict(RunConfig, {
        "out_dir": str(root),
        "tokenizer": {"model": {"patch_size": 16, "encoder": NET, "decoder": NET}, "train": {"seq_len": 3}},
        "dynamics": {"model": {"transformer": NET}},
        "agent": {"model": {"mtp_length": 2, "head_hidden": 16}, "train": {"seq_len": 4}},
    })
    torch.manual_seed(0)
    config = to_dict(cfg)
    config["dynamics"]["train"]["ema_decay"] = 0.0  # an option of earlier versions: still loads
    base = {"format": CHECKPOINT_FORMAT, "config": config, "done": True, "step": 5}
    dynamics = DynamicsModel(cfg.dynamics.model)
    agent = AgentModel(dynamics, cfg.agent.model)
    payloads = {
        "tokenizer": {"model": Tokenizer(cfg.tokenizer.model).state_dict()},
        "dynamics": {"model": dynamics.state_dict(), "extra": {"tokenizer": IDENTITY}},
        "agent": {"model": agent.state_dict(), "extra": {"bc": {}}},
        "imagine": {"model": agent.state_dict(), "extra": {"prior": {}}},
        "unfinished": {"model": agent.state_dict(), "done": False, "stop_reason": "signal"},
    }
    paths = {}
    for name, payload in payloads.items():
        paths[name] = root / name / "checkpoint.pt"
        save_checkpoint(paths[name], {**base, **payload})
    return paths


def test_every_stage_loads_with_one_signature(run):
    for load, stage, kind in ((load_tokenizer, "tokenizer", Tokenizer), (load_dynamics, "dynamics", DynamicsModel),
                              (load_agent, "agent", AgentModel), (load_agent, "imagine", AgentModel)):
        model, cfg = load(run[stage], require_done=True)
        assert isinstance(model, kind) and not model.training and isinstance(cfg, RunConfig), stage
        saved = torch.load(run[stage], weights_only=True)["model"]
        assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items()), stage
    # A world model's (and an agent's) config comes with the paths its stage reads filled in.
    _, cfg = load_dynamics(run["dynamics"])
    assert cfg.dynamics.tokenizer_checkpoint == str(Path(cfg.out_dir) / "tokenizer" / "checkpoint.pt")
    assert cfg == resolve_dynamics_paths(cfg) and resolve_agent_paths(cfg).agent.latents == cfg.dynamics.latents
    assert tokenizer_identity(run["dynamics"]) == {**IDENTITY, "step": 5}


def test_a_wrong_or_unfinished_checkpoint_is_one_checkpoint_error(run, tmp_path):
    with pytest.raises(CheckpointError, match=r"a tokenizer checkpoint .*needs an agent checkpoint"):
        load_agent(run["tokenizer"])
    with pytest.raises(CheckpointError, match=r"an imagine checkpoint .*needs a dynamics checkpoint"):
        load_dynamics(run["imagine"])
    with pytest.raises(CheckpointError, match="before it finished"):
        load_agent(run["unfinished"], require_done=True)
    load_agent(run["unfinished"])  # evaluating a checkpoint mid-training is allowed
    with pytest.raises(CheckpointError, match="not a `dreamerv4 train dynamics` checkpoint"):
        tokenizer_identity(run["agent"])
    other = tmp_path / "other.pt"
    save_checkpoint(other, {"weights": torch.zeros(2)})  # a valid file, but no training-loop checkpoint
    for load in (load_tokenizer, load_dynamics, load_agent):
        with pytest.raises(CheckpointError, match=f"^{other}: not a `dreamerv4 train"):
            load(other)
    broken = tmp_path / "broken.pt"
    ckpt = torch.load(run["dynamics"], weights_only=True)
    save_checkpoint(broken, {**ckpt, "config": {**ckpt["config"], "dynamics": {"model": {"transformer": {"embed_dim": 48}}}}})
    with pytest.raises(CheckpointError, match=f"^{broken}: does not match the model"):
        load_dynamics(broken)

"""Integration tests of Phase 2 training (src/dreamerv4/training/agent.py) on real Crafter episodes:
tiny tokenizer -> latents -> dynamics checkpoint -> agent. Covers: the behaviour-cloning and reward
losses fall on a tiny set; a run stopped and resumed ends bitwise equal to an uninterrupted one;
the checkpoint alone rebuilds the agent (with the dynamics run it started from); clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dreamerv4.checkpoint import load_checkpoint
from dreamerv4.config import load_config
from dreamerv4.data.latents import LatentSequenceDataset
from dreamerv4.errors import CheckpointError, UserError
from dreamerv4.run_config import RunConfig
from dreamerv4.training.agent import WithReturns, discounted_returns, train_agent
from dreamerv4.training.dynamics import train_dynamics
from dreamerv4.training.logging import read_metrics
from dreamerv4.training.stages import load_agent
from dreamerv4.training.tokenize import tokenize_dataset
from dreamerv4.training.tokenizer import train_tokenizer

NET = {"embed_dim": 32, "depth": 2, "num_heads": 2, "num_kv_heads": 2, "time_every": 2, "num_registers": 1}
TRAIN = {"batch_size": 2, "seq_len": 4, "lr": 3e-3, "warmup_steps": 2, "log_every": 1, "ckpt_every": 100,
         "image_every": 0, "eval_every": 0, "precision": "fp32", "device": "cpu", "tensorboard": False, "threads": 1}


def write_config(path: Path, out_dir: Path, data_path: Path, agent_train: dict | None = None,
                 agent_model: dict | None = None) -> Path:
    config = {
        "out_dir": str(out_dir),
        "data": {"path": str(data_path), "val_fraction": 0.0, "stride": 4},
        "tokenizer": {"model": {"patch_size": 16, "encoder": NET, "decoder": NET},
                      "train": {**TRAIN, "steps": 2}, "lpips_weight": 0.0},
        "dynamics": {"model": {"transformer": NET}, "train": {**TRAIN, "steps": 2}},
        "agent": {"model": {"mtp_length": 3, "head_hidden": 32, **(agent_model or {})},
                  "train": {**TRAIN, "steps": 4, **(agent_train or {})}},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def dynamics_run(tiny_crafter_root, tmp_path_factory) -> Path:
    """A run folder with a 2-step tokenizer, its latents of the tiny episodes and a 2-step dynamics model."""
    root = tmp_path_factory.mktemp("agent_run")
    cfg = load_config(RunConfig, write_config(root / "cfg.yaml", root / "run", tiny_crafter_root))
    train_tokenizer(cfg)
    tokenize_dataset(root / "run" / "tokenizer" / "checkpoint.pt", tiny_crafter_root, root / "run" / "latents",
                     progress=False)
    train_dynamics(cfg)
    return root / "run"


def config_for(dynamics_run: Path, tmp_path: Path, data_path: Path, **kwargs) -> RunConfig:
    """An agent config that starts from `dynamics_run` and writes to tmp_path/run."""
    cfg = load_config(RunConfig, write_config(tmp_path / "cfg.yaml", tmp_path / "run", data_path, **kwargs))
    agent = dataclasses.replace(cfg.agent, dynamics_checkpoint=str(dynamics_run / "dynamics" / "checkpoint.pt"),
                                latents=str(dynamics_run / "latents"))
    return dataclasses.replace(cfg, agent=agent)


def test_discounted_returns_and_value_targets(dynamics_run, tiny_crafter_root):
    assert np.allclose(discounted_returns(np.array([1.0, 0.0, 2.0]), 0.5), [1.5, 1.0, 2.0])
    data = LatentSequenceDataset(dynamics_run / "latents", seq_len=4, stride=4, val_fraction=0.0)
    wrapped = WithReturns(data, 0.9)
    name, start = data.window(3)
    rewards = data.episodes[data.episode_names.index(name)].rewards
    expected = discounted_returns(rewards, 0.9)[start: start + 4]
    item = wrapped[3]
    assert torch.equal(item["returns"], torch.from_numpy(expected)) and torch.equal(item["rewards"], data[3]["rewards"])


def test_continuation_targets_come_from_terminals():
    from dreamerv4.models.agent import AgentConfig, AgentModel
    from dreamerv4.models.dynamics import DynamicsConfig, DynamicsModel
    from dreamerv4.models.transformer import TransformerConfig
    from dreamerv4.training.agent import agent_losses

    stack = TransformerConfig(embed_dim=16, depth=2, num_heads=2, num_kv_heads=2, time_every=2, num_registers=1)
    model = AgentModel(DynamicsModel(DynamicsConfig(transformer=stack)), AgentConfig(mtp_length=2))
    actions, rewards = torch.zeros(1, 3, dtype=torch.int64), torch.zeros(1, 3)
    terminals = torch.tensor([[False, False, True]])  # the last step ended the episode by death: target 0
    logits = torch.tensor([[2.0, -1.0, 3.0]])
    out = model(torch.zeros(1, 3, 16, 32), actions)
    out["continue_logits"] = logits
    losses = agent_losses(model, out, actions, rewards, terminals=terminals)
    p = torch.sigmoid(logits)[0]
    expected = -(torch.log(p[0]) + torch.log(p[1]) + torch.log(1 - p[2])) / 3
    assert torch.allclose(losses["continue_nll"], expected)
    assert "continue_nll" not in agent_losses(model, out, actions, rewards)  # continue_weight 0: no target


def test_bc_and_reward_losses_fall(dynamics_run, tmp_path):
    # The explore policy holds its moves for several steps, so the action that led to a frame (which
    # the agent token reads) predicts the next one: a learnable behaviour even for a tiny model.
    from dreamerv4.data.crafter_record import record_crafter

    record_crafter(tmp_path / "explore", 2, seed=1, policy="explore", max_steps=80, progress=False)
    tokenize_dataset(dynamics_run / "tokenizer" / "checkpoint.pt", tmp_path / "explore", tmp_path / "latents",
                     progress=False)
    cfg = config_for(dynamics_run, tmp_path, tmp_path / "explore", agent_train={
        "steps": 40, "batch_size": 4, "seq_len": 8, "warmup_steps": 5, "log_every": 10})
    cfg = dataclasses.replace(cfg, agent=dataclasses.replace(cfg.agent, latents=str(tmp_path / "latents")))
    summary = train_agent(cfg)
    assert summary.done and summary.step == 40
    records = read_metrics(tmp_path / "run" / "agent", "train")
    first, last = records[0], records[-1]
    assert first["bc_nll"] > 2.5  # about ln 17 = 2.83 at the start: the policy head starts near uniform
    assert last["bc_nll"] < first["bc_nll"] - 0.5, (first["bc_nll"], last["bc_nll"])
    assert last["reward_nll"] < first["reward_nll"] - 1.0
    assert np.isfinite(last["video_loss"]) and "value_nll" in last and "continue_nll" in last


def test_resume_is_bitwise_exact_and_checkpoint_rebuilds_the_agent(dynamics_run, tiny_crafter_root, tmp_path):
    straight = config_for(dynamics_run, tmp_path / "a", tiny_crafter_root, agent_train={"warmup_steps": 4})
    train_agent(straight)
    # Steps 1-2 sit inside the warmup, whose lr does not depend on train.steps: a 2-step run resumed
    # with steps=4 must end exactly where the 4-step run ended.
    first = config_for(dynamics_run, tmp_path / "b", tiny_crafter_root, agent_train={"warmup_steps": 4, "steps": 2})
    assert train_agent(first).step == 2
    second = config_for(dynamics_run, tmp_path / "b", tiny_crafter_root, agent_train={"warmup_steps": 4})
    assert train_agent(second, resume=True).step == 4
    a = load_checkpoint(tmp_path / "a" / "run" / "agent" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "b" / "run" / "agent" / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["extra"][n]["mean_square"], b["extra"][n]["mean_square"]) for n in a["extra"])

    agent, run = load_agent(tmp_path / "a" / "run" / "agent" / "checkpoint.pt")
    assert not agent.training and agent.cfg.mtp_length == 3
    assert run.dynamics.latents.endswith("latents") and run.dynamics.model.transformer.embed_dim == 32
    assert all(torch.equal(v, a["model"][k]) for k, v in agent.state_dict().items())
    # It started from the dynamics weights: parameters the agent loss cannot reach stay equal.
    dyn = load_checkpoint(dynamics_run / "dynamics" / "checkpoint.pt")["model"]
    assert set(dyn) == {k[len("dynamics."):] for k in a["model"] if k.startswith("dynamics.")}


def test_clear_errors(dynamics_run, tiny_crafter_root, tmp_path):
    cfg = config_for(dynamics_run, tmp_path, tiny_crafter_root)
    missing = dataclasses.replace(cfg, agent=dataclasses.replace(cfg.agent, dynamics_checkpoint=str(tmp_path / "no.pt")))
    with pytest.raises(CheckpointError, match="no.pt"):
        train_agent(missing)
    tokenizer_ckpt = dynamics_run / "tokenizer" / "checkpoint.pt"
    wrong = dataclasses.replace(cfg, agent=dataclasses.replace(cfg.agent, dynamics_checkpoint=str(tokenizer_ckpt)))
    with pytest.raises(CheckpointError, match="dynamics"):
        train_agent(wrong)
    with pytest.raises(CheckpointError, match="agent"):
        load_agent(dynamics_run / "dynamics" / "checkpoint.pt")
    train_agent(cfg)
    with pytest.raises(UserError, match="already holds"):
        train_agent(cfg)


def test_unlock_targets_mark_first_unlocks_and_split_the_reward():
    from dreamerv4.training.agent import unlock_targets

    # two achievements; the first unlocked by the action before frame 1 (reward 1), a health loss
    # before frame 2 (-0.1), the second unlocked with a health gain before frame 3 (1.1)
    achievements = torch.tensor([[[0, 0], [1, 0], [1, 0], [1, 1]]], dtype=torch.float32)
    rewards = torch.tensor([[1.0, -0.1, 1.1, 0.0]])
    target = unlock_targets(achievements, rewards)
    assert target["unlocked"].tolist() == [[[1, 0], [0, 0], [0, 1]]]
    assert target["valid"].tolist() == [[[1, 1], [0, 1], [0, 1]]]  # an unlocked achievement is not a target
    assert torch.allclose(target["other"], torch.tensor([[0.0, -0.1, 0.1]]))
    # two unlocks on one step: Crafter pays +1 once, so the rest of the reward stays the health part
    both = unlock_targets(torch.tensor([[[0, 0], [1, 1]]], dtype=torch.float32), torch.tensor([[1.0, 0.0]]))
    assert both["unlocked"].tolist() == [[[1, 1]]] and torch.allclose(both["other"], torch.zeros(1, 1))


def test_unlock_head_loss_reads_only_achievements_not_yet_unlocked():
    from dreamerv4.models.agent import AgentConfig, AgentModel
    from dreamerv4.models.dynamics import DynamicsConfig, DynamicsModel
    from dreamerv4.models.transformer import TransformerConfig
    from dreamerv4.training.agent import agent_losses

    stack = TransformerConfig(embed_dim=16, depth=2, num_heads=2, num_kv_heads=2, time_every=2, num_registers=1)
    model = AgentModel(DynamicsModel(DynamicsConfig(transformer=stack)), AgentConfig(mtp_length=2, num_achievements=2))
    actions = torch.zeros(1, 3, dtype=torch.int64)
    achievements = torch.tensor([[[0, 0], [1, 0], [1, 0]]], dtype=torch.float32)
    rewards = torch.tensor([[1.0, 0.1, 0.0]])
    out = model(torch.zeros(1, 3, 16, 32), actions)
    assert out["unlock_logits"].shape == (1, 3, 2) and out["other_reward"].shape == (1, 3)
    logits = torch.tensor([[[0.0, 0.0], [2.0, -1.0], [7.0, -3.0]]])  # frame 2's 7.0: achievement 0, already unlocked
    out["unlock_logits"], out["other_reward"] = logits, torch.tensor([[0.0, 0.5, 0.0]])
    losses = agent_losses(model, out, actions, rewards, achievements=achievements)
    p = torch.sigmoid(logits[0])
    bce = -(torch.log(p[1, 0]) + torch.log(1 - p[1, 1]) + torch.log(1 - p[2, 1])) / 2  # 2 steps, 3 valid entries
    mse = ((0.5 - 0.0) ** 2 + (0.0 - 0.1) ** 2) / 2
    assert torch.allclose(losses["unlock_nll"], bce + mse)
    with pytest.raises(UserError, match="records 3 achievements"):
        agent_losses(model, out, actions, rewards, achievements=torch.zeros(1, 3, 3))


def test_agent_with_unlock_head_learns_the_unlocks(dynamics_run, tiny_crafter_root, tmp_path):
    cfg = config_for(dynamics_run, tmp_path, tiny_crafter_root, agent_train={
        "steps": 30, "batch_size": 4, "seq_len": 8, "warmup_steps": 5, "log_every": 10})
    cfg = dataclasses.replace(cfg, agent=dataclasses.replace(
        cfg.agent, model=dataclasses.replace(cfg.agent.model, num_achievements=22)))
    summary = train_agent(cfg)
    assert summary.done
    records = read_metrics(tmp_path / "run" / "agent", "train")
    assert records[-1]["unlock_nll"] < records[0]["unlock_nll"]
    agent, _ = load_agent(tmp_path / "run" / "agent" / "checkpoint.pt")
    assert agent.has_unlock_head and agent.cfg.num_achievements == 22
    wrong = dataclasses.replace(cfg, out_dir=str(tmp_path / "wrong"), agent=dataclasses.replace(
        cfg.agent, model=dataclasses.replace(cfg.agent.model, num_achievements=5)))
    with pytest.raises(UserError, match="record 22 achievements, but agent.model.num_achievements is 5"):
        train_agent(wrong)

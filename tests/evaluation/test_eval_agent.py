"""`dreamerv4 eval agent` (src/dreamerv4/evaluation/agent.py): report fields, baselines and AUROC,
on a tiny untrained agent over real Crafter episodes (frames encoded on the fly)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dreamerv4.actions import get_action_space
from dreamerv4.checkpoint import save_checkpoint
from dreamerv4.cli import main
from dreamerv4.config import from_dict, to_dict
from dreamerv4.evaluation.agent import auroc, baseline_scores
from dreamerv4.models.agent import AgentModel
from dreamerv4.models.dynamics import DynamicsModel
from dreamerv4.models.tokenizer import Tokenizer
from dreamerv4.run_config import RunConfig
from dreamerv4.training.resume import CHECKPOINT_FORMAT

NET = {"embed_dim": 32, "depth": 2, "num_heads": 2, "num_kv_heads": 2, "time_every": 2, "num_registers": 1}


def make_agent_checkpoint(root: Path, data_path: Path, agent_model: dict | None = None) -> Path:
    """An untrained tiny tokenizer + agent saved as finished training-loop checkpoints (no training)."""
    cfg = from_dict(RunConfig, {
        "out_dir": str(root), "data": {"path": str(data_path), "val_fraction": 0.0},
        "tokenizer": {"model": {"patch_size": 16, "encoder": NET, "decoder": NET}, "train": {"seq_len": 4}},
        "dynamics": {"model": {"transformer": NET}, "tokenizer_checkpoint": str(root / "tokenizer" / "checkpoint.pt"),
                     "latents": str(root / "latents")},
        "agent": {"model": {"mtp_length": 2, "head_hidden": 16, **(agent_model or {})}, "train": {"seq_len": 6}},
    })
    torch.manual_seed(0)
    base = {"format": CHECKPOINT_FORMAT, "config": to_dict(cfg), "done": True, "step": 1}
    save_checkpoint(root / "tokenizer" / "checkpoint.pt", {**base, "model": Tokenizer(cfg.tokenizer.model).state_dict()})
    agent = AgentModel(DynamicsModel(cfg.dynamics.model), cfg.agent.model)
    with torch.no_grad():  # a reward head that reacts to its input, so the AUROC is not degenerate
        agent.reward_head.out.weight.normal_(0.0, 0.5)
    save_checkpoint(root / "agent" / "checkpoint.pt", {**base, "model": agent.state_dict()})
    return root / "agent" / "checkpoint.pt"


def test_auroc_on_hand_made_scores():
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auroc(np.array([1.0, 2.0, 3.0]), np.array([0, 1, 1])) == 1.0
    assert auroc(np.array([3.0, 2.0, 1.0]), np.array([0, 1, 1])) == 0.0
    assert auroc(np.array([1.0, 1.0, 1.0, 1.0]), np.array([0, 1, 0, 1])) == 0.5  # ties count half
    assert auroc(np.array([1.0, 2.0]), np.array([0, 0])) is None


def test_baselines_majority_and_marginal():
    crafter = get_action_space("crafter")
    train = np.array([5, 5, 5, 1])
    test = np.array([5, 1, 2])
    b = baseline_scores(crafter, train, test)["action"]
    assert b["majority_accuracy"] == pytest.approx(1 / 3)
    p = (np.bincount(train, minlength=17) + 1) / (4 + 17)  # add-one smoothing
    assert b["marginal_log_likelihood"] == pytest.approx(np.log(p[[5, 1, 2]]).mean())
    minerl = get_action_space("minerl")
    codes = minerl.pack({"keys": np.array([1, 1, 3]), "camera": np.array([60, 60, 0]), "item": np.array([0, 0, 0])})
    b = baseline_scores(minerl, codes, codes)
    assert set(b) == {"keys", "camera", "item"}
    assert b["keys"]["majority_accuracy"] == pytest.approx(2 / 3)  # majority bits: forward only
    assert b["item"]["majority_accuracy"] == 1.0


def test_eval_agent_report(tiny_crafter_root, tmp_path, capsys):
    checkpoint = make_agent_checkpoint(tmp_path / "run", tiny_crafter_root)
    out = tmp_path / "report.json"
    assert main(["eval", "agent", "--checkpoint", str(checkpoint), "--data", str(tiny_crafter_root),
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["windows"] == 3 * (40 // 6) and report["steps"] == report["windows"] * 6 and report["seq_len"] == 6
    assert str(tiny_crafter_root) in report["baseline_source"]
    comp = report["action"]["components"]["action"]
    assert set(comp) == {"accuracy", "log_likelihood", "majority_accuracy", "marginal_log_likelihood"}
    # An untrained policy head is near uniform: about -ln 17 per step.
    assert comp["log_likelihood"] == pytest.approx(-np.log(17), abs=0.1)
    assert 0.0 <= comp["accuracy"] <= 1.0 and comp["marginal_log_likelihood"] < 0
    reward = report["reward"]
    assert reward["steps"] == report["windows"] * 5  # the next frame's readout scores each step's reward
    assert {"mae", "rmse", "baseline_mae", "auroc", "auroc_positive", "events", "event_threshold"} <= set(reward)
    assert "action: accuracy" in capsys.readouterr().out
    assert main(["eval", "agent", "--checkpoint", str(tmp_path / "missing.pt"), "--data", str(tiny_crafter_root)]) == 2


def test_unlock_reward_reads_the_recorded_unlocked_achievements(tiny_crafter_root, tmp_path):
    from dreamerv4.evaluation.agent import heldout_windows, predict
    from dreamerv4.training.stages import load_agent

    checkpoint = make_agent_checkpoint(tmp_path / "run", tiny_crafter_root, {"num_achievements": 22})
    agent, run = load_agent(checkpoint)
    with torch.no_grad():  # P = 0.5 for every achievement and no other reward, whatever the frame
        agent.unlock_head.out.weight.zero_()
        agent.unlock_head.out.bias.copy_(torch.cat((torch.zeros(22), torch.zeros(1))))
    windows = heldout_windows(tiny_crafter_root, run, 6)
    pred = predict(agent, windows)
    # the reward for the action at t, read at frame t + 1: P(any new unlock) over the achievements not
    # unlocked before that action, each at 1/2
    expected = np.concatenate([1.0 - 0.5 ** (22 - w["achievements"][:-1].sum(-1)) for w in windows])
    assert windows[0]["achievements"].shape == (6, 22)
    assert np.allclose(pred["unlock_reward_pred"], expected, atol=1e-5)
    assert main(["eval", "agent", "--checkpoint", str(checkpoint), "--data", str(tiny_crafter_root),
                 "--out", str(tmp_path / "r.json")]) == 0
    assert set(json.loads((tmp_path / "r.json").read_text())["unlock_reward"]) == {"mae", "auroc"}

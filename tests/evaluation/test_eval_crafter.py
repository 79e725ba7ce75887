"""`dreamerv4 eval crafter` (src/dreamerv4/evaluation/crafter.py): a tiny untrained agent and the
random policy play a few very short real Crafter episodes; same seed, same numbers; report fields;
the live-frame policy keeps a capped context of the tokenizer's chunked latents."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dreamerv4.checkpoint import save_checkpoint
from dreamerv4.cli import main
from dreamerv4.config import from_dict, to_dict
from dreamerv4.errors import CheckpointError
from dreamerv4.evaluation.crafter import evaluate_crafter
from dreamerv4.models.agent import AgentModel
from dreamerv4.models.dynamics import DynamicsModel
from dreamerv4.models.policy import AgentPolicy
from dreamerv4.models.tokenizer import Tokenizer
from dreamerv4.run_config import RunConfig
from dreamerv4.training.resume import CHECKPOINT_FORMAT

NET = {"embed_dim": 32, "depth": 2, "num_heads": 2, "num_kv_heads": 2, "time_every": 2, "num_registers": 1}


def make_agent_checkpoint(root: Path, agent_model: dict | None = None) -> Path:
    """An untrained tiny tokenizer + agent saved as finished training-loop checkpoints, in <root>/agent
    (agent_model: extra agent.model keys)."""
    cfg = from_dict(RunConfig, {
        "out_dir": str(root),
        "tokenizer": {"model": {"patch_size": 16, "encoder": NET, "decoder": NET}, "train": {"seq_len": 3}},
        "dynamics": {"model": {"transformer": NET}, "tokenizer_checkpoint": str(root / "tokenizer" / "checkpoint.pt"),
                     "latents": str(root / "latents")},
        "agent": {"model": {"mtp_length": 2, "head_hidden": 16, **(agent_model or {})}, "train": {"seq_len": 4}},
    })
    torch.manual_seed(0)
    base = {"format": CHECKPOINT_FORMAT, "config": to_dict(cfg), "done": True, "step": 1}
    save_checkpoint(root / "tokenizer" / "checkpoint.pt", {**base, "model": Tokenizer(cfg.tokenizer.model).state_dict()})
    agent = AgentModel(DynamicsModel(cfg.dynamics.model), cfg.agent.model)
    with torch.no_grad():  # policy logits far from uniform, so the frames steer the actions
        agent.policy_head.out.weight.normal_(0.0, 3.0)
    save_checkpoint(root / "agent" / "checkpoint.pt", {**base, "model": agent.state_dict()})
    return root / "agent" / "checkpoint.pt"


def test_eval_crafter_reproducible_and_report(tmp_path, capsys):
    checkpoint = make_agent_checkpoint(tmp_path / "run")
    args = ["eval", "crafter", "--checkpoint", str(checkpoint), "--episodes", "2", "--seed", "7", "--max-steps", "25"]
    assert main(args) == 0
    out = tmp_path / "run" / "eval" / "crafter_bc.json"  # where the run report looks for it
    first = json.loads(out.read_text())
    assert main(args) == 0
    second = json.loads(out.read_text())
    for key in ("returns", "lengths", "achievements", "crafter_score", "mean_return", "return_ci95"):
        assert first[key] == second[key], key
    assert first["episodes"] == 2 and first["env_seeds"] == [7, 8] and first["policy"] == "bc"
    assert all(n == 25 for n in first["lengths"])  # nobody dies in 25 steps: the time limit ends them
    assert len(first["achievements"]) == 22 and all(0.0 <= v <= 1.0 for v in first["achievements"].values())
    low, high = first["return_ci95"]
    assert low <= first["mean_return"] <= high
    assert first["context_restarts"] > 0  # 25 steps with a context of 4 frames: the cap is exercised
    assert Path(first["video"]).is_file() and Path(first["video"]).suffix == ".gif"
    assert "mean return" in capsys.readouterr().out


def test_random_policy_runs_through_the_same_code(tmp_path):
    a = evaluate_crafter("random", 2, seed=3, max_steps=20, out=tmp_path / "a.json", progress=False)
    b = evaluate_crafter("random", 2, seed=3, max_steps=20, out=tmp_path / "b.json", progress=False)
    assert a["returns"] == b["returns"] and a["policy"] == "random" and a["max_context"] is None
    assert json.loads((tmp_path / "a.json").read_text())["crafter_score"] == a["crafter_score"]
    with pytest.raises(Exception, match="episodes"):
        evaluate_crafter("random", 0, out=tmp_path / "c.json", progress=False)


def test_agent_policy_keeps_a_capped_context_of_chunk_encoded_latents(tmp_path):
    from dreamerv4.evaluation.crafter import load_policy

    policy, label = load_policy(str(make_agent_checkpoint(tmp_path / "run")), max_context=4)
    assert label == "bc" and isinstance(policy, AgentPolicy)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (7, 64, 64, 3), dtype=np.uint8)
    policy.reset(torch.Generator().manual_seed(0))
    actions = [policy.act(f) for f in frames]
    assert all(0 <= a < 17 for a in actions) and policy.rollout.num_frames <= 4
    # The latents the policy keeps are the tokenizer's chunked encoding of the live frames.
    from dreamerv4.data.latents import encode_episode

    expected = torch.from_numpy(encode_episode(policy.tokenizer, frames, policy.tokenizer_context))
    assert torch.allclose(torch.stack(policy.latents)[:, 0], expected[-4:], atol=1e-5)
    assert [int(a[0]) for a in policy.prev_actions[1:]] == actions[-4:-1]


def test_a_checkpoint_of_another_stage_is_named_not_a_traceback(tmp_path, capsys):
    from dreamerv4.training.stages import load_dynamics, load_tokenizer

    agent = make_agent_checkpoint(tmp_path / "run")
    tokenizer = tmp_path / "run" / "tokenizer" / "checkpoint.pt"
    assert main(["eval", "crafter", "--checkpoint", str(tokenizer), "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{tokenizer}: a tokenizer checkpoint" in err and "needs an agent checkpoint" in err
    with pytest.raises(CheckpointError, match="an agent checkpoint.*needs a tokenizer checkpoint"):
        load_tokenizer(agent)
    with pytest.raises(CheckpointError, match="a tokenizer checkpoint.*needs a dynamics checkpoint"):
        load_dynamics(tokenizer)


@pytest.mark.parametrize("checkpoint", ["random", "agent"])
def test_batched_play_equals_one_episode_at_a_time(tmp_path, monkeypatch, checkpoint):
    from dreamerv4.models import policy as policy_module

    make_env = policy_module.make_crafter_env
    played: dict[int, list[int]] = {}

    def recording_env(seed, steps):
        # episodes of different lengths, so finished ones leave the batch while the others go on
        env = make_env(seed, steps - 7 * (seed % 3))
        step, played[seed] = env.step, []
        env.step = lambda action: (played[seed].append(int(action)), step(action))[1]
        return env

    monkeypatch.setattr(policy_module, "make_crafter_env", recording_env)
    path = "random" if checkpoint == "random" else str(make_agent_checkpoint(tmp_path / "run"))
    one = evaluate_crafter(path, 4, seed=5, max_steps=30, out=tmp_path / "one.json", progress=False, batch=1,
                           max_context=4)
    actions_one = dict(played)
    many = evaluate_crafter(path, 4, seed=5, max_steps=30, out=tmp_path / "many.json", progress=False, batch=3,
                            max_context=4)
    assert sorted(set(one["lengths"])) == [16, 23, 30]
    assert played == actions_one and len(set(map(tuple, played.values()))) == 4  # same actions, episodes differ
    for key in ("returns", "lengths", "achievements", "context_restarts"):
        assert one[key] == many[key], key


def _report(path: Path, returns: list[float], seeds: list[int], policy: str) -> str:
    mean = float(np.mean(returns))
    path.write_text(json.dumps({"policy": policy, "returns": returns, "env_seeds": seeds, "mean_return": mean,
                                "return_ci95": [mean - 1, mean + 1], "crafter_score": 1.0}))
    return str(path)


def test_eval_compare_pairs_the_same_worlds_and_refuses_others(tmp_path, capsys):
    # Per-world differences 1, 1, 2, 0: mean 1, sd sqrt(2/3), interval 1 +- 1.96 sqrt(2/3) / 2.
    a = _report(tmp_path / "a.json", [3.0, 2.0, 5.0, 1.0], [10, 11, 12, 13], "imagine")
    b = _report(tmp_path / "b.json", [2.0, 1.0, 3.0, 1.0], [10, 11, 12, 13], "bc")
    assert main(["eval", "compare", a, b, "--json", str(tmp_path / "cmp.json")]) == 0
    out = capsys.readouterr().out
    assert "paired a - b over 4 worlds: +1.00 (95% CI +0.20 to +1.80), ratio of means 1.57x" in out
    written = json.loads((tmp_path / "cmp.json").read_text())
    assert written["diff"] == pytest.approx(1.0) and written["episodes"] == 4
    assert written["ci95"] == pytest.approx([1 - 1.96 * (2 / 3) ** 0.5 / 2, 1 + 1.96 * (2 / 3) ** 0.5 / 2])
    other = _report(tmp_path / "other.json", [2.0, 1.0, 3.0, 1.0], [20, 21, 22, 23], "bc")
    assert main(["eval", "compare", a, other]) == 2
    assert "different worlds (env_seeds differ)" in capsys.readouterr().err
    assert main(["eval", "compare", a, str(tmp_path / "missing.json")]) == 2
    assert "missing.json: no such file" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"mean_return": 1.0}')
    assert main(["eval", "compare", a, str(tmp_path / "bad.json")]) == 2
    assert "no per-episode `returns`" in capsys.readouterr().err

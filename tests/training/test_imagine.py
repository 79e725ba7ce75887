"""RL in imagination: the rollout's output dict and reward alignment, actions drawn from the policy,
gradients that reach only the policy and value heads, a policy that learns to pick rewarded actions,
and `train imagine` end to end (frozen weights bitwise unchanged, checkpoint readable as an agent)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dreamerv4.checkpoint import load_checkpoint, save_checkpoint
from dreamerv4.config import from_dict, to_dict
from dreamerv4.data.latents import LATENTS_FILE, MANIFEST_FILE, MANIFEST_FORMAT
from dreamerv4.errors import CheckpointError, ConfigError
from dreamerv4.models.agent import AgentConfig, AgentModel, AgentRollout
from dreamerv4.models.dynamics import DynamicsConfig, DynamicsModel, previous_actions
from dreamerv4.models.tokenizer import Tokenizer
from dreamerv4.models.transformer import TransformerConfig
from dreamerv4.run_config import ImagineStage, RunConfig
from dreamerv4.training.imagine import PriorPolicy, freeze_for_imagination, imagination_loss, imagine, train_imagine
from dreamerv4.training.config import TrainConfig
from dreamerv4.training.resume import CHECKPOINT_FORMAT
from dreamerv4.training.returns import lambda_returns

HEADS = ("policy_head.", "value_head.")


def tiny_agent(seed: int = 0) -> AgentModel:
    stack = TransformerConfig(embed_dim=32, depth=2, num_heads=2, num_kv_heads=1, time_every=2, num_registers=2)
    torch.manual_seed(seed)
    dynamics = DynamicsModel(DynamicsConfig(transformer=stack, action_space="crafter"))
    agent = AgentModel(dynamics, AgentConfig(mtp_length=2, head_hidden=16, head_layers=1))
    with torch.no_grad():  # unit-scale weights, so actions, frames and rewards differ visibly
        for name, p in agent.named_parameters():
            if "embed" in name or name.endswith(("no_action", "latent_slot", "agent_tokens")):
                p.normal_(0.0, 1.0)
            elif p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
    return agent


def contexts(b: int = 4, c: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, 16, 32, generator=g) * 2 - 1, torch.randint(0, 17, (b, c), generator=g)


def test_continuation_off_means_no_termination_and_death_cuts_the_return():
    agent = tiny_agent().eval()
    latents, actions = contexts()
    off = dataclasses.replace(agent.cfg, continue_weight=0.0)
    agent.cfg = off
    out = imagine(agent, latents, actions, horizon=3, steps=4, gamma=0.9, lam=0.5,
                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(out["continues"], torch.ones(4, 3))
    assert torch.allclose(out["returns"], lambda_returns(out["imagined_rewards"], out["values"], gamma=0.9, lam=0.5))
    # A head that reads every state as a death: R_t = r_t, nothing after the first step is alive.
    agent.cfg = dataclasses.replace(off, continue_weight=1.0)
    with torch.no_grad():
        agent.continue_head.out.bias.fill_(-50.0)
        agent.continue_head.out.weight.zero_()
    dead = imagine(agent, latents, actions, horizon=3, steps=4, gamma=0.9, lam=0.5,
                   generator=torch.Generator().manual_seed(0))
    assert torch.allclose(dead["returns"], dead["imagined_rewards"], atol=1e-6)
    assert torch.equal(dead["alive"] >= 0.5, torch.tensor([[True, False, False]]).expand(4, 3))
    loss, metrics = imagination_loss(agent, PriorPolicy(agent), dead, ImagineStage())
    assert torch.isfinite(loss) and float(metrics["alive_frac"]) == pytest.approx(1 / 3)


def test_fresh_value_head_reads_zero():
    from dreamerv4.training.imagine import reset_value_head

    agent = tiny_agent()
    hidden = torch.randn(5, 32)
    with torch.no_grad():
        agent.value_head.out.weight.normal_()
    assert agent.two_hot.decode(agent.value(hidden)).abs().max() > 0.01
    policy_before = {k: v.clone() for k, v in agent.policy_head.state_dict().items()}
    reset_value_head(agent)
    assert torch.allclose(agent.two_hot.decode(agent.value(hidden)), torch.zeros(5), atol=1e-6)
    assert all(torch.equal(v, policy_before[k]) for k, v in agent.policy_head.state_dict().items())


def test_imagine_output_dict_and_alignment():
    agent = tiny_agent().eval()
    latents, actions = contexts()
    out = imagine(agent, latents, actions, horizon=3, steps=4, gamma=0.9, lam=0.5,
                  generator=torch.Generator().manual_seed(0))
    assert out["imagined_latents"].shape == (4, 3, 16, 32)
    for key in ("imagined_actions", "imagined_rewards", "advantages", "returns"):
        assert out[key].shape == (4, 3), key
    assert out["imagined_actions"].dtype == torch.int64
    assert out["values"].shape == (4, 4) and out["agent_hidden"].shape == (4, 4, 32)
    hidden = out["agent_hidden"]
    # r_t is the reward head read at s_{t+1} (the frame a_t led to), v_t the value head at s_t.
    assert torch.allclose(out["imagined_rewards"], agent.two_hot.decode(agent.reward(hidden[:, 1:])))
    assert torch.allclose(out["values"], agent.two_hot.decode(agent.value(hidden)))
    assert out["imagined_rewards"].std() > 0  # rewards differ (the reward head is not zero here)
    # c_t is the continuation head read at s_t (the state a_t is taken in); alive_t = prod_{k<t} c_k.
    assert torch.allclose(out["continues"], torch.sigmoid(agent.continuation(hidden[:, :-1])))
    assert torch.allclose(out["alive"][:, 0], torch.ones(4))
    assert torch.allclose(out["alive"][:, 2], out["continues"][:, 0] * out["continues"][:, 1])
    expected = lambda_returns(out["imagined_rewards"], out["values"], out["continues"], gamma=0.9, lam=0.5)
    assert torch.allclose(out["returns"], expected)
    assert torch.allclose(out["advantages"], expected - out["values"][:, :-1])
    # Seeded: the same rollout again; another seed gives other frames.
    again = imagine(agent, latents, actions, horizon=3, steps=4, gamma=0.9, lam=0.5,
                    generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(out[k], again[k]) for k in out)
    other = imagine(agent, latents, actions, horizon=3, steps=4, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(out["imagined_latents"], other["imagined_latents"])
    # The last context action is not used: the policy acts at the last context frame.
    changed = actions.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 17
    same = imagine(agent, latents, changed, horizon=3, steps=4, gamma=0.9, lam=0.5,
                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(same["imagined_latents"], out["imagined_latents"])


def test_imagine_caps_the_context_like_real_play(monkeypatch):
    agent = tiny_agent().eval()
    latents, actions = contexts(c=2)
    seen = []
    encode = agent.encode

    def recording_encode(noisy, prev_actions, tau, d, cache=None, update_cache=True):
        seen.append((cache.length if cache is not None else 0) + noisy.shape[1])  # frames in this pass
        return encode(noisy, prev_actions, tau, d, cache=cache, update_cache=update_cache)

    monkeypatch.setattr(agent, "encode", recording_encode)
    run = lambda cap: imagine(agent, latents, actions, horizon=5, steps=2, max_frames=cap,  # noqa: E731
                              generator=torch.Generator().manual_seed(0))
    free = run(None)
    assert max(seen) == 2 + 5
    seen.clear()
    capped = run(4)
    assert max(seen) == 4  # restarts from the last 2 frames whenever 4 are in the context
    assert torch.equal(capped["imagined_latents"][:, :2], free["imagined_latents"][:, :2])  # before the first restart
    assert not torch.allclose(capped["imagined_latents"][:, 2:], free["imagined_latents"][:, 2:])
    assert torch.equal(run(7)["imagined_latents"], free["imagined_latents"])  # a cap never reached changes nothing
    with pytest.raises(ValueError, match="max_frames"):
        run(2)  # no room after a context of 2


def test_imagined_actions_come_from_the_policy():
    agent = tiny_agent().eval()
    with torch.no_grad():  # offset-0 logits: action 7 by a wide margin
        agent.policy_head.out.weight.zero_()
        agent.policy_head.out.bias.zero_()
        agent.policy_head.out.bias[7] = 50.0
    out = imagine(agent, *contexts(), horizon=3, steps=2, generator=torch.Generator().manual_seed(0))
    assert (out["imagined_actions"] == 7).all()


def test_gradients_reach_only_the_policy_and_value_heads():
    agent = tiny_agent()
    trainable = freeze_for_imagination(agent)
    assert trainable and all(name.startswith(HEADS) for name in trainable)
    prior = PriorPolicy(agent)
    assert not any(p.requires_grad for p in prior.parameters())
    out = imagine(agent, *contexts(), horizon=3, steps=2, generator=torch.Generator().manual_seed(0))
    loss, metrics = imagination_loss(agent, prior, out, ImagineStage(horizon=3))
    loss.backward()
    for name, p in agent.named_parameters():
        if name.startswith(HEADS):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert abs(float(metrics["kl_prior"])) < 1e-6  # the policy still equals its prior
    assert 0 <= float(metrics["adv_pos_frac"]) <= 1
    for key in ("imagined_return", "imagined_reward", "value_error", "policy_loss", "value_loss", "entropy"):
        assert torch.isfinite(metrics[key]), key


def _first_step_hidden(agent: AgentModel, latents: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """(B, 17, width): the agent readout after each possible first action, every action with the same noise."""
    from dreamerv4.models.agent import AgentRollout
    from dreamerv4.models.dynamics import previous_actions

    hidden = []
    for a in range(17):
        rollout = AgentRollout(agent, generator=torch.Generator().manual_seed(5), steps=2)
        rollout.observe(latents, previous_actions(actions))
        hidden.append(rollout.imagine_step(torch.full((latents.shape[0],), a))[1])
    return torch.stack(hidden, dim=1)


def test_pmpo_in_imagination_learns_to_pick_rewarded_actions():
    # Horizon 1 and a value head held at 0 (value_weight 0): the advantage of a_0 is the sign of its
    # imagined reward, so PMPO must move probability towards the actions the world model rewards.
    agent = tiny_agent(seed=3)
    latents, actions = contexts(b=4, seed=2)
    with torch.no_grad():
        agent.value_head.out.weight.zero_()  # uniform two-hot: v = 0
        # Offset-0 reward logits +-u.x on two bins near symlog(+-1) (rewards in (-1.6, 1.6)), with u along
        # what the first action changes in the reward head's features x and orthogonal to their mean in
        # each state, so every state has rewarded and punished actions.
        features = agent.reward_head.body(_first_step_hidden(agent, latents, actions))  # (B, 17, F)
        means = features.mean(1)
        basis = torch.linalg.svd(means, full_matrices=True).Vh[len(means):]  # orthogonal to every mean
        variation = (features - means[:, None]).flatten(0, 1) @ basis.T
        u = torch.linalg.svd(variation, full_matrices=False).Vh[0] @ basis
        u = u * 2.0 / (features.flatten(0, 1) @ u).std()
        bins = agent.two_hot.bins
        up, down = int((bins - 1.0).abs().argmin()), int((bins + 1.0).abs().argmin())
        out = agent.reward_head.out
        out.weight.zero_()
        out.bias.fill_(-30.0)
        out.bias[[up, down]] = 0.0
        out.weight[up], out.weight[down] = u, -u
        per_action = agent.two_hot.decode(agent.reward(_first_step_hidden(agent, latents, actions)))  # (B, 17)
        assert (per_action.max(1).values > 0.3).all() and (per_action.min(1).values < -0.3).all()
        expected = lambda: (agent.policy(agent(latents, actions)["agent_hidden"][:, -1]).softmax(-1)  # noqa: E731
                            * per_action).sum(1).mean()
    freeze_for_imagination(agent)
    agent.value_head.requires_grad_(False)
    prior = PriorPolicy(agent)
    stage = ImagineStage(horizon=1, beta=0.0, value_weight=0.0)
    optimizer = torch.optim.Adam(agent.policy_head.parameters(), lr=1e-2)
    torch.manual_seed(0)
    with torch.no_grad():
        before = float(expected())
    for _ in range(60):
        out = imagine(agent, latents, actions, horizon=1, steps=2)
        loss, _ = imagination_loss(agent, prior, out, stage)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(expected())
    best = float(per_action.max(1).values.mean())
    assert after > before + 0.4 * (best - before), (before, after, best)  # most of the way to the best


# --- train imagine end to end -----------------------------------------------------------------------


def write_latent_folder(episodes_root: Path, out: Path, observations: bool = False) -> Path:
    """A latent folder (manifest + random latents) for the recorded episodes, as `data tokenize` writes
    (with observations: their observations.npz too, as `data tokenize` copies it)."""
    out.mkdir(parents=True)
    g = np.random.default_rng(0)
    lengths = {}
    for episode in sorted(p for p in episodes_root.iterdir() if p.is_dir()):
        dest = out / episode.name
        dest.mkdir()
        for name in ("actions.npz", "rewards.npy") + (("observations.npz",) if observations else ()):
            (dest / name).write_bytes((episode / name).read_bytes())
        length = len(np.load(episode / "rewards.npy"))
        np.save(dest / LATENTS_FILE, g.uniform(-1, 1, (length, 16, 32)).astype(np.float32))
        lengths[episode.name] = length
    manifest = {"format": MANIFEST_FORMAT, "tokenizer": {"fingerprint": "test"}, "context": 4, "num_latents": 16,
                "latent_dim": 32, "episodes": lengths, "complete": True}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    return out


def write_agent_run(agent: AgentModel, out_dir: Path, latents: Path) -> tuple[Path, RunConfig]:
    """A finished `train agent` checkpoint of `agent` (and an untrained tiny tokenizer for live play)."""
    net = {"embed_dim": 32, "depth": 2, "num_heads": 2, "num_kv_heads": 2, "time_every": 2, "num_registers": 1}
    tokenizer_path = out_dir / "tokenizer" / "checkpoint.pt"
    cfg = from_dict(RunConfig, {
        "out_dir": str(out_dir),
        "tokenizer": {"model": {"patch_size": 16, "encoder": net, "decoder": net}, "train": {"seq_len": 4}},
        "dynamics": {"tokenizer_checkpoint": str(tokenizer_path), "latents": str(latents)},
        "agent": {"latents": str(latents), "train": {"seq_len": 4}},
    })
    cfg = dataclasses.replace(cfg, dynamics=dataclasses.replace(cfg.dynamics, model=agent.dynamics.cfg),
                              agent=dataclasses.replace(cfg.agent, model=agent.cfg))
    base = {"format": CHECKPOINT_FORMAT, "done": True, "step": 1, "config": to_dict(cfg)}
    save_checkpoint(tokenizer_path, {**base, "model": Tokenizer(cfg.tokenizer.model).state_dict()})
    path = out_dir / "agent" / "checkpoint.pt"
    save_checkpoint(path, {**base, "model": agent.state_dict()})
    return path, cfg


def test_train_imagine_end_to_end(tiny_crafter_root, tmp_path):
    from dreamerv4.training.stages import load_agent

    latents = write_latent_folder(tiny_crafter_root, tmp_path / "latents")
    agent = tiny_agent()
    path, cfg = write_agent_run(agent, tmp_path / "run", latents)
    train_cfg = TrainConfig(steps=3, batch_size=2, seq_len=2, lr=1e-2, warmup_steps=1, precision="fp32",
                            log_every=1, ckpt_every=10, eval_every=3, tensorboard=False)
    cfg = dataclasses.replace(cfg, imagine=ImagineStage(train=train_cfg, horizon=3, sampling_steps=2,
                                                        eval_episodes=1, eval_max_steps=6))
    summary = train_imagine(cfg)
    assert summary.done and summary.step == 3
    run_dir = tmp_path / "run" / "imagine"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r.get("kind") == "train"]
    assert len(train_records) == 3
    for key in ("imagined_return", "adv_pos_frac", "kl_prior", "value_error", "policy_loss", "value_loss"):
        assert all(np.isfinite(r[key]) for r in train_records), key
    assert train_records[-1]["kl_prior"] > 0  # the policy moved away from its prior
    # One real-game evaluation, at the last step.
    evals = [r for r in records if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [3]
    assert all(np.isfinite(r["crafter_return"]) and r["crafter_score"] >= 0 for r in evals)

    # The checkpoint reads as an agent; everything but the policy and value heads is bitwise unchanged.
    trained, run = load_agent(run_dir / "checkpoint.pt")
    assert run.imagine.horizon == 3 and run.imagine.latents == str(latents)
    before, after = agent.state_dict(), trained.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith(HEADS) for name in changed), changed
    assert any(name.startswith("policy_head.") for name in changed)
    assert any(name.startswith("value_head.") for name in changed)
    prior = load_checkpoint(run_dir / "checkpoint.pt")["extra"]["prior"]
    assert all(torch.equal(v, before[f"policy_head.{k[len('head.'):]}"]) for k, v in prior.items())


def test_train_imagine_resumes_exactly(tiny_crafter_root, tmp_path):
    latents = write_latent_folder(tiny_crafter_root, tmp_path / "latents")
    _, cfg = write_agent_run(tiny_agent(), tmp_path / "run", latents)
    train_cfg = TrainConfig(steps=3, batch_size=2, seq_len=2, lr=1e-2, warmup_steps=1, min_lr_ratio=1.0,
                            precision="fp32", log_every=1, ckpt_every=10, tensorboard=False)
    stage = ImagineStage(train=train_cfg, horizon=2, sampling_steps=2)
    whole = train_imagine(dataclasses.replace(cfg, imagine=stage))
    reference = load_checkpoint(whole.checkpoint)["model"]

    cfg = dataclasses.replace(cfg, out_dir=str(tmp_path / "run2"))
    (tmp_path / "run2" / "agent").mkdir(parents=True)
    agent_checkpoint = (tmp_path / "run" / "agent" / "checkpoint.pt").read_bytes()
    (tmp_path / "run2" / "agent" / "checkpoint.pt").write_bytes(agent_checkpoint)
    train_imagine(dataclasses.replace(cfg, imagine=dataclasses.replace(
        stage, train=dataclasses.replace(train_cfg, steps=2))))
    resumed = train_imagine(dataclasses.replace(cfg, imagine=stage), resume=True)
    assert resumed.step == 3
    state = load_checkpoint(resumed.checkpoint)["model"]
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_train_imagine_context_must_fit(tiny_crafter_root, tmp_path):
    latents = write_latent_folder(tiny_crafter_root, tmp_path / "latents")
    _, cfg = write_agent_run(tiny_agent(), tmp_path / "run", latents)  # agent.train.seq_len 4
    stage = ImagineStage(train=TrainConfig(steps=1, batch_size=2, seq_len=4))
    with pytest.raises(ConfigError, match="max_context"):
        train_imagine(dataclasses.replace(cfg, imagine=stage))


def test_train_imagine_missing_agent_checkpoint(tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path / "run"))
    with pytest.raises(CheckpointError, match="agent/checkpoint.pt"):
        train_imagine(cfg)


def unlock_agent(seed: int = 0, num_achievements: int = 3) -> AgentModel:
    agent = tiny_agent(seed)
    agent.cfg = dataclasses.replace(agent.cfg, num_achievements=num_achievements)
    torch.manual_seed(seed)
    fresh = AgentModel(agent.dynamics, agent.cfg)
    fresh.load_state_dict(agent.state_dict(), strict=False)  # the tiny agent's weights plus an unlock head
    return fresh


def test_step_reward_pays_an_achievement_only_while_not_unlocked():
    agent = unlock_agent()
    with torch.no_grad():  # P = sigmoid(0) = 0.5 for each of 3 achievements, other reward 0.2
        agent.unlock_head.out.weight.zero_()
        agent.unlock_head.out.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.2]))
    hidden = torch.randn(2, 32)
    unlocked = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    reward, after = agent.step_reward(hidden, unlocked)
    # +1 for a step with any new unlock: P(any) = 1 - 0.5^3 with nothing unlocked, 0.5 with one left
    assert torch.allclose(reward, torch.tensor([0.2 + 0.875, 0.2 + 0.5]))
    assert torch.allclose(after, torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 0.5]]))
    # the same event again pays what is left: half of each achievement was already unlocked
    again, _ = agent.step_reward(hidden, after)
    assert torch.allclose(again, torch.tensor([0.2 + 1 - 0.75 ** 3, 0.2 + 0.25]))
    with pytest.raises(ValueError, match="unlocked must be"):
        agent.step_reward(hidden, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="no unlock head"):
        tiny_agent().unlocks(hidden)


def test_imagine_with_unlocks_pays_less_once_unlocked():
    agent = unlock_agent().eval()
    with torch.no_grad():
        agent.unlock_head.out.bias.copy_(torch.tensor([1.0, 1.0, 1.0, 0.0]))
    latents, actions = contexts()
    kwargs = dict(horizon=3, steps=4, gamma=0.9, lam=0.5)
    none = imagine(agent, latents, actions, generator=torch.Generator().manual_seed(0), unlocked=torch.zeros(4, 3), **kwargs)
    done = imagine(agent, latents, actions, generator=torch.Generator().manual_seed(0), unlocked=torch.ones(4, 3), **kwargs)
    assert torch.equal(none["imagined_actions"], done["imagined_actions"])  # same draws: only the reward differs
    logits, other = agent.unlocks(none["agent_hidden"][:, 1:])
    assert torch.allclose(done["imagined_rewards"], other, atol=1e-6)  # every achievement taken: only the rest pays
    assert (none["imagined_rewards"] > done["imagined_rewards"]).all()
    # unlocked accumulates: after H steps 1 - prod (1 - p_t)
    expected = 1.0 - torch.prod(1.0 - torch.sigmoid(logits), dim=1)
    assert torch.allclose(none["unlocked"], expected, atol=1e-6)
    head = imagine(agent, latents, actions, generator=torch.Generator().manual_seed(0), **kwargs)
    assert "unlocked" not in head  # no start state: the reward head pays


def test_peek_reads_a_frame_without_adding_it_to_the_context():
    agent = tiny_agent().eval()
    latents, actions = contexts()
    action = torch.tensor([1, 2, 3, 4])
    frame = torch.rand(4, 1, 16, 32) * 2 - 1
    peeked, plain = AgentRollout(agent, generator=torch.Generator()), AgentRollout(agent, generator=torch.Generator())
    for rollout in (peeked, plain):
        rollout.observe(latents, previous_actions(actions))
    peeked.generator.manual_seed(3)
    hidden = peeked.peek(frame, action[:, None])
    assert peeked.num_frames == plain.num_frames == 2  # not added
    plain.generator.manual_seed(3)
    assert torch.allclose(hidden, plain.observe(frame, action[:, None]), atol=1e-5)  # the readout observe gives
    plain = AgentRollout(agent, generator=torch.Generator())
    plain.observe(latents, previous_actions(actions))
    peeked.generator.manual_seed(4)
    plain.generator.manual_seed(4)
    assert torch.equal(peeked.imagine(action), plain.imagine(action))  # the next frame is as if never peeked


def test_disagreement_reward_is_pessimistic():
    agent = unlock_agent().eval()
    with torch.no_grad():  # an unlock head that reads the frame (it starts at zero)
        agent.unlock_head.out.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    latents, actions = contexts()
    kwargs = dict(horizon=3, steps=4, gamma=0.9, lam=0.5, unlocked=torch.zeros(4, 3))
    out = imagine(agent, latents, actions, generator=torch.Generator().manual_seed(0), disagreement=0.5, **kwargs)
    spread = out["reward_spread"]
    assert spread.shape == (4, 3) and (spread > 0).all()  # two samples of a frame read out differently
    own, _ = _step_rewards(agent, out["agent_hidden"][:, 1:], torch.zeros(4, 3))  # r_a of the kept frames
    # 0.5: the smaller of r_a and r_b = r_a +- spread
    assert torch.all(torch.isclose(out["imagined_rewards"], own, atol=1e-6)
                     | torch.isclose(out["imagined_rewards"], own - spread, atol=1e-6))
    assert torch.allclose(out["returns"], lambda_returns(out["imagined_rewards"], out["values"], out["continues"],
                                                         gamma=0.9, lam=0.5))
    harsh = imagine(agent, latents, actions, generator=torch.Generator().manual_seed(0), disagreement=2.0, **kwargs)
    assert torch.equal(harsh["reward_spread"], spread)  # same draws
    assert (harsh["imagined_rewards"] < out["imagined_rewards"]).all()
    assert "reward_spread" not in imagine(agent, latents, actions, generator=torch.Generator().manual_seed(0), **kwargs)
    with pytest.raises(ValueError, match="disagreement"):
        ImagineStage(disagreement=-1.0)


def _step_rewards(agent: AgentModel, hidden: torch.Tensor, unlocked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rewards = []
    for t in range(hidden.shape[1]):
        reward, unlocked = agent.step_reward(hidden[:, t], unlocked)
        rewards.append(reward)
    return torch.stack(rewards, dim=1), unlocked


def test_centred_advantages_fill_both_pmpo_sets():
    agent = tiny_agent().eval()
    latents, actions = contexts(b=8)
    out = imagine(agent, latents, actions, horizon=4, steps=4, generator=torch.Generator().manual_seed(0))
    out["advantages"] = torch.rand(8, 4) + 1.0  # a critic that reads low everywhere: all positive
    prior = PriorPolicy(agent)
    _, plain = imagination_loss(agent, prior, out, ImagineStage())
    _, centred = imagination_loss(agent, prior, out, ImagineStage(center_advantages=True))
    assert float(plain["adv_pos_frac"]) == 1.0 and float(plain["adv_mean"]) > 1.0
    assert 0.2 < float(centred["adv_pos_frac"]) < 0.8 and float(centred["adv_neg_frac"]) > 0.2
    with pytest.raises(ValueError, match="reward must be"):
        ImagineStage(reward="bogus")


def test_train_imagine_with_unlocks_reward(tiny_crafter_root, tmp_path):
    train_cfg = TrainConfig(steps=2, batch_size=2, seq_len=2, lr=1e-2, warmup_steps=1, precision="fp32",
                            log_every=1, ckpt_every=10, tensorboard=False)
    stage = ImagineStage(train=train_cfg, horizon=2, sampling_steps=2, reward="unlocks", center_advantages=True)
    no_head = write_latent_folder(tiny_crafter_root, tmp_path / "plain")
    _, cfg = write_agent_run(tiny_agent(), tmp_path / "run", no_head)
    with pytest.raises(ConfigError, match="imagine.reward = unlocks needs an agent with an unlock head"):
        train_imagine(dataclasses.replace(cfg, imagine=stage))
    latents = write_latent_folder(tiny_crafter_root, tmp_path / "latents", observations=True)
    agent = unlock_agent(num_achievements=22)
    _, cfg = write_agent_run(agent, tmp_path / "run2", latents)
    summary = train_imagine(dataclasses.replace(cfg, imagine=stage))
    assert summary.done
    records = [json.loads(line) for line in (tmp_path / "run2" / "imagine" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["imagined_reward"]) and np.isfinite(r["adv_mean"]) for r in records if r.get("kind") == "train")


def test_train_imagine_starts_from_the_last_context_frames_achievements(tiny_crafter_root, tmp_path, monkeypatch):
    from dreamerv4.training import imagine as imagine_module

    latents = write_latent_folder(tiny_crafter_root, tmp_path / "latents", observations=True)
    for episode in (p for p in latents.iterdir() if p.is_dir()):
        length = len(np.load(episode / "rewards.npy"))
        steps = np.arange(length)
        # frame t carries its index in its latents; achievement k counts as unlocked before frame t iff t > k
        np.save(episode / LATENTS_FILE, np.broadcast_to((steps / 1000.0)[:, None, None], (length, 16, 32)).astype(np.float32))
        with np.load(episode / "observations.npz") as npz:
            observations = {k: npz[k] for k in npz.files}
        observations["achievements"] = (steps[:, None] > np.arange(22)[None]).astype(np.uint8)
        np.savez_compressed(episode / "observations.npz", **observations)
    _, cfg = write_agent_run(unlock_agent(num_achievements=22), tmp_path / "run", latents)
    seen = []
    real_imagine = imagine_module.imagine

    def spy(agent, context_latents, context_actions, *args, **kwargs):
        seen.append((context_latents[:, -1, 0, 0].clone(), kwargs["unlocked"].clone()))
        return real_imagine(agent, context_latents, context_actions, *args, **kwargs)

    monkeypatch.setattr(imagine_module, "imagine", spy)
    train_cfg = TrainConfig(steps=2, batch_size=3, seq_len=3, lr=1e-2, warmup_steps=1, precision="fp32",
                            log_every=1, ckpt_every=10, tensorboard=False)
    train_imagine(dataclasses.replace(cfg, imagine=ImagineStage(train=train_cfg, horizon=2, sampling_steps=2,
                                                                reward="unlocks", max_context=4)))
    assert len(seen) == 2
    for last_frame, unlocked in seen:
        t = torch.round(last_frame * 1000).long()
        assert torch.equal(unlocked, (t[:, None] > torch.arange(22)[None]).float())

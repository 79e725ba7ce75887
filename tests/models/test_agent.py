"""Agent tokens on the dynamics transformer: the world model is untouched by them, alignment of the
multi-token targets, the output dict, heads on detached states, and the cached agent rollout."""

from __future__ import annotations

import pytest
import torch

from dreamerv4.models.agent import AgentConfig, AgentModel, AgentRollout, mtp_targets
from dreamerv4.models.dynamics import NO_ACTION, DynamicsConfig, DynamicsModel, Rollout, add_noise, previous_actions
from dreamerv4.models.transformer import TransformerConfig


def tiny_agent(action_space: str = "crafter", seed: int = 0, num_agent_tokens: int = 1) -> AgentModel:
    stack = TransformerConfig(embed_dim=32, depth=4, num_heads=4, num_kv_heads=2, time_every=2, num_registers=2)
    torch.manual_seed(seed)
    dynamics = DynamicsModel(DynamicsConfig(transformer=stack, action_space=action_space))
    agent = AgentModel(dynamics, AgentConfig(num_agent_tokens=num_agent_tokens, mtp_length=3, head_hidden=16)).eval()
    # Unit-scale random weights (as tests/models/test_dynamics.py) so every path is far above float noise.
    with torch.no_grad():
        for name, p in agent.named_parameters():
            if "embed" in name or name.endswith(("no_action", "latent_slot", "agent_tokens")):
                p.normal_(0.0, 1.0)
            elif p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
            elif name.endswith("weight") and p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return agent


def window(b: int = 2, t: int = 5, seed: int = 1, num_actions: int = 17):
    g = torch.Generator().manual_seed(seed)
    latents = torch.rand(b, t, 16, 32, generator=g) * 2 - 1
    actions = torch.randint(0, num_actions, (b, t), generator=g)
    tau = torch.randint(0, 64, (b, t), generator=g) / 64
    d = torch.full((b, t), 1 / 64)
    noise = torch.randn(b, t, 16, 32, generator=g)
    return latents, actions, tau, d, noise


@pytest.mark.parametrize("num_agent_tokens", [1, 3])
def test_agent_tokens_do_not_change_the_world_model(num_agent_tokens):
    agent = tiny_agent(num_agent_tokens=num_agent_tokens)
    latents, actions, tau, d, noise = window()
    out = agent(latents, actions, tau, d, noise=noise)
    with torch.no_grad():
        agent.agent_tokens.normal_(0.0, 5.0)
    changed = agent(latents, actions, tau, d, noise=noise)
    assert torch.equal(out["predicted_latents"], changed["predicted_latents"])  # bitwise
    assert not torch.allclose(out["agent_hidden"], changed["agent_hidden"])  # they do reach the agent readout
    # ... and equal to the bare dynamics model with the same weights.
    bare = agent.dynamics(latents, actions, tau, d, noise=noise)
    assert torch.allclose(out["predicted_latents"], bare["predicted_latents"], atol=1e-5, rtol=1e-5)
    assert torch.equal(out["noisy_latents"], bare["noisy_latents"])


def test_output_dict_shapes_crafter_and_minerl():
    for space, logits in (("crafter", 17), ("minerl", 144)):
        agent = tiny_agent(space)
        latents, _, tau, d, noise = window()
        actions = torch.zeros(2, 5, dtype=torch.long)  # code 0 exists in both spaces
        out = agent(latents, actions)
        assert out["policy_logits"].shape == (2, 5, logits)
        assert out["reward_logits"].shape == out["value_logits"].shape == (2, 5, 255)
        assert out["policy_logits_mtp"].shape == (2, 5, 3, logits)
        assert out["reward_logits_mtp"].shape == (2, 5, 3, 255)
        assert out["predicted_latents"].shape == out["noisy_latents"].shape == (2, 5, 16, 32)
        assert out["agent_hidden"].shape == (2, 5, 32)
        assert torch.equal(out["policy_logits"], out["policy_logits_mtp"][:, :, 0])
        assert all(v.dtype == torch.float32 for v in out.values())


def test_agent_readout_is_causal_and_sees_the_previous_action_only():
    agent = tiny_agent()
    latents, actions, _, _, noise = window(t=6)
    base = agent(latents, actions, noise=noise)["agent_hidden"]
    # Changing frame 3 changes readouts of frames >= 3 only.
    latents2 = latents.clone()
    latents2[:, 3] += 1.0
    h = agent(latents2, actions, noise=noise)["agent_hidden"]
    assert torch.equal(h[:, :3], base[:, :3]) and not torch.allclose(h[:, 3:], base[:, 3:])
    # actions[3] is taken after frame 3: it reaches frames >= 4 (through their action token), not frame 3.
    actions2 = actions.clone()
    actions2[:, 3] = (actions[:, 3] + 1) % 17
    h = agent(latents, actions2, noise=noise)["agent_hidden"]
    assert torch.equal(h[:, :4], base[:, :4]) and not torch.allclose(h[:, 4], base[:, 4])


def test_mtp_targets_alignment():
    actions = torch.tensor([[10, 11, 12, 13]])
    rewards = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    t = mtp_targets(actions, rewards, length=3)
    # policy offset n at frame t -> actions[t + n]
    assert t["actions"][0].tolist() == [[10, 11, 12], [11, 12, 13], [12, 13, 0], [13, 0, 0]]
    assert t["action_valid"][0].tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0]]
    # reward offset n at frame t -> rewards[t + n - 1] (offset 0: the reward of the action that led here)
    assert t["rewards"][0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 0]]
    assert t["reward_valid"][0].tolist() == [[0, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0]]


def test_heads_train_on_detached_hidden_states():
    agent = tiny_agent()
    latents, actions, _, _, noise = window()
    with torch.no_grad():
        hidden = agent(latents, actions, noise=noise)["agent_hidden"]
    loss = agent.policy(hidden).logsumexp(-1).sum() + agent.value(hidden).sum() + agent.reward(hidden).sum()
    loss.backward()
    assert agent.policy_head.out.weight.grad is not None and agent.value_head.out.weight.grad is not None
    assert all(p.grad is None for p in agent.dynamics.parameters())


def test_rollout_matches_dynamics_rollout_and_uncached_readout():
    agent = tiny_agent()
    latents, actions, _, _, _ = window(b=2, t=4)
    prev = previous_actions(actions)
    # The agent rollout draws the same noise in the same order as dynamics.Rollout: same frames.
    ours = AgentRollout(agent, generator=torch.Generator().manual_seed(3))
    theirs = Rollout(agent.dynamics, generator=torch.Generator().manual_seed(3))
    h = ours.observe(latents, prev)
    with torch.no_grad():
        theirs.observe(latents, prev)
    assert h.shape == (2, 32) and ours.num_frames == 4
    action = torch.tensor([5, 7])
    frame, h_next = ours.imagine_step(action)
    with torch.no_grad():
        expected = theirs.step(action)
    assert torch.allclose(frame, expected, atol=1e-5)
    # The cached readout equals an uncached pass over the same re-noised frames.
    g = torch.Generator().manual_seed(3)
    level = agent.dynamics.cfg.context_signal_level
    noise_ctx = torch.randn(latents.shape, generator=g)
    with torch.no_grad():
        _, hidden = agent.encode(add_noise(latents, noise_ctx, level), prev, torch.full((2, 4), level),
                                 torch.full((2, 4), 1 / 64))
    assert torch.allclose(hidden[:, -1].float(), h, atol=1e-5)
    assert agent.policy(h_next).shape == (2, 17) and agent.reward(h_next).shape == (2, 255)


def test_rollout_is_reproducible_with_a_seeded_generator():
    agent = tiny_agent()
    latents, actions, _, _, _ = window(b=1, t=2)
    runs = []
    for _ in range(2):
        r = AgentRollout(agent, generator=torch.Generator().manual_seed(11), steps=2)
        r.observe(latents, previous_actions(actions))
        frames = [r.imagine_step(torch.tensor([a]))[0] for a in (1, 2, 3)]
        runs.append(torch.stack(frames))
    assert torch.equal(runs[0], runs[1])
    with pytest.raises(ValueError, match="power of two"):
        AgentRollout(agent, steps=3)
    assert NO_ACTION == -1

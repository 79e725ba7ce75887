"""Behaviour of the shortcut-forcing dynamics model: noising, causality, action alignment and
conditioning, grids, and cached vs uncached generation."""

from __future__ import annotations

import pytest
import torch

from dreamerv4.config import load_config
from dreamerv4.errors import ConfigError
from dreamerv4.models.dynamics import (
    NO_ACTION,
    DynamicsConfig,
    DynamicsModel,
    Rollout,
    add_noise,
    previous_actions,
)
from dreamerv4.models.transformer import TransformerConfig


def tiny_model(action_space: str = "crafter", seed: int = 0, **overrides) -> DynamicsModel:
    stack = TransformerConfig(embed_dim=32, depth=4, num_heads=4, num_kv_heads=2, time_every=2, num_registers=2)
    torch.manual_seed(seed)
    model = DynamicsModel(DynamicsConfig(transformer=stack, action_space=action_space, **overrides)).eval()
    # Unit-scale random weights instead of the small init, so every input's effect on the output
    # is far above float noise, and random gains so no symmetry hides a bug.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed" in name or name in ("no_action", "latent_slot"):
                p.normal_(0.0, 1.0)
            elif p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
            elif name.endswith("weight") and p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def batch(b: int = 2, t: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.rand(b, t, 16, 32, generator=g) * 2 - 1
    actions = torch.randint(0, 17, (b, t), generator=g)
    tau = torch.randint(0, 64, (b, t), generator=g) / 64
    d = torch.full((b, t), 1 / 64)
    noise = torch.randn(b, t, 16, 32, generator=g)
    return latents, actions, tau, d, noise


def test_add_noise_endpoints_and_mix():
    clean, noise = torch.rand(2, 3, 16, 32), torch.randn(2, 3, 16, 32)
    assert torch.equal(add_noise(clean, noise, torch.ones(2, 3)), clean)  # tau = 1: clean data
    assert torch.equal(add_noise(clean, noise, torch.zeros(2, 3)), noise)  # tau = 0: pure noise
    tau = torch.tensor([[0.25, 0.5, 0.75], [0.0, 1.0, 0.125]])
    mixed = add_noise(clean, noise, tau)
    assert torch.allclose(mixed[0, 2], 0.25 * noise[0, 2] + 0.75 * clean[0, 2])
    assert torch.allclose(mixed[1, 2], 0.875 * noise[1, 2] + 0.125 * clean[1, 2])


def test_forward_contract_and_noisy_latents():
    model = tiny_model()
    latents, actions, tau, d, noise = batch()
    out = model(latents, actions, tau, d, noise=noise)
    assert set(out) == {"predicted_latents", "noisy_latents"}
    assert out["predicted_latents"].shape == out["noisy_latents"].shape == (2, 5, 16, 32)
    assert out["predicted_latents"].dtype == torch.float32
    assert torch.allclose(out["noisy_latents"], add_noise(latents, noise, tau))
    # x-prediction from the noisy input: the clean latents reach the model only through it.
    tau_one = torch.ones(2, 5)
    clean_in = model(latents, actions, tau_one, d, noise=noise)
    assert torch.equal(clean_in["noisy_latents"], latents)
    other_noise = model(latents, actions, tau_one, d, noise=noise * 7)["predicted_latents"]
    assert torch.allclose(clean_in["predicted_latents"], other_noise)


def test_previous_actions_shift():
    actions = torch.tensor([[3, 4, 5], [6, 7, 8]])
    assert previous_actions(actions).tolist() == [[NO_ACTION, 3, 4], [NO_ACTION, 6, 7]]


def test_causal_in_time():
    model = tiny_model()
    latents, actions, tau, d, noise = batch(t=6)
    base = model(latents, actions, tau, d, noise=noise)["predicted_latents"]
    for t in (0, 2, 4):
        changed_latents = latents.clone()
        changed_latents[:, t + 1 :] = torch.rand_like(changed_latents[:, t + 1 :])
        changed_tau = tau.clone()
        changed_tau[:, t + 1 :] = 0.5
        out = model(changed_latents, actions, changed_tau, d, noise=noise)["predicted_latents"]
        assert torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6), f"frames <= {t} saw the future"
        assert not torch.allclose(out[:, t + 1], base[:, t + 1], atol=1e-3)


def test_frame_is_conditioned_on_the_previous_action_only():
    """actions[t] is taken after frame t, so it conditions frame t + 1 (and later), never frame t."""
    model = tiny_model()
    latents, actions, tau, d, noise = batch(t=5)
    base = model(latents, actions, tau, d, noise=noise)["predicted_latents"]
    for t in (0, 2):
        other = actions.clone()
        other[:, t] = (other[:, t] + 5) % 17
        out = model(latents, other, tau, d, noise=noise)["predicted_latents"]
        assert torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6)
        assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 1e-3
    other = actions.clone()
    other[:, -1] = (other[:, -1] + 5) % 17  # the last action conditions no frame of this window
    assert torch.allclose(model(latents, other, tau, d, noise=noise)["predicted_latents"], base, atol=1e-6)


def test_no_action_embedding_is_used_for_missing_actions():
    model = tiny_model()
    latents, actions, tau, d, noise = batch(t=3)
    noisy = add_noise(latents, noise, tau)
    prev = previous_actions(actions)
    with_none = model.denoise(noisy, prev, tau, d)
    prev_noop = prev.clone()
    prev_noop[:, 0] = 0  # an explicit noop is an action, not "no action"
    assert (model.denoise(noisy, prev_noop, tau, d)[:, 0] - with_none[:, 0]).abs().max() > 1e-3


def test_minerl_components_each_condition_the_prediction():
    model = tiny_model("minerl")
    space = model.action_space
    latents, _, tau, d, noise = batch(t=3)
    parts = {
        "keys": torch.tensor([[1, 0, 3], [0, 5, 0]]),
        "camera": torch.full((2, 3), 60),
        "item": torch.zeros(2, 3, dtype=torch.long),
    }
    base = model(latents, space.pack(parts), tau, d, noise=noise)["predicted_latents"]
    for name, value in (("keys", 128), ("camera", 0), ("item", 3)):
        changed = {k: v.clone() for k, v in parts.items()}
        changed[name][:, 0] = value
        out = model(latents, space.pack(changed), tau, d, noise=noise)["predicted_latents"]
        assert torch.allclose(out[:, 0], base[:, 0], atol=1e-6)
        assert (out[:, 1] - base[:, 1]).abs().max() > 1e-3, f"component {name} is ignored"


def test_conditioning_distinguishes_tau_and_d():
    model = tiny_model()
    latents, actions, tau, d, noise = batch(t=2)
    base = model(latents, actions, tau, d, noise=noise)["predicted_latents"]
    noisy = add_noise(latents, noise, tau)
    prev = previous_actions(actions)
    other_d = model.denoise(noisy, prev, tau, torch.full_like(d, 0.25))
    other_tau = model.denoise(noisy, prev, (tau + 1 / 64).clamp_max(1), d)
    assert (other_d - base).abs().max() > 1e-3 and (other_tau - base).abs().max() > 1e-3


def test_rejects_bad_inputs():
    model = tiny_model()
    latents, actions, tau, d, noise = batch(t=2)
    with pytest.raises(ValueError, match="multiple of 1/64"):
        model(latents, actions, torch.full_like(tau, 0.3), d)
    with pytest.raises(ValueError, match="step size"):
        model(latents, actions, tau, torch.full_like(d, 0.3))
    with pytest.raises(ValueError, match="step size"):
        model(latents, actions, tau, torch.full_like(d, 1 / 128))
    with pytest.raises(ValueError, match="outside 0..16"):
        model(latents, torch.full_like(actions, 17), tau, d)
    with pytest.raises(ValueError, match="expected latents"):
        model(latents[..., :8], actions, tau, d)
    with pytest.raises(ValueError, match="tau must be"):
        model(latents, actions, tau[:, :1], d)


def test_config_validation_through_the_loader(tmp_path):
    path = tmp_path / "dyn.yaml"
    path.write_text("k_max: 48\n")
    with pytest.raises(ConfigError, match="k_max must be a power of two"):
        load_config(DynamicsConfig, path)
    with pytest.raises(ConfigError, match="sampling_steps"):
        load_config(DynamicsConfig, None, ["sampling_steps=128"])
    with pytest.raises(ConfigError, match="unknown action space"):
        load_config(DynamicsConfig, None, ["action_space=atari"])
    cfg = load_config(DynamicsConfig, None, ["action_space=minerl", "transformer.embed_dim=64"])
    assert cfg.action_space == "minerl" and cfg.transformer.embed_dim == 64
    assert cfg.context_signal_level == 58 / 64 and cfg.d_min == 1 / 64


# -- generation ------------------------------------------------------------------------------------


def generation_inputs(b: int = 2, c: int = 3, h: int = 4, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    context = torch.rand(b, c, 16, 32, generator=g) * 2 - 1
    context_actions = torch.randint(0, 17, (b, c), generator=g)
    future_actions = torch.randint(0, 17, (b, h), generator=g)
    return context, context_actions, future_actions


def test_cached_and_uncached_generation_agree():
    model = tiny_model()
    context, context_actions, future_actions = generation_inputs()
    runs = [
        model.generate(context, context_actions, future_actions, steps=4, cache=cache,
                       generator=torch.Generator().manual_seed(7))
        for cache in (True, False)
    ]
    assert runs[0].shape == (2, 4, 16, 32)
    assert torch.allclose(runs[0], runs[1], atol=1e-5), (runs[0] - runs[1]).abs().max()


def test_generation_matches_a_hand_rolled_reference():
    """One step per frame (K = 1): each frame is f(noise, tau 0, d 1) after the re-noised context,
    conditioned on the previous action; the noise comes from the generator in a fixed order."""
    model = tiny_model()
    cfg = model.cfg
    context, context_actions, future_actions = generation_inputs(h=2)
    out = model.generate(context, context_actions, future_actions, steps=1, generator=torch.Generator().manual_seed(3))

    g = torch.Generator().manual_seed(3)
    signal = 58 / 64
    seq = add_noise(context, torch.randn(context.shape, generator=g), signal)
    prev = previous_actions(torch.cat((context_actions, future_actions), dim=1))
    expected = []
    for i in range(2):
        z = torch.randn(2, 1, 16, 32, generator=g)
        n = seq.shape[1]
        taus = torch.full((2, n + 1), signal)
        taus[:, -1] = 0.0
        ds = torch.full((2, n + 1), cfg.d_min)
        ds[:, -1] = 1.0
        with torch.no_grad():
            frame = model.denoise(torch.cat((seq, z), 1), prev[:, : n + 1], taus, ds)[:, -1:]
        expected.append(frame)
        seq = torch.cat((seq, add_noise(frame, torch.randn(frame.shape, generator=g), signal)), 1)
    assert torch.allclose(out, torch.cat(expected, 1), atol=1e-5)


def test_generation_uses_context_and_actions():
    model = tiny_model()
    context, context_actions, future_actions = generation_inputs()

    def run(ctx, ctx_actions, fut_actions):
        return model.generate(ctx, ctx_actions, fut_actions, generator=torch.Generator().manual_seed(5))

    base = run(context, context_actions, future_actions)
    assert torch.equal(base, run(context, context_actions, future_actions))  # deterministic given the generator
    older = context.clone()
    older[:, 0] = -older[:, 0]  # only the oldest context frame differs
    assert (run(older, context_actions, future_actions) - base).abs().max() > 1e-3
    other = future_actions.clone()
    other[:, 1] = (other[:, 1] + 3) % 17  # conditions imagined frame 2 onwards
    changed = run(context, context_actions, other)
    assert torch.allclose(changed[:, :2], base[:, :2], atol=1e-6)
    assert (changed[:, 2] - base[:, 2]).abs().max() > 1e-3


def test_rollout_cache_grows_one_frame_per_step_and_steps_do_not_store():
    model = tiny_model()
    context, context_actions, _ = generation_inputs(c=3)
    rollout = Rollout(model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rollout.observe(context, previous_actions(context_actions))
        assert rollout.cache.length == 3
        frame = rollout.imagine(context_actions[:, -1], steps=8)  # 8 denoising passes, none stored
        assert frame.shape == (2, 16, 32) and rollout.cache.length == 3
        rollout.step(context_actions[:, -1])
        assert rollout.cache.length == 4
        keys, _ = next(iter(rollout.cache.layers.values()))
        assert keys.shape[2] == 4  # (streams, heads, frames, head_dim)


def test_generate_without_context_and_bad_steps():
    model = tiny_model()
    empty = torch.zeros(2, 0, 16, 32)
    no_actions = torch.zeros(2, 0, dtype=torch.long)
    future = torch.randint(0, 17, (2, 2))
    out = [
        model.generate(empty, no_actions, future, cache=cache, generator=torch.Generator().manual_seed(1))
        for cache in (True, False)
    ]
    assert out[0].shape == (2, 2, 16, 32) and torch.allclose(out[0], out[1], atol=1e-5)
    with pytest.raises(ValueError, match="power of two"):
        model.generate(empty, no_actions, future, steps=3)


def test_cached_generation_matches_uncached_after_a_long_context():
    """A context long enough for the cache buffers to grow several times (36 frames, then 3
    imagined with K = 2): cached and uncached generation still agree."""
    model = tiny_model()
    context, context_actions, future_actions = generation_inputs(b=1, c=36, h=3)
    runs = [
        model.generate(context, context_actions, future_actions, steps=2, cache=cache,
                       generator=torch.Generator().manual_seed(11))
        for cache in (True, False)
    ]
    assert runs[0].shape == (1, 3, 16, 32)
    assert torch.allclose(runs[0], runs[1], atol=1e-5), (runs[0] - runs[1]).abs().max()


def test_latent_scale_is_a_change_of_units():
    # Same weights, scale 4: the model sees 4 x latents, so feeding it latents / 4 must give exactly
    # the scale-1 model's outputs / 4 (forward, generation, the loss's noisy inputs).
    plain = tiny_model()
    scaled = tiny_model(latent_scale=4.0)
    scaled.load_state_dict(plain.state_dict())
    latents, actions, tau, d, noise = batch()
    a = plain(latents, actions, tau, d, noise=noise)
    b = scaled(latents / 4, actions, tau, d, noise=noise)
    for key in ("predicted_latents", "noisy_latents"):
        torch.testing.assert_close(b[key], a[key] / 4, rtol=1e-5, atol=1e-6)
    gen_a = plain.generate(latents[:, :3], actions[:, :3], actions[:, 3:], generator=torch.Generator().manual_seed(0))
    gen_b = scaled.generate(latents[:, :3] / 4, actions[:, :3], actions[:, 3:], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gen_b, gen_a / 4, rtol=1e-4, atol=1e-5)


def test_latent_scale_validation():
    with pytest.raises(ValueError, match="latent_scale"):
        DynamicsConfig(latent_scale=-1.0)
    with pytest.raises(ValueError, match="latent_scale"):
        DynamicsConfig(latent_scale=float("nan"))
    with pytest.raises(ValueError, match="measure"):  # 0 is resolved by training, never built
        DynamicsModel(DynamicsConfig(latent_scale=0.0))


def test_action_to_latents_adds_the_action_embedding_to_every_latent_token():
    plain, wide = tiny_model(), tiny_model(action_to_latents=True)  # same seed: the same weights
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), wide.state_dict().values()))
    latents, actions, tau, d, noise = batch(t=4)
    noisy, prev = add_noise(latents, noise, tau), previous_actions(actions)
    base, added = plain.frame_tokens(noisy, prev, tau, d), wide.frame_tokens(noisy, prev, tau, d)
    action = plain.embed_actions(prev)
    assert torch.equal(added[:, :, :2], base[:, :, :2])  # the action and (tau, d) tokens are unchanged
    assert torch.allclose(added[:, :, 2:], base[:, :, 2:] + action[:, :, None], atol=1e-6)
    # Still conditioned on the previous action only, and generation with and without the cache agrees.
    out = wide(latents, actions, tau, d, noise=noise)["predicted_latents"]
    other = actions.clone()
    other[:, 1] = (other[:, 1] + 5) % 17
    changed = wide(latents, other, tau, d, noise=noise)["predicted_latents"]
    assert torch.allclose(changed[:, :2], out[:, :2], atol=1e-6) and (changed[:, 2] - out[:, 2]).abs().max() > 1e-3
    context, context_actions, future_actions = generation_inputs()
    runs = [wide.generate(context, context_actions, future_actions, steps=4, cache=cache,
                          generator=torch.Generator().manual_seed(7)) for cache in (True, False)]
    assert torch.allclose(runs[0], runs[1], atol=1e-5), (runs[0] - runs[1]).abs().max()

"""The shortcut forcing loss: grids, the bootstrap target on hand-made tensors with a stub network,
the (1 - tau)^2 scale, the ramp weight, stop-gradient, single-frame rows, and a loss that falls."""

from __future__ import annotations

import torch

from dreamerv4.models.dynamics import NO_ACTION, DynamicsConfig, DynamicsModel, add_noise, previous_actions
from dreamerv4.models.transformer import TransformerConfig
from dreamerv4.training.shortcut import (
    bootstrap_velocity_target,
    denoise_with_single_frames,
    ramp_weight,
    sample_step_and_signal,
    shortcut_forcing_loss,
    shortcut_loss_terms,
)


def tiny_model(seed: int = 0, **overrides) -> DynamicsModel:
    stack = TransformerConfig(embed_dim=32, depth=2, num_heads=2, num_kv_heads=1, time_every=2, num_registers=2)
    cfg = dict(transformer=stack, num_latents=4, latent_dim=8)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return DynamicsModel(DynamicsConfig(**cfg))


def test_step_and_signal_grids():
    # bootstrap_fraction 6/7: d uniform over the 7 step sizes 1, 1/2, ..., 1/64.
    tau, d = sample_step_and_signal(400, 50, 64, 6 / 7, generator=torch.Generator().manual_seed(0))
    k = 1.0 / d
    assert torch.equal(k, torch.exp2(torch.round(torch.log2(k))))  # d = 1/k, k a power of two
    assert set(k.unique().tolist()) == {1, 2, 4, 8, 16, 32, 64}
    counts = torch.stack([(k == 2**e).float().mean() for e in range(7)])
    assert (counts - 1 / 7).abs().max() < 0.02
    steps_from_zero = tau * k
    assert torch.equal(steps_from_zero, torch.round(steps_from_zero))  # every tau is a multiple of its d
    assert (tau >= 0).all() and (tau <= 1 - d).all()  # so tau < 1
    assert (tau[k == 1] == 0).all()
    quarter = tau[k == 4]
    assert set(quarter.unique().tolist()) == {0.0, 0.25, 0.5, 0.75}
    assert ((quarter == 0.75).float().mean() - 0.25).abs() < 0.03  # uniform on the grid
    assert tau[k == 64].max() == 63 / 64
    # The default share: 75% flow frames at d_min, the rest spread over the 6 coarser sizes.
    tau, d = sample_step_and_signal(400, 50, 64, 0.25, generator=torch.Generator().manual_seed(1))
    assert ((d == 1 / 64).float().mean() - 0.75).abs() < 0.01
    assert ((d == 1 / 8).float().mean() - 0.25 / 6).abs() < 0.01
    assert torch.equal(tau * 64, torch.round(tau * 64)) and (tau < 1).all()
    assert (sample_step_and_signal(8, 8, 64, 0.0)[1] == 1 / 64).all()
    assert (sample_step_and_signal(8, 8, 64, 1.0)[1] > 1 / 64).all()


def test_ramp_weight():
    assert torch.allclose(ramp_weight(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([0.1, 0.55, 1.0]))


class StubDenoiser:
    """A network whose outputs the test sets: returns `outputs[i]` on the i-th call, records inputs."""

    def __init__(self, outputs):
        self.outputs = list(outputs)
        self.calls = []

    def __call__(self, z, tau, d):
        self.calls.append((z.clone(), tau.clone(), d.clone()))
        return self.outputs[len(self.calls) - 1]


def test_bootstrap_target_is_the_average_of_two_half_step_velocities():
    # Frame 0 bootstraps (tau 1/2, d 1/2); frame 1 is a flow frame (d = d_min) and is held still.
    noisy = torch.tensor([0.2, -0.3]).view(1, 2, 1, 1)
    tau = torch.tensor([[0.5, 0.25]])
    d = torch.tensor([[0.5, 1 / 64]])
    stub = StubDenoiser([torch.tensor([1.0, 5.0]).view(1, 2, 1, 1), torch.tensor([0.8, 7.0]).view(1, 2, 1, 1)])
    target = bootstrap_velocity_target(stub, noisy, tau, d, d_min=1 / 64)
    # b' = (1.0 - 0.2) / (1 - 0.5) = 1.6;  z' = 0.2 + 1.6 * 0.25 = 0.6
    # b'' = (0.8 - 0.6) / (1 - 0.75) = 0.8;  target = (1.6 + 0.8) / 2 = 1.2
    assert torch.isclose(target[0, 0, 0, 0], torch.tensor(1.2))
    (z1, tau1, d1), (z2, tau2, d2) = stub.calls
    assert torch.equal(z1, noisy) and torch.equal(tau1, tau) and torch.allclose(d1, torch.tensor([[0.25, 1 / 64]]))
    assert torch.isclose(z2[0, 0, 0, 0], torch.tensor(0.6)) and z2[0, 1, 0, 0] == noisy[0, 1, 0, 0]
    assert torch.allclose(tau2, torch.tensor([[0.75, 0.25]])) and torch.allclose(d2, d1)


def test_bootstrap_target_of_the_exact_denoiser_is_the_straight_velocity():
    """If f always returns the data, both half steps follow the straight path z0 -> z1, so the
    target is z1 - z0 and a student predicting the data has zero loss for every tau and d."""
    g = torch.Generator().manual_seed(1)
    clean, noise = torch.randn(3, 6, 4, 8, generator=g), torch.randn(3, 6, 4, 8, generator=g)
    tau, d = sample_step_and_signal(3, 6, 64, 0.5, generator=g)
    d[0, :3] = 0.5  # make sure coarse steps are present
    tau[0, :3] = torch.tensor([0.0, 0.5, 0.0])
    noisy = add_noise(clean, noise, tau)
    target = bootstrap_velocity_target(lambda z, t, s: clean, noisy, tau, d, d_min=1 / 64)
    bootstrap_frames = d > 1 / 64
    assert torch.allclose(target[bootstrap_frames], (clean - noise)[bootstrap_frames], atol=1e-5)
    flow, bootstrap = shortcut_loss_terms(clean, noisy, clean, tau, target)
    assert flow.abs().max() == 0 and bootstrap[bootstrap_frames].abs().max() < 1e-10


def test_bootstrap_term_has_the_one_minus_tau_squared_scale():
    tau = torch.tensor([[0.0, 0.5, 0.75, 63 / 64]])
    g = torch.Generator().manual_seed(2)
    noisy, velocity, error = (torch.randn(1, 4, 4, 8, generator=g) for _ in range(3))
    # The prediction whose implied velocity (x^ - z~)/(1 - tau) misses the target by `error`.
    predicted = noisy + (1 - tau)[..., None, None] * (velocity + error)
    _, bootstrap = shortcut_loss_terms(predicted, noisy, torch.zeros_like(noisy), tau, velocity)
    literal = (1 - tau) ** 2 * (((predicted - noisy) / (1 - tau)[..., None, None] - velocity) ** 2).mean(dim=(-2, -1))
    assert torch.allclose(bootstrap, literal, rtol=1e-4)
    assert torch.allclose(bootstrap, (1 - tau) ** 2 * error.pow(2).mean(dim=(-2, -1)), rtol=1e-4)


def fixed_batch(b=4, t=3, seed=3, coarse=True):
    g = torch.Generator().manual_seed(seed)
    latents = torch.rand(b, t, 4, 8, generator=g) * 2 - 1
    actions = torch.randint(0, 17, (b, t), generator=g)
    tau, d = sample_step_and_signal(b, t, 64, 0.5, generator=g)
    if coarse:  # both kinds of frames in every row
        d[:, 0], tau[:, 0] = 1 / 64, torch.tensor([0.0, 0.5, 63 / 64, 0.25])[:b]
        d[:, 1], tau[:, 1] = 0.25, torch.tensor([0.0, 0.25, 0.5, 0.75])[:b]
    noise = torch.randn(b, t, 4, 8, generator=g)
    return latents, actions, tau, d, noise


def test_loss_is_the_ramp_weighted_mean_of_eq7_terms():
    model = tiny_model(single_frame_fraction=0.0)
    latents, actions, tau, d, noise = fixed_batch()
    loss, metrics = shortcut_forcing_loss(model, latents, actions, tau=tau, d=d, noise=noise)

    noisy = add_noise(latents, noise, tau)
    prev = previous_actions(actions)
    with torch.no_grad():
        predicted = model.denoise(noisy, prev, tau, d)
        target = bootstrap_velocity_target(lambda z, t_, d_: model.denoise(z, prev, t_, d_), noisy, tau, d, 1 / 64)
    one_minus = (1 - tau)[..., None, None]
    flow = ((predicted - latents) ** 2).mean(dim=(-2, -1))
    boot = (1 - tau) ** 2 * (((predicted - noisy) / one_minus - target) ** 2).mean(dim=(-2, -1))
    is_flow = d == 1 / 64
    expected = ((0.9 * tau + 0.1) * torch.where(is_flow, flow, boot)).mean()  # Eq. 8 weight, written out
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert torch.allclose(metrics["flow_loss"] + metrics["bootstrap_loss"], loss.detach(), rtol=1e-6)
    assert torch.isclose(metrics["flow_mse"], flow[is_flow].mean(), rtol=1e-5)
    assert torch.isclose(metrics["bootstrap_mse"], boot[~is_flow].mean(), rtol=1e-4)
    assert metrics["flow_fraction"] == is_flow.float().mean()


def test_no_gradient_flows_through_the_bootstrap_target():
    model = tiny_model(single_frame_fraction=0.0)
    latents, actions, tau, d, noise = fixed_batch()
    d[:] = 0.5  # only bootstrap frames
    tau[:] = torch.tensor([0.0, 0.5, 0.0])
    loss, _ = shortcut_forcing_loss(model, latents, actions, tau=tau, d=d, noise=noise)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    noisy = add_noise(latents, noise, tau)
    prev = previous_actions(actions)

    def manual_loss(detach_target: bool) -> torch.Tensor:
        predicted = model.denoise(noisy, prev, tau, d)
        half = d / 2
        b1 = (model.denoise(noisy, prev, tau, half) - noisy) / (1 - tau)[..., None, None]
        mid = noisy + b1 * half[..., None, None]
        b2 = (model.denoise(mid, prev, tau + half, half) - mid) / (1 - tau - half)[..., None, None]
        target = (b1 + b2) / 2
        target = target.detach() if detach_target else target
        term = (1 - tau) ** 2 * (((predicted - noisy) / (1 - tau)[..., None, None] - target) ** 2).mean(dim=(-2, -1))
        return (ramp_weight(tau) * term).mean()

    detached = torch.autograd.grad(manual_loss(True), list(model.parameters()))
    through_target = torch.autograd.grad(manual_loss(False), list(model.parameters()))
    assert all(torch.allclose(a, b, atol=1e-7, rtol=1e-4) for a, b in zip(grads, detached))
    assert any(not torch.allclose(a, b, atol=1e-7, rtol=1e-4) for a, b in zip(grads, through_target))


def test_single_frame_rows_run_as_separate_frames_without_action():
    model = tiny_model().eval()
    latents, actions, tau, d, noise = fixed_batch(b=4, t=3)
    noisy = add_noise(latents, noise, tau)
    prev = previous_actions(actions)
    with torch.no_grad():
        out = denoise_with_single_frames(model, noisy, prev, tau, d, single_rows=2)
        sequences = model.denoise(noisy[:2], prev[:2], tau[:2], d[:2])
        assert torch.allclose(out[:2], sequences, atol=1e-6)
        for row in (2, 3):
            for t in range(3):
                alone = model.denoise(noisy[row : row + 1, t : t + 1], torch.tensor([[NO_ACTION]]),
                                      tau[row : row + 1, t : t + 1], d[row : row + 1, t : t + 1])
                assert torch.allclose(out[row, t], alone[0, 0], atol=1e-6)
    # In the loss, 30% of a batch of 10 rows (the last 3) are single frames: the loss equals that of
    # the first 7 rows as sequences plus that of the last 3 rows cut into 9 one-frame sequences.
    latents, actions, tau, d, noise = fixed_batch(b=10, t=3, coarse=False)
    with torch.no_grad():
        mixed = tiny_model(single_frame_fraction=0.3)
        loss = shortcut_forcing_loss(mixed, latents, actions, tau=tau, d=d, noise=noise)[0]
        plain = tiny_model(single_frame_fraction=0.0)
        sequences = shortcut_forcing_loss(plain, latents[:7], actions[:7], tau=tau[:7], d=d[:7], noise=noise[:7])[0]
        frames = shortcut_forcing_loss(
            plain, latents[7:].reshape(9, 1, 4, 8), actions[7:].reshape(9, 1),
            tau=tau[7:].reshape(9, 1), d=d[7:].reshape(9, 1), noise=noise[7:].reshape(9, 1, 4, 8),
        )[0]
    assert torch.isclose(loss, (sequences * 21 + frames * 9) / 30, rtol=1e-5)


def moving_toy_batch(b: int, t: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Toy latents with dynamics: frame = p * a fixed pattern over the 4 x 8 values; Crafter action
    1 moves p down by 0.3, action 2 up, 0 keeps it (clipped to +-0.9)."""
    pattern = torch.linspace(-1, 1, 32).view(4, 8)
    actions = torch.randint(0, 3, (b, t), generator=generator)
    position = torch.rand(b, generator=generator) * 1.2 - 0.6
    frames = []
    for step in range(t):
        frames.append(position[:, None, None] * pattern)
        move = (actions[:, step] == 2).float() - (actions[:, step] == 1).float()
        position = (position + 0.3 * move).clamp(-0.9, 0.9)
    return torch.stack(frames, dim=1), actions


def test_loss_falls_and_the_model_learns_to_use_context_and_actions():
    model = tiny_model(seed=0)
    g = torch.Generator().manual_seed(0)
    eval_latents, eval_actions = moving_toy_batch(128, 4, g)
    eval_noise = torch.randn(eval_latents.shape, generator=g)
    eval_tau = torch.randint(0, 64, (128, 4), generator=g) / 64
    d_min = torch.full_like(eval_tau, 1 / 64)

    def eval_flow_loss() -> float:
        """The loss at d = d_min on a fixed batch: a fixed objective (the bootstrap target moves)."""
        with torch.no_grad():
            return float(shortcut_forcing_loss(model, eval_latents, eval_actions, eval_tau, d_min, eval_noise)[0])

    def last_frame_error(actions: torch.Tensor, context: torch.Tensor) -> float:
        """|x^ - z1|^2 of frame 3 predicted from pure noise after 3 context frames at signal 58/64."""
        tau = torch.full((128, 4), 58 / 64)
        tau[:, 3] = 0.0
        latents = torch.cat((context[:, :3], eval_latents[:, 3:]), dim=1)
        with torch.no_grad():
            predicted = model.denoise(add_noise(latents, eval_noise, tau), previous_actions(actions), tau, d_min)
        return float((predicted[:, 3] - eval_latents[:, 3]).pow(2).mean())

    before = eval_flow_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        latents, actions = moving_toy_batch(16, 4, g)
        loss, metrics = shortcut_forcing_loss(model, latents, actions, generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss) and metrics["bootstrap_loss"] > 0
    assert eval_flow_loss() < 0.5 * before
    error = last_frame_error(eval_actions, eval_latents)
    wrong_actions = last_frame_error((eval_actions + 1) % 3, eval_latents)
    other_context = last_frame_error(eval_actions, eval_latents.roll(1, dims=0))
    assert error < 0.85 * wrong_actions and error < 0.75 * other_context, (error, wrong_actions, other_context)

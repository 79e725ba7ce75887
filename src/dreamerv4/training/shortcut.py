"""The shortcut forcing loss of the dynamics model (DreamerV4 Eq. 6-8; docs/design.md, Models).

    loss, metrics = shortcut_forcing_loss(model, latents, actions)   # latents (B,T,16,32) clean,
    loss.backward()                                                 # actions (B,T) dataset-aligned

Per frame (diffusion forcing: every frame has its own tau and d):
- d = 1/k, k a power of two up to K_max (d_min = 1/K_max = 1/64); tau uniform on d's grid
  {0, d, ..., 1 - d}, so every tau is a multiple of its d and < 1 (`sample_step_and_signal`).
  A share `bootstrap_fraction` (default 0.25) of the frames draws k uniformly from 1, 2, ..., K_max/2,
  the rest take d_min. The paper leaves the distribution over k open; uniform over all 7 sizes (a
  share of 6/7) did not learn at all on a toy task within 600 steps where 0.25 did: a constant
  prediction is an exact fixed point of the bootstrap term (its half steps are collinear), so only
  the flow frames pull the model towards the data. 0.25 is also the shortcut-model recipe.
- z~ = (1 - tau) z0 + tau z1 (z0 noise, z1 data); the model predicts x^ = f(z~, tau, d, a).
- d = d_min: flow loss |x^ - z1|^2.
- d > d_min: bootstrap in velocity space with a stop-gradient target (`bootstrap_velocity_target`):
      b'  = (f(z~, tau, d/2) - z~) / (1 - tau),     z' = z~ + b' d/2,
      b'' = (f(z', tau + d/2, d/2) - z') / (1 - (tau + d/2)),
      loss (1 - tau)^2 |(x^ - z~)/(1 - tau) - sg(b' + b'')/2|^2.
- every term weighted by w(tau) = 0.9 tau + 0.1 (Eq. 8); the loss is the mean over all frames.
Squared norms are means over the frame's L x C latent values.

Context in the bootstrap passes: the two half-step teacher passes (no grad, one batched call each)
run the whole sequence like the student pass, with each frame's own noisy context (never clean
data, which would give the target information the student lacks). Applied to the sequence as
written in Eq. 7, every bootstrap frame advances by its own d/2 in the second pass, and frames at
d_min (flow-loss frames, whose teacher outputs are not needed) are held still at (z~, tau, d_min).
A frame's d token thus tells the model how far that frame moves within one step; generation gives
context frames d_min and holds them still, which is the fixed-context case training covers.

Single frames: the last round(single_frame_fraction * B) rows of a batch (when T > 1) are cut into
B*T independent sequences of one frame with no previous action, so the model learns to generate a
first frame from nothing (one extra transformer call per pass for those rows).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from dreamerv4.models.dynamics import NO_ACTION, DynamicsModel, add_noise, previous_actions

# f(z, tau, d) -> predicted clean latents, with everything else (actions, model) bound.
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def ramp_weight(tau: torch.Tensor) -> torch.Tensor:
    """w(tau) = 0.9 tau + 0.1 (Eq. 8): low-signal frames, which carry little information, count less."""
    return 0.9 * tau + 0.1


def sample_step_and_signal(
    batch: int,
    frames: int,
    k_max: int,
    bootstrap_fraction: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame (tau, d), each (batch, frames) float32. With probability bootstrap_fraction a frame
    gets d = 2^-e, e uniform in 0..log2(k_max) - 1 (d > d_min), otherwise d = d_min = 1/k_max;
    tau is uniform on {0, d, ..., 1 - d}."""
    max_exponent = int(math.log2(k_max))
    coarse = torch.randint(0, max(max_exponent, 1), (batch, frames), generator=generator, device=device)
    bootstrap = torch.rand(batch, frames, generator=generator, device=device) < bootstrap_fraction
    exponent = torch.where(bootstrap & (max_exponent > 0), coarse, max_exponent)
    k = torch.exp2(exponent.float())
    j = torch.minimum(torch.floor(torch.rand(batch, frames, generator=generator, device=device) * k), k - 1)
    return j / k, 1.0 / k


def bootstrap_velocity_target(
    denoise: Denoiser, noisy: torch.Tensor, tau: torch.Tensor, d: torch.Tensor, d_min: float
) -> torch.Tensor:
    """sg((b' + b'') / 2) of Eq. 7 (B,T,L,C): the average velocity of two half steps of size d/2
    from (z~, tau). Frames with d <= d_min are held still at (z~, tau, d) in both passes; their
    entries are not a bootstrap target (the flow loss covers them). Runs without gradient."""
    with torch.no_grad():
        is_flow = d <= d_min * (1.0 + 1e-6)
        half = torch.where(is_flow, torch.zeros_like(d), d / 2)
        step = torch.where(is_flow, d, d / 2)
        first = denoise(noisy, tau, step)
        b_first = (first - noisy) / (1.0 - tau)[..., None, None]
        midway = noisy + b_first * half[..., None, None]
        tau_mid = tau + half
        second = denoise(midway, tau_mid, step)
        b_second = (second - midway) / (1.0 - tau_mid)[..., None, None]
        return ((b_first + b_second) / 2).detach()


def shortcut_loss_terms(
    predicted: torch.Tensor,
    noisy: torch.Tensor,
    clean: torch.Tensor,
    tau: torch.Tensor,
    target_velocity: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame (B,T) flow term |x^ - z1|^2 and bootstrap term (1 - tau)^2 |(x^ - z~)/(1 - tau) - v|^2,
    unweighted, squared norms as means over the frame's values. The bootstrap term is computed as
    |x^ - (z~ + (1 - tau) v)|^2, the same quantity without dividing by a small 1 - tau."""
    flow = (predicted - clean).pow(2).mean(dim=(-2, -1))
    one_minus_tau = (1.0 - tau)[..., None, None]
    bootstrap = (predicted - (noisy + one_minus_tau * target_velocity)).pow(2).mean(dim=(-2, -1))
    return flow, bootstrap


def denoise_with_single_frames(
    model: DynamicsModel, noisy: torch.Tensor, prev_actions: torch.Tensor, tau: torch.Tensor, d: torch.Tensor,
    single_rows: int,
) -> torch.Tensor:
    """model.denoise on (B,T,...) where the last `single_rows` rows run as B*T separate one-frame
    sequences without a previous action; returns (B,T,L,C) in the input's layout."""
    b, t = noisy.shape[:2]
    if single_rows == 0:
        return model.denoise(noisy, prev_actions, tau, d)
    m = b - single_rows
    singles = model.denoise(
        noisy[m:].reshape(single_rows * t, 1, *noisy.shape[2:]),
        torch.full((single_rows * t, 1), NO_ACTION, dtype=prev_actions.dtype, device=prev_actions.device),
        tau[m:].reshape(-1, 1),
        d[m:].reshape(-1, 1),
    ).reshape(single_rows, t, *noisy.shape[2:])
    if m == 0:
        return singles
    return torch.cat((model.denoise(noisy[:m], prev_actions[:m], tau[:m], d[:m]), singles), dim=0)


def shortcut_forcing_loss(
    model: DynamicsModel,
    latents: torch.Tensor,
    actions: torch.Tensor,
    tau: torch.Tensor | None = None,
    d: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Shortcut forcing loss of a batch: clean latents (B,T,L,C), dataset-aligned actions (B,T).

    tau, d (B,T) and noise (B,T,L,C) are drawn (from `generator` when given) unless passed.
    Returns (loss, metrics), metrics as detached 0-d tensors:
      flow_loss, bootstrap_loss: the weighted sums of each kind of frame / all frames (they add up
        to the loss); flow_mse, bootstrap_mse: unweighted means over frames of that kind;
      flow_fraction: share of frames at d_min; x_mse: |x^ - z1|^2 over all frames.
    """
    cfg = model.cfg
    b, t = latents.shape[:2]
    latents = model.to_model(latents)  # the loss lives in the model's (scaled) latent space
    if tau is None or d is None:
        tau, d = sample_step_and_signal(
            b, t, cfg.k_max, cfg.bootstrap_fraction, generator=generator, device=latents.device
        )
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    noisy = add_noise(latents, noise, tau)
    prev = previous_actions(actions)
    single_rows = round(cfg.single_frame_fraction * b) if t > 1 else 0

    def denoise(z: torch.Tensor, tau_: torch.Tensor, d_: torch.Tensor) -> torch.Tensor:
        return denoise_with_single_frames(model, z, prev, tau_, d_, single_rows)

    predicted = denoise(noisy, tau, d)
    is_flow = d <= cfg.d_min * (1.0 + 1e-6)
    if bool(is_flow.all()):
        target_velocity = torch.zeros_like(noisy)
    else:
        target_velocity = bootstrap_velocity_target(denoise, noisy, tau, d, cfg.d_min)
    flow, bootstrap = shortcut_loss_terms(predicted, noisy, latents, tau, target_velocity)
    weight = ramp_weight(tau)
    frames = float(b * t)
    flow_loss = (weight * flow * is_flow).sum() / frames
    bootstrap_loss = (weight * bootstrap * ~is_flow).sum() / frames
    num_flow = is_flow.sum()
    num_bootstrap = (~is_flow).sum()
    metrics = {
        "flow_loss": flow_loss.detach(),
        "bootstrap_loss": bootstrap_loss.detach(),
        "flow_mse": ((flow * is_flow).sum() / num_flow.clamp_min(1)).detach(),
        "bootstrap_mse": ((bootstrap * ~is_flow).sum() / num_bootstrap.clamp_min(1)).detach(),
        "flow_fraction": (num_flow / frames).detach(),
        "x_mse": flow.mean().detach(),
    }
    return flow_loss + bootstrap_loss, metrics

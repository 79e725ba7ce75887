"""Phase 3 objectives on imagined trajectories: lambda-returns, the PMPO policy loss and the value loss.

Pure functions on tensors (DreamerV4 section 3.3; docs/paper.md); `training/imagine.py` drives them.

    returns = lambda_returns(rewards, values, gamma=0.997, lam=0.95)   # rewards (B,H), values (B,H+1)
    advantages = returns - values[:, :-1]                              # only the sign is used
    loss, stats = pmpo_loss(log_probs, advantages, kl_to_prior, alpha=0.5, beta=0.3)
    v_loss = value_loss(value_logits, returns, two_hot)                # two-hot CE on sg(returns)

Indexing: at imagined state s_t (t = 0..H-1) the policy picks a_t and r_t is the reward received for
it; values[:, t] = v(s_t) for t = 0..H, the last one (the last imagined state) only bootstraps.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


def lambda_returns(
    rewards: torch.Tensor,
    values: torch.Tensor,
    continues: torch.Tensor | None = None,
    gamma: float = 0.997,
    lam: float = 0.95,
) -> torch.Tensor:
    """TD(lambda) returns (..., H): R_t = r_t + gamma c_t ((1 - lam) v_{t+1} + lam R_{t+1}), R_H = v_H.

    rewards (..., H) r_t for the action at s_t; values (..., H+1) v(s_0) .. v(s_H); continues (..., H)
    c_t in [0, 1], the probability that the episode goes on after step t (None: always 1, e.g.
    Crafter without a termination model). lam = 0 gives one-step TD targets r_t + gamma c_t v_{t+1};
    lam = 1 the discounted sum of the rewards plus the discounted bootstrap value v_H.
    Computed in float32; inputs are not differentiated through by callers (use detached tensors).
    """
    if not 0.0 <= gamma <= 1.0 or not 0.0 <= lam <= 1.0:
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    horizon = rewards.shape[-1]
    if values.shape[:-1] != rewards.shape[:-1] or values.shape[-1] != horizon + 1:
        raise ValueError(
            f"values must be (..., H+1) = {(*rewards.shape[:-1], horizon + 1)} for rewards {tuple(rewards.shape)}, "
            f"got {tuple(values.shape)}"
        )
    if continues is None:
        continues = torch.ones_like(rewards, dtype=torch.float32)
    elif continues.shape != rewards.shape:
        raise ValueError(f"continues must have the rewards' shape {tuple(rewards.shape)}, got {tuple(continues.shape)}")
    rewards, values, continues = rewards.float(), values.float(), continues.float()
    next_return = values[..., horizon]
    returns = []
    for t in reversed(range(horizon)):
        next_return = rewards[..., t] + gamma * continues[..., t] * (
            (1.0 - lam) * values[..., t + 1] + lam * next_return
        )
        returns.append(next_return)
    return torch.stack(returns[::-1], dim=-1)


def pmpo_loss(
    log_probs: torch.Tensor,
    advantages: torch.Tensor,
    kl_to_prior: torch.Tensor,
    alpha: float = 0.5,
    beta: float = 0.3,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PMPO (DreamerV4 Eq. 11; docs/paper.md), minimized:

        (1 - alpha)/|D-| sum_{D-} ln pi(a|s) - alpha/|D+| sum_{D+} ln pi(a|s) + beta/N sum KL(pi || prior)

    log_probs (...) ln pi(a|s) of the sampled actions (with grad); advantages (...) A = R - v, of
    which only the sign counts (D+: A > 0, D-: A < 0; A = 0 joins neither), so no advantage
    normalization is needed; kl_to_prior (...) KL(pi || prior) per state (with grad). mask (...)
    bool selects the N samples that count (None: all). An empty D+ or D- contributes 0 (no
    division by zero). Minimizing raises ln pi on D+ and lowers it on D-, each set weighted as a
    whole, so the balance of positive and negative samples does not tilt the update.
    Returns (loss, stats): stats has detached "pos_frac" |D+|/N, "neg_frac" |D-|/N and "kl" mean KL.
    """
    if not 0.0 <= alpha <= 1.0 or beta < 0.0:
        raise ValueError(f"alpha must be in [0, 1] and beta >= 0, got alpha={alpha}, beta={beta}")
    if log_probs.shape != advantages.shape or kl_to_prior.shape != advantages.shape:
        raise ValueError(
            f"log_probs {tuple(log_probs.shape)}, advantages {tuple(advantages.shape)} and kl_to_prior "
            f"{tuple(kl_to_prior.shape)} must have one shape"
        )
    log_probs, kl_to_prior = log_probs.float(), kl_to_prior.float()
    advantages = advantages.detach()
    valid = torch.ones_like(advantages, dtype=torch.bool) if mask is None else mask.bool()
    positive = ((advantages > 0) & valid).float()
    negative = ((advantages < 0) & valid).float()
    count = valid.float().sum()
    n_pos, n_neg = positive.sum(), negative.sum()
    # clamp_min(1): an empty set has a zero sum, so its term is 0 rather than 0/0.
    pos_term = (positive * log_probs).sum() / n_pos.clamp_min(1.0)
    neg_term = (negative * log_probs).sum() / n_neg.clamp_min(1.0)
    kl = (valid.float() * kl_to_prior).sum() / count.clamp_min(1.0)
    loss = (1.0 - alpha) * neg_term - alpha * pos_term + beta * kl
    stats = {
        "pos_frac": (n_pos / count.clamp_min(1.0)).detach(),
        "neg_frac": (n_neg / count.clamp_min(1.0)).detach(),
        "kl": kl.detach(),
    }
    return loss, stats


class TwoHotLike(Protocol):
    """What value_loss needs from a two-hot distribution (models/heads.py TwoHot)."""

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> Any: ...


def value_loss(value_logits: torch.Tensor, returns: torch.Tensor, two_hot: TwoHotLike,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean two-hot cross-entropy of value_logits (..., bins) against the stop-gradient returns (...),
    over the entries where `mask` (...) is True (None: all; an empty mask gives 0)."""
    if value_logits.shape[:-1] != returns.shape:
        raise ValueError(
            f"value_logits (..., bins) must match returns {tuple(returns.shape)}, got {tuple(value_logits.shape)}"
        )
    nll = two_hot.loss(value_logits.float(), returns.detach().float())
    if mask is None:
        return nll.mean()
    valid = mask.float()
    return (nll * valid).sum() / valid.sum().clamp_min(1.0)

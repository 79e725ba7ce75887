"""Lambda-returns and PMPO on hand-made tensors: values computed by hand, the TD(0) and Monte-Carlo
limits, the direction and normalization of the PMPO gradient, empty sets, and the KL term."""

from __future__ import annotations

import pytest
import torch

from dreamerv4.actions import get_action_space
from dreamerv4.training.returns import lambda_returns, pmpo_loss, value_loss


def test_lambda_returns_by_hand_three_steps():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, -1.0, 4.0]])  # v(s_0) .. v(s_3); v(s_3) bootstraps
    continues = torch.tensor([[1.0, 0.5, 1.0]])
    gamma, lam = 0.9, 0.8
    r3 = 4.0
    r2 = 2.0 + gamma * 1.0 * ((1 - lam) * 4.0 + lam * r3)  # 5.6
    r1 = 0.0 + gamma * 0.5 * ((1 - lam) * -1.0 + lam * r2)  # 1.926
    r0 = 1.0 + gamma * 1.0 * ((1 - lam) * 1.0 + lam * r1)  # 2.56672
    out = lambda_returns(rewards, values, continues, gamma=gamma, lam=lam)
    assert out.shape == (1, 3)
    assert torch.allclose(out, torch.tensor([[r0, r1, r2]]), atol=1e-6)
    assert abs(r0 - 2.56672) < 1e-9


def test_lambda_zero_is_one_step_td_and_one_is_monte_carlo():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(4, 5, generator=g)
    values = torch.randn(4, 6, generator=g)
    gamma = 0.97
    td = lambda_returns(rewards, values, gamma=gamma, lam=0.0)
    assert torch.allclose(td, rewards + gamma * values[:, 1:], atol=1e-6)

    mc = lambda_returns(rewards, values, gamma=gamma, lam=1.0)
    horizon = rewards.shape[1]
    for t in range(horizon):
        discounts = gamma ** torch.arange(horizon - t, dtype=torch.float32)
        expected = (rewards[:, t:] * discounts).sum(1) + gamma ** (horizon - t) * values[:, -1]
        assert torch.allclose(mc[:, t], expected, atol=1e-5)
    # Intermediate values do not enter the Monte-Carlo return; they do enter TD(0).
    changed = values.clone()
    changed[:, 1:-1] += 10.0
    assert torch.allclose(lambda_returns(rewards, changed, gamma=gamma, lam=1.0), mc)
    assert not torch.allclose(lambda_returns(rewards, changed, gamma=gamma, lam=0.0), td)


def test_lambda_returns_termination_cuts_the_future():
    rewards = torch.tensor([[1.0, 5.0]])
    values = torch.tensor([[0.0, 3.0, 7.0]])
    out = lambda_returns(rewards, values, torch.tensor([[0.0, 1.0]]), gamma=0.99, lam=0.95)
    assert out[0, 0] == 1.0  # episode over after step 0: nothing after it counts


def test_lambda_returns_rejects_bad_shapes():
    with pytest.raises(ValueError, match="H\\+1"):
        lambda_returns(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="continues"):
        lambda_returns(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="gamma"):
        lambda_returns(torch.zeros(2, 3), torch.zeros(2, 4), gamma=1.5)


def _pmpo_grad(log_probs: torch.Tensor, advantages: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    log_probs = log_probs.clone().requires_grad_(True)
    loss, _ = pmpo_loss(log_probs, advantages, torch.zeros_like(log_probs), **kwargs)
    loss.backward()
    return loss.detach(), log_probs.grad


def test_pmpo_raises_positive_and_lowers_negative_log_probs_by_set_size():
    log_probs = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    advantages = torch.tensor([0.7, -0.1, -4.0, -0.01])  # one positive, three negative samples
    loss, grad = _pmpo_grad(log_probs, advantages, alpha=0.5, beta=0.0)
    # Gradient descent moves ln pi against the gradient: up on D+, down on D-.
    assert grad[0] < 0 and (grad[1:] > 0).all()
    # Each set is weighted as a whole: alpha / |D+| and (1 - alpha) / |D-|, magnitudes ignored.
    assert torch.allclose(grad, torch.tensor([-0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3]))
    assert torch.allclose(loss, torch.tensor(0.5 * (-5.5) / 3 - 0.5 * -1.0))
    # alpha shifts the weight between the sets.
    _, grad = _pmpo_grad(log_probs, advantages, alpha=0.8, beta=0.0)
    assert torch.allclose(grad, torch.tensor([-0.8, 0.2 / 3, 0.2 / 3, 0.2 / 3]))


def test_pmpo_uses_only_the_sign_of_the_advantage():
    log_probs = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    a = torch.tensor([0.7, -0.1, -4.0, 2.0])
    assert torch.equal(_pmpo_grad(log_probs, a)[1], _pmpo_grad(log_probs, a * 1000.0)[1])
    assert torch.equal(_pmpo_grad(log_probs, a)[1], _pmpo_grad(log_probs, torch.sign(a))[1])


def test_pmpo_normalizes_by_set_sizes():
    log_probs = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    advantages = torch.tensor([0.7, 1.5, -4.0, -1.0])
    loss, _ = _pmpo_grad(log_probs, advantages, beta=0.0)
    # Every positive sample twice: the mean over D+ is unchanged (a plain mean over N would not be).
    doubled = torch.cat([log_probs, log_probs[:2]]), torch.cat([advantages, advantages[:2]])
    assert torch.allclose(_pmpo_grad(*doubled, beta=0.0)[0], loss)
    # Same for the negatives.
    doubled = torch.cat([log_probs, log_probs[2:]]), torch.cat([advantages, advantages[2:]])
    assert torch.allclose(_pmpo_grad(*doubled, beta=0.0)[0], loss)


def test_pmpo_empty_sets_and_zero_advantages():
    log_probs = torch.tensor([-1.0, -2.0, -0.5])
    loss, grad = _pmpo_grad(log_probs, torch.tensor([1.0, 2.0, 0.0]), alpha=0.5, beta=0.0)  # no D-
    assert torch.isfinite(loss) and torch.allclose(loss, torch.tensor(-0.5 * -1.5))
    assert torch.allclose(grad, torch.tensor([-0.25, -0.25, 0.0]))  # A = 0 joins neither set
    loss, grad = _pmpo_grad(log_probs, torch.tensor([-1.0, -2.0, -3.0]), alpha=0.5, beta=0.0)  # no D+
    assert torch.isfinite(loss) and (grad > 0).all()
    loss, grad = _pmpo_grad(log_probs, torch.zeros(3), beta=0.0)
    assert loss == 0 and torch.equal(grad, torch.zeros(3))


def test_pmpo_mask_drops_samples():
    log_probs = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    advantages = torch.tensor([0.7, 1.5, -4.0, -1.0])
    mask = torch.tensor([True, False, True, False])
    masked, _ = _pmpo_grad(log_probs, advantages, mask=mask, beta=0.0)
    kept, _ = _pmpo_grad(log_probs[mask], advantages[mask], beta=0.0)
    assert torch.allclose(masked, kept)


def test_pmpo_kl_term_is_zero_at_the_prior_and_pulls_towards_it():
    space = get_action_space("crafter")
    g = torch.Generator().manual_seed(0)
    prior = torch.randn(6, space.num_logits, generator=g)
    policy = prior.clone().requires_grad_(True)
    kl = space.kl(policy, prior)  # reverse KL(pi || prior)
    advantages = torch.randn(6, generator=g)
    log_probs = space.log_prob(policy, space.sample(prior, generator=g))
    loss, stats = pmpo_loss(log_probs, advantages, kl, beta=0.3)
    assert stats["kl"].abs() < 1e-6
    no_kl, _ = pmpo_loss(log_probs, advantages, kl, beta=0.0)
    assert torch.allclose(loss, no_kl)

    # Away from the prior the term is positive and one gradient step on it moves towards the prior.
    policy = (prior + torch.randn(6, space.num_logits, generator=g)).requires_grad_(True)
    kl = space.kl(policy, prior)
    loss, stats = pmpo_loss(torch.zeros(6), torch.zeros(6), kl, beta=0.3)
    assert stats["kl"] > 0 and torch.allclose(loss, 0.3 * kl.mean())
    loss.backward()
    with torch.no_grad():
        assert space.kl(policy - 0.5 * policy.grad, prior).mean() < kl.mean()


def test_pmpo_stats_and_bad_input():
    _, stats = pmpo_loss(torch.zeros(4), torch.tensor([1.0, -1.0, 2.0, 0.0]), torch.zeros(4))
    assert stats["pos_frac"] == 0.5 and stats["neg_frac"] == 0.25
    with pytest.raises(ValueError, match="one shape"):
        pmpo_loss(torch.zeros(4), torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="alpha"):
        pmpo_loss(torch.zeros(4), torch.zeros(4), torch.zeros(4), alpha=1.5)


def test_value_loss_mask_averages_only_the_kept_entries():
    from dreamerv4.models.heads import TwoHot

    two_hot = TwoHot(11, -2.0, 2.0)
    logits = torch.randn(2, 3, 11)
    returns = torch.randn(2, 3)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    per_entry = two_hot.loss(logits, returns)
    assert torch.allclose(value_loss(logits, returns, two_hot, mask=mask), per_entry[mask].mean())
    assert torch.allclose(value_loss(logits, returns, two_hot), per_entry.mean())
    assert float(value_loss(logits, returns, two_hot, mask=torch.zeros(2, 3, dtype=torch.bool))) == 0.0

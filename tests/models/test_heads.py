"""symlog/symexp and the two-hot distribution: round trips, the loss's minimum, clipping; the MLP head."""

from __future__ import annotations

import pytest
import torch

from dreamerv4.models.heads import MLPHead, TwoHot, symexp, symlog


def test_symlog_symexp_inverse_and_shape():
    x = torch.tensor([-1e6, -100.0, -1.0, -0.1, 0.0, 0.1, 1.0, 100.0, 1e6])
    assert torch.allclose(symexp(symlog(x)), x, rtol=1e-5)
    assert symlog(torch.tensor(0.0)) == 0 and torch.allclose(symlog(torch.tensor(1.0)), torch.log(torch.tensor(2.0)))


def test_two_hot_encode_weights_and_round_trip():
    two_hot = TwoHot()
    assert two_hot.bins.shape == (255,) and two_hot.bins[0] == -20 and two_hot.bins[-1] == 20
    values = torch.tensor([0.0, 0.1, -0.1, 1.0, 0.37, -3.3, 17.0, 1234.5, -9876.0])
    probs = two_hot.encode(values)
    assert probs.shape == (9, 255)
    assert torch.allclose(probs.sum(-1), torch.ones(9))
    assert ((probs > 0).sum(-1) <= 2).all()
    nonzero = [torch.nonzero(p).flatten() for p in probs]
    assert all(len(i) == 1 or i[1] - i[0] == 1 for i in nonzero)  # neighbouring bins only
    # Expected bin equals symlog(value): the two-hot is an exact linear interpolation.
    assert torch.allclose((probs * two_hot.bins).sum(-1), symlog(values), atol=1e-5)
    # Round trip through logits: decode(log(encode(x))) within the bin resolution (here: far better).
    decoded = two_hot.decode(torch.log(probs))
    assert torch.allclose(symlog(decoded), symlog(values), atol=two_hot.resolution)
    assert torch.allclose(decoded, values, rtol=1e-4, atol=1e-5)
    assert two_hot.decode(torch.zeros(255)).abs() < 1e-5  # uniform logits decode to 0 (symmetric bins)


def test_two_hot_clips_beyond_the_range():
    two_hot = TwoHot(num_bins=11, low=-2.0, high=2.0)
    probs = two_hot.encode(torch.tensor([1e9, -1e9]))
    assert probs[0, -1] == 1 and probs[1, 0] == 1


def test_two_hot_loss_is_minimized_at_the_target():
    two_hot = TwoHot()
    target = torch.tensor([0.0, 2.5, -0.7, 40.0])
    probs = two_hot.encode(target)
    best = torch.log(probs.clamp_min(1e-12))
    loss_best = two_hot.loss(best, target)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
    assert torch.allclose(loss_best, entropy, atol=1e-4)  # CE(p, p) = H(p): the minimum
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        other = best + torch.randn(best.shape, generator=g)
        loss_other = two_hot.loss(other, target)
        assert (loss_other >= loss_best - 1e-6).all() and loss_other.sum() > loss_best.sum()
    # Gradient descent on free logits drives the decoded value to the target.
    logits = torch.zeros(4, 255, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        two_hot.loss(logits, target).sum().backward()
        opt.step()
    assert torch.allclose(two_hot.decode(logits.detach()), target, rtol=0.05, atol=0.05)


def test_two_hot_rejects_wrong_shapes():
    two_hot = TwoHot()
    with pytest.raises(ValueError, match="255"):
        two_hot.decode(torch.zeros(3, 17))
    with pytest.raises(ValueError, match="shape"):
        two_hot.loss(torch.zeros(3, 255), torch.zeros(4))
    with pytest.raises(ValueError):
        TwoHot(num_bins=1)


def test_mlp_head_zero_init_and_gradients():
    torch.manual_seed(0)
    head = MLPHead(16, 32, 255, layers=2, zero_init=True)
    x = torch.randn(4, 16)
    assert torch.equal(head(x), torch.zeros(4, 255))
    plain = MLPHead(16, 32, 10, layers=1)
    y = plain(x.requires_grad_())
    assert y.shape == (4, 10) and y.abs().sum() > 0
    y.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in plain.parameters())

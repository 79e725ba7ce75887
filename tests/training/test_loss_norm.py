"""Tests of RunningRMS (src/dreamerv4/training/loss_norm.py).

    pytest tests/training/test_loss_norm.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from dreamerv4.training.loss_norm import RunningRMS


def test_normalized_loss_matches_bias_corrected_ema_and_keeps_gradient_direction():
    norm = RunningRMS(decay=0.9)
    values = [2.0, 4.0, 1.0, 3.0]
    ema = 0.0
    for k, v in enumerate(values, start=1):
        x = torch.tensor(v, requires_grad=True)
        out = norm(x)
        ema = 0.9 * ema + 0.1 * v * v
        expected_rms = math.sqrt(ema / (1 - 0.9**k))
        assert out.item() == pytest.approx(v / expected_rms, rel=1e-6)
        out.backward()
        assert x.grad.item() == pytest.approx(1 / expected_rms, rel=1e-6)  # the divisor carries no gradient
    assert int(norm.count) == 4


def test_constant_loss_normalizes_to_one_and_eval_mode_does_not_update():
    norm = RunningRMS()
    for _ in range(5):
        assert norm(torch.tensor(0.25)).item() == pytest.approx(1.0, rel=1e-6)
    state = {k: v.clone() for k, v in norm.state_dict().items()}
    norm.eval()
    assert norm(torch.tensor(0.5)).item() == pytest.approx(2.0, rel=1e-6)
    assert all(torch.equal(state[k], v) for k, v in norm.state_dict().items())


def test_state_dict_round_trip_restores_the_statistic():
    a = RunningRMS()
    for v in (1.0, 5.0, 2.0):
        a(torch.tensor(v))
    b = RunningRMS()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.rms(), b.rms())
    assert RunningRMS().rms().item() == 1.0  # no statistic yet: the loss passes through unchanged

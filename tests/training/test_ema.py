"""Tests of the weight average (src/dreamerv4/training/ema.py) and its use by the training loop.

    pytest tests/training/test_ema.py -q
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dreamerv4.checkpoint import load_checkpoint
from dreamerv4.errors import ConfigError
from dreamerv4.training.ema import WeightEMA, inference_state
from dreamerv4.training.loop import TrainConfig, load_weights
from training.test_loop import ToyModel, assert_same_state, base_cfg, crash_on_call, run_toy


def test_update_follows_the_warmed_up_decay_by_hand():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = WeightEMA(model, decay=0.5)
    expected = 0.0
    for t, value in enumerate([4.0, 8.0, -2.0, 6.0], start=1):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update()
        decay = min(0.5, (1 + t) / (10 + t))  # t=1: 2/11; from t=9 on it would be 0.5
        expected = decay * expected + (1 - decay) * value
        assert ema.shadow[0][0, 0].item() == pytest.approx(expected, rel=1e-6)
    assert ema.updates == 4


def test_swapped_into_lends_the_average_and_gives_the_weights_back():
    torch.manual_seed(0)
    model = ToyModel()
    ema = WeightEMA(model, decay=0.9)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped_into():
        inside = {k: v.clone() for k, v in model.state_dict().items()}
    for name, value in model.state_dict().items():
        assert torch.equal(value, moved[name]), name  # the trained weights are back
    weight = "net.0.weight"
    decay = 2 / 11
    assert torch.allclose(inside[weight], decay * trained[weight] + (1 - decay) * moved[weight])
    assert torch.equal(ema.model_state()[weight], inside[weight])
    # Buffers (LayerNorm has none; running stats would be) and non-averaged keys come from the model.
    assert set(ema.model_state()) == set(model.state_dict())


def test_bad_decay_is_rejected():
    with pytest.raises(ValueError, match="ema_decay"):
        WeightEMA(nn.Linear(1, 1), decay=1.0)
    with pytest.raises((ValueError, ConfigError), match="ema_decay"):
        TrainConfig(ema_decay=1.5)


def test_loop_saves_the_average_and_later_phases_load_it(tmp_path):
    summary, model, _ = run_toy(tmp_path, base_cfg(ema_decay=0.9))
    ckpt = load_checkpoint(summary.checkpoint)
    assert ckpt["ema_updates"] == 40
    assert inference_state(ckpt) is ckpt["ema_model"]
    # The average trails the last weights: different from them, and from the initial weights.
    assert not torch.equal(ckpt["ema_model"]["net.0.weight"], ckpt["model"]["net.0.weight"])
    loaded = ToyModel()
    load_weights(loaded, summary.checkpoint)
    assert torch.equal(loaded.state_dict()["net.0.weight"], ckpt["ema_model"]["net.0.weight"])
    # Without ema_decay nothing changes: later phases get the trained weights.
    plain, plain_model, _ = run_toy(tmp_path / "plain", base_cfg())
    plain_ckpt = load_checkpoint(plain.checkpoint)
    assert "ema_model" not in plain_ckpt and inference_state(plain_ckpt) is plain_ckpt["model"]


def test_resume_restores_the_average_exactly(tmp_path):
    cfg = base_cfg(ema_decay=0.9)
    _, reference_model, _ = run_toy(tmp_path / "ref", cfg)
    reference = load_checkpoint(tmp_path / "ref" / "checkpoint.pt")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_toy(tmp_path / "crash", cfg, loss_wrapper=crash_on_call(24))  # last checkpoint at step 20
    run_toy(tmp_path / "crash", cfg, resume=True)
    resumed = load_checkpoint(tmp_path / "crash" / "checkpoint.pt")
    assert resumed["ema_updates"] == reference["ema_updates"]
    for name, value in reference["ema_model"].items():
        assert torch.equal(resumed["ema_model"][name], value), name
    loaded_a, loaded_b = ToyModel(), ToyModel()
    loaded_a.load_state_dict(resumed["model"])
    loaded_b.load_state_dict(reference["model"])
    assert_same_state(loaded_a, loaded_b)


def test_switching_the_average_on_at_resume_starts_it_from_the_restored_weights(tmp_path, capsys):
    run_toy(tmp_path, base_cfg(steps=20))
    run_toy(tmp_path, base_cfg(steps=21, ema_decay=0.9), resume=True)
    assert "has no weight average" in capsys.readouterr().err
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["ema_updates"] == 1

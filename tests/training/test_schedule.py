"""Tests of the optimizer and its schedule (src/dreamerv4/training/schedule.py).

    pytest tests/training/test_schedule.py -q -x
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dreamerv4.training.schedule import lr_factor, param_groups

from .toy_run import base_cfg


def test_schedule_values():
    kw = dict(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_factor(0, **kw) == pytest.approx(0.1)  # first warmup update: 1/10
    assert lr_factor(4, **kw) == pytest.approx(0.5)
    assert lr_factor(9, **kw) == pytest.approx(1.0)  # warmup done
    assert lr_factor(10, **kw) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_factor(60, **kw) == pytest.approx(0.55)  # half way: (1 + 0.1) / 2
    assert lr_factor(110, **kw) == pytest.approx(0.1)  # floor lr * min_lr_ratio
    assert lr_factor(500, **kw) == pytest.approx(0.1)
    assert lr_factor(35, **kw) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)


def test_loop_applies_the_schedule(reference):
    cfg = base_cfg()
    for step, lr, *_ in reference["curve"]:  # record of step s used the lr of update index s - 1
        factor = lr_factor(step - 1, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, min_lr_ratio=0.1)
        assert lr == pytest.approx(cfg.lr * factor, rel=1e-12)


def test_weight_decay_groups():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 4)
            self.proj = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.tokens = nn.Parameter(torch.zeros(3, 4))
            self.frozen = nn.Linear(4, 4).requires_grad_(False)

    net = Net()
    decay, no_decay = param_groups(net, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in net.named_parameters()}
    assert [names[id(p)] for p in decay["params"]] == ["proj.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["embed.weight", "norm.bias", "norm.weight",
                                                                "proj.bias", "tokens"]

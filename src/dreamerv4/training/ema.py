"""Exponential moving average of a model's weights, the copy later phases load (`train.ema_decay`).

The training loop (`training/loop.py`) keeps one when `train.ema_decay > 0`: after every applied
update, ema <- ema + (1 - d_t) (weights - ema) with d_t = min(ema_decay, (1 + t) / (10 + t)) for the
t-th update (the warm-up keeps the average from remembering the random initialisation for ~1/(1-d)
steps). Checkpoints store it as "ema_model" beside the raw "model" (which resume keeps training);
`inference_state(ckpt)` is what every loader uses, so eval, tokenize and later phases read the
average. The loop's image and eval hooks run on it too (`swapped_into`).

    ema = WeightEMA(model, decay=0.999)   # follows this model's parameters from now on
    ...optimizer.step(); ema.update()
    with ema.swapped_into():              # the model holds the averaged weights inside the block
        evaluate(model)
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn


class WeightEMA:
    """fp32 moving average of `model`'s floating-point parameters (buffers are taken from the model
    when the state is read: they are not trained). Holds the parameter tensors themselves, so it
    follows in-place updates (optimizers) and must be made after the model is on its device."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.model = model
        named = [(name, p) for name, p in model.named_parameters() if p.is_floating_point()]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights into the average (call after each applied update)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - decay)

    def model_state(self) -> dict[str, torch.Tensor]:
        """A full state_dict of the model with the averaged parameters in place of the trained ones."""
        averaged = dict(zip(self.names, self.shadow))
        return {k: averaged[k].to(v.dtype, copy=True) if k in averaged else v.detach().clone()
                for k, v in self.model.state_dict().items()}

    def load_model_state(self, state: dict[str, torch.Tensor], updates: int) -> None:
        """Restore from a checkpoint's "ema_model" (a `model_state`) and its update count."""
        missing = [name for name in self.names if name not in state]
        if missing:
            raise KeyError(f"EMA weights do not match the model (missing {missing[:3]})")
        for name, value in zip(self.names, self.shadow):
            if state[name].shape != value.shape:
                raise ValueError(f"EMA weight {name}: shape {tuple(state[name].shape)}, model {tuple(value.shape)}")
            value.copy_(state[name])
        self.updates = int(updates)

    @contextlib.contextmanager
    def swapped_into(self) -> Iterator[None]:
        """Inside the block the model's parameters hold the average; the trained ones come back after."""
        params = self.params
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, value in zip(params, self.shadow):
                p.copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(params, saved):
                    p.copy_(value)


def inference_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a later phase should load from a training checkpoint: the moving average when
    the run kept one, else the trained weights."""
    return ckpt["ema_model"] if "ema_model" in ckpt else ckpt["model"]

"""A toy regression run of the shared training loop, for the loop's tests (test_loop, test_resume,
test_runtime, test_schedule): y = tanh(x W) learned by a small MLP with dropout, input noise and a
running-RMS loss normalizer, so every RNG stream and the extra state take part."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from dreamerv4.training.config import TrainConfig
from dreamerv4.training.logging import read_metrics
from dreamerv4.training.loop import train
from dreamerv4.training.loss_norm import RunningRMS


class ToyDataset(Dataset):
    """Deterministic regression: y = tanh(x W) for 64 fixed inputs."""

    def __init__(self, n: int = 64, dim: int = 8):
        rng = np.random.default_rng(123)
        self.x = rng.normal(size=(n, dim)).astype(np.float32)
        self.y = np.tanh(self.x @ rng.normal(size=(dim, 2)).astype(np.float32))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": torch.from_numpy(self.x[i]), "y": torch.from_numpy(self.y[i])}


class ToyModel(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, width), nn.LayerNorm(width), nn.GELU(), nn.Dropout(0.1),
                                 nn.Linear(width, 2))
        self.offset = nn.Parameter(torch.zeros(2))  # a bare learned parameter, like a learned token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.offset


def make_loss(norm: RunningRMS, sleep_s: float = 0.0):
    """MSE normalized by a running RMS; input noise and dropout draw from the torch RNG."""

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]):
        if sleep_s:
            time.sleep(sleep_s)
        pred = model(batch["x"] + 0.01 * torch.randn_like(batch["x"]))
        mse = F.mse_loss(pred.float(), batch["y"])
        return norm(mse), {"mse": mse.detach()}

    return loss_fn


def fresh() -> tuple[ToyModel, RunningRMS]:
    """New objects with the same initial weights, and the same global RNG afterwards (as a new process)."""
    torch.manual_seed(0)
    model, norm = ToyModel(), RunningRMS()
    torch.manual_seed(1)
    np.random.seed(1)
    return model, norm


def base_cfg(**overrides) -> TrainConfig:
    values = dict(steps=40, batch_size=8, lr=1e-2, warmup_steps=5, log_every=1, ckpt_every=10,
                  precision="fp32", device="cpu", tensorboard=False, image_every=0, seed=3)
    values.update(overrides)
    return TrainConfig(**values)


def run_toy(run_dir: Path, cfg: TrainConfig, *, resume: bool = False, loss_wrapper=None, sleep_s: float = 0.0,
            **kwargs):
    model, norm = fresh()
    loss_fn = make_loss(norm, sleep_s)
    if loss_wrapper is not None:
        loss_fn = loss_wrapper(loss_fn)
    summary = train(model, ToyDataset(), loss_fn, cfg, run_dir, resume=resume, extra_state={"mse": norm}, **kwargs)
    return summary, model, norm


def crash_on_call(call: int):
    """Wraps a loss function so its `call`-th call raises, as if the process died mid-step."""

    def wrap(loss_fn):
        calls = {"n": 0}

        def wrapped(model, batch):
            calls["n"] += 1
            if calls["n"] == call:
                raise RuntimeError("simulated crash")
            return loss_fn(model, batch)

        return wrapped

    return wrap


def train_curve(run_dir: Path) -> list[tuple]:
    return [(r["step"], r["lr"], r["loss"], r["mse"], r["grad_norm"]) for r in read_metrics(run_dir, "train")]


def assert_same_state(model_a: nn.Module, model_b: nn.Module) -> None:
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs"


def subprocess_main(run_dir: str) -> None:
    """Body of the process the SIGKILL/SIGTERM test starts: the reference run, slowed down."""
    summary, _, _ = run_toy(Path(run_dir), base_cfg(), sleep_s=0.03)
    print(json.dumps({"stop_reason": summary.stop_reason, "step": summary.step}))

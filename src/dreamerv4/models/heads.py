"""Output heads of the agent: symlog/symexp, the two-hot distribution over 255 bins, a small MLP.

    two_hot = TwoHot()                        # 255 bins uniform in symlog space on [-20, 20] (DreamerV3)
    probs = two_hot.encode(rewards)           # (...) -> (..., 255), two neighbouring bins carry the mass
    values = two_hot.decode(logits)           # (..., 255) -> (...): symexp(E_softmax[bin])
    nll = two_hot.loss(logits, rewards)       # (...) cross-entropy against the two-hot target
    head = MLPHead(256, 256, 255, layers=2, zero_init=True)

Reward and value heads predict a distribution over bins b_i = linspace(low, high, n) that live in
symlog space (symlog(x) = sign(x) ln(1 + |x|)): a target x is written as the two-hot vector that puts
weight on the two bins around symlog(x) (linear interpolation, so the expected bin equals symlog(x)
exactly inside the range), and a prediction is decoded as symexp(sum_i softmax(logits)_i b_i). The
cross-entropy against the two-hot target makes the loss scale-free in the value's magnitude
(DreamerV3, Hafner et al. 2023, "symexp twohot"; DreamerV4 uses it for reward and value).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dreamerv4.models.transformer import RMSNorm


def symlog(x: torch.Tensor) -> torch.Tensor:
    """sign(x) ln(1 + |x|)."""
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: torch.Tensor) -> torch.Tensor:
    """sign(x) (exp(|x|) - 1), the inverse of symlog."""
    return torch.sign(x) * torch.expm1(x.abs())


class TwoHot:
    """Two-hot encoding over `num_bins` bins spaced uniformly in symlog space on [low, high].

    Values beyond symexp(low/high) are clipped to the edge bins. Everything computes in float32.
    Not an nn.Module (no parameters); the bins move to the logits' device on use.
    """

    def __init__(self, num_bins: int = 255, low: float = -20.0, high: float = 20.0):
        if num_bins < 2 or not low < high:
            raise ValueError(f"TwoHot needs num_bins >= 2 and low < high, got {num_bins}, [{low}, {high}]")
        self.num_bins, self.low, self.high = num_bins, float(low), float(high)
        self.bins = torch.linspace(low, high, num_bins, dtype=torch.float32)

    def _bins(self, device: torch.device) -> torch.Tensor:
        if self.bins.device != device:
            self.bins = self.bins.to(device)
        return self.bins

    @property
    def resolution(self) -> float:
        """Spacing of the bins in symlog space."""
        return (self.high - self.low) / (self.num_bins - 1)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """values (...) -> target probabilities (..., num_bins): weights on the two bins around
        symlog(value) that interpolate it linearly (one bin when it falls on a bin or off the range)."""
        y = symlog(values.float()).clamp(self.low, self.high)
        position = (y - self.low) / self.resolution  # fractional bin index in [0, num_bins - 1]
        below = position.floor().clamp(0, self.num_bins - 2)
        upper_weight = (position - below).clamp(0.0, 1.0)
        below = below.long()
        probs = torch.zeros(*values.shape, self.num_bins, device=values.device, dtype=torch.float32)
        probs.scatter_(-1, below[..., None], (1.0 - upper_weight)[..., None])
        probs.scatter_add_(-1, below[..., None] + 1, upper_weight[..., None])
        return probs

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (..., num_bins) -> values (...): symexp of the expected bin under softmax(logits)."""
        self._check(logits)
        probs = F.softmax(logits.float(), dim=-1)
        return symexp((probs * self._bins(logits.device)).sum(-1))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (...) of logits (..., num_bins) against the two-hot encoding of targets (...)."""
        self._check(logits)
        if logits.shape[:-1] != targets.shape:
            raise ValueError(f"logits {tuple(logits.shape)} must be targets' shape {tuple(targets.shape)} + (bins,)")
        return -(self.encode(targets.detach()) * F.log_softmax(logits.float(), dim=-1)).sum(-1)

    def _check(self, logits: torch.Tensor) -> None:
        if logits.shape[-1] != self.num_bins:
            raise ValueError(f"expected {self.num_bins} two-hot logits, got shape {tuple(logits.shape)}")


class MLPHead(nn.Module):
    """A small MLP on the agent tokens: `layers` x (Linear -> RMSNorm -> SiLU), then Linear to out_dim.

    zero_init: the output layer starts at zero (DreamerV3 does this for reward and critic heads: the
    first predictions are a uniform two-hot distribution, i.e. value 0, instead of random values).
    Computes in the input's dtype (bf16 under autocast); callers cast the logits to float32.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int = 2, zero_init: bool = False):
        super().__init__()
        if layers < 0 or hidden < 1 or out_dim < 1:
            raise ValueError(f"MLPHead needs layers >= 0, hidden >= 1, out_dim >= 1; got {layers}, {hidden}, {out_dim}")
        blocks: list[nn.Module] = []
        width = in_dim
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden, bias=False), RMSNorm(hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*blocks)
        self.out = nn.Linear(width, out_dim)
        self.zero_init = zero_init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)draw the initial weights (e.g. a critic that starts from scratch)."""
        for module in self.body:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=module.in_features**-0.5)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        if self.zero_init:
            nn.init.zeros_(self.out.weight)
        else:
            nn.init.trunc_normal_(self.out.weight, std=0.02)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))

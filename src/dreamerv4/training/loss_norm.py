"""Running-RMS loss normalization: each loss term is divided by a running estimate of its RMS.

DreamerV4 balances loss terms this way (e.g. the tokenizer's MSE + 0.2 LPIPS; docs/design.md, Models)
so that no term dominates only because of its scale. Hand the normalizers to the training loop as
`extra_state` so their statistics are checkpointed and restored on resume:

    norms = {"mse": RunningRMS(), "lpips": RunningRMS()}
    loss = norms["mse"](mse) + 0.2 * norms["lpips"](lpips)
    train(..., extra_state=norms)
"""

from __future__ import annotations

import torch
from torch import nn


class RunningRMS(nn.Module):
    """Divides a scalar loss by the bias-corrected EMA estimate of its root mean square.

    In training mode each call first updates the estimate with the (detached) loss; in eval mode the
    statistic is only read. The divisor carries no gradient, so the term's gradient is scaled by
    1 / RMS. Statistics are kept in float32 buffers (checkpointed with the state dict).
    """

    def __init__(self, decay: float = 0.99, eps: float = 1e-8):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"RunningRMS decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.eps = eps
        self.register_buffer("mean_square", torch.zeros((), dtype=torch.float32))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def rms(self) -> torch.Tensor:
        """The current bias-corrected RMS estimate (1 before the first update)."""
        # torch.where instead of an `if` keeps this free of a device-to-host sync on CUDA.
        correction = (1.0 - self.decay ** self.count.double()).clamp_min(1e-300)
        estimate = (self.mean_square.double() / correction).sqrt().float()
        return torch.where(self.count > 0, estimate, torch.ones_like(estimate))

    @torch.no_grad()
    def update(self, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.mean_square.mul_(self.decay).add_((1.0 - self.decay) * value.square().mean())
        self.count.add_(1)

    def forward(self, loss: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.update(loss)
        return loss / self.rms().clamp_min(self.eps).to(loss.dtype)

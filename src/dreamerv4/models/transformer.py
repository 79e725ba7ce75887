"""The block-causal space-time transformer shared by the tokenizer and the dynamics model.

Input and output are (B, T, S, D): batch, frames, tokens per frame, width. Each layer is a
pre-RMSNorm residual block (attention, then a SwiGLU feed-forward). Most layers are *space*
layers: every token attends to the S tokens of its own frame plus `num_registers` learned
register tokens. Every `time_every`-th layer is a *time* layer: each token position attends
causally to the same position in frames <= t. Overall a token sees its own frame and earlier
frames, never later ones (DreamerV4, arXiv 2509.24527, section 3). RoPE runs over the token
index in space layers and over the frame index in time layers; queries and keys are
RMS-normalised (QKNorm); attention logits are soft-capped; keys/values may use fewer heads than
queries (grouped-query attention); no linear layer has a bias.

    model = SpaceTimeTransformer(TransformerConfig(embed_dim=256, depth=6))
    y = model(x)                                   # x: (B, T, S, 256) -> y: (B, T, S, 256)
    cache = KVCache()                              # frame-by-frame generation
    y_t = model(x[:, t : t + 1], cache=cache)      # appends frame t after the cached frames

Every attention in the package goes through `attention()`, so the kernel choice lives in one
place; `benchmarks/attention.py` measures the candidates (results in benchmarks/results/).

Speed and memory (CPU training is the bottleneck here): the attention core, RMSNorm, QKNorm +
RoPE and the SwiGLU gate are small autograd Functions that keep only what their backward needs
and run their elementwise passes in cache-sized row chunks; `checkpoint_activations` trades a
recomputed forward for storing only each block's input. `benchmarks/tokenizer_step.py` measures
a full training step; the tests check every Function against the textbook formulas.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


@dataclass
class TransformerConfig:
    embed_dim: int = 256
    depth: int = 6
    num_heads: int = 8  # query heads; head_dim = embed_dim // num_heads
    num_kv_heads: int = 8  # key/value heads (grouped-query attention when < num_heads)
    time_every: int = 4  # every k-th layer attends causally over time, the others over space only
    num_registers: int = 4
    soft_cap: float = 50.0  # attention-logit soft cap: cap * tanh(logits / cap); 0 disables
    rope_base: float = 10000.0
    dropout: float = 0.0  # residual dropout after each attention and feed-forward block
    # Recompute each block's activations in the backward pass instead of storing them: about a
    # third more compute for a fraction of the activation memory (only block inputs are kept).
    checkpoint_activations: bool = False

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if (self.embed_dim // self.num_heads) % 2:
            raise ValueError(f"head_dim {self.embed_dim // self.num_heads} must be even for RoPE")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.depth < 1 or self.time_every < 1:
            raise ValueError(f"depth ({self.depth}) and time_every ({self.time_every}) must be >= 1")
        if self.num_registers < 0 or self.soft_cap < 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("num_registers and soft_cap must be >= 0 and dropout in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        return swiglu_hidden_dim(self.embed_dim)

    def is_time_layer(self, index: int) -> bool:
        """Layer `index` (0-based) attends over time: layers time_every-1, 2*time_every-1, ..."""
        return (index + 1) % self.time_every == 0


def swiglu_hidden_dim(width: int) -> int:
    """int(width * 4 * 2/3) rounded up to a multiple of 64 (704 at width 256)."""
    return -(-int(width * 4 * 2 / 3) // 64) * 64


# ---------------------------------------------------------------------------------------------
# Attention: the one function every layer calls.


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    mask: torch.Tensor | None = None,
    soft_cap: float = 0.0,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with an optional logit soft cap and grouped-query heads.

    q: (N, Hq, Lq, Dh); k, v: (N, Hkv, Lk, Dh) with Hq a multiple of Hkv (each key/value head
    serves Hq/Hkv query heads). `causal`: query i sits at position Lk - Lq + i (the last Lq of
    the Lk keys, as with a key/value cache) and reads keys at positions <= its own. `mask`:
    boolean (Lq, Lk), True where the query may read the key. Logits are scale * q.k with
    scale = 1/sqrt(Dh) unless given, then soft_cap * tanh(logits / soft_cap) when soft_cap > 0.
    `bias`: optional float (Hq, Lq, Lk) added to the (capped) logits, a fixed prior such as the
    tokenizer's locality bias (no gradient flows to it). Returns (N, Hq, Lq, Dh).

    CPU runs explicit softmax(QK^T)V (`_SoftCapAttention`): it measured fastest here for fwd+bwd
    at the tokenizer's shapes (benchmarks/attention.py), and the soft cap needs the logits anyway.
    On CUDA without a soft cap, PyTorch's fused SDPA (flash/memory-efficient kernels) is used; with
    the cap the same explicit kernel runs there (on an H100, FlexAttention with the cap as a
    score_mod saved ~1% of a reference-size tokenizer step: benchmarks/gpu.py).
    """
    n, hq, lq, dh = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    groups = hq // hkv
    scale = 1.0 / math.sqrt(dh) if scale is None else scale
    if q.is_cuda and soft_cap == 0.0:
        square_causal = causal and mask is None and bias is None and lq == lk  # lets SDPA pick the flash kernel
        attn_mask = None if square_causal else _allowed(lq, lk, causal, mask, q.device)
        if bias is not None:
            additive = bias.to(q.dtype)
            attn_mask = additive if attn_mask is None else additive.masked_fill(~attn_mask, float("-inf"))
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=square_causal,
            scale=scale,
            enable_gqa=groups > 1,
        )
    q, k, v = _common_dtype(q, k, v)
    # The kernel takes z = q.k with q already multiplied by `_q_factor`: q is smaller than the
    # (Lq, Lk) logits.
    q_factor = _q_factor(scale, soft_cap)
    if q_factor != 1.0:
        q = q * q_factor
    # Grouped-query attention without copying k and v: fold the query heads that share a key
    # head into the query-length axis, (N, Hkv, G*Lq, Dh) @ (N, Hkv, Dh, Lk).
    q = q.reshape(n, hkv, groups * lq, dh)
    # Contiguous once here, not inside each forward and backward matmul; the saved v then no
    # longer pins the whole fused qkv projection in memory.
    k, v = k.contiguous(), v.contiguous()
    allowed = _allowed(lq, lk, causal, mask, q.device)
    if bias is not None:  # query head h = kv_head * groups + g, matching the fold above
        bias = bias.detach().to(q.dtype).reshape(hkv, groups * lq, lk)
    out = _SoftCapAttention.apply(q, k, v, allowed, soft_cap, groups, bias)
    return out.view(n, hq, lq, dh)


def _allowed(lq: int, lk: int, causal: bool, mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Boolean (Lq, Lk) "query may read key", or None when every query reads every key."""
    allowed = mask
    if causal:
        query_pos = torch.arange(lk - lq, lk, device=device)[:, None]
        key_pos = torch.arange(lk, device=device)[None, :]
        allowed = key_pos <= query_pos if allowed is None else allowed & (key_pos <= query_pos)
    return allowed


def _common_dtype(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Cast to the autocast dtype when autocast is on (what matmul would do), else to the promoted dtype."""
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype) for t in tensors]


def _q_factor(scale: float, soft_cap: float) -> float:
    """What `_SoftCapAttention` expects q to be multiplied by: scale, or 2 * scale / cap with a cap."""
    return 2.0 * scale / soft_cap if soft_cap > 0.0 else scale


# Elements per chunk of the hand-written kernels below (4 MB in float32): their temporaries stay
# in cache and are reused from the heap instead of being freshly page-faulted at every call.
_CHUNK_ELEMENTS = 1 << 20


class _SoftCapAttention(torch.autograd.Function):
    """Attention weights softmax(logits + bias) (masked) times v, for q (N, H, G*Lq, Dh) and k, v
    (N, H, Lk, Dh); `allowed` (Lq, Lk) and `bias` (H, G*Lq, Lk) apply to every group.

    With z = q.k (q pre-multiplied by `_q_factor`), the logits are z without a cap and else
    cap * tanh(z / 2) + cap = 2 * cap * sigmoid(z): the soft cap shifted by the constant cap, which
    softmax ignores. sigmoid costs a fifth of tanh on this CPU; the sigmoid, the cap and the
    softmax run in float32, in place (in bf16, logits shifted up to ~cap would keep an absolute
    precision of only ~cap/256).
    Both passes walk N in chunks of about `_CHUNK_ELEMENTS` logits, so the float32
    temporaries stay in cache and are reused instead of freshly page-faulted (faster fwd+bwd
    at the reference batch). Kept for the backward: the capped logits and the weights, in the inputs'
    dtype (autograd over the plain ops would keep raw logits, tanh, an fp32 softmax and its bf16
    copy). Backward: dS = softmax'(dP), then dZ = dS * c * (1 - c / (2 cap)) for capped logits
    c (sigmoid' = s (1 - s))."""

    @staticmethod
    def forward(ctx, q, k, v, allowed, soft_cap, groups, bias=None):
        n, h, gl, dh = q.shape
        lk = k.shape[2]
        compute_dtype = torch.promote_types(q.dtype, torch.float32)
        weights = q.new_empty(n, h, gl, lk)
        capped = q.new_empty(n, h, gl, lk) if soft_cap > 0.0 else None
        out = q.new_empty(n, h, gl, v.shape[-1])
        for rows in _row_slices(n, h * gl * lk, q.device):
            logits = torch.matmul(q[rows], k[rows].transpose(-1, -2)).to(compute_dtype)  # a copy unless fp32
            if capped is not None:
                logits.sigmoid_().mul_(2.0 * soft_cap)
                capped[rows] = logits
            if bias is not None:  # a constant shift of the logits: the backward is unchanged
                logits.add_(bias)
            if allowed is not None:
                logits.view(-1, h, groups, gl // groups, lk).masked_fill_(~allowed, float("-inf"))
            if logits.dtype == weights.dtype:
                torch.softmax(logits, dim=-1, out=weights[rows])
            else:
                weights[rows] = torch.softmax(logits, dim=-1)
            torch.matmul(weights[rows], v[rows], out=out[rows])
        ctx.soft_cap = soft_cap
        ctx.save_for_backward(q, k, v, capped, weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, capped, weights = ctx.saved_tensors
        grad_out = grad_out.to(v.dtype)
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        n, h, gl, lk = weights.shape
        for rows in _row_slices(n, h * gl * lk, q.device):
            grad = grad_out[rows].contiguous()  # read by two matmuls
            torch.matmul(weights[rows].transpose(-1, -2), grad, out=grad_v[rows])
            grad_logits = torch.matmul(grad, v[rows].transpose(-1, -2))
            grad_logits = torch._softmax_backward_data(grad_logits, weights[rows], -1, weights.dtype)
            if capped is not None:
                grad_logits.mul_(capped[rows])
                grad_logits.addcmul_(grad_logits, capped[rows], value=-0.5 / ctx.soft_cap)
            torch.matmul(grad_logits, k[rows], out=grad_q[rows])
            torch.matmul(grad_logits.transpose(-1, -2), q[rows], out=grad_k[rows])
        return grad_q, grad_k, grad_v, None, None, None, None


def _row_slices(n: int, elements_per_row: int, device: torch.device) -> list[slice]:
    """Slices of range(n) holding about _CHUNK_ELEMENTS elements each (at least one row); one
    slice off the CPU, where more kernel launches would cost more than the cache saves."""
    if device.type != "cpu":
        return [slice(0, n)]
    step = max(1, _CHUNK_ELEMENTS // max(1, elements_per_row))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


# ---------------------------------------------------------------------------------------------
# Building blocks.
#
# RMSNorm, QKNorm + RoPE and the SwiGLU gate are small autograd Functions: autograd over the
# plain formulas spends a memory pass on every intermediate (forward and backward) and keeps
# several of them alive until the backward; these keep only what their backward needs. At the
# reference batch (B=16, T=16) this took the bf16 step from 14.4 to 9.6 CPU seconds and its peak
# memory from 8.1 to 4.2 GB (benchmarks/results/tokenizer_step*.json).


def rope_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position tables (L, head_dim) for integer `positions`: cos of each pair's angle
    twice, and its sin with a minus sign for the first half (see `apply_rope`)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[..., i], x[..., i + Dh/2]) of x (..., L, Dh) by its angle:
    (x1 cos - x2 sin, x2 cos + x1 sin), written as x * cos + swap_halves(x) * signed sin."""
    return x * cos.to(x.dtype) + _swap_halves(x) * sin.to(x.dtype)


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, x1), dim=-1)


def _inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """(mean(x^2) + eps)^-1/2 over the last axis, keepdim, in float32 or wider: one pass (vector_norm)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    return norm.square_().div_(x.shape[-1]).add_(eps).rsqrt_()


class _RMSNormFunction(torch.autograd.Function):
    """y = x * rstd * w; keeps x and rstd. dx = u*w - x * rstd^2 * mean(u*w*x) with u = dy * rstd,
    computed in row chunks (cache-sized temporaries), dw accumulated in float32."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = _inverse_rms(x, eps).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return (x * rstd).mul_(weight)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        width = x.shape[-1]
        x2, grad_y2, rstd2 = x.reshape(-1, width), grad_y.reshape(-1, width), rstd.reshape(-1, 1)
        grad_x = torch.empty_like(x2)
        grad_weight = x.new_zeros(width, dtype=torch.promote_types(x.dtype, torch.float32))
        for rows in _row_slices(len(x2), width, x.device):
            u = grad_y2[rows] * rstd2[rows]
            ux = u * x2[rows]
            if ctx.needs_input_grad[1]:
                grad_weight += ux.sum(0, dtype=grad_weight.dtype)
            coef = torch.mv(ux, weight).unsqueeze(-1).mul_(rstd2[rows].square() / width)
            torch.addcmul(u.mul_(weight), x2[rows], coef, value=-1.0, out=grad_x[rows])
        return grad_x.view_as(x), grad_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None, None


class _NormRope(torch.autograd.Function):
    """QKNorm then RoPE for x (N, L, H, Dh) of any strides (a view into the fused qkv output):
    y = xn * cos_g + swap_halves(xn) * sin_g with xn = x * rstd, where the tables (L, Dh) carry
    the learned QKNorm gain g: rotating g * xn equals that. Returns (N, H, L, Dh) contiguous, the
    layout the attention matmuls read; keeps xn and rstd. Temporaries are chunked over N."""

    @staticmethod
    def forward(ctx, x, cos_g, sin_g, eps):
        xn = x.transpose(1, 2).clone(memory_format=torch.contiguous_format)  # one cheap copy, then contiguous passes
        rstd = _inverse_rms(xn, eps).to(x.dtype)
        xn.mul_(rstd)
        out = xn * cos_g
        for rows in _row_slices(len(xn), xn[0].numel(), xn.device):
            out[rows].addcmul_(_swap_halves(xn[rows]), sin_g)
        ctx.save_for_backward(xn, rstd, cos_g, sin_g)
        return out

    @staticmethod
    def backward(ctx, grad):
        xn, rstd, cos_g, sin_g = ctx.saved_tensors
        grad_x = torch.empty_like(xn)
        acc_dtype = torch.promote_types(xn.dtype, torch.float32)
        grad_cos = torch.zeros_like(cos_g, dtype=acc_dtype)
        grad_sin = torch.zeros_like(sin_g, dtype=acc_dtype)
        for rows in _row_slices(len(xn), xn[0].numel(), xn.device):
            g, x = grad[rows], xn[rows]
            grad_xn = _swap_halves(g * sin_g).addcmul_(g, cos_g)  # swap_halves is its own transpose
            grad_cos += (g * x).sum((0, 1), dtype=acc_dtype)
            grad_sin += (g * _swap_halves(x)).sum((0, 1), dtype=acc_dtype)
            # RMSNorm without gain: dx = rstd * (dxn - xn * mean(dxn * xn)).
            mean = (grad_xn * x).mean(-1, keepdim=True)
            torch.mul(grad_xn.addcmul_(x, mean, value=-1.0), rstd[rows], out=grad_x[rows])
        grad_cos = grad_cos.to(cos_g.dtype) if ctx.needs_input_grad[1] else None
        grad_sin = grad_sin.to(sin_g.dtype) if ctx.needs_input_grad[2] else None
        return grad_x.transpose(1, 2), grad_cos, grad_sin, None


class _SwiGLUGate(torch.autograd.Function):
    """silu(gate) * up; keeps gate and up only (autograd would also keep silu(gate)). The
    backward recomputes silu in row chunks."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        width = gate.shape[-1]
        gate2, up2, grad2 = gate.reshape(-1, width), up.reshape(-1, width), grad_out.reshape(-1, width)
        grad_gate, grad_up = torch.empty_like(gate2), torch.empty_like(up2)
        for rows in _row_slices(len(gate2), width, gate.device):
            torch.mul(grad2[rows], F.silu(gate2[rows]), out=grad_up[rows])
            torch.ops.aten.silu_backward.grad_input(grad2[rows] * up2[rows], gate2[rows], grad_input=grad_gate[rows])
        return grad_gate.view_as(gate), grad_up.view_as(up)


class RMSNorm(nn.Module):
    """RMSNorm (gain, no bias). The gain is cast to the input's dtype so bf16 autocast stays in bf16."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight.to(x.dtype), self.eps)


class SwiGLU(nn.Module):
    """Feed-forward W2(silu(W1 x) * W3 x) with the hidden width of `swiglu_hidden_dim`."""

    def __init__(self, width: int):
        super().__init__()
        hidden = swiglu_hidden_dim(width)
        self.gate_up = nn.Linear(width, 2 * hidden, bias=False)  # W1 and W3 as one matmul
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two matmuls into contiguous gate and up: as fast as one into [gate, up], and the
        # elementwise gate then reads contiguous memory (strided halves cost ~1.6x here).
        hidden = self.down.in_features
        gate = F.linear(x, self.gate_up.weight[:hidden])
        up = F.linear(x, self.gate_up.weight[hidden:])
        return self.down(_SwiGLUGate.apply(gate, up))


class Attention(nn.Module):
    """Multi-head attention over the second-to-last axis of (N, L, D), with QKNorm, RoPE and GQA."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.soft_cap = cfg.soft_cap
        kv_width = cfg.num_kv_heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.embed_dim, cfg.embed_dim + 2 * kv_width, bias=False)
        self.out = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim)
        self.k_norm = RMSNorm(cfg.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        *,
        causal: bool,
        mask: torch.Tensor | None = None,
        past: tuple[torch.Tensor, torch.Tensor] | Callable[..., tuple[torch.Tensor, torch.Tensor, int]] | None = None,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (N, L, D); rope tables for the L new positions; `past` keys/values (N, Hkv, Lp, Dh)
        come before them, or `past` is `KVCache.extend` of this layer: (new k, new v) -> (keys,
        values, frames) of past + new, where keys past `frames` are unused buffer space.
        Returns the output (N, L, D) and the keys/values of past + new (with that space)."""
        n, length, _ = x.shape
        hq, hkv, dh = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([hq * dh, hkv * dh, hkv * dh], dim=-1)  # backward: one concatenation
        q = self._norm_rope(q.view(n, length, hq, dh), self.q_norm, rope)
        k, v = self._kv_heads(k, v, rope)
        if callable(past):
            k, v, frames = past(k, v)
            if frames < k.shape[2]:  # causal over the filled frames, blind to the buffer space after them
                mask = F.pad(_allowed(length, frames, True, None, x.device), (0, k.shape[2] - frames), value=False)
                causal = False
        elif past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        y = attention(q, k, v, causal=causal, mask=mask, soft_cap=self.soft_cap, bias=bias)
        return self.out(y.transpose(1, 2).reshape(n, length, -1)), (k, v)

    def write_kv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], past: Callable[..., object]) -> None:
        """Only the keys/values of x (N, L, D), handed to `past` (`KVCache.extend`); no attention."""
        kv_width = self.num_kv_heads * self.head_dim
        k, v = F.linear(x, self.qkv.weight[self.num_heads * self.head_dim:]).split([kv_width, kv_width], dim=-1)
        past(*self._kv_heads(k, v, rope))

    def _kv_heads(self, k: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected keys and values (N, L, Hkv * Dh) -> QKNorm + RoPE keys and values, both (N, Hkv, L, Dh)."""
        n, length = k.shape[:2]
        k = self._norm_rope(k.view(n, length, self.num_kv_heads, self.head_dim), self.k_norm, rope)
        return k, v.view(n, length, self.num_kv_heads, self.head_dim).transpose(1, 2)

    @staticmethod
    def _norm_rope(x: torch.Tensor, norm: RMSNorm, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """(N, L, H, Dh) -> apply_rope(norm(x)) as (N, H, L, Dh), via `_NormRope` with the gain in the tables."""
        cos, sin = rope
        cos_g = (cos * norm.weight).to(x.dtype)
        sin_g = (sin * _swap_halves(norm.weight)).to(x.dtype)
        return _NormRope.apply(x, cos_g, sin_g, norm.eps)


class Block(nn.Module):
    """Pre-RMSNorm residual block: x + attn(norm(x)), then x + swiglu(norm(x))."""

    def __init__(self, cfg: TransformerConfig, attends_over_time: bool):
        super().__init__()
        self.attends_over_time = attends_over_time
        self.attn_norm = RMSNorm(cfg.embed_dim)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.embed_dim)
        self.ffn = SwiGLU(cfg.embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, T, S, D). Space layers attend within each frame (`mask` over its S tokens, `bias`
        added to their logits);
        time layers attend causally over frames, `past` holding the cached earlier frames."""
        b, t, s, d = x.shape
        h = self.attn_norm(x)
        if self.attends_over_time:
            h = h.transpose(1, 2).reshape(b * s, t, d)
            h, kv = self.attn(h, rope, causal=True, past=past)
            h = h.view(b, s, t, d).transpose(1, 2)
        else:
            h, kv = self.attn(h.reshape(b * t, s, d), rope, causal=False, mask=mask, bias=bias)
            h = h.view(b, t, s, d)
        x = x + self.dropout(h)
        return x + self.dropout(self.ffn(self.ffn_norm(x))), kv

    def write_kv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], past: Callable[..., object]) -> None:
        """A time layer's keys/values of x (B, T, S, D) into the cache (`past` = KVCache.extend of
        this layer), nothing else: all that the last time layer of a `cache_only` pass must do."""
        b, t, s, d = x.shape
        self.attn.write_kv(self.attn_norm(x).transpose(1, 2).reshape(b * s, t, d), rope, past)


class KVCache:
    """Keys and values of the time layers for the frames processed so far (frame-by-frame inference).

    Space layers need no cache: they never look across frames. `length` counts the frames processed
    so far; the next frames get RoPE time positions length, length + 1, ... `layers` maps each time
    layer to its cached keys and values (num_streams, Hkv, frames, Dh): every frame, or the last
    `max_frames` after `crop`.

    Storage: per time layer a preallocated key buffer and value buffer (num_streams, Hkv, capacity,
    Dh), zero-filled, regrown by an eighth (at least 16 frames) when full, so appending is amortised
    O(1) per frame. A call writes its new frames' keys/values right after the stored ones (`extend`)
    and attends over the whole buffer, the space after its last frame masked out: the batched
    matmuls read a contiguous buffer fastest, and the masked space costs at most an eighth (or 16
    frames) more reads. (At batch 64 and context 256 in bf16, attending over a prefix view of the
    buffer took 2.5x as long, and concatenating the context at every call 2.8x: attention_kernels
    in benchmarks/results/dynamics_generate.json.) Frames written by a call with
    update_cache=False are overwritten by the next call; `commit` (update_cache=True) keeps them.
    When gradients flow into the new keys/values the buffers are replaced, not written in place,
    so tensors that autograd saved are never modified.
    """

    MIN_GROWTH = 16  # frames

    def __init__(self) -> None:
        self.length = 0  # frames processed so far: the RoPE time position of the next frame
        self.num_streams: int | None = None  # B * (S + registers) time-attention sequences; fixed by the first commit
        self._stored = 0  # frames held in the buffers (length, or fewer after crop)
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def layers(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Cached keys and values per time layer, views (num_streams, Hkv, stored frames, Dh)."""
        return {i: (k[:, :, : self._stored], v[:, :, : self._stored]) for i, (k, v) in self._buffers.items()}

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Write the new frames' keys/values (N, Hkv, t, Dh) of time layer `layer` after the stored
        frames, uncommitted. Returns (keys, values, frames): buffers (N, Hkv, capacity, Dh) whose
        first `frames` = stored + t frames are the context and the new frames (the rest is unused)."""
        stored, end = self._stored, self._stored + k.shape[2]
        old = self._buffers.get(layer) if stored else None
        if old is not None and (old[0].shape[:2], old[0].shape[3]) != (k.shape[:2], k.shape[3]):
            raise ValueError(
                f"cache layer {layer} holds keys of shape {tuple(old[0].shape)}, new ones are {tuple(k.shape)}"
            )
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            new = (k, v) if old is None else tuple(torch.cat((b[:, :, :stored], x), dim=2) for b, x in zip(old, (k, v)))
            self._buffers[layer] = new
            return new[0], new[1], end
        dtype = k.dtype if old is None else torch.promote_types(old[0].dtype, k.dtype)
        current = self._buffers.get(layer)
        if current is None or current[0].shape[2] < end or current[0].dtype != dtype or current[0].requires_grad or (
            current[0].shape[:2], current[0].shape[3]) != (k.shape[:2], k.shape[3]):
            capacity = end + max(self.MIN_GROWTH, end // 8)
            # Zero-filled: the unused space is masked, but its values still enter the weights x
            # values product (as 0 x value), which must not meet uninitialised NaNs.
            new = [x.new_zeros(*x.shape[:2], capacity, x.shape[3], dtype=dtype) for x in (k, v)]
            if old is not None:
                for buffer, previous in zip(new, old):
                    buffer[:, :, :stored] = previous[:, :, :stored].detach()
            current = self._buffers[layer] = (new[0], new[1])
        current[0][:, :, stored:end] = k
        current[1][:, :, stored:end] = v
        return current[0], current[1], end

    def commit(self, frames: int, num_streams: int) -> None:
        """Keep the `frames` frames that the last call wrote after the stored ones."""
        self._stored += frames
        self.length += frames
        self.num_streams = num_streams

    def select_rows(self, rows: torch.Tensor | list[int], batch: int) -> None:
        """Keep only the batch rows `rows` of a cache filled by batches of `batch` rows (streams are
        batch-major: row b owns streams b * n .. (b + 1) * n - 1), e.g. when some episodes of a batch end."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        if self.num_streams is not None and self.num_streams % batch:
            raise ValueError(f"cache holds {self.num_streams} streams, not a multiple of the batch {batch}")
        self._buffers = {
            i: tuple(x.unflatten(0, (batch, -1))[rows.to(x.device)].flatten(0, 1) for x in kv)
            for i, kv in self._buffers.items()
        }
        if self.num_streams is not None:
            self.num_streams = self.num_streams // batch * len(rows)

    def crop(self, max_frames: int) -> None:
        """Keep only the last `max_frames` frames (RoPE is relative, so positions stay valid)."""
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        keep = min(self._stored, max_frames)
        first = self._stored - keep
        self._buffers = {
            i: (k[:, :, first : self._stored].clone(), v[:, :, first : self._stored].clone())
            for i, (k, v) in self._buffers.items()
        }
        self._stored = keep


class SpaceTimeTransformer(nn.Module):
    """A stack of space and time layers with register tokens and a final RMSNorm; see module doc."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.registers = nn.Parameter(torch.randn(cfg.num_registers, cfg.embed_dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg, cfg.is_time_layer(i)) for i in range(cfg.depth))
        # Where a cache-only pass stops (-1: no time layer, nothing to cache).
        self.last_time_layer = max((i for i in range(cfg.depth) if cfg.is_time_layer(i)), default=-1)
        self.norm = RMSNorm(cfg.embed_dim)
        self.apply(_init_linear)
        for block in self.blocks:  # GPT-2 style: shrink the residual branches' last projections
            for proj in (block.attn.out, block.ffn.down):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.depth))

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        update_cache: bool = True,
        space_bias: torch.Tensor | None = None,
        cache_only: bool = False,
    ) -> torch.Tensor | None:
        """x (B, T, S, D) -> (B, T, S, D).

        mask: optional boolean (S, S) for the space layers, True where token i may read token j.
            Registers are read by every token; a register reads token j only if every token may
            read j, so a token hidden from some tokens cannot reach them through a register.
        cache: frames already processed; x holds the frames after them. With update_cache the
            new frames' keys/values are appended (set it False to query without committing,
            e.g. for intermediate denoising steps of one frame).
        space_bias: optional float (num_heads, S, S) added to the space layers' attention logits
            (0 for pairs involving registers), e.g. the tokenizer's 2D locality prior.
        cache_only: only append the new frames' keys/values to `cache` and return None: the
            layers after the last time layer, and that layer's attention, are skipped (their
            output would be discarded), e.g. when a finished frame joins the context.
        """
        b, t, s, d = x.shape
        if d != self.cfg.embed_dim:
            raise ValueError(f"expected width {self.cfg.embed_dim}, got input of shape {tuple(x.shape)}")
        r = self.cfg.num_registers
        if mask is not None:
            if mask.shape != (s, s) or mask.dtype != torch.bool:
                raise ValueError(f"mask must be a bool ({s}, {s}) tensor, got {mask.dtype} {tuple(mask.shape)}")
            mask = _with_registers(mask, r)
        if space_bias is not None:
            if space_bias.shape != (self.cfg.num_heads, s, s):
                raise ValueError(f"space_bias must be ({self.cfg.num_heads}, {s}, {s}), got {tuple(space_bias.shape)}")
            space_bias = F.pad(space_bias, (0, r, 0, r))
        if cache_only and (cache is None or not update_cache):
            raise ValueError("cache_only needs a cache and update_cache=True")
        if cache is not None and cache.num_streams not in (None, b * (s + r)):
            raise ValueError(f"cache holds {cache.num_streams} token streams (batch x tokens), input has {b * (s + r)}")
        x = torch.cat((x, self.registers.to(x.dtype).expand(b, t, r, d)), dim=2)
        past_len = cache.length if cache is not None else 0
        hd, base = self.cfg.head_dim, self.cfg.rope_base
        space_rope = rope_tables(torch.arange(s + r, device=x.device), hd, base)
        time_rope = rope_tables(torch.arange(past_len, past_len + t, device=x.device), hd, base)
        # Not with a cache: a recomputed block would write its keys/values into the cache again.
        recompute = self.cfg.checkpoint_activations and self.training and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.blocks):
            rope, block_mask = (time_rope, None) if block.attends_over_time else (space_rope, mask)
            block_bias = None if block.attends_over_time else space_bias
            past = functools.partial(cache.extend, i) if cache is not None and block.attends_over_time else None
            if cache_only and i == self.last_time_layer:
                block.write_kv(x, rope, past)
                break
            if recompute:
                # Non-reentrant checkpointing replays dropout's RNG and autocast state, so the
                # recomputed activations equal the stored ones would have. `block.forward`: a block
                # compiled by `compile_blocks` runs eagerly here (and with a cache, below).
                x, _ = torch.utils.checkpoint.checkpoint(
                    block.forward, x, rope, block_mask, past, block_bias, use_reentrant=False
                )
            else:
                x, _ = (block if past is None else block.forward)(x, rope, block_mask, past, block_bias)
        if cache is not None and update_cache:
            cache.commit(t, b * (s + r))
        return None if cache_only else self.norm(x[:, :, :s])


# The oldest torch on which compiled blocks were checked against eager ones in value and gradient
# (tests/models/test_compile_blocks.py runs on 2.13). On torch 2.11 (a GPU machine's, 2026-11-26) the
# same test failed: the compiled backward gave zero gradients for the RMSNorm gains, the SwiGLU input
# projection and the registers, so training would silently not update them.
MIN_COMPILE_TORCH = (2, 13)


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def compile_blocks(model: nn.Module, dynamic: bool | None = False, mode: str | None = None) -> int:
    """torch.compile (inductor) every transformer `Block` inside `model`, in place (parameter names
    and checkpoints are unchanged); returns how many. Compiled blocks fuse the elementwise work
    around the matmuls (RMSNorm, QKNorm + RoPE, soft cap + softmax, SwiGLU, residual adds, casts)
    into generated loops: faster block forward + backward at the reference sizes on one CPU core
    in bf16, and faster whole training steps (docs/results.md, Speed; LPIPS and the S=84 attention
    weigh more in the tokenizer's): benchmarks/{dynamics_train,tokenizer_step}.py --compile. Calls with a
    KVCache and activation-checkpointed calls run the blocks eagerly. Compilation happens at the
    first call of each new shape / grad mode (about 10 s per block kind on one core).
    On torch older than MIN_COMPILE_TORCH nothing is compiled (a note on stderr) and 0 is returned."""
    if torch_version() < MIN_COMPILE_TORCH:
        print(f"torch.compile of the transformer blocks skipped: torch {torch.__version__} is older than "
              f"{'.'.join(map(str, MIN_COMPILE_TORCH))}, on which compiled blocks gave wrong gradients "
              "(models/transformer.py MIN_COMPILE_TORCH); training eagerly", file=sys.stderr)
        return 0
    # Blocks share one code object: each (layer kind, shape, grad mode, train/eval) is a cache entry.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    blocks = [module for module in model.modules() if isinstance(module, Block)]
    for block in blocks:
        block.compile(dynamic=dynamic, mode=mode)
    return len(blocks)


def _with_registers(mask: torch.Tensor, num_registers: int) -> torch.Tensor:
    """Extend an (S, S) visibility mask to (S + R, S + R) with the registers appended last."""
    s = mask.shape[0]
    full = torch.ones(s + num_registers, s + num_registers, dtype=torch.bool, device=mask.device)
    full[:s, :s] = mask
    full[s:, :s] = mask.all(dim=0)  # a register reads token j only if every token may read j
    return full


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

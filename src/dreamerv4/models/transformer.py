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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
) -> torch.Tensor:
    """Scaled dot-product attention with an optional logit soft cap and grouped-query heads.

    q: (N, Hq, Lq, Dh); k, v: (N, Hkv, Lk, Dh) with Hq a multiple of Hkv (each key/value head
    serves Hq/Hkv query heads). `causal`: query i sits at position Lk - Lq + i (the last Lq of
    the Lk keys, as with a key/value cache) and reads keys at positions <= its own. `mask`:
    boolean (Lq, Lk), True where the query may read the key. Logits become
    soft_cap * tanh(logits / soft_cap) when soft_cap > 0. Returns (N, Hq, Lq, Dh).

    CPU runs explicit softmax(QK^T)V: it measured fastest here for fwd+bwd at the tokenizer's
    shapes (benchmarks/attention.py), and the soft cap needs the logits anyway. On CUDA without
    a soft cap, PyTorch's fused SDPA (flash/memory-efficient kernels) is used instead.
    """
    n, hq, lq, dh = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    groups = hq // hkv
    if q.is_cuda and soft_cap == 0.0:
        square_causal = causal and mask is None and lq == lk  # lets SDPA pick the flash kernel
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if square_causal else _allowed(lq, lk, causal, mask, q.device),
            is_causal=square_causal,
            enable_gqa=groups > 1,
        )
    # Grouped-query attention without copying k and v: fold the query heads that share a key
    # head into the query-length axis, (N, Hkv, G*Lq, Dh) @ (N, Hkv, Dh, Lk). Scales are
    # applied to q, which is smaller than the (Lq, Lk) logits.
    q = q.reshape(n, hkv, groups * lq, dh) * (1.0 / (math.sqrt(dh) * (soft_cap or 1.0)))
    logits = torch.matmul(q, k.transpose(-1, -2))
    if soft_cap > 0.0:
        logits = torch.tanh(logits) * soft_cap
    allowed = _allowed(lq, lk, causal, mask, q.device)
    if allowed is not None:
        logits = logits.view(n, hkv, groups, lq, lk).masked_fill(~allowed, float("-inf")).view(n, hkv, groups * lq, lk)
    # fp32 softmax: as fast as a bf16 one over 84 keys and faster over 16 (benchmarks/attention.py).
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(weights, v).reshape(n, hq, lq, dh)


def _allowed(lq: int, lk: int, causal: bool, mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Boolean (Lq, Lk) "query may read key", or None when every query reads every key."""
    allowed = mask
    if causal:
        query_pos = torch.arange(lk - lq, lk, device=device)[:, None]
        key_pos = torch.arange(lk, device=device)[None, :]
        allowed = key_pos <= query_pos if allowed is None else allowed & (key_pos <= query_pos)
    return allowed


# ---------------------------------------------------------------------------------------------
# Building blocks.


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
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat((x2, x1), dim=-1) * sin.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm whose gain is cast to the input's dtype, so bf16 autocast keeps the fused kernel
    (nn.RMSNorm with a bf16 input and an fp32 gain falls back to a ~2x slower composite)."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class SwiGLU(nn.Module):
    """Feed-forward W2(silu(W1 x) * W3 x) with the hidden width of `swiglu_hidden_dim`."""

    def __init__(self, width: int):
        super().__init__()
        hidden = swiglu_hidden_dim(width)
        self.gate_up = nn.Linear(width, 2 * hidden, bias=False)  # W1 and W3 as one matmul
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


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
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (N, L, D); rope tables for the L new positions; `past` keys/values (N, Hkv, Lp, Dh)
        come before them. Returns the output (N, L, D) and the keys/values of past + new."""
        n, length, _ = x.shape
        kv_width = self.num_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([self.num_heads * self.head_dim, kv_width, kv_width], dim=-1)
        q = q.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(n, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(n, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(self.q_norm(q), *rope)
        k = apply_rope(self.k_norm(k), *rope)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        y = attention(q, k, v, causal=causal, mask=mask, soft_cap=self.soft_cap)
        return self.out(y.transpose(1, 2).reshape(n, length, -1)), (k, v)


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
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, T, S, D). Space layers attend within each frame (`mask` over its S tokens);
        time layers attend causally over frames, `past` holding the cached earlier frames."""
        b, t, s, d = x.shape
        h = self.attn_norm(x)
        if self.attends_over_time:
            h = h.transpose(1, 2).reshape(b * s, t, d)
            h, kv = self.attn(h, rope, causal=True, past=past)
            h = h.view(b, s, t, d).transpose(1, 2)
        else:
            h, kv = self.attn(h.reshape(b * t, s, d), rope, causal=False, mask=mask)
            h = h.view(b, t, s, d)
        x = x + self.dropout(h)
        return x + self.dropout(self.ffn(self.ffn_norm(x))), kv


@dataclass
class KVCache:
    """Keys and values of the time layers for the frames processed so far (frame-by-frame inference).

    Space layers need no cache: they never look across frames. `length` counts cached frames;
    the next frames get RoPE time positions length, length + 1, ...
    """

    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    length: int = 0
    num_streams: int | None = None  # B * (S + registers) time-attention sequences; fixed by the first call

    def crop(self, max_frames: int) -> None:
        """Keep only the last `max_frames` frames (RoPE is relative, so positions stay valid)."""
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.layers = {i: (k[:, :, -max_frames:], v[:, :, -max_frames:]) for i, (k, v) in self.layers.items()}


class SpaceTimeTransformer(nn.Module):
    """A stack of space and time layers with register tokens and a final RMSNorm; see module doc."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.registers = nn.Parameter(torch.randn(cfg.num_registers, cfg.embed_dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg, cfg.is_time_layer(i)) for i in range(cfg.depth))
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
    ) -> torch.Tensor:
        """x (B, T, S, D) -> (B, T, S, D).

        mask: optional boolean (S, S) for the space layers, True where token i may read token j.
            Registers are read by every token; a register reads token j only if every token may
            read j, so a token hidden from some tokens cannot reach them through a register.
        cache: frames already processed; x holds the frames after them. With update_cache the
            new frames' keys/values are appended (set it False to query without committing,
            e.g. for intermediate denoising steps of one frame).
        """
        b, t, s, d = x.shape
        if d != self.cfg.embed_dim:
            raise ValueError(f"expected width {self.cfg.embed_dim}, got input of shape {tuple(x.shape)}")
        r = self.cfg.num_registers
        if mask is not None:
            if mask.shape != (s, s) or mask.dtype != torch.bool:
                raise ValueError(f"mask must be a bool ({s}, {s}) tensor, got {mask.dtype} {tuple(mask.shape)}")
            mask = _with_registers(mask, r)
        if cache is not None and cache.num_streams not in (None, b * (s + r)):
            raise ValueError(f"cache holds {cache.num_streams} token streams (batch x tokens), input has {b * (s + r)}")
        x = torch.cat((x, self.registers.to(x.dtype).expand(b, t, r, d)), dim=2)
        past_len = cache.length if cache is not None else 0
        hd, base = self.cfg.head_dim, self.cfg.rope_base
        space_rope = rope_tables(torch.arange(s + r, device=x.device), hd, base)
        time_rope = rope_tables(torch.arange(past_len, past_len + t, device=x.device), hd, base)
        new_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        recompute = self.cfg.checkpoint_activations and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            rope, block_mask = (time_rope, None) if block.attends_over_time else (space_rope, mask)
            past = cache.layers.get(i) if cache is not None and block.attends_over_time else None
            if recompute:
                # Non-reentrant checkpointing replays dropout's RNG and autocast state, so the
                # recomputed activations equal the stored ones would have.
                x, kv = torch.utils.checkpoint.checkpoint(block, x, rope, block_mask, past, use_reentrant=False)
            else:
                x, kv = block(x, rope, block_mask, past)
            if block.attends_over_time:
                new_kv[i] = kv
        if cache is not None and update_cache:
            cache.layers.update(new_kv)
            cache.length += t
            cache.num_streams = b * (s + r)
        return self.norm(x[:, :, :s])


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

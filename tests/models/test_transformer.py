"""Behaviour of the shared space-time transformer: causality, caching, GQA, masks, soft cap."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dreamerv4.config import load_config
from dreamerv4.errors import ConfigError
from dreamerv4.models.transformer import (
    KVCache,
    SpaceTimeTransformer,
    TransformerConfig,
    apply_rope,
    attention,
    rope_tables,
    swiglu_hidden_dim,
)


def tiny(**overrides) -> SpaceTimeTransformer:
    cfg = dict(embed_dim=32, depth=4, num_heads=4, num_kv_heads=2, time_every=2, num_registers=2, soft_cap=5.0)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = SpaceTimeTransformer(TransformerConfig(**cfg)).eval()
    # Random gains instead of the all-ones init, so no symmetry hides a bug.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def reference_attention(q, k, v, causal, mask, soft_cap):
    """Naive per-head attention with k/v heads repeated for grouped queries."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if soft_cap:
        logits = soft_cap * torch.tanh(logits / soft_cap)
    lq, lk = q.shape[2], k.shape[2]
    allowed = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(lk, lk, dtype=torch.bool).tril()[lk - lq :]
    if mask is not None:
        allowed &= mask
    logits = logits.masked_fill(~allowed, float("-inf"))
    return logits.softmax(-1) @ v


def test_swiglu_hidden_width_is_704_at_256():
    assert swiglu_hidden_dim(256) == 704
    assert swiglu_hidden_dim(128) == 384  # int(341.3) = 341 -> 384
    model = SpaceTimeTransformer(TransformerConfig(embed_dim=256, depth=1))
    assert model.blocks[0].ffn.down.in_features == 704
    assert model.blocks[0].ffn.gate_up.out_features == 2 * 704


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("soft_cap", [0.0, 3.0])
def test_attention_matches_reference(causal, kv_heads, soft_cap):
    torch.manual_seed(1)
    q = torch.randn(3, 4, 5, 8) * 3  # large logits so the soft cap matters
    k = torch.randn(3, kv_heads, 7, 8) * 3
    v = torch.randn(3, kv_heads, 7, 8)
    mask = torch.rand(5, 7) > 0.3
    mask[:, -1] = True  # every query reads at least one key
    got = attention(q, k, v, causal=causal, mask=mask, soft_cap=soft_cap)
    torch.testing.assert_close(got, reference_attention(q, k, v, causal, mask, soft_cap), atol=1e-5, rtol=1e-5)


def test_attention_without_cap_matches_torch_sdpa():
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    got = attention(q, k, v, causal=True, soft_cap=0.0)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)


def test_soft_cap_changes_large_logits_only_a_little_for_small_ones():
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    small = attention(q * 0.1, k, v, causal=False, soft_cap=50.0)
    torch.testing.assert_close(small, attention(q * 0.1, k, v, causal=False, soft_cap=0.0), atol=1e-4, rtol=1e-4)
    big = attention(q * 100, k * 100, v, causal=False, soft_cap=2.0)
    assert not torch.allclose(big, attention(q * 100, k * 100, v, causal=False, soft_cap=0.0), atol=1e-2)


def test_rope_logits_depend_only_on_relative_position():
    torch.manual_seed(4)
    q, k = torch.randn(8), torch.randn(8)

    def logit(pq: int, pk: int) -> torch.Tensor:
        cos, sin = rope_tables(torch.tensor([pq, pk]), 8, 10000.0)
        rq = apply_rope(q[None], cos[:1], sin[:1])
        rk = apply_rope(k[None], cos[1:], sin[1:])
        return (rq * rk).sum()

    torch.testing.assert_close(logit(3, 1), logit(10, 8))
    assert not torch.allclose(logit(3, 1), logit(3, 2))


def test_block_causal_in_time():
    model = tiny()
    x = torch.randn(2, 5, 6, 32)
    y = model(x)
    x2 = x.clone()
    x2[:, 3] += torch.randn(2, 6, 32)
    y2 = model(x2)
    assert torch.equal(y2[:, :3], y[:, :3])  # earlier frames are untouched, bit for bit
    for t in (3, 4):  # the changed frame and every later one do change
        assert (y2[:, t] - y[:, t]).abs().amax() > 1e-3


def test_space_layers_only_without_time_layers_keeps_frames_independent():
    model = tiny(depth=2, time_every=3)  # no time layer
    x = torch.randn(1, 3, 6, 32)
    x2 = x.clone()
    x2[:, 0] += 1.0
    assert torch.equal(model(x2)[:, 1:], model(x)[:, 1:])


@pytest.mark.parametrize("kv_heads", [4, 1])
def test_cache_frame_by_frame_equals_full_forward(kv_heads):
    model = tiny(num_kv_heads=kv_heads)
    x = torch.randn(2, 6, 5, 32)
    full = model(x)
    cache = KVCache()
    steps = [model(x[:, t : t + 1], cache=cache) for t in range(6)]
    assert cache.length == 6
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    # Chunks of several frames at a time give the same result.
    cache = KVCache()
    chunks = [model(x[:, :2], cache=cache), model(x[:, 2:5], cache=cache), model(x[:, 5:], cache=cache)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_query_without_update_leaves_cache_unchanged():
    model = tiny()
    x = torch.randn(1, 4, 5, 32)
    full = model(x)
    cache = KVCache()
    model(x[:, :3], cache=cache)
    noise = torch.randn(1, 1, 5, 32)
    probe = model(noise, cache=cache, update_cache=False)  # e.g. an intermediate denoising step
    assert cache.length == 3
    assert not torch.allclose(probe, full[:, 3:])
    torch.testing.assert_close(model(x[:, 3:], cache=cache), full[:, 3:], atol=1e-5, rtol=1e-5)


def test_cache_rejects_a_different_batch():
    model = tiny()
    cache = KVCache()
    model(torch.randn(2, 1, 5, 32), cache=cache)
    with pytest.raises(ValueError, match="cache holds"):
        model(torch.randn(3, 1, 5, 32), cache=cache)


def test_cache_crop_keeps_a_sliding_window():
    model = tiny(depth=2, time_every=2)
    x = torch.randn(1, 5, 4, 32)
    cache = KVCache()
    model(x[:, :4], cache=cache)
    cache.crop(2)  # keep frames 2 and 3
    windowed = model(x[:, 4:], cache=cache)
    # Same as a fresh causal pass over frames 2..4 (RoPE is relative, so positions may shift).
    torch.testing.assert_close(windowed, model(x[:, 2:5])[:, -1:], atol=1e-5, rtol=1e-5)


def test_grouped_query_attention_has_fewer_key_value_weights():
    full = SpaceTimeTransformer(TransformerConfig(embed_dim=32, depth=1, num_heads=4, num_kv_heads=4))
    grouped = SpaceTimeTransformer(TransformerConfig(embed_dim=32, depth=1, num_heads=4, num_kv_heads=1))
    assert full.blocks[0].attn.qkv.out_features == 32 * 3
    assert grouped.blocks[0].attn.qkv.out_features == 32 + 2 * 8
    y = grouped(torch.randn(2, 3, 5, 32))
    assert y.shape == (2, 3, 5, 32) and torch.isfinite(y).all()


def test_a_token_nobody_reads_cannot_influence_the_others():
    # Token 0 plays the agent token of the next phase: it reads everything, nobody reads it.
    model = tiny(num_registers=3)
    s = 6
    mask = torch.ones(s, s, dtype=torch.bool)
    mask[1:, 0] = False
    x = torch.randn(2, 4, s, 32)
    x2 = x.clone()
    x2[:, :, 0] += torch.randn(2, 4, 32) * 3
    y, y2 = model(x, mask=mask), model(x2, mask=mask)
    torch.testing.assert_close(y2[:, :, 1:], y[:, :, 1:], atol=0, rtol=0)  # not through registers or time either
    assert (y2[:, :, 0] - y[:, :, 0]).abs().amax() > 1e-3
    # Control: without the mask the same change does reach the other tokens.
    assert (model(x2)[:, :, 1:] - model(x)[:, :, 1:]).abs().amax() > 1e-3


def test_the_agent_token_reads_the_others():
    model = tiny()
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[1:, 0] = False
    x = torch.randn(1, 2, 4, 32)
    x2 = x.clone()
    x2[:, :, 2] += 1.0
    assert (model(x2, mask=mask)[:, :, 0] - model(x, mask=mask)[:, :, 0]).abs().amax() > 1e-3


def test_bad_inputs_raise_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match="width 32"):
        model(torch.randn(1, 2, 3, 16))
    with pytest.raises(ValueError, match="mask must be a bool"):
        model(torch.randn(1, 2, 3, 32), mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_kv_heads"):
        TransformerConfig(embed_dim=32, num_heads=4, num_kv_heads=3)


def test_bad_config_file_value_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("num_heads: 8\nnum_kv_heads: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(TransformerConfig, path)


def test_dropout_is_active_in_training_only():
    model = tiny(dropout=0.5)
    x = torch.randn(1, 2, 4, 32)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    model = tiny()
    x = torch.randn(2, 3, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert (y.float() - model(x)).abs().mean() < 0.05
    y.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

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


@pytest.mark.parametrize("depth, time_every", [(4, 2), (3, 1), (5, 2)])
def test_cache_only_pass_stores_the_same_keys_and_values(depth, time_every):
    """A cache-only pass (the last time layer's attention and every later layer skipped) leaves
    the cache exactly as a full pass does, so the next frames see the same context."""
    model = tiny(depth=depth, time_every=time_every)
    x = torch.randn(2, 5, 5, 32)
    full_cache, lean_cache = KVCache(), KVCache()
    model(x[:, :2], cache=full_cache)
    assert model(x[:, :2], cache=lean_cache, cache_only=True) is None
    for t in (2, 3):
        model(x[:, t : t + 1], cache=full_cache)
        model(x[:, t : t + 1], cache=lean_cache, cache_only=True)
    assert lean_cache.length == full_cache.length == 4 and lean_cache.num_streams == full_cache.num_streams
    for layer, (k, v) in full_cache.layers.items():
        torch.testing.assert_close(lean_cache.layers[layer][0], k, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lean_cache.layers[layer][1], v, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(x[:, 4:], cache=lean_cache), model(x)[:, 4:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cache_only"):
        model(x[:, :1], cache_only=True)
    with pytest.raises(ValueError, match="cache_only"):
        model(x[:, :1], cache=lean_cache, update_cache=False, cache_only=True)


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


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_bias_adds_to_capped_logits_in_value_and_gradient(kv_heads):
    torch.manual_seed(5)
    q = (torch.randn(2, 4, 5, 8) * 3).requires_grad_()
    k = (torch.randn(2, kv_heads, 7, 8) * 3).requires_grad_()
    v = torch.randn(2, kv_heads, 7, 8).requires_grad_()
    bias = torch.randn(4, 5, 7) * 2  # per query head
    mask = torch.rand(5, 7) > 0.3
    mask[:, 0] = True

    def reference(q, k, v):
        groups = 4 // kv_heads
        kr, vr = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        logits = 3.0 * torch.tanh(q @ kr.transpose(-1, -2) / math.sqrt(8) / 3.0) + bias
        return logits.masked_fill(~mask, float("-inf")).softmax(-1) @ vr

    got = attention(q, k, v, causal=False, mask=mask, soft_cap=3.0, bias=bias)
    want = reference(q, k, v)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    # A strongly negative bias acts like the boolean mask.
    hidden = torch.zeros(4, 5, 7).masked_fill(~mask, -1e4)
    torch.testing.assert_close(
        attention(q, k, v, causal=False, soft_cap=3.0, bias=hidden),
        attention(q, k, v, causal=False, soft_cap=3.0, mask=mask), atol=1e-5, rtol=1e-5,
    )


def test_space_bias_reaches_space_layers_only_and_keeps_causality():
    model = tiny()
    x = torch.randn(2, 3, 5, 32)
    bias = torch.randn(4, 5, 5)
    with torch.no_grad():
        plain, biased = model(x), model(x, space_bias=bias)
        assert (plain - biased).abs().amax() > 1e-3
        changed = x.clone()
        changed[:, 2] = torch.randn(2, 5, 32)
        torch.testing.assert_close(model(changed, space_bias=bias)[:, :2], biased[:, :2], atol=0, rtol=0)
        cache = KVCache()
        steps = [model(x[:, t : t + 1], cache=cache, space_bias=bias) for t in range(3)]
    torch.testing.assert_close(torch.cat(steps, 1), biased, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="space_bias"):
        model(x, space_bias=torch.zeros(4, 6, 6))


# -- the hand-written autograd Functions against the textbook formulas, and checkpointing -------


@pytest.mark.parametrize("chunk_elements", [1 << 20, 20])  # one chunk; several row chunks
def test_fused_functions_have_exact_gradients(monkeypatch, chunk_elements):
    from torch.autograd import gradcheck

    from dreamerv4.models import transformer

    monkeypatch.setattr(transformer, "_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(6)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x, gain = torch.randn(3, 5, 8, **f64), (torch.rand(8, dtype=torch.float64) + 0.5).requires_grad_()
    assert gradcheck(lambda x, g: transformer._RMSNormFunction.apply(x, g, 1e-6), (x, gain))
    # QKNorm + RoPE on a strided view, as it reads the fused qkv projection.
    qkv = torch.randn(2, 5, 3, 16, **f64)
    cos, sin = torch.randn(5, 8, **f64), torch.randn(5, 8, **f64)
    assert gradcheck(lambda t, c, s: transformer._NormRope.apply(t[..., :8], c, s, 1e-6), (qkv, cos, sin))
    gate, up = torch.randn(4, 6, **f64), torch.randn(4, 6, **f64)
    assert gradcheck(transformer._SwiGLUGate.apply, (gate, up))


@pytest.mark.parametrize("soft_cap", [0.0, 3.0])
def test_chunked_attention_matches_reference_in_value_and_gradient(monkeypatch, soft_cap):
    from dreamerv4.models import transformer

    monkeypatch.setattr(transformer, "_CHUNK_ELEMENTS", 250)  # 2 of the 7 sequences (2 x 10 x 6 logits each) per chunk
    torch.manual_seed(7)
    q = (torch.randn(7, 4, 5, 8) * 3).requires_grad_()
    k = (torch.randn(7, 2, 6, 8) * 3).requires_grad_()
    v = torch.randn(7, 2, 6, 8).requires_grad_()
    mask = torch.rand(5, 6) > 0.3
    mask[:, -1] = True
    got = attention(q, k, v, causal=True, mask=mask, soft_cap=soft_cap)
    want = reference_attention(q, k, v, True, mask, soft_cap)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(got)
    for g, w in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_attention_layer_matches_the_textbook_formulas():
    """QKNorm gains folded into RoPE tables, sigmoid-form soft cap, split SwiGLU: same numbers
    (and gradients) as rms_norm -> apply_rope -> cap * tanh -> softmax written out plainly."""
    model = tiny(num_kv_heads=2)
    block = model.blocks[0]
    attn = block.attn
    x = torch.randn(3, 7, 32, requires_grad=True)
    rope = rope_tables(torch.arange(7), 8, 10000.0)

    def textbook(x: torch.Tensor) -> torch.Tensor:
        q, k, v = (x @ attn.qkv.weight.T).split([32, 16, 16], dim=-1)
        heads = lambda t: t.view(3, 7, -1, 8).transpose(1, 2)  # noqa: E731
        q = apply_rope(F.rms_norm(heads(q), (8,), attn.q_norm.weight, attn.q_norm.eps), *rope)
        k = apply_rope(F.rms_norm(heads(k), (8,), attn.k_norm.weight, attn.k_norm.eps), *rope)
        y = reference_attention(q, k, heads(v), False, None, attn.soft_cap)
        h = x + y.transpose(1, 2).reshape(3, 7, 32) @ attn.out.weight.T
        n = F.rms_norm(h, (32,), block.ffn_norm.weight, block.ffn_norm.eps)
        gate, up = (n @ block.ffn.gate_up.weight.T).chunk(2, dim=-1)
        return h + (F.silu(gate) * up) @ block.ffn.down.weight.T

    def fused(x: torch.Tensor) -> torch.Tensor:
        h = x + attn(x, rope, causal=False)[0]
        return h + block.ffn(block.ffn_norm(h))

    got, want = fused(x), textbook(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    params = [x, attn.qkv.weight, attn.q_norm.weight, attn.k_norm.weight, block.ffn_norm.weight, block.ffn.gate_up.weight]
    grad = torch.randn_like(got)
    for g, w in zip(torch.autograd.grad(got, params, grad), torch.autograd.grad(want, params, grad)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("autocast", [False, True])
def test_activation_checkpointing_gives_the_same_outputs_and_gradients(autocast):
    plain = tiny(dropout=0.1).train()
    recomputed = tiny(dropout=0.1, checkpoint_activations=True).train()
    recomputed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 5, 32)
    results = []
    for model in (plain, recomputed):
        torch.manual_seed(8)  # the same dropout masks; checkpointing must replay them in the recompute
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = model(x)
        y.float().square().mean().backward()
        results.append((y.float(), {n: p.grad for n, p in model.named_parameters()}))
    (y_plain, grads_plain), (y_recomputed, grads_recomputed) = results
    torch.testing.assert_close(y_recomputed, y_plain, atol=0, rtol=0)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_recomputed[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    # The recompute happens in training only: evaluation and caches take the plain path.
    with torch.no_grad():
        torch.testing.assert_close(recomputed.eval()(x), plain.eval()(x), atol=0, rtol=0)


def test_activation_checkpointing_keeps_a_fraction_of_the_activations():
    def saved_bytes(model: SpaceTimeTransformer) -> int:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.train()(torch.randn(2, 4, 5, 32))
        return sum(storages.values())

    plain, recomputed = saved_bytes(tiny()), saved_bytes(tiny(checkpoint_activations=True))
    assert 0 < recomputed < plain / 4


# -- KVCache storage: preallocated buffers, doubled when full ------------------------------------


def test_cache_long_context_with_probes_matches_full_forward():
    """40 frames one by one, an uncommitted probe before each (as a denoising step would do):
    the buffers grow several times, probes are overwritten, and the outputs equal one full pass."""
    model = tiny(depth=2, time_every=2)
    x = torch.randn(1, 40, 3, 32)
    with torch.no_grad():
        full = model(x)
        cache = KVCache()
        outputs = []
        for t in range(40):
            model(torch.randn(1, 1, 3, 32), cache=cache, update_cache=False)
            outputs.append(model(x[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, atol=1e-5, rtol=1e-5)
    keys, values = cache.layers[1]
    assert keys.shape == values.shape == (1 * (3 + 2), 2, 40, 8) and cache.length == 40


def test_cache_appends_in_place_until_full_then_grows_by_a_quarter():
    model = tiny(depth=2, time_every=2)
    cache = KVCache()
    pointers, capacities = [], []
    with torch.no_grad():
        for _ in range(40):
            model(torch.randn(2, 1, 3, 32), cache=cache)
            buffer = cache._buffers[1][0]
            pointers.append(buffer.data_ptr())
            capacities.append(buffer.shape[2])
    # end + max(16, end // 4) frames whenever the next frame does not fit: 1 -> 17, 18 -> 34, 35 -> 51.
    assert capacities == [17] * 17 + [34] * 17 + [51] * 6
    # Within one capacity the stored frames are never copied: the buffer stays where it is.
    assert len(set(pointers[:17])) == 1 and len(set(pointers[17:34])) == 1
    keys, values = cache.layers[1]
    assert keys.shape == (2 * 5, 2, 40, 8)


def test_cache_under_bf16_autocast_matches_full_forward():
    model = tiny()
    x = torch.randn(2, 12, 5, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(x).float()
        cache = KVCache()
        steps = torch.cat([model(x[:, t : t + 1], cache=cache).float() for t in range(12)], dim=1)
    assert cache.layers[1][0].dtype == torch.bfloat16
    torch.testing.assert_close(steps, full, atol=3e-2, rtol=3e-2)


def test_cache_with_gradients_keeps_autograd_intact():
    """With gradients flowing through the cached keys/values, frame-by-frame gives the full
    pass's outputs and gradients (no in-place write corrupts a saved tensor)."""
    model = tiny(depth=2, time_every=2)
    x = torch.randn(1, 4, 3, 32)
    model(x).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    cache = KVCache()
    torch.cat([model(x[:, t : t + 1], cache=cache) for t in range(4)], dim=1).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_cache_probe_of_several_frames_then_fewer_ignores_the_stale_buffer_space():
    """An uncommitted call writes 3 frames after the context; the next call writes 1: the two
    stale probe frames behind it (and the zero-filled space) must not be attended to."""
    model = tiny(depth=2, time_every=2)
    x = torch.randn(1, 5, 3, 32)
    with torch.no_grad():
        full = model(x)
        cache = KVCache()
        model(x[:, :4], cache=cache)
        model(torch.randn(1, 3, 3, 32) * 10, cache=cache, update_cache=False)
        last = model(x[:, 4:], cache=cache)
    torch.testing.assert_close(last, full[:, 4:], atol=1e-5, rtol=1e-5)


def test_cache_select_rows_continues_as_if_only_those_rows_had_run():
    model = tiny()
    x = torch.randn(3, 5, 5, 32)
    cache = KVCache()
    for t in range(3):
        model(x[:, t : t + 1], cache=cache)
    cache.select_rows([2, 0], batch=3)  # reordered on purpose
    after = torch.cat([model(x[[2, 0], t : t + 1], cache=cache) for t in range(3, 5)], dim=1)
    alone = model(x[[2, 0]])[:, 3:]
    torch.testing.assert_close(after, alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not a multiple"):
        cache.select_rows([0], batch=3)

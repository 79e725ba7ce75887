"""`compile_blocks` (TrainConfig.compile): compiled transformer blocks compute what the eager ones do.

Slow (inductor compiles two block kinds, forward and backward, on one core): ~80 s wall here.
"""

from __future__ import annotations

import copy

import pytest
import torch

from dreamerv4.models.transformer import KVCache, SpaceTimeTransformer, TransformerConfig, compile_blocks


def _pair() -> tuple[SpaceTimeTransformer, SpaceTimeTransformer]:
    cfg = TransformerConfig(embed_dim=32, depth=2, num_heads=4, num_kv_heads=2, time_every=2, num_registers=2,
                            soft_cap=5.0)
    torch.manual_seed(0)
    eager = SpaceTimeTransformer(cfg).train()
    with torch.no_grad():  # random gains, so no symmetry hides a difference
        for name, p in eager.named_parameters():
            if name.endswith("weight") and p.dim() == 1:
                p.uniform_(0.5, 1.5)
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled) == 2
    return eager, compiled


@pytest.mark.slow  # ~50 CPU seconds of inductor compilation on one core
def test_compiled_blocks_match_eager_in_value_and_gradient_and_keep_cache_and_names():
    eager, compiled = _pair()
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints are unchanged
    x = torch.randn(2, 3, 5, 32, generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for model in (eager, compiled):
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        (y * torch.linspace(-1, 1, 32)).square().sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
    # With a cache the blocks run eagerly: frame-by-frame equals the full forward.
    compiled.eval()
    with torch.no_grad():
        full = compiled(x)
        cache = KVCache()
        steps = torch.cat([compiled(x[:, t : t + 1], cache=cache) for t in range(3)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-5)


def test_older_torch_is_not_compiled_and_says_so(monkeypatch, capsys):
    """On torch older than MIN_COMPILE_TORCH (2.11 gave zero gradients for compiled norm gains),
    compile_blocks leaves every block eager and says why."""
    from dreamerv4.models import transformer

    cfg = TransformerConfig(embed_dim=32, depth=2, num_heads=4, num_kv_heads=2, time_every=2, num_registers=2)
    model = SpaceTimeTransformer(cfg)
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    assert transformer.torch_version() == (2, 11)
    assert compile_blocks(model) == 0
    assert all(getattr(block, "_compiled_call_impl", None) is None for block in model.modules())
    assert "torch 2.11.0+cu130 is older than 2.13" in capsys.readouterr().err
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    assert transformer.torch_version() == (2, 13) >= transformer.MIN_COMPILE_TORCH

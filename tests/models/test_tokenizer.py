"""Behaviour of the causal masked-autoencoding tokenizer: layout, masks, causality, bottleneck."""

from __future__ import annotations

import pytest
import torch

from dreamerv4.config import load_config
from dreamerv4.errors import ConfigError
from dreamerv4.models.tokenizer import Tokenizer, TokenizerConfig, patchify, unpatchify
from dreamerv4.models.transformer import KVCache, TransformerConfig


def tiny_config(**overrides) -> TokenizerConfig:
    stack = dict(embed_dim=32, depth=2, num_heads=2, num_kv_heads=1, time_every=2, num_registers=2)
    cfg = dict(encoder=TransformerConfig(**stack), decoder=TransformerConfig(**stack))
    cfg.update(overrides)
    return TokenizerConfig(**cfg)


def tiny_tokenizer(**overrides) -> Tokenizer:
    torch.manual_seed(0)
    return Tokenizer(tiny_config(**overrides)).eval()


def test_patch_layout_is_raster_order_with_channels_last():
    frames = torch.rand(2, 3, 3, 64, 64)
    patches = patchify(frames, 8)
    assert patches.shape == (2, 3, 64, 192)
    for y, x, c in [(0, 0, 0), (5, 13, 2), (63, 63, 1), (17, 40, 0)]:
        index = (y // 8) * 8 + x // 8
        offset = ((y % 8) * 8 + x % 8) * 3 + c
        assert patches[1, 2, index, offset] == frames[1, 2, c, y, x]
    assert torch.equal(unpatchify(patches, 8), frames)


def test_forward_contract():
    tok = tiny_tokenizer()
    out = tok(torch.rand(2, 3, 3, 64, 64))
    assert out["latents"].shape == (2, 3, 16, 32) and out["latents"].abs().max() < 1  # tanh bottleneck
    assert out["reconstructed"].shape == (2, 3, 64, 192) and out["reconstructed"].dtype == torch.float32
    assert out["mask"].shape == (2, 3, 64) and out["mask"].dtype == torch.bool


def test_fixed_mask_drops_exactly_the_configured_share():
    tok = tiny_tokenizer()
    mask = tok.sample_mask(8, 16)
    assert (mask.sum(-1) == round(0.75 * 64)).all()
    assert not torch.equal(mask[0, 0], mask[0, 1])  # different patches per image
    assert (tok.sample_mask(4, 4, mask_rate=0.25).sum(-1) == 16).all()
    assert not tok.sample_mask(4, 4, mask_rate=0.0).any()


def test_uniform_mask_rate_varies_per_image_with_the_right_mean():
    tok = tiny_tokenizer(mask_mode="uniform")
    torch.manual_seed(0)
    rates = tok.sample_mask(50, 40).float().mean(-1).flatten()  # 2000 images
    assert abs(rates.mean().item() - 0.45) < 0.02
    assert rates.std() > 0.2  # U(0, 0.9) has std 0.26
    assert rates.min() < 0.05 and rates.max() <= round(0.9 * 64) / 64  # whole patches


def test_mask_follows_the_rng_state_and_the_generator():
    tok = tiny_tokenizer()
    state = torch.get_rng_state()
    first = tok.sample_mask(2, 3)
    torch.set_rng_state(state)
    assert torch.equal(tok.sample_mask(2, 3), first)
    a = tok.sample_mask(2, 3, generator=torch.Generator().manual_seed(5))
    b = tok.sample_mask(2, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, first)


def test_dropped_patches_are_invisible_and_kept_ones_are_not():
    tok = tiny_tokenizer()
    frames = torch.rand(1, 2, 3, 64, 64)
    out = tok(frames, generator=torch.Generator().manual_seed(1))
    dropped = unpatchify(out["mask"][..., None].float().expand(-1, -1, -1, 192), 8).bool()
    changed = torch.where(dropped, torch.rand_like(frames), frames)
    again = tok(changed, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again["mask"], out["mask"])
    torch.testing.assert_close(again["latents"], out["latents"], atol=0, rtol=0)
    kept_changed = torch.where(dropped, frames, torch.rand_like(frames))
    third = tok(kept_changed, generator=torch.Generator().manual_seed(1))
    assert (third["latents"] - out["latents"]).abs().amax() > 1e-4


def test_encoder_and_decoder_are_causal_in_time():
    tok = tiny_tokenizer()
    frames = torch.rand(2, 4, 3, 64, 64)
    out = tok(frames, mask_rate=0.0)
    changed = frames.clone()
    changed[:, 2] = torch.rand(2, 3, 64, 64)
    out2 = tok(changed, mask_rate=0.0)
    for key in ("latents", "reconstructed"):
        assert torch.equal(out2[key][:, :2], out[key][:, :2]), key
        for t in (2, 3):  # the changed frame and the later one do change
            assert (out2[key][:, t] - out[key][:, t]).abs().amax() > 1e-5, (key, t)
    # Decoding alone: frame t needs latents <= t only.
    latents = out["latents"]
    changed_latents = latents.clone()
    changed_latents[:, 3] = torch.rand_like(latents[:, 3]) * 2 - 1
    assert torch.equal(tok.decode(changed_latents)[:, :3], tok.decode(latents)[:, :3])


def test_reconstruction_goes_only_through_the_bottleneck():
    tok = tiny_tokenizer()
    frames = torch.rand(2, 3, 3, 64, 64)
    out = tok(frames, mask_rate=0.0)
    with torch.no_grad():
        torch.testing.assert_close(tok.encode(frames), out["latents"], atol=1e-6, rtol=1e-6)
        decoded = tok.decode(tok.encode(frames))
    expected = unpatchify(out["reconstructed"], 8).clamp(0, 1)
    torch.testing.assert_close(decoded, expected, atol=1e-6, rtol=1e-6)
    # With the latents held fixed, other input frames change nothing in the reconstruction.
    fixed = out["latents"]
    tok.encode_patches = lambda patches, mask=None, cache=None: fixed
    other = tok(torch.rand(2, 3, 3, 64, 64), mask_rate=0.0)
    assert torch.equal(other["reconstructed"], out["reconstructed"])


def test_frame_by_frame_encode_and_decode_match_full_sequence():
    tok = tiny_tokenizer()
    frames = torch.rand(2, 4, 3, 64, 64)
    with torch.no_grad():
        latents, decoded = tok.encode(frames), tok.decode(tok.encode(frames))
        enc_cache, dec_cache = KVCache(), KVCache()
        step_latents = [tok.encode(frames[:, t : t + 1], cache=enc_cache) for t in range(4)]
        step_frames = [tok.decode(z, cache=dec_cache) for z in step_latents]
    torch.testing.assert_close(torch.cat(step_latents, 1), latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(step_frames, 1), decoded, atol=1e-5, rtol=1e-5)


def test_decode_output_is_an_image_in_unit_range():
    tok = tiny_tokenizer()
    with torch.no_grad():
        tok.to_patch.bias.fill_(2.0)  # push raw predictions outside [0, 1]
        images = tok.decode(torch.rand(1, 2, 16, 32) * 2 - 1)
    assert images.shape == (1, 2, 3, 64, 64)
    assert images.min() >= 0 and images.max() <= 1


def test_reconstruction_loss_falls_and_reaches_every_parameter():
    tok = tiny_tokenizer(mask_rate=0.5, image_size=32)  # 16 patches keep the test quick
    # Blocky frames (2x2 grid of flat colours, each block 4 patches): compressible, and a dropped
    # patch can be inferred from its neighbours, unlike pixel noise.
    frames = torch.rand(1, 2, 3, 2, 2).repeat_interleave(16, dim=-1).repeat_interleave(16, dim=-2)
    target = patchify(frames, 8)

    def unmasked_error() -> float:
        with torch.no_grad():
            return (tok(frames, mask_rate=0.0)["reconstructed"] - target).square().mean().item()

    before = unmasked_error()
    optimizer = torch.optim.Adam(tok.parameters(), lr=1e-3)
    # Linear decay to 0: at a constant lr the last updates can land on a loss spike, and whether
    # they did flipped with float-noise changes to the kernels (same losses for 50 steps).
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 60)
    tok.train()
    for step in range(60):
        loss = (tok(frames)["reconstructed"] - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            missing = [n for n, p in tok.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not missing, missing
        optimizer.step()
        schedule.step()
    tok.eval()
    assert unmasked_error() < 0.3 * before


def test_bf16_autocast_gives_float32_outputs_close_to_fp32():
    tok = tiny_tokenizer()
    frames = torch.rand(1, 2, 3, 64, 64)
    reference = tok(frames, mask_rate=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tok(frames, mask_rate=0.0)
    assert out["latents"].dtype == out["reconstructed"].dtype == torch.float32
    assert (out["latents"] - reference["latents"]).abs().mean() < 0.02
    assert (out["reconstructed"] - reference["reconstructed"]).abs().mean() < 0.02


def test_bad_frames_raise_clear_errors():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="float frames"):
        tok(torch.zeros(1, 2, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="float frames"):
        tok(torch.rand(1, 2, 3, 32, 32))
    with pytest.raises(ValueError, match="latents"):
        tok.decode(torch.rand(1, 2, 8, 32))


def test_bad_mask_settings_are_config_errors(tmp_path):
    path = tmp_path / "tok.yaml"
    path.write_text("mask_mode: random\n")
    with pytest.raises(ConfigError, match="tok.yaml"):
        load_config(TokenizerConfig, path)
    path.write_text("mask_rate: 1.5\n")
    with pytest.raises(ConfigError, match="mask_rate"):
        load_config(TokenizerConfig, path)


def test_seed_size_latent_and_patch_shapes():
    cfg = TokenizerConfig()
    assert (cfg.num_patches, cfg.patch_dim, cfg.num_latents, cfg.latent_dim) == (64, 192, 16, 32)


def test_locality_prior_ties_latents_to_image_regions_and_keeps_the_contract():
    # Four heads: slopes 4, 2, 1 and a global 0 (with two heads the global one would dominate).
    stack = dict(embed_dim=32, depth=2, num_heads=4, num_kv_heads=1, time_every=2, num_registers=2)
    four_heads = dict(encoder=TransformerConfig(**stack), decoder=TransformerConfig(**stack))
    tok = tiny_tokenizer(locality_slope=4.0, **four_heads)
    frames = torch.rand(1, 2, 3, 64, 64, requires_grad=True)
    out = tok(frames, mask_rate=0.0)
    # At initialisation latent 0 sits over the top-left 2x2 patches: it reads them far more than
    # the bottom-right ones; without the prior the two corners matter about equally.
    (grad,) = torch.autograd.grad(out["latents"][0, 0, 0].square().sum(), frames)
    top_left, bottom_right = grad[0, 0, :, :16, :16].abs().sum(), grad[0, 0, :, -16:, -16:].abs().sum()
    assert top_left > 5 * bottom_right
    plain = tiny_tokenizer(**four_heads)
    (grad,) = torch.autograd.grad(plain(frames, mask_rate=0.0)["latents"][0, 0, 0].square().sum(), frames)
    ratio = grad[0, 0, :, :16, :16].abs().sum() / grad[0, 0, :, -16:, -16:].abs().sum()
    assert 0.5 < ratio < 2.0
    # Block-causal, cache-equivalent and bottlenecked as without the prior.
    frames = frames.detach()
    with torch.no_grad():
        changed = frames.clone()
        changed[:, 1] = torch.rand(1, 3, 64, 64)
        torch.testing.assert_close(tok(changed, mask_rate=0.0)["latents"][:, :1], out["latents"][:, :1].detach(), atol=0, rtol=0)
        latents = tok.encode(frames)
        enc_cache, dec_cache = KVCache(), KVCache()
        step_latents = [tok.encode(frames[:, t : t + 1], cache=enc_cache) for t in range(2)]
        step_frames = [tok.decode(z, cache=dec_cache) for z in step_latents]
        torch.testing.assert_close(torch.cat(step_latents, 1), latents, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.cat(step_frames, 1), tok.decode(latents), atol=1e-5, rtol=1e-5)
    assert "encoder_bias" not in tok.state_dict()  # a fixed prior, rebuilt from the config
    with pytest.raises(ValueError, match="square number of latents"):
        tiny_config(locality_slope=1.0, num_latents=8)


def test_mlp_head_lifts_the_rank_limit_of_the_linear_read_out():
    # A linear read-out from width 32 puts every predicted 16x16x3 patch in a 33-dim affine
    # subspace; the GELU head (head_hidden) escapes it, and the contract stays the same.
    latents = torch.rand(4, 2, 16, 32) * 2 - 1

    def patch_rank(tok: Tokenizer) -> int:
        with torch.no_grad():
            patches = tok.decode_patches(latents).reshape(-1, 768).double()
        return int(torch.linalg.matrix_rank(patches - patches.mean(0), rtol=1e-6))

    assert patch_rank(tiny_tokenizer(patch_size=16)) <= 33
    tok = tiny_tokenizer(patch_size=16, head_hidden=96)
    assert patch_rank(tok) > 60
    frames = torch.rand(1, 2, 3, 64, 64)
    out = tok(frames, mask_rate=0.0)
    assert out["reconstructed"].shape == (1, 2, 16, 768)
    with torch.no_grad():
        changed = frames.clone()
        changed[:, 1] = torch.rand(1, 3, 64, 64)
        assert torch.equal(tok(changed, mask_rate=0.0)["reconstructed"][:, :1], out["reconstructed"][:, :1])
    with pytest.raises(ValueError, match="head_hidden"):
        tiny_config(head_hidden=-1)

"""Phase 1A: the causal masked-autoencoding tokenizer (docs/design.md, Models; DreamerV4 section 3.1).

Each 64x64 frame is cut into 8x8 patches (64 patches of 192 values). The encoder, a
`SpaceTimeTransformer`, reads the patch tokens plus 16 learned latent tokens per frame; the
bottleneck is tanh(linear(encoder output at the latent tokens)), (B, T, 16, 32). The decoder,
a second transformer, reads only the bottleneck (projected up to its width) plus 64 learned
patch-query tokens, never the input patches, and predicts the 192 values of every patch. Both
are block-causal in time, so frame t's latents depend on frames <= t and decoding frame t needs
latents <= t. Masked autoencoding: dropped patches are replaced by a learned mask embedding
before the encoder.

    tok = Tokenizer(TokenizerConfig())
    out = tok(frames)                  # frames (B, T, 3, 64, 64) float in [0, 1]
    out["latents"]                     # (B, T, 16, 32) in (-1, 1)
    out["reconstructed"]               # (B, T, 64, 192) predicted patch pixels, unbounded
    out["mask"]                        # (B, T, 64) bool, True = patch was dropped
    frames_hat = tok.decode(tok.encode(frames))   # (B, T, 3, 64, 64) clamped to [0, 1]

Patch layout (`patchify`/`unpatchify`): patches in raster order over the 8x8 grid
(index = row * 8 + col), each patch's 192 values ordered (ph, pw, c), i.e. pixel-major with the
three channels adjacent. `reconstructed` is a linear read-out in the same [0, 1] pixel units
(no squashing, so the loss gets full gradients near black and white); `decode` clamps to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from dreamerv4.models.transformer import KVCache, SpaceTimeTransformer, TransformerConfig


@dataclass
class TokenizerConfig:
    image_size: int = 64
    patch_size: int = 8
    num_latents: int = 16
    latent_dim: int = 32
    encoder: TransformerConfig = field(default_factory=TransformerConfig)
    decoder: TransformerConfig = field(default_factory=TransformerConfig)
    # "fixed": drop `mask_rate` of the patches of every image; "uniform": rate ~ U(0, mask_max) per image
    mask_mode: Literal["fixed", "uniform"] = "fixed"
    mask_rate: float = 0.75
    mask_max: float = 0.9
    # 2D locality prior (ALiBi-like, in the space layers of both stacks): logit bias
    # -slope_h * distance between the tokens' (row, col) positions, in patch units. Patches and
    # patch queries sit on their grid cells, latent tokens on an evenly spread sqrt(L) x sqrt(L)
    # grid. Head h gets slope locality_slope * 2**-h, the last head 0 (global). 0 disables it (the paper's model).
    locality_slope: float = 0.0
    # Decoder read-out: 0 = one linear map per patch query (the reference model); > 0 = a GELU MLP with this
    # hidden width, so a wide patch (16x16x3 = 768 values) is not limited to rank embed_dim.
    head_hidden: int = 0

    def __post_init__(self) -> None:
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.mask_mode not in ("fixed", "uniform"):
            raise ValueError(f"mask_mode must be 'fixed' or 'uniform', got {self.mask_mode!r}")
        if not (0.0 <= self.mask_rate < 1.0 and 0.0 <= self.mask_max < 1.0):
            raise ValueError(f"mask_rate ({self.mask_rate}) and mask_max ({self.mask_max}) must be in [0, 1)")
        if self.num_latents < 1 or self.latent_dim < 1:
            raise ValueError("num_latents and latent_dim must be >= 1")
        if self.head_hidden < 0:
            raise ValueError(f"head_hidden must be >= 0, got {self.head_hidden}")
        if self.locality_slope < 0:
            raise ValueError(f"locality_slope must be >= 0, got {self.locality_slope}")
        if self.locality_slope > 0 and round(self.num_latents**0.5) ** 2 != self.num_latents:
            raise ValueError(f"locality_slope needs a square number of latents, got {self.num_latents}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * 3


def patchify(frames: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(..., 3, H, W) -> (..., H/p * W/p, p * p * 3): raster-order patches, values ordered (ph, pw, c)."""
    *lead, c, h, w = frames.shape
    gh, gw = h // patch_size, w // patch_size
    x = frames.reshape(-1, c, gh, patch_size, gw, patch_size).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(*lead, gh * gw, patch_size * patch_size * c)


def token_grid_positions(cfg: TokenizerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) positions in patch units: patches (N, 2) on their raster-order cells, latent
    tokens (L, 2) in raster order on an evenly spread sqrt(L) x sqrt(L) grid over the same image."""
    grid = cfg.image_size // cfg.patch_size
    cells = torch.arange(grid, dtype=torch.float32)
    patches = torch.stack(torch.meshgrid(cells, cells, indexing="ij"), dim=-1).reshape(-1, 2)
    side = round(cfg.num_latents**0.5)
    centres = (torch.arange(side, dtype=torch.float32) + 0.5) * (grid / side) - 0.5
    latents = torch.stack(torch.meshgrid(centres, centres, indexing="ij"), dim=-1).reshape(-1, 2)
    return patches, latents


def locality_bias(positions: torch.Tensor, num_heads: int, slope: float) -> torch.Tensor:
    """Attention-logit bias (num_heads, S, S) = -slope_h * distance(token i, token j) for positions
    (S, 2); slope_h = slope * 2**-h, and the last head gets 0 so it stays global."""
    slopes = torch.tensor([slope * 2.0**-h for h in range(num_heads - 1)] + [0.0])
    distance = torch.cdist(positions, positions)
    return -slopes[:, None, None] * distance


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify` for square images: (..., N, p * p * c) -> (..., c, H, W)."""
    *lead, n, _ = patches.shape
    grid = int(round(n**0.5))
    if grid * grid != n:
        raise ValueError(f"unpatchify needs a square number of patches, got {n}")
    x = patches.reshape(-1, grid, grid, patch_size, patch_size, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(*lead, channels, grid * patch_size, grid * patch_size)


class Tokenizer(nn.Module):
    """Causal masked-autoencoding tokenizer; see the module docstring for shapes and layout."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        enc_width, dec_width = cfg.encoder.embed_dim, cfg.decoder.embed_dim
        n, lat = cfg.num_patches, cfg.num_latents
        self.patch_embed = nn.Linear(cfg.patch_dim, enc_width, bias=False)
        self.patch_pos = nn.Parameter(torch.randn(n, enc_width) * 0.02)  # 2D position, beyond RoPE's 1D token index
        self.mask_token = nn.Parameter(torch.randn(enc_width) * 0.02)
        self.latent_tokens = nn.Parameter(torch.randn(lat, enc_width) * 0.02)
        self.encoder = SpaceTimeTransformer(cfg.encoder)
        self.to_latent = nn.Linear(enc_width, cfg.latent_dim, bias=False)
        self.from_latent = nn.Linear(cfg.latent_dim, dec_width, bias=False)
        self.latent_slot = nn.Parameter(torch.randn(lat, dec_width) * 0.02)
        self.patch_queries = nn.Parameter(torch.randn(n, dec_width) * 0.02)
        self.decoder = SpaceTimeTransformer(cfg.decoder)
        self.to_patch = nn.Linear(cfg.head_hidden or dec_width, cfg.patch_dim)
        self.head = None
        if cfg.head_hidden:
            self.head = nn.Sequential(nn.Linear(dec_width, cfg.head_hidden), nn.GELU())
            nn.init.trunc_normal_(self.head[0].weight, std=dec_width**-0.5, a=-2 * dec_width**-0.5, b=2 * dec_width**-0.5)
            nn.init.zeros_(self.head[0].bias)
        for linear in (self.patch_embed, self.to_latent, self.from_latent):
            nn.init.trunc_normal_(linear.weight, std=0.02, a=-0.04, b=0.04)
        # Start as a mid-grey image with small noise: a small read-out keeps early losses and
        # gradients tame, while leaving the decoder's output visibly input-dependent.
        nn.init.normal_(self.to_patch.weight, std=0.005)
        nn.init.constant_(self.to_patch.bias, 0.5)
        encoder_bias = decoder_bias = None
        if cfg.locality_slope > 0:
            patch_pos, latent_pos = token_grid_positions(cfg)
            encoder_bias = locality_bias(torch.cat((patch_pos, latent_pos)), cfg.encoder.num_heads, cfg.locality_slope)
            decoder_bias = locality_bias(torch.cat((latent_pos, patch_pos)), cfg.decoder.num_heads, cfg.locality_slope)
        # Fixed priors (not parameters, not saved): token order is patches then latents in the
        # encoder, latents then patch queries in the decoder.
        self.register_buffer("encoder_bias", encoder_bias, persistent=False)
        self.register_buffer("decoder_bias", decoder_bias, persistent=False)

    # -- masks ---------------------------------------------------------------------------------

    def sample_mask(
        self,
        batch: int,
        frames: int,
        mask_rate: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Boolean (batch, frames, num_patches), True = dropped; drawn on the CPU.

        mask_rate None follows the config: "fixed" drops round(cfg.mask_rate * N) patches of
        every image, "uniform" draws a rate ~ U(0, cfg.mask_max) per image and drops
        round(rate * N). A float drops round(mask_rate * N) of every image (0 drops none).
        The global torch RNG is used unless `generator` is given, so a restored RNG state
        reproduces the masks.
        """
        n = self.cfg.num_patches
        if mask_rate is not None:
            if not 0.0 <= mask_rate <= 1.0:
                raise ValueError(f"mask_rate must be in [0, 1], got {mask_rate}")
            rates = torch.full((batch, frames), float(mask_rate))
        elif self.cfg.mask_mode == "fixed":
            rates = torch.full((batch, frames), self.cfg.mask_rate)
        else:
            rates = torch.rand(batch, frames, generator=generator) * self.cfg.mask_max
        num_dropped = torch.round(rates * n)
        if not bool((num_dropped > 0).any()):
            return torch.zeros(batch, frames, n, dtype=torch.bool)
        ranks = torch.rand(batch, frames, n, generator=generator).argsort(dim=-1).argsort(dim=-1)
        return ranks < num_dropped[..., None]

    # -- encoder and decoder -------------------------------------------------------------------

    def _check_frames(self, frames: torch.Tensor) -> None:
        size = self.cfg.image_size
        if frames.dim() != 5 or tuple(frames.shape[2:]) != (3, size, size) or not frames.is_floating_point():
            raise ValueError(
                f"expected float frames (B, T, 3, {size}, {size}) in [0, 1], got {frames.dtype} {tuple(frames.shape)}"
            )

    def encode_patches(
        self, patches: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Patches (B, T, N, patch_dim) in [0, 1], optional drop mask (B, T, N) -> latents (B, T, L, latent_dim)."""
        b, t, n, _ = patches.shape
        tokens = self.patch_embed(patches * 2.0 - 1.0)  # centre pixel values around zero
        if mask is not None:
            tokens = torch.where(mask.to(tokens.device)[..., None], self.mask_token.to(tokens.dtype), tokens)
        tokens = tokens + self.patch_pos.to(tokens.dtype)
        latent_tokens = self.latent_tokens.to(tokens.dtype).expand(b, t, -1, -1)
        h = self.encoder(torch.cat((tokens, latent_tokens), dim=2), cache=cache, space_bias=self.encoder_bias)
        return torch.tanh(self.to_latent(h[:, :, n:]))

    def decode_patches(self, latents: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Latents (B, T, L, latent_dim) -> predicted patches (B, T, N, patch_dim), unbounded."""
        b, t, lat, _ = latents.shape
        h = self.from_latent(latents) + self.latent_slot.to(latents.dtype)
        queries = self.patch_queries.to(h.dtype).expand(b, t, -1, -1)
        h = self.decoder(torch.cat((h, queries), dim=2), cache=cache, space_bias=self.decoder_bias)[:, :, lat:]
        if self.head is not None:
            h = self.head(h)
        return self.to_patch(h)

    def forward(
        self, frames: torch.Tensor, mask_rate: float | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """frames (B, T, 3, H, W) float in [0, 1] -> {"latents", "reconstructed", "mask"} (module doc).

        Masking follows `mask_rate` (see `sample_mask`), not train/eval mode: evaluation passes
        mask_rate=0.0. Outputs are float32 even under autocast.
        """
        self._check_frames(frames)
        b, t = frames.shape[:2]
        mask = self.sample_mask(b, t, mask_rate, generator).to(frames.device)
        patches = patchify(frames, self.cfg.patch_size)
        latents = self.encode_patches(patches, mask)
        reconstructed = self.decode_patches(latents)
        return {"latents": latents.float(), "reconstructed": reconstructed.float(), "mask": mask}

    def encode(self, frames: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """frames (B, T, 3, H, W) in [0, 1] -> latents (B, T, L, latent_dim), without masking.

        With a `cache` (a fresh `KVCache()` for the first call), `frames` are the frames after
        those already encoded into it: frame-by-frame encoding gives the same latents. Gradients
        flow as usual; wrap calls in `torch.no_grad()` when the tokenizer is frozen."""
        self._check_frames(frames)
        return self.encode_patches(patchify(frames, self.cfg.patch_size), cache=cache).float()

    def decode(self, latents: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """latents (B, T, L, latent_dim) -> frames (B, T, 3, H, W) clamped to [0, 1].

        Frame t depends on latents <= t only; a `cache` decodes frame by frame (see `encode`)."""
        expected = (self.cfg.num_latents, self.cfg.latent_dim)
        if latents.dim() != 4 or tuple(latents.shape[2:]) != expected:
            raise ValueError(f"expected latents (B, T, {expected[0]}, {expected[1]}), got {tuple(latents.shape)}")
        patches = self.decode_patches(latents, cache=cache).float()
        return unpatchify(patches, self.cfg.patch_size).clamp(0.0, 1.0)

"""Phase 1A: causal masked-autoencoding tokenizer. (Owned by the model work; stub fixes the config.)"""

from __future__ import annotations

from dataclasses import dataclass, field

from dreamerv4.models.transformer import TransformerConfig


@dataclass
class TokenizerConfig:
    image_size: int = 64
    patch_size: int = 8
    num_latents: int = 16
    latent_dim: int = 32
    encoder: TransformerConfig = field(default_factory=TransformerConfig)
    decoder: TransformerConfig = field(default_factory=TransformerConfig)
    mask_mode: str = "fixed"  # "fixed": drop `mask_rate` of patches; "uniform": rate ~ U(0, mask_max) per image
    mask_rate: float = 0.75
    mask_max: float = 0.9

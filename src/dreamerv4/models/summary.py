"""Parameter counts of the configured models, next to the reference arithmetic (`dreamerv4 info params`, info.py).

    dreamerv4 info params --config configs/crafter-small.yaml [tokenizer.model.encoder.depth=4 ...]

Prints, for the tokenizer, every top-level module, each transformer stack and one layer split
into attention, QKNorm, SwiGLU and norms, then compares with the per-layer and per-stack numbers
of the reference arithmetic this project started from (docs/design.md, Reference sizes: ~1.28M per layer, ~7.7M per 6-layer stack at width 256) and says
where each difference comes from.
"""

from __future__ import annotations

import torch
from torch import nn

from dreamerv4.models.tokenizer import Tokenizer, TokenizerConfig
from dreamerv4.models.transformer import Block, SpaceTimeTransformer, TransformerConfig

# The reference arithmetic (docs/design.md, Reference sizes), for embed_dim 256, depth 6.
SEED_ATTENTION = 197_000  # "Attention: ~197K parameters" (its QKV projection, 3 x 256 x 256)
SEED_FFN = 1_081_344  # "Total FFN params per layer: 256x704 + 256x704 + 704x256 = 1,081,344"
SEED_LAYER = 1_280_000  # "Total per layer: ~1.28M parameters"
SEED_STACK = 7_700_000  # "Full Transformer (6 layers): Total: ~7.7M parameters"


def count(module: nn.Module | nn.Parameter) -> int:
    if isinstance(module, nn.Parameter):
        return module.numel()
    return sum(p.numel() for p in module.parameters())


def _layer_lines(block: Block, indent: str) -> list[str]:
    attn = block.attn
    return [
        f"{indent}attention: qkv {count(attn.qkv):,} + out {count(attn.out):,} "
        f"+ QKNorm {count(attn.q_norm) + count(attn.k_norm):,}",
        f"{indent}SwiGLU (hidden {block.ffn.down.in_features}): {count(block.ffn):,}",
        f"{indent}pre-norms: {count(block.attn_norm) + count(block.ffn_norm):,}",
    ]


def stack_report(name: str, stack: SpaceTimeTransformer) -> list[str]:
    cfg = stack.cfg
    time_layers = [i for i in range(cfg.depth) if cfg.is_time_layer(i)]
    layer = count(stack.blocks[0])
    lines = [
        f"  {name}: {count(stack):,}  ({cfg.depth} layers, time attention at layer(s) {time_layers or 'none'}; "
        f"width {cfg.embed_dim}, {cfg.num_heads} query / {cfg.num_kv_heads} key-value heads of {cfg.head_dim})",
        f"    per layer: {layer:,}",
        *_layer_lines(stack.blocks[0], "      "),
        f"    layers {cfg.depth} x {layer:,} = {cfg.depth * layer:,}; registers {count(stack.registers):,}; "
        f"final norm {count(stack.norm):,}",
    ]
    return lines


def seed_comparison(cfg: TransformerConfig, stack: SpaceTimeTransformer) -> list[str]:
    """Explain the gap between the reference arithmetic's counts ("seed") and this stack's."""
    d, hd = cfg.embed_dim, cfg.head_dim
    block = stack.blocks[0]
    attn_here = count(block.attn)
    ffn_here = count(block.ffn)
    layer_here = count(block)
    gqa_saving = 2 * d * (d - cfg.num_kv_heads * hd)
    lines = [
        "Seed arithmetic (the reference sizes of docs/design.md, width 256, depth 6) against this config's encoder stack:",
        f"  attention  seed ~{SEED_ATTENTION:,}  here {attn_here:,}: the reference counts only the QKV projection "
        f"(3 x 256 x 256 = 196,608); here also the output projection ({d * d:,}) and QKNorm gains ({2 * hd})"
        + (f", minus {gqa_saving:,} for {cfg.num_kv_heads} key/value heads (GQA)" if gqa_saving else ""),
        f"  SwiGLU     seed {SEED_FFN:,}  here {ffn_here:,}: 3 x {d} x {block.ffn.down.in_features} = "
        f"{3 * d * block.ffn.down.in_features:,}; the reference sum 256x704 + 256x704 + 704x256 is 540,672, "
        "it doubled it",
        f"  per layer  seed ~{SEED_LAYER:,}  here {layer_here:,} (+ 2 pre-norms of {d})",
        f"  stack      seed ~{SEED_STACK:,}  here {count(stack):,}: {cfg.depth} layers + {cfg.num_registers} "
        f"register tokens ({count(stack.registers):,}) + final norm ({d}); the reference total inherits its FFN error",
    ]
    if (d, cfg.depth) != (256, 6):
        lines.append(f"  (this config has width {d} and depth {cfg.depth}, so counts differ from the reference size too)")
    return lines


def tokenizer_report(cfg: TokenizerConfig) -> str:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        tok = Tokenizer(cfg)
    lines = [
        f"Tokenizer: {count(tok):,} parameters  ({cfg.image_size}x{cfg.image_size} frames, {cfg.num_patches} patches "
        f"of {cfg.patch_dim}, bottleneck {cfg.num_latents} x {cfg.latent_dim})",
        f"  patch_embed {count(tok.patch_embed):,}; patch_pos {count(tok.patch_pos):,}; mask_token "
        f"{count(tok.mask_token):,}; latent_tokens {count(tok.latent_tokens):,}; to_latent {count(tok.to_latent):,}",
        *stack_report("encoder", tok.encoder),
        f"  from_latent {count(tok.from_latent):,}; latent_slot {count(tok.latent_slot):,}; patch_queries "
        f"{count(tok.patch_queries):,}; to_patch {count(tok.to_patch):,}"
        + (f"; read-out MLP {count(tok.head):,}" if getattr(tok, "head", None) is not None else ""),
        *stack_report("decoder", tok.decoder),
        "",
        *seed_comparison(cfg.encoder, tok.encoder),
    ]
    return "\n".join(lines)

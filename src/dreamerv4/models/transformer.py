"""The space-time transformer shared by the tokenizer and the dynamics model.

(Owned by the model work; this stub fixes the config interface.)
"""

from __future__ import annotations

from dataclasses import dataclass


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
    dropout: float = 0.0

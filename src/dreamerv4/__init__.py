"""dreamerv4: DreamerV4 (Hafner, Yan, Lillicrap 2025) learned offline from recorded gameplay.

Pipeline: episodes -> data loader -> causal tokenizer -> shortcut-forcing dynamics ->
agent heads (BC + reward) -> reinforcement learning in imagination. See README.md.
"""

__version__ = "0.1.0"

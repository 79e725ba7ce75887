"""Models: the shared space-time transformer, the tokenizer, LPIPS."""

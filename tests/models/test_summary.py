"""`dreamerv4 info params` runs on the default config and reports the real parameter counts."""

from __future__ import annotations

import torch

from dreamerv4.cli import main
from dreamerv4.models.tokenizer import Tokenizer, TokenizerConfig


def test_info_params_on_the_default_config(tmp_path, capsys):
    config = tmp_path / "default.yaml"
    config.write_text("{}\n")
    assert main(["info", "params", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    with torch.device("meta"):
        total = sum(p.numel() for p in Tokenizer(TokenizerConfig()).parameters())
    assert f"Tokenizer: {total:,} parameters" in out
    assert "SwiGLU (hidden 704): 540,672" in out
    assert "seed ~1,280,000" in out and "seed ~7,700,000" in out


def test_info_params_applies_overrides_and_names_a_missing_file(tmp_path, capsys):
    config = tmp_path / "default.yaml"
    config.write_text("{}\n")
    assert main(["info", "params", "--config", str(config), "tokenizer.model.encoder.num_kv_heads=2"]) == 0
    assert "2 key/value heads (GQA)" in capsys.readouterr().out
    assert main(["info", "params", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err

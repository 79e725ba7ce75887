"""Typed configs: YAML + key=value overrides, unknown keys and wrong types are clear errors."""

from __future__ import annotations

import pytest
import yaml

from dreamerv4.config import load_config, save_config, to_dict
from dreamerv4.errors import ConfigError
from dreamerv4.run_config import RunConfig


def test_defaults_file_and_overrides_layer_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"out_dir": "runs/x", "tokenizer": {"train": {"steps": 7, "lr": 0.01}}}))
    cfg = load_config(RunConfig, path, ["tokenizer.train.steps=9", "data.stride=3", "tokenizer.model.encoder.depth=2"])
    assert cfg.out_dir == "runs/x"
    assert cfg.tokenizer.train.steps == 9  # override beats file
    assert cfg.tokenizer.train.lr == 0.01  # file beats default
    assert cfg.data.stride == 3
    assert cfg.tokenizer.model.encoder.depth == 2
    assert cfg.tokenizer.model.decoder.depth == RunConfig().tokenizer.model.decoder.depth


def test_yaml_exponent_without_dot_is_a_number():
    # PyYAML reads "2e-3" as a string; a float field must still accept it.
    assert load_config(RunConfig, None, ["tokenizer.train.lr=2e-3"]).tokenizer.train.lr == pytest.approx(2e-3)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("tokenizer.train.stepz=3", "stepz"),
        ("nope=1", "nope"),
        ("tokenizer.train.steps=abc", "tokenizer.train.steps"),
        ("tokenizer.train.steps=1.5", "tokenizer.train.steps"),
        ("tokenizer.model.mask_mode=sometimes", "mask_mode"),
        ("tokenizer.train.precision=fp8", "precision"),
        ("data.path", "key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(RunConfig, None, [override])


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tokenizer:\n  modle: {}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*modle"):
        load_config(RunConfig, path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(RunConfig, tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(RunConfig, bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(RunConfig, top)


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(RunConfig, None, ["tokenizer.train.steps=11", "record.policy=random"])
    save_config(cfg, tmp_path / "config.yaml")
    assert to_dict(load_config(RunConfig, tmp_path / "config.yaml")) == to_dict(cfg)


@pytest.mark.parametrize("name", ["crafter-small.yaml", "crafter-demo.yaml", "minerl.yaml"])
def test_shipped_configs_load(name):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(RunConfig, root / "configs" / name)
    assert cfg.tokenizer.model.num_latents == 16 and cfg.tokenizer.model.latent_dim == 32


def test_base_file_is_extended(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"out_dir": "runs/base", "data": {"stride": 3},
                                                        "tokenizer": {"train": {"steps": 5, "lr": 0.01}}}))
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("base: ../base.yaml\nout_dir: runs/child\ntokenizer: {train: {steps: 7}}\n")
    cfg = load_config(RunConfig, child, ["data.stride=2"])
    assert cfg.out_dir == "runs/child"  # child beats base
    assert cfg.tokenizer.train.steps == 7 and cfg.tokenizer.train.lr == 0.01  # nested keys merge
    assert cfg.data.stride == 2  # overrides beat both


def test_bad_base_files_are_clear_errors(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(RunConfig, child)
    child.write_text("base: child.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(RunConfig, child)
    (tmp_path / "base.yaml").write_text("data: {strid: 3}\n")
    child.write_text("base: base.yaml\n")
    with pytest.raises(ConfigError, match="strid"):
        load_config(RunConfig, child)


def test_demo_config_only_shortens_the_preset():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    small = to_dict(load_config(RunConfig, root / "crafter-small.yaml"))
    demo = to_dict(load_config(RunConfig, root / "crafter-demo.yaml"))
    # The one model change: 16x16 tokenizer patches (cheaper steps; configs/crafter-demo.yaml says why).
    assert (small["tokenizer"]["model"]["patch_size"], demo["tokenizer"]["model"]["patch_size"]) == (8, 16)
    demo["tokenizer"]["model"]["patch_size"] = 8
    for stage in ("tokenizer", "dynamics", "agent"):
        assert demo[stage]["model"] == small[stage]["model"]
    for key in ("reward", "center_advantages", "horizon", "alpha", "beta", "fresh_value"):
        assert demo["imagine"][key] == small["imagine"][key]  # the same imagination recipe
    for stage in ("tokenizer", "dynamics", "agent", "imagine"):
        assert demo[stage]["train"]["lr"] == small[stage]["train"]["lr"]
        assert demo[stage]["train"]["steps"] < small[stage]["train"]["steps"]
        assert demo[stage]["train"]["time_limit_min"] < small[stage]["train"]["time_limit_min"]
    assert demo["data"]["path"] != small["data"]["path"]  # its smaller recording never mixes with the preset's
    assert sum(demo[s]["train"]["time_limit_min"] for s in ("tokenizer", "dynamics", "agent", "imagine")) <= 24

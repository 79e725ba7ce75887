"""Checkpoints: atomic writes, weights_only loads, clear errors, RNG state round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dreamerv4.checkpoint import (checkpoint_stage, load_checkpoint, require_stage, rng_state, save_checkpoint,
                                  set_rng_state)
from dreamerv4.errors import CheckpointError


def test_round_trip_and_no_temp_files_left(tmp_path):
    path = tmp_path / "sub" / "ck.pt"
    save_checkpoint(path, {"w": torch.arange(5.0), "step": 3, "config": {"a": [1, 2]}})
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["w"], torch.arange(5.0)) and loaded["step"] == 3 and loaded["config"] == {"a": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["ck.pt"]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"step": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        save_checkpoint(path, {"step": 2, "bad": Unpicklable()})
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_missing_truncated_and_foreign_files_raise_naming_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="absent.pt.*not found"):
        load_checkpoint(tmp_path / "absent.pt")
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"w": torch.randn(1000)})
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_checkpoint(truncated)
    listed = tmp_path / "list.pt"
    torch.save([1, 2], listed)
    with pytest.raises(CheckpointError, match="list.pt.*not a dreamerv4 checkpoint"):
        load_checkpoint(listed)


class Custom:
    """A class weights_only unpickling must refuse to construct."""


def test_arbitrary_objects_are_refused(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"x": Custom()}, path)
    with pytest.raises(CheckpointError, match="obj.pt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value) == f"{path}: not a dreamerv4 checkpoint (it holds Python objects, which are not loaded " \
        "for safety)"  # not torch's advice to load it with weights_only=False


def test_checkpoint_stage_reads_the_weights_and_require_stage_names_both():
    from dreamerv4.config import from_dict
    from dreamerv4.models.agent import AgentConfig, AgentModel
    from dreamerv4.models.dynamics import DynamicsConfig, DynamicsModel
    from dreamerv4.models.tokenizer import Tokenizer, TokenizerConfig

    net = {"embed_dim": 32, "depth": 2, "num_heads": 2, "num_kv_heads": 2, "time_every": 2, "num_registers": 1}
    tokenizer = Tokenizer(from_dict(TokenizerConfig, {"patch_size": 16, "encoder": net, "decoder": net}))
    dynamics = DynamicsModel(from_dict(DynamicsConfig, {"transformer": net}))
    agent = AgentModel(dynamics, from_dict(AgentConfig, {"mtp_length": 2, "head_hidden": 16}))
    assert checkpoint_stage({"model": tokenizer.state_dict()}) == "tokenizer"
    assert checkpoint_stage({"model": dynamics.state_dict(), "extra": {"tokenizer": {}}}) == "dynamics"
    assert checkpoint_stage({"model": agent.state_dict(), "extra": {"bc": {}}}) == "agent"
    assert checkpoint_stage({"model": agent.state_dict(), "extra": {"prior": {}}}) == "imagine"
    assert checkpoint_stage({"model": {"w": torch.zeros(1)}}) is None and checkpoint_stage({}) is None
    ckpt = {"model": dynamics.state_dict()}
    assert require_stage(ckpt, "x.pt", "dynamics") == "dynamics" and require_stage({}, "x.pt", "agent") is None
    with pytest.raises(CheckpointError, match=r"^x.pt: a dynamics checkpoint \(written by `dreamerv4 train dynamics`\); "
                       r"this command needs an agent checkpoint .* or an imagine checkpoint"):
        require_stage(ckpt, "x.pt", "agent", "imagine")


def test_rng_state_survives_a_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "ck.pt", {"rng": rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    set_rng_state(load_checkpoint(tmp_path / "ck.pt")["rng"])
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])

"""Latent datasets (src/dreamerv4/data/latents.py): `data tokenize` round trip, causal chunking, the
dataset's windows and split, no silent overwrite, and clear errors on damaged latent episodes.

    pytest tests/data/test_latents.py -q -x
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dreamerv4.checkpoint import save_checkpoint
from dreamerv4.cli import main
from dreamerv4.config import from_dict, to_dict
from dreamerv4.data.dataset import SequenceDataset
from dreamerv4.data.episodes import load_frames
from dreamerv4.data.latents import (
    LATENTS_FILE, MANIFEST_FILE, LatentSequenceDataset, decode_latents, frames_to_float, tokenizer_fingerprint,
)
from dreamerv4.errors import DataError
from dreamerv4.models.tokenizer import Tokenizer
from dreamerv4.run_config import RunConfig
from dreamerv4.training.resume import CHECKPOINT_FORMAT
from dreamerv4.training.stages import load_tokenizer
from dreamerv4.training.tokenize import tokenize_dataset

NET = {"embed_dim": 32, "depth": 2, "num_heads": 2, "num_kv_heads": 2, "time_every": 2, "num_registers": 1}
CONTEXT = 3  # the tokenizer's training seq_len: 40-step episodes end in a partial chunk of 1


def make_tokenizer_checkpoint(path: Path, seed: int = 0, seq_len: int = CONTEXT) -> Path:
    """A tokenizer checkpoint in the training loop's format, with unit-scale random weights so the
    time attention visibly mixes frames."""
    cfg = from_dict(RunConfig, {"tokenizer": {"model": {"encoder": NET, "decoder": NET}, "train": {"seq_len": seq_len}}})
    torch.manual_seed(seed)
    model = Tokenizer(cfg.tokenizer.model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": to_dict(cfg),
                           "step": 7, "done": True})
    return path


@pytest.fixture(scope="module")
def tokenized(tiny_crafter_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    ckpt = make_tokenizer_checkpoint(root / "tok.pt")
    out = root / "latents"
    assert main(["data", "tokenize", "--checkpoint", str(ckpt), "--data", str(tiny_crafter_root), "--out", str(out),
                 "--batch-frames", "7"]) == 0
    return {"ckpt": ckpt, "out": out}


def test_latents_equal_the_tokenizer_encoding_of_aligned_windows(tokenized, tiny_crafter_root):
    tok, _ = load_tokenizer(tokenized["ckpt"])
    manifest = json.loads((tokenized["out"] / MANIFEST_FILE).read_text())
    assert manifest["complete"] and manifest["context"] == CONTEXT and manifest["tokenizer"]["step"] == 7
    assert manifest["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok)
    assert manifest["episodes"] == {f"episode_{i:05d}": 40 for i in range(3)}
    for i in range(3):
        name = f"episode_{i:05d}"
        frames = frames_to_float(load_frames(tiny_crafter_root / name))
        stored = np.load(tokenized["out"] / name / LATENTS_FILE)
        assert stored.shape == (40, 16, 32) and stored.dtype == np.float32
        with torch.no_grad():  # every aligned window of 3 frames on its own, and the last partial one
            expected = torch.cat([tok.encode(frames[a: a + CONTEXT][None])[0] for a in range(0, 40, CONTEXT)])
            whole = tok.encode(frames[None])[0]  # the whole episode at once: a different (longer) history
        np.testing.assert_allclose(stored, expected.numpy(), atol=1e-5, rtol=0)
        assert np.abs(stored[CONTEXT:] - whole[CONTEXT:].numpy()).max() > 1e-3  # the chunking matters
        for file in ("actions.npz", "rewards.npy", "observations.npz"):
            assert (tokenized["out"] / name / file).read_bytes() == (tiny_crafter_root / name / file).read_bytes()
    # decode_latents decodes in the same aligned chunks
    lat = torch.from_numpy(np.load(tokenized["out"] / "episode_00000" / LATENTS_FILE))[None, :7]
    with torch.no_grad():
        expected = torch.cat([tok.decode(lat[:, a: a + CONTEXT]) for a in range(0, 7, CONTEXT)], dim=1)
    torch.testing.assert_close(decode_latents(tok, lat, CONTEXT), expected)


def test_dataset_has_the_frame_datasets_windows_and_split(tokenized, tiny_crafter_root):
    for split in ("train", "val", "all"):
        kwargs = dict(seq_len=8, stride=5, split=split, val_fraction=0.34, split_seed=3)
        lat = LatentSequenceDataset(tokenized["out"], **kwargs)
        ref = SequenceDataset(tiny_crafter_root, **kwargs)
        assert [lat.window(i) for i in range(len(lat))] == [ref.window(i) for i in range(len(ref))]
    lat = LatentSequenceDataset(tokenized["out"], seq_len=8, stride=5)
    ref = SequenceDataset(tiny_crafter_root, seq_len=8, stride=5)
    for i in (0, len(lat) - 1):
        item, frames_item = lat[i], ref[i]
        name, start = lat.window(i)
        assert item["latents"].dtype == torch.float32 and item["latents"].shape == (8, 16, 32)
        assert torch.equal(item["latents"], torch.from_numpy(np.load(tokenized["out"] / name / LATENTS_FILE)[start: start + 8]))
        assert torch.equal(item["actions"], frames_item["actions"]) and torch.equal(item["rewards"], frames_item["rewards"])


def test_rerun_keeps_same_tokenizer_latents_and_refuses_another_without_overwrite(tokenized, tiny_crafter_root, tmp_path):
    out = Path(shutil.copytree(tokenized["out"], tmp_path / "latents"))
    before = (out / "episode_00001" / LATENTS_FILE).stat().st_mtime_ns
    manifest = tokenize_dataset(tokenized["ckpt"], tiny_crafter_root, out, progress=False)
    assert manifest["_counts"] == {"encoded": 0, "skipped": 3}
    assert (out / "episode_00001" / LATENTS_FILE).stat().st_mtime_ns == before

    other = make_tokenizer_checkpoint(tmp_path / "other.pt", seed=1)
    with pytest.raises(DataError, match="another tokenizer.*--overwrite"):
        tokenize_dataset(other, tiny_crafter_root, out, progress=False)
    assert (out / "episode_00001" / LATENTS_FILE).stat().st_mtime_ns == before  # untouched
    assert main(["data", "tokenize", "--checkpoint", str(other), "--data", str(tiny_crafter_root), "--out", str(out),
                 "--overwrite"]) == 0
    tok, _ = load_tokenizer(other)
    assert json.loads((out / MANIFEST_FILE).read_text())["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok)
    assert not np.array_equal(np.load(out / "episode_00001" / LATENTS_FILE),
                              np.load(tokenized["out"] / "episode_00001" / LATENTS_FILE))

    stray = tmp_path / "not-latents"
    (stray / "x").mkdir(parents=True)
    with pytest.raises(DataError, match="not a latent folder"):
        tokenize_dataset(other, tiny_crafter_root, stray, progress=False)


def damage(out: Path, how: str) -> Path:
    episode = out / "episode_00001"
    path = episode / LATENTS_FILE
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif how == "shape":
        np.save(path, np.zeros((40, 16, 8), np.float32))
    elif how == "dtype":
        np.save(path, np.zeros((40, 16, 32), np.float64))
    elif how == "nan":
        latents = np.load(path)
        latents[5, 3, 2] = np.nan
        np.save(path, latents)
    elif how == "length":
        np.save(path, np.load(path)[:30])
        return episode
    return path


@pytest.mark.parametrize("how, message", [
    ("missing", "missing"), ("truncated", "unreadable or truncated"), ("shape", r"expected \(T, 16, 32\) float32"),
    ("dtype", "float32"), ("nan", "NaN or inf latents .first at step 5"), ("length", "lengths differ"),
])
def test_damaged_latent_episodes_give_errors_naming_the_file(tokenized, tmp_path, how, message):
    out = Path(shutil.copytree(tokenized["out"], tmp_path / "latents"))
    culprit = damage(out, how)
    with pytest.raises(DataError, match=message) as info:
        LatentSequenceDataset(out, seq_len=4, stride=4)
    assert str(culprit) in str(info.value)


def test_cli_errors_are_one_line_with_status_2(tokenized, tiny_crafter_root, tmp_path, capsys):
    assert main(["data", "tokenize", "--checkpoint", str(tmp_path / "nope.pt"), "--data", str(tiny_crafter_root),
                 "--out", str(tmp_path / "o")]) == 2
    assert "nope.pt" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["data", "tokenize", "--checkpoint", str(tokenized["ckpt"]), "--data", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "no episode folders" in capsys.readouterr().err
    incomplete = Path(shutil.copytree(tokenized["out"], tmp_path / "latents"))
    manifest = json.loads((incomplete / MANIFEST_FILE).read_text())
    (incomplete / MANIFEST_FILE).write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(DataError, match="stopped before it finished"):
        LatentSequenceDataset(incomplete, seq_len=4)


def test_dataset_reads_the_recorded_deaths_as_terminals(tokenized, tmp_path):
    out = Path(shutil.copytree(tokenized["out"], tmp_path / "latents"))
    data = LatentSequenceDataset(out, seq_len=4, stride=4, val_fraction=0.0)
    assert not any(bool(data[i]["terminals"].any()) for i in range(len(data)))  # 40-step episodes: time limit
    episode = out / data.episode_names[0]
    with np.load(episode / "observations.npz") as npz:
        observations = {k: npz[k] for k in npz.files}
    observations["terminal"][-1] = True  # the last step ended the episode by death
    np.savez_compressed(episode / "observations.npz", **observations)
    data = LatentSequenceDataset(out, seq_len=4, stride=4, val_fraction=0.0)
    last = max(i for i in range(len(data)) if data.window(i)[0] == data.episode_names[0])
    item = data[last]
    assert item["terminals"].dtype == torch.bool and item["terminals"].tolist() == [False, False, False, True]
    observations["terminal"] = observations["terminal"][:-1]
    np.savez_compressed(episode / "observations.npz", **observations)
    with pytest.raises(DataError, match="observations.npz: terminal has shape"):
        LatentSequenceDataset(out, seq_len=4, stride=4, val_fraction=0.0)


def test_dataset_reads_the_recorded_achievements(tokenized, tmp_path):
    out = Path(shutil.copytree(tokenized["out"], tmp_path / "latents"))
    data = LatentSequenceDataset(out, seq_len=4, stride=4, val_fraction=0.0)
    assert data.num_achievements == 22
    name, start = data.window(0)
    with np.load(out / name / "observations.npz") as npz:
        observations = {k: npz[k] for k in npz.files}
    item = data[0]
    assert item["achievements"].dtype == torch.float32 and item["achievements"].shape == (4, 22)
    assert np.array_equal(item["achievements"].numpy(), observations["achievements"][start:start + 4] > 0)
    # An episode without the array reads K = 0; mixing it with K = 22 episodes is named, not a collate error.
    del observations["achievements"]
    np.savez_compressed(out / name / "observations.npz", **observations)
    with pytest.raises(DataError, match="different numbers of achievements"):
        LatentSequenceDataset(out, seq_len=4, stride=4, val_fraction=0.0)

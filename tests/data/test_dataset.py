"""SequenceDataset: the batch contract (docs/design.md, Data contract), real actions reaching the batch, splits, workers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from dreamerv4.data.dataset import (
    DataConfig, MineRLDataset, RepeatedWindows, SequenceDataset, make_dataloader, validation_mask,
)
from dreamerv4.data.episodes import find_episodes, load_actions, load_frames, load_rewards, write_episode
from dreamerv4.errors import DataError


def test_batches_have_the_seeds_shapes_and_dtypes(tiny_crafter_root):
    ds = SequenceDataset(tiny_crafter_root, seq_len=16, split="all")
    batch = next(iter(make_dataloader(ds, batch_size=4)))
    assert set(batch) == {"frames", "actions", "rewards"}
    assert batch["frames"].shape == (4, 16, 3, 64, 64) and batch["frames"].dtype == torch.float32
    assert batch["frames"].is_contiguous()
    assert batch["actions"].shape == (4, 16) and batch["actions"].dtype == torch.int64
    assert batch["rewards"].shape == (4, 16) and batch["rewards"].dtype == torch.float32
    assert 0.0 <= batch["frames"].min() and batch["frames"].max() <= 1.0
    assert MineRLDataset is SequenceDataset


def test_items_equal_the_episode_files(tiny_crafter_root):
    ds = SequenceDataset(tiny_crafter_root, seq_len=16, stride=8, split="all")
    seen_actions = []
    for i in range(len(ds)):
        name, start = ds.window(i)
        episode = tiny_crafter_root / name
        item = ds[i]
        actions = load_actions(episode)["action"][start:start + 16]
        np.testing.assert_array_equal(item["actions"].numpy(), actions)
        np.testing.assert_array_equal(item["rewards"].numpy(), load_rewards(episode)[start:start + 16])
        expected = torch.from_numpy(np.array(load_frames(episode)[start:start + 16])).permute(0, 3, 1, 2) / 255.0
        assert torch.equal(item["frames"], expected)
        seen_actions.append(item["actions"])
    # Real actions reach the batch (a loader that silently loses them yields all no-ops).
    assert len(torch.unique(torch.cat(seen_actions))) > 5


def test_windows_start_every_stride_and_cover_the_episode_end(tiny_crafter_root):
    ds = SequenceDataset(tiny_crafter_root, seq_len=16, stride=10, split="all")
    starts = [ds.window(i) for i in range(len(ds))]
    assert starts[:4] == [("episode_00000", s) for s in (0, 10, 20, 24)]  # 40 steps: 24 is the last start
    assert len(ds) == 3 * 4
    assert len(SequenceDataset(tiny_crafter_root, seq_len=16, stride=8)) == 3 * 4  # 0, 8, 16, 24
    assert len(SequenceDataset(tiny_crafter_root, seq_len=40, stride=8)) == 3


def test_getitem_is_deterministic_and_supports_negative_indices(tiny_crafter_root):
    ds = SequenceDataset(tiny_crafter_root)
    for key in ("frames", "actions", "rewards"):
        assert torch.equal(ds[5][key], ds[5][key])
        assert torch.equal(ds[-1][key], ds[len(ds) - 1][key])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_two_workers_give_the_same_batches_as_none(tiny_crafter_root):
    ds = SequenceDataset(tiny_crafter_root)
    ds[0]  # opened memory maps must not travel to the workers
    assert pickle.loads(pickle.dumps(ds))._frames == {}
    serial = list(make_dataloader(ds, batch_size=4, shuffle=True, seed=3, num_workers=0))
    parallel = list(make_dataloader(ds, batch_size=4, shuffle=True, seed=3, num_workers=2))
    assert len(serial) == len(parallel) == len(ds) // 4
    for a, b in zip(serial, parallel):
        for key in a:
            assert torch.equal(a[key], b[key])


def test_split_is_by_episode_disjoint_and_complete(tiny_crafter_root):
    train = SequenceDataset(tiny_crafter_root, split="train", val_fraction=0.34)
    val = SequenceDataset(tiny_crafter_root, split="val", val_fraction=0.34)
    assert set(train.episode_names).isdisjoint(val.episode_names)
    assert sorted(train.episode_names + val.episode_names) == ["episode_00000", "episode_00001", "episode_00002"]
    assert len(val.episode_names) >= 1 and len(train.episode_names) >= 1


def test_validation_mask_is_stable_seeded_and_near_the_fraction():
    names = [f"episode_{i:05d}" for i in range(2000)]
    mask = validation_mask(names, 0.1, split_seed=0)
    assert 0.08 < np.mean(mask) < 0.12
    # Adding episodes never moves the old ones to the other side.
    assert validation_mask(names + [f"extra_{i}" for i in range(500)], 0.1, 0)[:2000] == mask
    assert validation_mask(names, 0.1, split_seed=1) != mask
    assert validation_mask(names[:3], 0.0, 0) == [False] * 3
    assert validation_mask(names[:3], 1.0, 0) == [True] * 3
    # Tiny sets still get one episode on each side.
    assert 1 <= sum(validation_mask(names[:2], 0.01, 0)) <= 1
    with pytest.raises(DataError):
        validation_mask(names, 1.5, 0)


def test_short_episodes_are_skipped_and_counted(tiny_crafter_copy):
    rng = np.random.default_rng(0)
    write_episode(tiny_crafter_copy / "short", rng.integers(0, 255, (10, 64, 64, 3), dtype=np.uint8),
                  {"action": np.ones(10, np.int64)}, np.zeros(10, np.float32))
    ds = SequenceDataset(tiny_crafter_copy, seq_len=16)
    assert ds.skipped_short == ["short"] and len(ds.episodes) == 3
    with pytest.raises(DataError, match=f"{tiny_crafter_copy}: no window of 41 steps"):
        SequenceDataset(tiny_crafter_copy, seq_len=41)


def test_semantic_labels_on_request(tiny_crafter_root, tmp_path):
    ds = SequenceDataset(tiny_crafter_root, with_semantic=True)
    item = ds[0]
    assert item["semantic"].shape == (16, 7, 9) and item["semantic"].dtype == torch.uint8
    batch = next(iter(make_dataloader(ds, batch_size=2)))
    assert batch["semantic"].shape == (2, 16, 7, 9)
    rng = np.random.default_rng(0)
    write_episode(tmp_path / "ep", rng.integers(0, 255, (20, 64, 64, 3), dtype=np.uint8),
                  {"action": np.ones(20, np.int64)}, np.zeros(20, np.float32))
    with pytest.raises(DataError, match="observations.npz: missing"):
        SequenceDataset(tmp_path, with_semantic=True)


def test_errors_name_the_folder_or_file(tiny_crafter_root, tmp_path):
    with pytest.raises(DataError, match="actions.npz: crafter actions, but the minerl action space"):
        SequenceDataset(tiny_crafter_root, action_space="minerl")
    with pytest.raises(DataError, match="no episode folders"):
        SequenceDataset(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        SequenceDataset(tmp_path / "missing")


def test_from_config(tiny_crafter_root):
    cfg = DataConfig(path=str(tiny_crafter_root), stride=4, val_fraction=0.0)
    ds = SequenceDataset.from_config(cfg, seq_len=8, split="train")
    assert len(ds.episodes) == len(find_episodes(tiny_crafter_root)) and len(ds) == 3 * 9


def test_repeated_windows_lists_each_window_its_number_of_times(tiny_crafter_root):
    ds = SequenceDataset(tiny_crafter_root, seq_len=4, stride=8)
    repeats = np.ones(len(ds), np.int64)
    repeats[[1, 3]] = [3, 2]
    rep = RepeatedWindows(ds, repeats)
    assert len(rep) == len(ds) + 3
    drawn = [ds.window(int(i)) for i in rep.index]
    assert drawn[: len(ds)] == [ds.window(i) for i in range(len(ds))]  # every window once, in order, first
    assert drawn.count(ds.window(1)) == 3 and drawn.count(ds.window(3)) == 2 and drawn.count(ds.window(0)) == 1
    assert torch.equal(rep[len(ds)]["frames"], ds[1]["frames"])
    for bad in (np.ones(len(ds) - 1, np.int64), np.zeros(len(ds), np.int64), np.ones(len(ds))):
        with pytest.raises(ValueError, match="repeats must be"):
            RepeatedWindows(ds, bad)

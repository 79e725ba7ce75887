"""Stage 1 of the pipeline (docs/design.md, Data contract): fixed-length windows of episodes as training items (MineRLDataset).

    ds = SequenceDataset("data/crafter", seq_len=16, stride=8, split="train")
    loader = make_dataloader(ds, batch_size=16, num_workers=2)
    batch = next(iter(loader))   # frames (16,16,3,64,64) float32 in [0,1], actions (16,16) int64, rewards (16,16)

Or from a run's config: `SequenceDataset.from_config(cfg.data, seq_len=cfg.tokenizer.train.seq_len)`.
Episode folders are described in `dreamerv4.data.episodes`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from dreamerv4.data.episodes import (
    EpisodeInfo,
    episode_name,
    find_episodes,
    load_frames,
    load_observations,
    read_episode_info,
)
from dreamerv4.errors import DataError

Split = Literal["train", "val", "all"]


@dataclass
class DataConfig:
    path: str = "data/crafter"  # folder of episode folders
    heldout_path: str = ""  # held-out episodes (another seed) for evaluation; "" means "<path>-heldout"
    action_space: Literal["crafter", "minerl"] = "crafter"
    stride: int = 8  # step between the starts of overlapping windows
    val_fraction: float = 0.1  # share of episodes held out, chosen deterministically by episode name
    split_seed: int = 0
    num_workers: int = 0  # DataLoader worker processes


def validation_mask(names: list[str], val_fraction: float, split_seed: int) -> list[bool]:
    """Which episodes are held out. Each episode's side depends only on (split_seed, its name), via a
    hash mapped to [0, 1) and compared with val_fraction, so adding episodes never moves old ones.
    With 2+ episodes and 0 < val_fraction < 1, each side gets at least one episode (the episode with
    the lowest, or highest, hash is moved), which only matters for tiny datasets."""
    if not 0.0 <= val_fraction <= 1.0:
        raise DataError(f"data.val_fraction: {val_fraction} is not in [0, 1]")
    scores = [int.from_bytes(hashlib.sha256(f"{split_seed}/{n}".encode()).digest()[:8], "big") / 2**64 for n in names]
    in_val = [s < val_fraction for s in scores]
    if 0.0 < val_fraction < 1.0 and len(names) >= 2:
        if not any(in_val):
            in_val[int(np.argmin(scores))] = True
        if all(in_val):
            in_val[int(np.argmax(scores))] = False
    return in_val


def split_episodes(root: Path, split: Split, val_fraction: float, split_seed: int) -> list[tuple[Path, str]]:
    """(folder, name) of the episodes under `root` in `split` ("all", or the side `validation_mask` puts
    them on); DataError when `root` holds no episode folder. Shared by every dataset of windows."""
    paths = find_episodes(root)
    if not paths:
        raise DataError(f"{root}: no episode folders (record some with `dreamerv4 data crafter`)")
    names = [episode_name(root, p) for p in paths]
    held_out = validation_mask(names, val_fraction, split_seed)
    return [(p, n) for p, n, v in zip(paths, names, held_out) if split == "all" or v == (split == "val")]


def window_starts(lengths: list[int], seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(episode index, start step) int64 arrays of every window of `seq_len` steps: starts every `stride`
    steps from 0, plus one window ending at the last step; episodes shorter than seq_len give none."""
    episode_index, starts = [], []
    for i, length in enumerate(lengths):
        last = length - seq_len
        if last < 0:
            continue
        s = list(range(0, last + 1, stride))
        if s[-1] != last:
            s.append(last)
        episode_index += [i] * len(s)
        starts += s
    return np.asarray(episode_index, dtype=np.int64), np.asarray(starts, dtype=np.int64)


class SequenceDataset(Dataset):
    """Windows of `seq_len` consecutive steps from the episodes of one split.

    Item i (deterministic: the training loop picks indices itself for exact resume):
        frames  (seq_len, 3, 64, 64) float32 in [0, 1]
        actions (seq_len,) int64 packed codes of `action_space` (dreamerv4.actions)
        rewards (seq_len,) float32
        semantic (seq_len, 7, 9) uint8, only with with_semantic=True (needs observations.npz)
    Windows start every `stride` steps from 0, plus one window ending at the last step so episode
    ends are covered. Episodes shorter than seq_len give no window: they are skipped and listed in
    `skipped_short`; DataError (naming the folder) if no window is left at all. The train/val split
    is by episode (`validation_mask`). Frames are memory-mapped lazily in each process (DataLoader
    workers open their own maps), so only the windows read are paged in.
    """

    def __init__(
        self,
        root: str | Path,
        seq_len: int = 16,
        stride: int = 8,
        split: Split = "all",
        val_fraction: float = 0.1,
        split_seed: int = 0,
        action_space: str = "crafter",
        with_semantic: bool = False,
    ):
        if split not in ("train", "val", "all"):
            raise DataError(f"split {split!r}: expected 'train', 'val' or 'all'")
        if seq_len < 1 or stride < 1:
            raise DataError(f"seq_len ({seq_len}) and stride ({stride}) must be at least 1")
        self.root = Path(root)
        self.seq_len = seq_len
        self.stride = stride
        self.split = split
        self.action_space = action_space
        self.with_semantic = with_semantic

        chosen = self._choose_episodes(split, val_fraction, split_seed)

        self.episodes: list[EpisodeInfo] = []
        self.episode_names: list[str] = []
        self.skipped_short: list[str] = []
        for path, name in chosen:
            info = self._read_info(path, action_space)
            if info.length < seq_len:
                self.skipped_short.append(name)
                continue
            if with_semantic and not info.has_observations:
                raise DataError(f"{path / 'observations.npz'}: missing; semantic labels were asked for")
            self.episodes.append(info)
            self.episode_names.append(name)

        self._window_episode, self._window_start = window_starts([info.length for info in self.episodes], seq_len, stride)
        if not len(self._window_start):
            raise DataError(
                f"{self.root}: no window of {seq_len} steps in the {split} split "
                f"({len(chosen)} episode(s), {len(self.skipped_short)} shorter than {seq_len})"
            )
        self._frames: dict[int, np.ndarray] = {}  # opened lazily, per process
        self._semantic: dict[int, np.ndarray] = {}

    def __new__(cls, root: str | Path | None = None, *args, **kwargs):
        # A shard folder or URL (`dreamerv4 data shard`) opens as ShardedSequenceDataset: same windows and items.
        if cls is SequenceDataset and root is not None:
            from dreamerv4.data.shards import ShardedSequenceDataset, is_shard_root

            if is_shard_root(root):
                cls = ShardedSequenceDataset
        return super().__new__(cls)

    # Where episodes come from; ShardedSequenceDataset (dreamerv4.data.shards) reads them from shards instead.
    def _choose_episodes(self, split: Split, val_fraction: float, split_seed: int) -> list[tuple[Path, str]]:
        return split_episodes(self.root, split, val_fraction, split_seed)

    def _read_info(self, path: Path, action_space: str) -> EpisodeInfo:
        return read_episode_info(path, action_space)

    def _load_frames(self, info: EpisodeInfo) -> np.ndarray:
        return load_frames(info.path)

    def _load_semantic(self, info: EpisodeInfo) -> np.ndarray:
        return load_observations(info.path, ("semantic",))["semantic"]

    @classmethod
    def from_config(cls, cfg: DataConfig, seq_len: int, split: Split = "train", with_semantic: bool = False):
        return cls(cfg.path, seq_len, cfg.stride, split, cfg.val_fraction, cfg.split_seed, cfg.action_space,
                   with_semantic)

    @property
    def num_frames(self) -> int:
        """Steps in the split's usable episodes."""
        return sum(info.length for info in self.episodes)

    def window(self, index: int) -> tuple[str, int]:
        """(episode name, start step) of item `index`."""
        return self.episode_names[int(self._window_episode[index])], int(self._window_start[index])

    def __len__(self) -> int:
        return len(self._window_start)

    def __getstate__(self) -> dict:
        # Memory maps stay out of the pickled state sent to DataLoader workers; each opens its own.
        state = self.__dict__.copy()
        state["_frames"], state["_semantic"] = {}, {}
        return state

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        episode = int(self._window_episode[index])
        start = int(self._window_start[index])
        stop = start + self.seq_len
        info = self.episodes[episode]
        if episode not in self._frames:
            self._frames[episode] = self._load_frames(info)
        # One copy of the uint8 window in (T, C, H, W) order, then one pass to float. numpy, not torch:
        # torch's intra-op thread pool makes these small ops 10x slower when the CPUs are busy.
        window = np.ascontiguousarray(self._frames[episode][start:stop].transpose(0, 3, 1, 2))
        item = {
            "frames": torch.from_numpy(np.divide(window, np.float32(255.0), dtype=np.float32)),
            "actions": torch.from_numpy(info.codes[start:stop].copy()),
            "rewards": torch.from_numpy(info.rewards[start:stop].copy()),
        }
        if self.with_semantic:
            if episode not in self._semantic:
                self._semantic[episode] = self._load_semantic(info)
            item["semantic"] = torch.from_numpy(self._semantic[episode][start:stop].copy())
        return item

    def __repr__(self) -> str:
        return (f"SequenceDataset({str(self.root)!r}, split={self.split!r}, episodes={len(self.episodes)}, "
                f"windows={len(self)}, seq_len={self.seq_len}, stride={self.stride}, "
                f"skipped_short={len(self.skipped_short)})")


MineRLDataset = SequenceDataset  # the name the reference pipeline gives it


class RepeatedWindows(Dataset):
    """`dataset` with window i listed repeats[i] >= 1 times (0..len-1 in order, then the extra copies),
    so a uniform sampler over this index draws it repeats[i] times as often as a window listed once."""

    def __init__(self, dataset: Dataset, repeats: np.ndarray):
        repeats = np.asarray(repeats)
        if repeats.shape != (len(dataset),) or not np.issubdtype(repeats.dtype, np.integer) or (repeats < 1).any():
            raise ValueError(f"repeats must be {len(dataset)} integers >= 1, got shape {repeats.shape} {repeats.dtype}")
        self.dataset = dataset
        n = len(dataset)
        self.index = np.concatenate([np.arange(n), np.repeat(np.arange(n), repeats - 1)])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.dataset[int(self.index[index])]


def collate_windows(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items into a batch. In the main process the stacking runs in numpy: torch.stack's thread
    pool took 250 ms per batch instead of 3 ms here when other jobs kept both cores busy. Workers run
    torch single-threaded, and default_collate there builds the batch directly in shared memory."""
    if get_worker_info() is not None:
        return default_collate(items)
    return {key: torch.from_numpy(np.stack([item[key].numpy() for item in items])) for key in items[0]}


def make_dataloader(
    dataset: Dataset,
    batch_size: int = 16,
    shuffle: bool = True,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = True,
    sampler: Sampler | None = None,
) -> DataLoader:
    """Batches in the reference pipeline's shapes (docs/design.md, Data contract): frames (B, T, 3, 64, 64), actions (B, T), rewards (B, T).
    `seed` fixes the shuffling order; pass a `sampler` to choose the windows yourself."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=collate_windows,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
    )

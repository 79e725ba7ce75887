"""Sharded episodes: WebDataset tar shards of episode folders, read from a local folder or any fsspec URL.

    dreamerv4 data shard data/minerl data/minerl-shards [--shard-mb 512] [--overwrite]
    train with data.path=data/minerl-shards (or s3://bucket/minerl-shards, https://host/minerl-shards, ...)

Layout of DST:
    index.json          {"format": "dreamerv4-shards", "version": 1, "shards": [...], "episodes": [...]}: each
                        episode's name, length, shard and the byte range of each of its members in that shard
    shard-000000.tar    WebDataset samples, one per episode (key e00000000, ...): `name.txt`,
                        `frames.00000.u8.gz`, `frames.00001.u8.gz`, ... (raw uint8 frames, FRAME_CHUNK = 256
                        per member, gzip level 6), `actions.npz`, `rewards.npy`, optional `observations.npz`
                        (the episode folder's files byte for byte)
Shards are plain tar (members compressed one by one), so any member can be read with one range read
(`fsspec` `cat_file(start, end)`): the same code path for a folder, file://, memory:// or http(s)://.

Two readers:
- ShardedSequenceDataset: SequenceDataset's windows, split and items (dreamerv4.data.dataset), so the
  training stages and the loop's StepBatchSampler (disjoint per DDP rank, exact resume) work unchanged.
  `SequenceDataset(path)` returns one when `path` is a shard folder or URL (is_shard_root). A window
  decodes only the one or two frame chunks it touches; each process keeps the last `cache_items`.
  `dreamerv4 data tokenize --data SHARDS` reads shards too (shard_sources).
- ShardedWindowStream: an IterableDataset for data far larger than memory: each epoch the shards are
  shuffled by (seed, epoch) and dealt round-robin to the rank x worker readers, which stream them
  sequentially (fsspec + WebDataset's tar iterators) and yield every window once; `start_window` resumes a reader at its position.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dreamerv4.actions import get_action_space, layout_of
from dreamerv4.data.dataset import SequenceDataset, Split, validation_mask, window_starts
from dreamerv4.data.episodes import (
    ACTIONS_FILE,
    FRAME_SHAPE,
    OBSERVATIONS_FILE,
    REWARDS_FILE,
    EpisodeInfo,
    episode_name,
    find_episodes,
    load_frames,
    publish_folder,
    read_episode_info,
)
from dreamerv4.errors import DataError

INDEX_FILE = "index.json"
FRAME_BYTES = int(np.prod(FRAME_SHAPE))
FORMAT = "dreamerv4-shards"
FRAME_CHUNK = 256  # frames per compressed member (3 MB raw): a window read decodes one or two of them


def frames_member(chunk: int) -> str:
    return f"frames.{chunk:05d}.u8.gz"


# --- writing ----------------------------------------------------------------------------------------
def _member_ranges(tar_path: Path) -> dict[str, dict[str, list[int]]]:
    """{sample key: {member suffix: [offset, size]}} of a written tar (data offsets inside the file)."""
    ranges: dict[str, dict[str, list[int]]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            key, _, suffix = member.name.partition(".")
            ranges.setdefault(key, {})[suffix] = [member.offset_data, member.size]
    return ranges


def write_shards(src: str | Path, dst: str | Path, shard_mb: float = 512.0, overwrite: bool = False,
                 progress: bool = True) -> dict:
    """Every episode folder under `src` (validated first) into tar shards of about `shard_mb` MB in `dst`."""
    import webdataset as wds
    from tqdm import tqdm

    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise DataError(f"{dst}: already exists (pass --overwrite to replace it)")
    paths = find_episodes(src)
    if not paths:
        raise DataError(f"{src}: no episode folders")
    infos = [read_episode_info(p) for p in paths]  # DataError naming the file of the first bad episode
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        shards: list[str] = []
        episodes: list[dict] = []
        writer, written = None, 0
        for i, (path, info) in enumerate(tqdm(list(zip(paths, infos)), desc="shard", unit="episode",
                                              disable=not progress)):
            if writer is None or written >= shard_mb * 1e6:
                if writer is not None:
                    writer.close()
                shards.append(f"shard-{len(shards):06d}.tar")
                writer, written = wds.TarWriter(str(tmp / shards[-1]), encoder=False, mtime=0.0), 0
            sample = {"__key__": f"e{i:08d}", "name.txt": episode_name(src, path).encode()}
            frames = load_frames(path)
            for chunk, start in enumerate(range(0, len(frames), FRAME_CHUNK)):
                raw = np.ascontiguousarray(frames[start:start + FRAME_CHUNK]).tobytes()
                sample[frames_member(chunk)] = gzip.compress(raw, compresslevel=6, mtime=0)
            for name in (ACTIONS_FILE, REWARDS_FILE, OBSERVATIONS_FILE):
                if (path / name).is_file():
                    sample[name] = (path / name).read_bytes()
            writer.write(sample)
            written += sum(len(v) for k, v in sample.items() if k != "__key__")
            episodes.append({"key": sample["__key__"], "name": sample["name.txt"].decode(), "length": info.length,
                             "shard": shards[-1], "layout": info.layout})
        writer.close()
        ranges = {}
        for shard in shards:
            ranges.update(_member_ranges(tmp / shard))
        for episode in episodes:
            episode["members"] = ranges[episode["key"]]
        index = {"format": FORMAT, "version": 1, "shards": shards, "episodes": episodes}
        (tmp / INDEX_FILE).write_text(json.dumps(index))
        publish_folder(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum((dst / s).stat().st_size for s in shards)
    frames = sum(e["length"] for e in episodes)
    return {"dst": str(dst), "episodes": len(episodes), "shards": len(shards), "frames": frames,
            "bytes": total, "bytes_per_frame": total / max(frames, 1)}


def cmd_shard(args) -> int:
    """`dreamerv4 data shard SRC DST [--shard-mb N] [--overwrite]`."""
    s = write_shards(args.src, args.dst, args.shard_mb, args.overwrite)
    print(f"{s['episodes']} episode(s), {s['frames']} frames into {s['shards']} shard(s) in {s['dst']}: "
          f"{s['bytes'] / 1e6:.1f} MB, {s['bytes_per_frame']:.0f} bytes per frame")
    return 0


# --- reading ----------------------------------------------------------------------------------------
def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def is_shard_root(root: str | Path) -> bool:
    """A URL (scheme://...) or a local folder holding index.json."""
    return "://" in str(root) or (Path(root) / INDEX_FILE).is_file()


@dataclass
class ShardIndex:
    root: str
    shards: list[str]
    episodes: list[dict]

    @classmethod
    def open(cls, root: str | Path) -> "ShardIndex":
        import fsspec

        root = str(root)
        url = _join(root, INDEX_FILE)
        try:
            with fsspec.open(url, "rb") as f:
                index = json.loads(f.read())
        except FileNotFoundError as exc:
            raise DataError(f"{url}: missing (write shards with `dreamerv4 data shard`)") from exc
        except (OSError, ValueError) as exc:
            raise DataError(f"{url}: unreadable ({type(exc).__name__}: {exc})") from exc
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise DataError(f"{url}: not a {FORMAT} index")
        return cls(root, index["shards"], index["episodes"])

    def read_member(self, episode: dict, member: str) -> bytes:
        """One member's bytes with a single range read (local folder or any fsspec URL)."""
        import fsspec

        url = _join(self.root, episode["shard"])
        offset, size = episode["members"][member]
        fs, path = fsspec.core.url_to_fs(url)
        try:
            data = fs.cat_file(path, start=offset, end=offset + size)
        except (OSError, ValueError) as exc:
            raise DataError(f"{url}: cannot read {episode['key']}.{member} ({type(exc).__name__}: {exc})") from exc
        if len(data) != size:
            raise DataError(f"{url}: {episode['key']}.{member} truncated ({len(data)} of {size} bytes)")
        return data


def _npy(data: bytes, what: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{what}: unreadable ({type(exc).__name__}: {exc})") from exc


def _npz(data: bytes, what: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as exc:
        raise DataError(f"{what}: unreadable ({type(exc).__name__}: {exc})") from exc


def decode_chunk(data: bytes, what: str, rows: int) -> np.ndarray:
    """One frames member -> (rows, 64, 64, 3) uint8."""
    try:
        raw = gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise DataError(f"{what}: bad gzip data ({exc})") from exc
    if len(raw) != rows * FRAME_BYTES:
        raise DataError(f"{what}: {len(raw)} bytes, expected {rows} frames of {FRAME_BYTES}")
    return np.frombuffer(raw, np.uint8).reshape(rows, *FRAME_SHAPE)


def chunk_rows(length: int, chunk: int) -> int:
    return min(FRAME_CHUNK, length - chunk * FRAME_CHUNK)


class ChunkedFrames:
    """An episode's (T, 64, 64, 3) frames, read chunk by chunk: frames[a:b] decodes only the chunks it
    touches (through `read_chunk`, which may cache)."""

    def __init__(self, length: int, read_chunk: Callable[[int], np.ndarray]):
        self.length, self.read_chunk = length, read_chunk

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(self.length)
        if step != 1 or stop <= start:
            raise IndexError(f"ChunkedFrames takes non-empty slices with step 1, got {key}")
        first, last = start // FRAME_CHUNK, (stop - 1) // FRAME_CHUNK
        parts = [self.read_chunk(c) for c in range(first, last + 1)]
        joined = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return joined[start - first * FRAME_CHUNK: stop - first * FRAME_CHUNK]


def episode_frames(length: int, member_bytes: Callable[[str], bytes], where: str) -> np.ndarray:
    """All of an episode's frames from its frames members."""
    chunks = range((length + FRAME_CHUNK - 1) // FRAME_CHUNK)
    return np.concatenate([decode_chunk(member_bytes(frames_member(c)), f"{where}.{frames_member(c)}",
                                        chunk_rows(length, c)) for c in chunks])


def read_entry_info(index: ShardIndex, entry: dict, action_space: str | None = None) -> EpisodeInfo:
    """An episode's EpisodeInfo from its actions and rewards members; `path` names shard and key."""
    where = f"{_join(index.root, entry['shard'])}:{entry['key']}"
    actions = _npz(index.read_member(entry, ACTIONS_FILE), f"{where}.{ACTIONS_FILE}")
    rewards = _npy(index.read_member(entry, REWARDS_FILE), f"{where}.{REWARDS_FILE}")
    layout = layout_of(actions)
    if action_space is not None and layout != action_space:
        raise DataError(f"{where}: {layout} actions, but the {action_space} action space was asked for")
    try:
        codes, report = get_action_space(layout).codes_from_actions(actions)
    except ValueError as exc:
        raise DataError(f"{where}.{ACTIONS_FILE}: {exc}") from exc
    info = EpisodeInfo(Path(where), int(entry["length"]), layout, codes, rewards.astype(np.float32), report,
                       OBSERVATIONS_FILE in entry["members"])
    info.entry = entry  # type: ignore[attr-defined]
    return info


def shard_sources(root: str | Path) -> list[tuple[Path, str, EpisodeInfo, Callable[[], np.ndarray], Callable[[Path], None]]]:
    """Per episode, in name order: (where, name, info, a loader of its frames, a writer of its actions,
    rewards and observations files into a folder), for `dreamerv4 data tokenize --data SHARDS`."""
    index = ShardIndex.open(root)

    def frames(entry: dict) -> np.ndarray:
        return episode_frames(entry["length"], partial(index.read_member, entry), f"{entry['shard']}:{entry['key']}")

    def copy_files(entry: dict, folder: Path) -> None:
        for name in (ACTIONS_FILE, REWARDS_FILE, OBSERVATIONS_FILE):
            if name in entry["members"]:
                (folder / name).write_bytes(index.read_member(entry, name))

    sources = []
    for entry in sorted(index.episodes, key=lambda e: e["name"]):
        info = read_entry_info(index, entry)
        sources.append((info.path, entry["name"], info, partial(frames, entry), partial(copy_files, entry)))
    return sources


class ShardedSequenceDataset(SequenceDataset):
    """SequenceDataset over a shard folder or URL (module doc); items, windows and split are the same."""

    cache_items = 32  # decoded frame chunks (and observations) kept per process

    def __init__(self, root: str | Path, *args, **kwargs):
        self._index = ShardIndex.open(root)  # before SequenceDataset's Path(root), which mangles URLs
        super().__init__(root, *args, **kwargs)

    def _choose_episodes(self, split: Split, val_fraction: float, split_seed: int) -> list[tuple[object, str]]:
        entries = sorted(self._index.episodes, key=lambda e: e["name"])  # find_episodes' order
        if not entries:
            raise DataError(f"{self._index.root}: the shard index lists no episodes")
        held_out = validation_mask([e["name"] for e in entries], val_fraction, split_seed)
        return [(e, e["name"]) for e, v in zip(entries, held_out) if split == "all" or v == (split == "val")]

    def _read_info(self, entry: dict, action_space: str) -> EpisodeInfo:
        return read_entry_info(self._index, entry, action_space)

    def _cached(self, info: EpisodeInfo, member: str, decode):
        cache = self.__dict__.setdefault("_decoded", OrderedDict())
        key = (str(info.path), member)
        if key not in cache:
            cache[key] = decode(self._index.read_member(info.entry, member), f"{info.path}.{member}")
            while len(cache) > self.cache_items:
                cache.popitem(last=False)
        cache.move_to_end(key)
        return cache[key]

    def _load_frames(self, info: EpisodeInfo) -> ChunkedFrames:
        def read_chunk(chunk: int) -> np.ndarray:
            rows = chunk_rows(info.length, chunk)
            return self._cached(info, frames_member(chunk), lambda data, what: decode_chunk(data, what, rows))

        return ChunkedFrames(info.length, read_chunk)

    def _load_semantic(self, info: EpisodeInfo) -> np.ndarray:
        return self._cached(info, OBSERVATIONS_FILE, _npz)["semantic"]

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_decoded"] = OrderedDict()
        return state


class ShardedWindowStream(IterableDataset):
    """Every window of every episode in the shards, once per epoch, split over DDP ranks and DataLoader
    workers without overlap (module doc). Items as SequenceDataset's plus "episode" and "start".

    Reader r of R = rank * workers + worker takes shards perm[r::R] of the epoch's shard permutation
    and yields their windows in order, after skipping its first `start_window` ones (resume: pass the
    count it had yielded). Needs at least R shards per epoch for every reader to get data.
    """

    def __init__(self, root: str | Path, seq_len: int, stride: int, action_space: str, seed: int = 0,
                 epoch: int = 0, rank: int = 0, world_size: int = 1, start_window: int = 0):
        self.index = ShardIndex.open(str(root))
        self.seq_len, self.stride, self.action_space = seq_len, stride, action_space
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.start_window = start_window

    def shards_of(self, reader: int, readers: int) -> list[str]:
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.index.shards))
        return [self.index.shards[i] for i in perm[reader::readers]]

    def _samples(self, urls: list[str]):
        """The shards' samples in order, streamed through fsspec and WebDataset's tar iterators."""
        import fsspec
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        for url in urls:
            try:
                with fsspec.open(url, "rb") as f:
                    members = ({**member, "__url__": url} for member in tar_file_iterator(f))
                    for sample in group_by_keys(members):
                        yield url, sample
            except (OSError, tarfile.TarError) as exc:
                raise DataError(f"{url}: unreadable shard ({type(exc).__name__}: {exc})") from exc

    def __iter__(self):
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        reader, readers = self.rank * workers + worker_id, self.world_size * workers
        urls = [_join(self.index.root, s) for s in self.shards_of(reader, readers)]
        skip = self.start_window
        space = get_action_space(self.action_space)
        for url, sample in self._samples(urls):
            name = sample["name.txt"].decode()
            where = f"{url}:{sample['__key__']}"
            codes, _ = space.codes_from_actions(_npz(sample[ACTIONS_FILE], f"{where}.{ACTIONS_FILE}"))
            rewards = _npy(sample[REWARDS_FILE], f"{where}.{REWARDS_FILE}").astype(np.float32)
            frames = episode_frames(len(rewards), sample.__getitem__, where)
            _, starts = window_starts([len(frames)], self.seq_len, self.stride)
            for start in starts:
                if skip:
                    skip -= 1
                    continue
                stop = start + self.seq_len
                window = np.ascontiguousarray(frames[start:stop].transpose(0, 3, 1, 2))
                yield {"frames": torch.from_numpy(np.divide(window, np.float32(255.0), dtype=np.float32)),
                       "actions": torch.from_numpy(codes[start:stop].copy()),
                       "rewards": torch.from_numpy(rewards[start:stop].copy()),
                       "episode": name, "start": int(start)}


"""Latent datasets: episodes encoded once by a frozen tokenizer, read by the dynamics model (Phase 1B).

    dreamerv4 data tokenize --checkpoint runs/x/tokenizer/checkpoint.pt --data data/crafter --out runs/x/latents
    (training/tokenize.py loads the tokenizer; `write_latent_folder` writes the folder)

    ds = LatentSequenceDataset("runs/x/latents", seq_len=16, stride=4, split="train")
    ds[0]   # latents (16, 16, 32) float32, actions (16,) int64 codes, rewards (16,) float32

A latent folder mirrors the episode folder it was made from (same episode names, so the same
train/validation split, `data/dataset.py`):
    latents.json                   manifest: format, tokenizer (checkpoint path, weights fingerprint,
                                   step, done, model config), encode context, source folder,
                                   episodes {name: length}, complete
    <episode>/latents.npy          (T, 16, 32) float32, the tokenizer's latents of frames.npy
    <episode>/actions.npz, rewards.npy, observations.npz (when present): copied byte for byte
Items also carry `terminals` (seq_len,) bool: the step ended the episode by the player's death
(observations.npz `terminal`, recorded for Crafter; all False when an episode has none) and
`achievements` (seq_len, K): which achievements were unlocked before each frame (Crafter: K = 22, the
sorted names; K = 0 when not recorded).
A dataset therefore knows which tokenizer made it: `train dynamics` refuses latents whose
fingerprint differs from the tokenizer checkpoint it decodes with.

Encoding (`encode_episode`). The tokenizer is block-causal in time (its encoder has time-attention
layers), so a frame's latents depend on the frames before it in the window it is encoded with, and
it was trained on windows of `tokenizer.train.seq_len` (S) frames only. Frame t is encoded with the
frames of its aligned chunk of S frames as past: latents[t] = encode(frames[S*(t//S) .. t])[-1]. So
the encoder never sees a longer history than in training, every frame has one fixed latent however
the dynamics model windows the episode, and encoding any S-aligned window of the episode on its
own gives exactly these latents (tests check it). `decode_latents` decodes in the same aligned
chunks. The evaluation encodes held-out episodes with the same function. Latents are computed in
fp32 and stored as float32 (exactly `Tokenizer.encode`; 2 KiB a frame, ~100 MB for 52k frames).

Writes are atomic per episode (built in a hidden folder, then renamed) and the manifest is marked
complete last, so an interrupted run resumes: rerunning skips the episodes already encoded by the
same tokenizer. Latents of another tokenizer are never replaced without --overwrite.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from dreamerv4.actions import get_action_space, layout_of
from dreamerv4.data.dataset import Split, split_episodes, window_starts
from dreamerv4.data.episodes import (
    ACTIONS_FILE, OBSERVATIONS_FILE, REWARDS_FILE, episode_name, find_episodes, has_observations, load_actions,
    load_frames, load_rewards, publish_folder, read_episode_info,
)
from dreamerv4.data.shards import is_shard_root, shard_sources
from dreamerv4.errors import DataError, UserError

LATENTS_FILE = "latents.npy"
MANIFEST_FILE = "latents.json"
MANIFEST_FORMAT = "dreamerv4.latents/1"


# --- encoding and decoding -------------------------------------------------------------------------
def tokenizer_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's weights (names, shapes, dtypes, bytes): the tokenizer's identity,
    independent of optimizer state or of when the checkpoint file was written."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def frames_to_float(frames: np.ndarray) -> torch.Tensor:
    """(N, 64, 64, 3) uint8 -> (N, 3, 64, 64) float32 in [0, 1], the same numbers SequenceDataset gives."""
    array = np.ascontiguousarray(np.asarray(frames).transpose(0, 3, 1, 2))
    return torch.from_numpy(np.divide(array, np.float32(255.0), dtype=np.float32))


@torch.no_grad()
def encode_episode(tokenizer, frames: np.ndarray, context: int, batch_frames: int = 256) -> np.ndarray:
    """Latents (T, L, C) float32 of an episode's frames (T, 64, 64, 3) uint8, encoded in chunks of
    `context` frames aligned at step 0 (module docstring); about `batch_frames` frames per forward pass."""
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    device = next(tokenizer.parameters()).device
    steps = len(frames)
    cfg = tokenizer.cfg
    out = np.empty((steps, cfg.num_latents, cfg.latent_dim), dtype=np.float32)
    full = steps // context
    per_batch = max(1, batch_frames // context)
    for first in range(0, full, per_batch):
        n = min(per_batch, full - first)
        a, b = first * context, (first + n) * context
        x = frames_to_float(frames[a:b]).reshape(n, context, 3, cfg.image_size, cfg.image_size)
        out[a:b] = tokenizer.encode(x.to(device)).reshape(b - a, *out.shape[1:]).cpu().numpy()
    if full * context < steps:  # a shorter last chunk: by causality, the first frames of a full one
        x = frames_to_float(frames[full * context:])[None]
        out[full * context:] = tokenizer.encode(x.to(device))[0].cpu().numpy()
    return out


@torch.no_grad()
def decode_latents(tokenizer, latents: torch.Tensor, context: int) -> torch.Tensor:
    """Frames (N, T, 3, 64, 64) in [0, 1] of latents (N, T, L, C), decoded in chunks of `context`
    frames aligned at index 0 (like `encode_episode`)."""
    device = next(tokenizer.parameters()).device
    parts = [tokenizer.decode(latents[:, a: a + context].to(device)).float().cpu()
             for a in range(0, latents.shape[1], context)]
    return torch.cat(parts, dim=1)


# --- reading ---------------------------------------------------------------------------------------
def read_manifest(root: str | Path) -> dict:
    """The manifest of a latent folder; DataError when it is missing, unreadable or not complete."""
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"{path}: missing; {root} is not a latent folder "
                        "(make one with `dreamerv4 data tokenize --checkpoint ... --data ... --out ...`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    if not manifest.get("complete", False):
        raise DataError(f"{path}: tokenizing stopped before it finished; rerun the same "
                        "`dreamerv4 data tokenize` command to complete it")
    return manifest


def load_latents(episode: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """(T, L, C) float32 latents, memory-mapped read-only; DataError naming the file when it is missing,
    truncated, of another dtype or shape ((L, C) = `shape` when given) or holds NaN/inf."""
    path = Path(episode) / LATENTS_FILE
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        latents = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{path}: unreadable or truncated ({type(exc).__name__}: {exc})") from exc
    want = "(T, L, C)" if shape is None else f"(T, {shape[0]}, {shape[1]})"
    if latents.dtype != np.float32 or latents.ndim != 3 or (shape is not None and latents.shape[1:] != tuple(shape)):
        raise DataError(f"{path}: expected {want} float32, got {latents.shape} {latents.dtype}")
    bad = ~np.isfinite(latents).all(axis=(1, 2))
    if bad.any():
        raise DataError(f"{path}: {int(bad.sum())} frame(s) with NaN or inf latents (first at step {int(np.argmax(bad))})")
    return latents


@dataclass
class LatentEpisodeInfo:
    path: Path
    length: int
    codes: np.ndarray  # (T,) int64 packed action codes
    rewards: np.ndarray  # (T,) float32
    terminals: np.ndarray  # (T,) bool, True where the step ended the episode by death
    achievements: np.ndarray  # (T, K) float32, 1 where achievement k was unlocked before frame t (K = 0: none)


def _observation(episode: Path, key: str, length: int) -> np.ndarray | None:
    """observations.npz[key] with `length` rows, or None when the episode records no such array."""
    if not has_observations(episode):
        return None
    try:
        with np.load(episode / OBSERVATIONS_FILE, allow_pickle=False) as npz:
            if key not in npz.files:
                return None
            value = npz[key]
    except Exception as exc:
        raise DataError(f"{episode / OBSERVATIONS_FILE}: unreadable or truncated ({type(exc).__name__}: {exc})") from exc
    if value.ndim not in (1, 2) or len(value) != length:
        raise DataError(f"{episode / OBSERVATIONS_FILE}: {key} has shape {value.shape}, expected ({length},"
                        f"{'' if key == 'terminal' else ' K'})")
    return value


def _terminals(episode: Path, length: int) -> np.ndarray:
    """observations.npz `terminal` as (T,) bool, or all False when the episode records none."""
    terminal = _observation(episode, "terminal", length)
    if terminal is None:
        return np.zeros(length, bool)
    if terminal.ndim != 1:
        raise DataError(f"{episode / OBSERVATIONS_FILE}: terminal has shape {terminal.shape}, expected ({length},)")
    return terminal.astype(bool)


def read_achievements(episode: Path, length: int) -> np.ndarray:
    """observations.npz `achievements` (T, K): 1 where achievement k was unlocked before frame t; (T, 0)
    when the episode records none."""
    achievements = _observation(episode, "achievements", length)
    if achievements is None:
        return np.zeros((length, 0), np.float32)
    if achievements.ndim != 2:
        raise DataError(f"{episode / OBSERVATIONS_FILE}: achievements has shape {achievements.shape}, "
                        f"expected ({length}, K)")
    return (achievements > 0).astype(np.float32)


def read_latent_episode(episode: str | Path, action_space: str, shape: tuple[int, int]) -> LatentEpisodeInfo:
    """Check one latent episode (latents, actions, rewards, equal lengths); DataError naming the file."""
    episode = Path(episode)
    latents = load_latents(episode, shape)
    rewards = load_rewards(episode)
    if not np.isfinite(rewards).all():
        raise DataError(f"{episode / REWARDS_FILE}: NaN or inf rewards")
    actions = load_actions(episode)
    layout = layout_of(actions)
    if layout != action_space:
        raise DataError(f"{episode / ACTIONS_FILE}: {layout or 'unknown'} actions, but the {action_space} "
                        "action space was asked for")
    try:
        codes, _ = get_action_space(layout).codes_from_actions(actions)
    except ValueError as exc:
        raise DataError(f"{episode / ACTIONS_FILE}: {exc}") from exc
    lengths = {LATENTS_FILE: len(latents), ACTIONS_FILE: len(codes), REWARDS_FILE: len(rewards)}
    if len(set(lengths.values())) > 1:
        raise DataError(f"{episode}: lengths differ ({', '.join(f'{k} {n}' for k, n in lengths.items())})")
    return LatentEpisodeInfo(episode, len(latents), codes, rewards, _terminals(episode, len(latents)),
                             read_achievements(episode, len(latents)))


class LatentSequenceDataset(Dataset):
    """Windows of `seq_len` steps of a latent folder, with SequenceDataset's windows and split
    (`window_starts`, `split_episodes`: the same episode names land on the same side).

    Item i: latents (seq_len, L, C) float32, actions (seq_len,) int64, rewards (seq_len,) float32,
    terminals (seq_len,) bool, achievements (seq_len, K) float32 (K = 0 when not recorded).
    Every episode is checked when the dataset is built (DataError naming the file); `manifest` is the
    folder's manifest (the tokenizer that made it). Latents are memory-mapped lazily per process.
    """

    def __init__(self, root: str | Path, seq_len: int = 16, stride: int = 8, split: Split = "all",
                 val_fraction: float = 0.1, split_seed: int = 0, action_space: str = "crafter"):
        if split not in ("train", "val", "all"):
            raise DataError(f"split {split!r}: expected 'train', 'val' or 'all'")
        if seq_len < 1 or stride < 1:
            raise DataError(f"seq_len ({seq_len}) and stride ({stride}) must be at least 1")
        self.root = Path(root)
        self.seq_len, self.stride, self.split = seq_len, stride, split
        self.manifest = read_manifest(self.root)
        self.latent_shape = (int(self.manifest["num_latents"]), int(self.manifest["latent_dim"]))
        listed = self.manifest.get("episodes", {})
        found = {name for _, name in split_episodes(self.root, "all", val_fraction, split_seed)}
        for name in sorted(set(listed) - found):
            raise DataError(f"{self.root / name}: missing (listed in {self.root / MANIFEST_FILE})")
        for name in sorted(found - set(listed)):
            raise DataError(f"{self.root / name}: not in {self.root / MANIFEST_FILE} (left from another tokenize run?)")
        self.episodes: list[LatentEpisodeInfo] = []
        self.episode_names: list[str] = []
        self.skipped_short: list[str] = []
        chosen = split_episodes(self.root, split, val_fraction, split_seed)
        for path, name in chosen:
            info = read_latent_episode(path, action_space, self.latent_shape)
            if info.length != int(listed[name]):
                raise DataError(f"{path / LATENTS_FILE}: {info.length} steps, the manifest says {listed[name]}")
            if info.length < seq_len:
                self.skipped_short.append(name)
                continue
            self.episodes.append(info)
            self.episode_names.append(name)
        widths = {info.achievements.shape[1] for info in self.episodes}
        if len(widths) > 1:
            raise DataError(f"{self.root}: episodes record different numbers of achievements ({sorted(widths)}); "
                            "re-record or convert them with one tool")
        self.num_achievements = widths.pop() if widths else 0
        self._window_episode, self._window_start = window_starts([i.length for i in self.episodes], seq_len, stride)
        if not len(self._window_start):
            raise DataError(f"{self.root}: no window of {seq_len} steps in the {split} split "
                            f"({len(chosen)} episode(s), {len(self.skipped_short)} shorter than {seq_len})")
        self._latents: dict[int, np.ndarray] = {}

    @property
    def num_frames(self) -> int:
        return sum(info.length for info in self.episodes)

    def window(self, index: int) -> tuple[str, int]:
        """(episode name, start step) of item `index`."""
        return self.episode_names[int(self._window_episode[index])], int(self._window_start[index])

    def __len__(self) -> int:
        return len(self._window_start)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_latents"] = {}  # memory maps stay out of what DataLoader workers receive
        return state

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        episode, start = int(self._window_episode[index]), int(self._window_start[index])
        stop = start + self.seq_len
        info = self.episodes[episode]
        if episode not in self._latents:
            self._latents[episode] = np.load(info.path / LATENTS_FILE, mmap_mode="r", allow_pickle=False)
        return {
            "latents": torch.from_numpy(np.array(self._latents[episode][start:stop], dtype=np.float32)),
            "actions": torch.from_numpy(info.codes[start:stop].copy()),
            "rewards": torch.from_numpy(info.rewards[start:stop].copy()),
            "terminals": torch.from_numpy(info.terminals[start:stop].copy()),
            "achievements": torch.from_numpy(info.achievements[start:stop].copy()),
        }

    def __repr__(self) -> str:
        return (f"LatentSequenceDataset({str(self.root)!r}, split={self.split!r}, episodes={len(self.episodes)}, "
                f"windows={len(self)}, seq_len={self.seq_len}, stride={self.stride})")


# --- writing ---------------------------------------------------------------------------------------
def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def _copy_episode_files(source: Path, folder: Path) -> None:
    """The episode's actions, rewards and observations files into `folder`."""
    for name in (ACTIONS_FILE, REWARDS_FILE, OBSERVATIONS_FILE):
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


def _write_latent_episode(dest: Path, latents: np.ndarray, copy_files: Callable[[Path], None], replace: bool) -> None:
    """Build the episode in a hidden folder beside `dest` (latents + `copy_files`: the source's actions,
    rewards, observations), then rename it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        np.save(tmp / LATENTS_FILE, latents)
        copy_files(tmp)
        if dest.exists() and not replace:
            raise DataError(f"{dest}: exists (pass --overwrite to replace it)")
        publish_folder(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_latent_folder(tokenizer, source: dict, data: str | Path, out: str | Path, *, context: int,
                        overwrite: bool = False, batch_frames: int = 256, progress: bool = True) -> dict:
    """Encode every episode of `data` (an episode folder, or a shard folder or URL) with `tokenizer`
    into the latent folder `out` (module docstring), in chunks of `context` frames. `source` is what
    the manifest records of the tokenizer: {"checkpoint", "step", "done", "model"}
    (`dreamerv4 data tokenize` fills it from the checkpoint: training/tokenize.py). Episodes already in
    `out` from the same tokenizer and context are kept; anything else already there is an error
    unless `overwrite`. Returns the manifest."""
    sharded = is_shard_root(data)
    data, out = (str(data) if sharded else Path(data)), Path(out)
    if batch_frames < 1:
        raise UserError(f"--batch-frames must be >= 1, got {batch_frames}")
    if context < 1:
        raise UserError(f"--context must be >= 1, got {context}")
    if not sharded:
        sources = find_episodes(data)
        if not sources:
            raise DataError(f"{data}: no episode folders")
        if sources == [data]:
            raise UserError(f"{data}: is itself an episode; pass the folder that holds episode folders")
        data_abs, out_abs = data.resolve(), out.resolve()
        if out_abs == data_abs or data_abs in out_abs.parents or out_abs in data_abs.parents:
            raise UserError(f"--out {out} and --data {data} must not contain one another")
    identity = {"fingerprint": tokenizer_fingerprint(tokenizer), "context": context}
    manifest = {
        "format": MANIFEST_FORMAT,
        "tokenizer": {"checkpoint": source["checkpoint"], "fingerprint": identity["fingerprint"],
                      "step": source["step"], "done": source["done"], "model": source["model"]},
        "context": context,
        "num_latents": tokenizer.cfg.num_latents,
        "latent_dim": tokenizer.cfg.latent_dim,
        "dtype": "float32",
        "source": data if sharded else str(data_abs),
        "episodes": {},
        "complete": False,
    }

    keep_existing = False
    manifest_path = out / MANIFEST_FILE
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
            old_identity = {"fingerprint": old["tokenizer"]["fingerprint"], "context": old["context"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{manifest_path}: unreadable ({type(exc).__name__}: {exc})") from exc
        keep_existing = old_identity == identity
        if not keep_existing and not overwrite:
            raise DataError(
                f"{out}: holds latents of another tokenizer or context ({old['tokenizer'].get('checkpoint')}, "
                f"fingerprint {old_identity['fingerprint'][:12]}, context {old_identity['context']}; now "
                f"{identity['fingerprint'][:12]}, context {context}); pass --overwrite to replace them")
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out}: exists and is not a latent folder (no {MANIFEST_FILE}); "
                        "choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(manifest_path, manifest)  # incomplete until every episode is written

    if sharded:  # (where, name, info, frames loader, copier of actions/rewards/observations into a folder)
        infos = shard_sources(data)
    else:
        infos = [(p, episode_name(data, p), read_episode_info(p), partial(load_frames, p), partial(_copy_episode_files, p))
                 for p in sources]  # DataError naming the file
    total = sum(info.length for _, _, info, _, _ in infos)
    bar = tqdm(total=total, desc="tokenize", unit="frame", dynamic_ncols=True, disable=None if progress else True)
    encoded = skipped = 0
    try:
        for path, name, info, frames, copy_files in infos:
            dest = out / name
            if dest.exists() and keep_existing and not overwrite:
                try:
                    ready = len(load_latents(dest, (manifest["num_latents"], manifest["latent_dim"]))) == info.length
                except DataError:
                    ready = False
                if not ready:
                    raise DataError(f"{dest}: exists but does not match {path}; pass --overwrite to redo it")
                skipped += 1
            else:
                latents = encode_episode(tokenizer, frames(), context, batch_frames)
                if not np.isfinite(latents).all():
                    raise UserError(f"{source['checkpoint']}: the tokenizer gave NaN or inf latents for {path}")
                _write_latent_episode(dest, latents, copy_files, replace=overwrite)
                encoded += 1
            manifest["episodes"][name] = info.length
            bar.update(info.length)
    finally:
        bar.close()
    manifest["complete"] = True
    _write_json(manifest_path, manifest)
    manifest["_counts"] = {"encoded": encoded, "skipped": skipped}
    return manifest

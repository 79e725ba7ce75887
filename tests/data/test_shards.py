"""Sharded episodes (src/dreamerv4/data/shards.py): writer, map-style reader against the episode folders,
the streaming reader split over two gloo ranks and DataLoader workers, resume, and a tokenizer run on shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dreamerv4.cli import main
from dreamerv4.data.dataset import SequenceDataset, window_starts
from dreamerv4.data.episodes import write_episode
from dreamerv4.data.shards import ShardedSequenceDataset, ShardedWindowStream
from dreamerv4.errors import DataError

THIS_FILE = Path(__file__).resolve()
SRC_DIR = THIS_FILE.parents[2] / "src"
LENGTHS = (30, 45, 20, 60, 37, 25, 41, 33)
SEQ_LEN, STRIDE = 8, 4


def make_episodes(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i, length in enumerate(LENGTHS):
        frames = rng.integers(0, 256, (length, 64, 64, 3), dtype=np.uint8)
        write_episode(root / f"ep{i:02d}", frames, {"action": rng.integers(0, 17, length)},
                      rng.normal(size=length).astype(np.float32),
                      {"semantic": rng.integers(0, 19, (length, 7, 9), dtype=np.uint8)})
    return root


def all_windows() -> set[tuple[str, int]]:
    episode, start = window_starts(list(LENGTHS), SEQ_LEN, STRIDE)
    return {(f"ep{e:02d}", int(s)) for e, s in zip(episode, start)}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shards")
    episodes = make_episodes(root / "episodes")
    # ~0.5 MB of frames per episode: 0.4 MB shards hold one or two episodes each (8 episodes, >= 4 shards)
    assert main(["data", "shard", str(episodes), str(root / "shards"), "--shard-mb", "0.4"]) == 0
    return episodes, root / "shards"


def assert_same_items(a: SequenceDataset, b: SequenceDataset) -> None:
    assert len(a) == len(b) and [a.window(i) for i in range(len(a))] == [b.window(i) for i in range(len(b))]
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)


@pytest.mark.parametrize("split", ["train", "val"])
def test_shards_read_as_the_same_windows_as_the_episode_folders(sharded, split):
    episodes, shards = sharded
    index = json.loads((shards / "index.json").read_text())
    assert len(index["shards"]) >= 4 and all(name.endswith(".tar") for name in index["shards"])
    kwargs = dict(seq_len=SEQ_LEN, stride=STRIDE, split=split, val_fraction=0.25, with_semantic=True)
    from_shards = SequenceDataset(shards, **kwargs)
    assert isinstance(from_shards, ShardedSequenceDataset)
    assert_same_items(SequenceDataset(episodes, **kwargs), from_shards)


def test_object_store_url_reads_through_the_same_code_path(sharded):
    episodes, shards = sharded
    fs = fsspec.filesystem("memory")
    for path in shards.iterdir():
        fs.pipe(f"/bucket/shards/{path.name}", path.read_bytes())
    from_url = SequenceDataset("memory://bucket/shards", seq_len=SEQ_LEN, stride=SEQ_LEN)
    assert_same_items(SequenceDataset(episodes, seq_len=SEQ_LEN, stride=SEQ_LEN), from_url)
    stream = ShardedWindowStream("memory://bucket/shards", SEQ_LEN, STRIDE, "crafter")
    assert {(w["episode"], w["start"]) for w in stream} == all_windows()
    with pytest.raises(DataError, match="memory://bucket/missing/index.json: missing"):
        SequenceDataset("memory://bucket/missing", seq_len=SEQ_LEN)


def test_shard_never_overwrites_without_flag(sharded, capsys):
    episodes, shards = sharded
    assert main(["data", "shard", str(episodes), str(shards)]) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err


def test_dataloader_workers_split_the_stream_without_overlap(sharded):
    _, shards = sharded
    stream = ShardedWindowStream(shards, SEQ_LEN, STRIDE, "crafter", seed=3, epoch=1)
    seen = [(w["episode"], w["start"]) for w in DataLoader(stream, batch_size=None, num_workers=2)]
    assert len(seen) == len(set(seen)) and set(seen) == all_windows()
    other_epoch = ShardedWindowStream(shards, SEQ_LEN, STRIDE, "crafter", seed=3, epoch=2)
    assert [(w["episode"], w["start"]) for w in other_epoch] != seen or len(stream.index.shards) < 2


def worker_main(shards: str, out: str) -> None:
    """Body of each torchrun worker: its rank's windows (2 DataLoader workers), then a resumed read."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    stream = ShardedWindowStream(shards, SEQ_LEN, STRIDE, "crafter", seed=1, rank=rank, world_size=world)
    windows = [(w["episode"], w["start"]) for w in DataLoader(stream, batch_size=None, num_workers=2)]
    single = [(w["episode"], w["start"]) for w in stream]  # this rank alone, no workers: one reader
    cut = len(single) // 2
    resumed = ShardedWindowStream(shards, SEQ_LEN, STRIDE, "crafter", seed=1, rank=rank, world_size=world,
                                  start_window=cut)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, {"windows": windows, "single": single, "cut": cut,
                                      "resumed": [(w["episode"], w["start"]) for w in resumed]})
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def test_two_gloo_ranks_read_disjoint_windows_that_cover_the_data_and_resume(sharded, tmp_path):
    _, shards = sharded
    script = tmp_path / "worker.py"
    script.write_text(
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('shard_test', {str(THIS_FILE)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "module.worker_main(sys.argv[1], sys.argv[2])\n")
    env = {**os.environ, "PYTHONPATH": f"{SRC_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(shards), str(tmp_path / "out.json")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in 120 s:\n{log[-4000:]}")
    assert proc.returncode == 0, log[-4000:]
    ranks = json.loads((tmp_path / "out.json").read_text())
    with_workers = [tuple(w) for r in ranks for w in r["windows"]]
    assert len(with_workers) == len(set(with_workers)) and set(with_workers) == all_windows()
    one_reader_per_rank = [tuple(w) for r in ranks for w in r["single"]]
    assert len(one_reader_per_rank) == len(set(one_reader_per_rank)) and set(one_reader_per_rank) == all_windows()
    for r in ranks:
        assert 0 < r["cut"] and r["resumed"] == r["single"][r["cut"]:]  # no window repeated or skipped


def test_tokenizer_trains_on_the_same_batches_from_shards(tiny_crafter_root, tmp_path):
    from dreamerv4.config import load_config
    from dreamerv4.run_config import RunConfig
    from dreamerv4.training.logging import read_metrics
    from dreamerv4.training.tokenizer import train_tokenizer
    from training.test_train_tokenizer import write_config

    assert main(["data", "shard", str(tiny_crafter_root), str(tmp_path / "shards")]) == 0
    losses = []
    for name, data in (("folders", tiny_crafter_root), ("shards", tmp_path / "shards")):
        cfg = load_config(RunConfig, write_config(tmp_path / f"{name}.yaml", tmp_path / name, data, steps=3,
                                                  ckpt_every=3))
        train_tokenizer(cfg)
        losses.append([r["loss"] for r in read_metrics(tmp_path / name / "tokenizer") if "loss" in r])
    assert len(losses[0]) == 3 and losses[0] == losses[1]  # bitwise on CPU fp32: the same batches


def test_tokenize_from_shards_writes_the_same_latent_episodes(tiny_crafter_root, tmp_path):
    from data.test_latents import make_tokenizer_checkpoint
    from dreamerv4.data.latents import load_latents
    from dreamerv4.training.tokenize import tokenize_dataset

    checkpoint = make_tokenizer_checkpoint(tmp_path / "tok" / "checkpoint.pt")
    assert main(["data", "shard", str(tiny_crafter_root), str(tmp_path / "shards")]) == 0
    a = tokenize_dataset(checkpoint, tiny_crafter_root, tmp_path / "from_folders", progress=False)
    b = tokenize_dataset(checkpoint, tmp_path / "shards", tmp_path / "from_shards", progress=False)
    assert a["episodes"] == b["episodes"] and len(a["episodes"]) == 3
    for name in a["episodes"]:
        np.testing.assert_array_equal(load_latents(tmp_path / "from_folders" / name),
                                      load_latents(tmp_path / "from_shards" / name))
        for file in ("actions.npz", "rewards.npy", "observations.npz"):
            assert (tmp_path / "from_folders" / name / file).read_bytes() == \
                (tmp_path / "from_shards" / name / file).read_bytes()


def test_windows_across_frame_chunks_read_the_right_frames(tmp_path, monkeypatch):
    import dreamerv4.data.shards as shards

    monkeypatch.setattr(shards, "FRAME_CHUNK", 16)  # the 20..60-step episodes span 2..4 chunks
    episodes = make_episodes(tmp_path / "episodes")
    shards.write_shards(episodes, tmp_path / "shards", progress=False)
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert sorted(k for k in index["episodes"][3]["members"] if k.startswith("frames.")) == \
        [f"frames.{c:05d}.u8.gz" for c in range(4)]  # ep03: 60 frames
    assert_same_items(SequenceDataset(episodes, seq_len=SEQ_LEN, stride=3),
                      SequenceDataset(tmp_path / "shards", seq_len=SEQ_LEN, stride=3))
    stream = ShardedWindowStream(tmp_path / "shards", SEQ_LEN, STRIDE, "crafter")
    folders = SequenceDataset(episodes, seq_len=SEQ_LEN, stride=STRIDE)
    expected = {folders.window(i): folders[i]["frames"] for i in range(len(folders))}
    for window in stream:
        torch.testing.assert_close(window["frames"], expected.pop((window["episode"], window["start"])), rtol=0, atol=0)
    assert not expected

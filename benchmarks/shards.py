"""Sharded reading against the mmap episode store: frames/s at the seed's batch (B=16, T=16) with 0, 2 and
4 DataLoader workers, and bytes per frame on disk.

    python benchmarks/shards.py                        # records data/bench-crafter once (as data_loading.py does)
    python benchmarks/shards.py --data data/minerl     # an existing episode folder

Three readers of the same windows: `mmap` (SequenceDataset on episode folders, shuffled windows, as in
training), `shards_map` (ShardedSequenceDataset on `dreamerv4 data shard` output, shuffled windows: each
process decodes whole episodes and keeps the last 8) and `shards_stream` (ShardedWindowStream: shards
dealt to workers, windows in order). Writes benchmarks/results/shards.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from data_loading import measure, time_batches  # benchmarks/data_loading.py: shuffled map-style batches, timed
from dreamerv4.data.crafter_record import record_crafter
from dreamerv4.data.dataset import SequenceDataset, collate_windows
from dreamerv4.data.episodes import find_episodes
from dreamerv4.data.shards import ShardedWindowStream, write_shards

ROOT = Path(__file__).resolve().parent.parent


def folder_bytes(root: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in root.rglob(pattern) if p.is_file())


def measure_stream(stream: ShardedWindowStream, batch_size: int, workers: int, batches: int) -> dict:
    def items(window_batch: list[dict]) -> dict:
        return collate_windows([{k: v for k, v in w.items() if isinstance(v, torch.Tensor)} for w in window_batch])

    loader = DataLoader(stream, batch_size=batch_size, num_workers=workers, collate_fn=items, drop_last=True)
    return time_batches(loader, batch_size * stream.seq_len, workers, batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "bench-crafter"), help="episode folder (recorded if absent)")
    parser.add_argument("--shards", default=None, help="shard folder (default: <data>-shards, written if absent)")
    parser.add_argument("--episodes", type=int, default=8, help="episodes to record when --data is absent")
    parser.add_argument("--max-steps", type=int, default=1000, help="steps per recorded episode")
    parser.add_argument("--shard-mb", type=float, default=8.0, help="shard size when writing shards")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per setting")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "shards.json"))
    args = parser.parse_args()

    data = Path(args.data)
    if not data.is_dir() or not find_episodes(data):
        record_crafter(data, args.episodes, seed=0, policy="random", max_steps=args.max_steps)
    shards = Path(args.shards or f"{data}-shards")
    written = None
    if not (shards / "index.json").is_file():
        started = time.perf_counter()
        written = write_shards(data, shards, args.shard_mb, progress=False)
        written["seconds"] = round(time.perf_counter() - started, 2)
    mmap = SequenceDataset(data, seq_len=args.seq_len, stride=8, split="all")
    sharded = SequenceDataset(shards, seq_len=args.seq_len, stride=8, split="all")
    stream = ShardedWindowStream(shards, args.seq_len, 8, mmap.action_space)
    frames = mmap.num_frames
    results = {
        "mmap": [measure(mmap, args.batch_size, w, args.batches, seed=0) for w in args.workers],
        "shards_map": [measure(sharded, args.batch_size, w, args.batches, seed=0) for w in args.workers],
        "shards_stream": [measure_stream(stream, args.batch_size, w, args.batches) for w in args.workers],
    }
    report = {
        "benchmark": "shards",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "settings": {"data": str(data), "shards": str(shards), "episodes": len(mmap.episodes), "frames": frames,
                     "shard_files": len(stream.index.shards), "windows": len(mmap), "batch_size": args.batch_size,
                     "seq_len": args.seq_len, "timed_batches": args.batches, "written_now": written},
        "bytes_per_frame": {"mmap_frames_npy": round(folder_bytes(data, "frames.npy") / frames, 1),
                            "mmap_episode_folders": round(folder_bytes(data, "*") / frames, 1),
                            "shards": round(folder_bytes(shards, "*.tar") / frames, 1)},
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    for reader, rows in results.items():
        for r in rows:
            print(f"{reader} workers={r['workers']}: {r['frames_per_second']:.0f} frames/s")
    print(f"bytes per frame: {report['bytes_per_frame']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

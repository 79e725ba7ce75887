"""Data-loading throughput: frames/s of SequenceDataset batches (B=16, T=16) with 0 and 2 workers.

    python benchmarks/data_loading.py                       # records data/bench-crafter once, then reuses it
    python benchmarks/data_loading.py --data data/crafter   # an existing episode folder

Writes benchmarks/results/data_loading.json (machine, settings, frames/s per worker count). Batches
are drawn in shuffled order (random windows, as in training) and fully materialized.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from dreamerv4.data.crafter_record import record_crafter
from dreamerv4.data.dataset import SequenceDataset, make_dataloader
from dreamerv4.data.episodes import find_episodes

ROOT = Path(__file__).resolve().parent.parent


def measure(dataset: SequenceDataset, batch_size: int, workers: int, batches: int, seed: int) -> dict:
    loader = make_dataloader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, seed=seed)
    return time_batches(loader, batch_size * dataset.seq_len, workers, batches)


def time_batches(loader, frames_per_batch: int, workers: int, batches: int) -> dict:
    """Frames/s of `batches` batches of `loader` (restarted when it runs out), after its first batch."""
    iterator = iter(loader)
    next(iterator)  # worker start-up and first page-in are not throughput
    started = time.perf_counter()
    checksum = 0.0
    drawn = 0
    while drawn < batches:
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            continue
        checksum += float(batch["frames"][:, :, 0, 0, 0].sum())  # touch the batch
        drawn += 1
    seconds = time.perf_counter() - started
    frames = drawn * frames_per_batch
    return {"workers": workers, "batches": drawn, "seconds": round(seconds, 3),
            "frames_per_second": round(frames / seconds, 1), "batches_per_second": round(drawn / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "bench-crafter"), help="episode folder (recorded if absent)")
    parser.add_argument("--episodes", type=int, default=8, help="episodes to record when --data is absent")
    parser.add_argument("--max-steps", type=int, default=1000, help="steps per recorded episode")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--batches", type=int, default=200, help="timed batches per setting")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_loading.json"))
    args = parser.parse_args()

    data = Path(args.data)
    recorded = None
    if not data.is_dir() or not find_episodes(data):
        recorded = record_crafter(data, args.episodes, seed=0, policy="random", max_steps=args.max_steps)
    dataset = SequenceDataset(data, seq_len=args.seq_len, stride=8, split="all")
    results = [measure(dataset, args.batch_size, w, args.batches, seed=0) for w in args.workers]
    report = {
        "benchmark": "data_loading",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "settings": {"data": str(data), "episodes": len(dataset.episodes), "frames_on_disk": dataset.num_frames,
                     "windows": len(dataset), "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "timed_batches": args.batches, "shuffle": True,
                     "recorded_now": recorded is not None,
                     "recording_frames_per_second": recorded["frames_per_second"] if recorded else None},
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    for r in results:
        print(f"workers={r['workers']}: {r['frames_per_second']:.0f} frames/s ({r['batches_per_second']:.1f} batches/s "
              f"of {args.batch_size}x{args.seq_len})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

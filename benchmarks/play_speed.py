"""Milliseconds per dream frame of `dreamerv4 play` at batch 1: the preset world model at K = 1, 2, 4.

    .venv/bin/python benchmarks/play_speed.py                       # ~3 min here, 2 threads
    ... --threads 1 --variants fp32 --ks 4 --frames 20              # one corner, quicker

What is timed is what the page waits for after a key press in dream mode (play/session.py): `Dream.step`
(the world model's K shortcut steps over the new frame reading the KVCache, then one cached pass that
appends it; a full context of `seq_len` frames restarts from its last half, as in play) and the
tokenizer decode of the new latent (`ChunkedCodec.decode`). Models are configs/crafter-small.yaml's
sizes (dynamics.model and tokenizer.model) with random weights (speed does not depend on them).

Variants: fp32 under torch.no_grad (what Rollout uses on its own), fp32 under torch.inference_mode (what
the server runs), bf16 autocast + inference_mode, and torch.compile of the transformer blocks
(models/transformer.py compile_blocks; with a KVCache the time-attention blocks run eagerly, so only the
space blocks are compiled) + inference_mode. Per variant and K: `--warmup` untimed frames, then
`--frames` timed ones; medians (and the minimum: on shared cores the least disturbed frame) of wall and process-CPU milliseconds per frame, split into world model
and decode, and the machine's load average at the end (the cores are shared). `meets_10fps_at_k4` says whether the median wall time per frame at K = 4 is <= 100 ms.
Writes benchmarks/results/play_speed.json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tokenizer_step import machine  # noqa: E402  (benchmarks/ helper, not a package)

from dreamerv4.config import load_config  # noqa: E402
from dreamerv4.models.dynamics import DynamicsModel  # noqa: E402
from dreamerv4.models.tokenizer import Tokenizer  # noqa: E402
from dreamerv4.models.transformer import compile_blocks  # noqa: E402
from dreamerv4.play.session import ChunkedCodec, Dream  # noqa: E402
from dreamerv4.run_config import RunConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "play_speed.json"
PRESET = Path(__file__).parent.parent / "configs" / "crafter-small.yaml"
VARIANTS = ("fp32_no_grad", "fp32", "bf16", "fp32_compiled")


def preset_models() -> tuple[DynamicsModel, Tokenizer, int, dict]:
    run = load_config(RunConfig, PRESET, [])
    dyn_cfg = run.dynamics.model
    if dyn_cfg.latent_scale == 0:  # "measure it at training time": any value times the same
        dyn_cfg = dataclasses.replace(dyn_cfg, latent_scale=3.1)
    torch.manual_seed(0)
    sizes = {"dynamics": dataclasses.asdict(dyn_cfg.transformer), "tokenizer_patch": run.tokenizer.model.patch_size,
             "seq_len": run.dynamics.train.seq_len}
    return DynamicsModel(dyn_cfg).eval(), Tokenizer(run.tokenizer.model).eval(), run.dynamics.train.seq_len, sizes


def grad_mode(variant: str):
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad() if variant == "fp32_no_grad" else torch.inference_mode())
    if variant == "bf16":
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    return stack


def time_cell(world: DynamicsModel, tokenizer: Tokenizer, variant: str, steps: int, max_context: int,
              warmup: int, frames: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    codec = ChunkedCodec(tokenizer, context=1)  # the preset tokenizer is per frame (no time layers)
    wall_world, wall_decode, cpu_total = [], [], []
    with grad_mode(variant):
        dream = Dream(world, steps, max_context, generator)
        dream.start(torch.rand(world.cfg.num_latents, world.cfg.latent_dim) * 2 - 1)
        for i in range(warmup + frames):
            c0, t0 = time.process_time(), time.perf_counter()
            latent, _ = dream.step(i % 17)
            t1 = time.perf_counter()
            codec.decode(latent)
            t2, c2 = time.perf_counter(), time.process_time()
            if i >= warmup:
                wall_world.append(t1 - t0)
                wall_decode.append(t2 - t1)
                cpu_total.append(c2 - c0)
    total = [a + b for a, b in zip(wall_world, wall_decode)]
    ms = lambda xs: round(1000 * statistics.median(xs), 2)  # noqa: E731
    return {"variant": variant, "steps": steps, "frames": frames, "ms_per_frame": ms(total),
            "ms_world_model": ms(wall_world), "ms_decode": ms(wall_decode), "cpu_ms_per_frame": ms(cpu_total),
            "mean_ms_per_frame": round(1000 * statistics.mean(total), 2),
            "min_ms_per_frame": round(1000 * min(total), 2),  # the least disturbed frame on shared cores
            "frames_per_s": round(1.0 / statistics.median(total), 1), "context_restarts": dream.restarts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    world, tokenizer, max_context, sizes = preset_models()
    cells = []
    for variant in args.variants:
        if variant == "fp32_compiled":
            world, tokenizer, max_context, sizes = preset_models()
            compile_blocks(world)
            compile_blocks(tokenizer)
        for steps in args.ks:
            started = time.perf_counter()
            cell = time_cell(world, tokenizer, variant, steps, max_context, args.warmup, args.frames)
            cell["cell_s"] = round(time.perf_counter() - started, 1)
            cells.append(cell)
            print(json.dumps(cell), flush=True)
    k4 = [c for c in cells if c["steps"] == 4]
    best = min(k4, key=lambda c: c["ms_per_frame"]) if k4 else None
    result = {
        "benchmark": "play_speed", "command": " ".join(sys.argv), "machine": machine(), "threads": args.threads,
        "preset": str(PRESET.name), "sizes": sizes, "batch": 1, "cells": cells,
        # Other processes on the same cores inflate wall times (and 2-thread CPU times: waiting threads spin).
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "best_at_k4": best, "meets_10fps_at_k4": None if best is None else best["ms_per_frame"] <= 100.0,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

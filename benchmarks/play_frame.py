"""Milliseconds per dream frame of `dreamerv4 play` at batch 1: the preset world model at K = 1, 2, 4.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/play_frame.py                 # configs/crafter-small.yaml, random weights
    .venv/bin/python benchmarks/play_frame.py --run runs/crafter-small          # a trained run's checkpoints
    ... --frames 64 --steps 1 2 4 --threads 2 --precision bf16

One dream frame is what the page waits for after a key press: the world model's `Rollout.step`
(K shortcut steps over the new frame against the cached context, then one cached pass that appends
the re-noised frame), the tokenizer's decode of the new latent (its own KVCache, reset every
tokenizer-context frames like `data tokenize`), and the PNG the server sends. The context is capped
at the world model's training seq_len as in play: when full, a fresh rollout observes its last half
again, and that restart is inside the frame that triggers it (so the median shows the steady cost,
the max the restart). Without --run the models are the preset's sizes, randomly initialised (speed
does not depend on the weights); the start frame is the real game's first frame (seed 0).

Per K: median / p90 / max wall milliseconds per frame and frames/s, median process CPU milliseconds
(the cores may be shared: CPU time is the comparable number), and the split into world model,
decode and PNG. `checks.interactive_at_k4` is frames/s >= 10 at K = 4 (the page's target).
Writes benchmarks/results/play_frame.json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from tokenizer_step import machine  # noqa: E402  (benchmarks/ helper, not a package)

from dreamerv4.data.crafter_record import make_crafter_env  # noqa: E402
from dreamerv4.data.latents import frames_to_float  # noqa: E402
from dreamerv4.evaluation.video import as_uint8_frames  # noqa: E402
from dreamerv4.models.dynamics import NO_ACTION, DynamicsModel, Rollout  # noqa: E402
from dreamerv4.models.tokenizer import Tokenizer  # noqa: E402
from dreamerv4.models.transformer import KVCache  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "play_frame.json"
PRESET = Path(__file__).parent.parent / "configs" / "crafter-small.yaml"
TARGET_FPS_AT_K4 = 10.0


def preset_models(config: Path) -> tuple[Tokenizer, DynamicsModel, int, int, str]:
    """(tokenizer, world model, tokenizer context, world-model context, source) of the preset config."""
    from dreamerv4.config import load_config
    from dreamerv4.run_config import RunConfig

    run = load_config(RunConfig, config, [])
    torch.manual_seed(0)
    # latent_scale 0 means "measured at training time"; any value costs the same.
    world = dataclasses.replace(run.dynamics.model, latent_scale=run.dynamics.model.latent_scale or 1.0)
    return (Tokenizer(run.tokenizer.model).eval(), DynamicsModel(world).eval(),
            int(run.tokenizer.train.seq_len), int(run.dynamics.train.seq_len), f"{config.name}, random weights")


def run_models(run_dir: Path) -> tuple[Tokenizer, DynamicsModel, int, int, str]:
    from dreamerv4.evaluation.tokenizer import load_tokenizer
    from dreamerv4.training.dynamics import load_dynamics

    dynamics, cfg, identity = load_dynamics(run_dir / "dynamics" / "checkpoint.pt", require_done=False)
    tokenizer, tok_cfg = load_tokenizer(identity.get("checkpoint") or cfg.dynamics.tokenizer_checkpoint)
    context = int(identity.get("context") or tok_cfg.tokenizer.train.seq_len)
    return tokenizer, dynamics, context, int(cfg.dynamics.train.seq_len), f"{run_dir} (trained)"


def png_bytes(frame: np.ndarray) -> int:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return len(buffer.getvalue())


def time_k(tokenizer: Tokenizer, dynamics: DynamicsModel, tokenizer_context: int, max_context: int,
           start: np.ndarray, steps: int, warmup: int, frames: int, autocast) -> dict:
    generator = torch.Generator().manual_seed(0)
    actions = torch.randint(0, dynamics.action_space.num_codes, (warmup + frames,), generator=generator)
    with torch.no_grad(), autocast():
        latents = [tokenizer.encode(frames_to_float(start[None])[None], cache=KVCache())[0, 0].float()]
        prev = [NO_ACTION]

        def restart(keep: int) -> Rollout:
            rollout = Rollout(dynamics, generator=generator)
            rollout.observe(torch.stack(latents[-keep:])[None], torch.tensor([[NO_ACTION] + prev[-keep:][1:]]))
            return rollout

        rollout, in_context = restart(1), 1
        decode_cache, decoded = KVCache(), 1  # the start frame is frame 0 of the first decode chunk
        rows = []
        for i in range(warmup + frames):
            cpu0, t0 = time.process_time(), time.perf_counter()
            restarted = in_context >= max_context
            if restarted:
                keep = max(1, max_context // 2)
                rollout, in_context = restart(keep), keep
            latent = rollout.step(actions[i : i + 1], steps)[0].float()
            in_context += 1
            latents, prev = (latents + [latent])[-max_context:], (prev + [int(actions[i])])[-max_context:]
            t1 = time.perf_counter()
            if decoded % tokenizer_context == 0:
                decode_cache = KVCache()
            frame = as_uint8_frames(tokenizer.decode(latent[None, None], cache=decode_cache))[0, 0]
            decoded += 1
            t2 = time.perf_counter()
            png_bytes(frame)
            t3 = time.perf_counter()
            if i >= warmup:
                rows.append({"wall": t3 - t0, "cpu": time.process_time() - cpu0, "world": t1 - t0,
                             "decode": t2 - t1, "png": t3 - t2, "restart": restarted})
    wall = sorted(r["wall"] for r in rows)
    ms = lambda values: round(1000 * statistics.median(values), 2)  # noqa: E731
    median_wall = statistics.median(wall)
    return {
        "steps": steps, "timed_frames": frames, "warmup_frames": warmup,
        "median_ms": round(1000 * median_wall, 2), "p90_ms": round(1000 * wall[int(0.9 * (len(wall) - 1))], 2),
        "max_ms": round(1000 * wall[-1], 2), "frames_per_s": round(1.0 / median_wall, 2),
        "median_cpu_ms": ms([r["cpu"] for r in rows]),
        "median_world_model_ms": ms([r["world"] for r in rows]), "median_decode_ms": ms([r["decode"] for r in rows]),
        "median_png_ms": ms([r["png"] for r in rows]),
        "restart_frames": sum(r["restart"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=None, help="a run folder with dynamics/ and tokenizer/ checkpoints")
    parser.add_argument("--config", type=Path, default=PRESET, help="preset whose model sizes are timed (without --run)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], help="K shortcut steps per frame")
    parser.add_argument("--frames", type=int, default=48, help="timed frames per K")
    parser.add_argument("--warmup", type=int, default=4, help="untimed frames per K first")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    tokenizer, dynamics, tok_context, max_context, source = (
        run_models(args.run) if args.run is not None else preset_models(args.config))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "bf16" \
        else contextlib.nullcontext
    start = make_crafter_env(0).reset()
    results = []
    for steps in args.steps:
        cell = time_k(tokenizer, dynamics, tok_context, max_context, start, steps, args.warmup, args.frames, autocast)
        results.append(cell)
        print(f"K={steps}: {cell['median_ms']} ms/frame median ({cell['frames_per_s']} frames/s), p90 {cell['p90_ms']}, "
              f"max {cell['max_ms']}; world model {cell['median_world_model_ms']}, decode {cell['median_decode_ms']}, "
              f"png {cell['median_png_ms']} ms", flush=True)
    k4 = next((c for c in results if c["steps"] == 4), None)
    report = {
        "benchmark": "play_frame", "models": source, "batch": 1, "threads": args.threads,
        "precision": args.precision, "tokenizer_context": tok_context, "max_context": max_context,
        "machine": machine(), "results": results,
        "checks": {} if k4 is None else {"interactive_at_k4": k4["frames_per_s"] >= TARGET_FPS_AT_K4,
                                         "target_frames_per_s": TARGET_FPS_AT_K4},
        "command": "python benchmarks/play_frame.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Throughput, FLOP/s, matmul utilization and peak memory of one dynamics (shortcut forcing) training step on CPU.

    taskset -c 0 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dynamics_train.py             # reference size, fp32 + bf16
    ... --precisions bf16 --repeats 3 | --batch 4 --frames 8 | --checkpoint-activations | --compile | --untuned-malloc

One step is what `dreamerv4 train dynamics` does per update: `training/shortcut.py`'s
shortcut_forcing_loss on clean latents (B,T,16,32) and actions (per-frame tau and d; the bootstrap
frames' two teacher passes without gradient; single-frame rows), backward, gradient-norm clipping
at 1.0 and an AdamW update with the loop's parameter groups (`training/schedule.py` make_optimizer),
zero_grad. bf16 = `torch.autocast("cpu", dtype=torch.bfloat16)` around the loss, as the loop does;
malloc tuned as the loop does (`tune_malloc`) unless --untuned-malloc.
Latents and actions are random; tau, d and the noise are drawn from a generator seeded per step,
so every run times the same sequence of steps.

The model is the reference config (see benchmarks/dynamics_generate.py `seed_dynamics_config`: the
dynamics section of configs/minerl.yaml, or the reference numbers, width 256, 6 layers, 8 heads). Each
precision runs in a fresh subprocess (its own peak RSS); the bf16 matmul peak is measured in the
same process before and after the steps (benchmarks/tokenizer_step.py `matmul_peak`), and
utilization = model FLOP/s / that peak. Model FLOPs are counted with FlopCounterMode over one full
step of the same batch (student forward + backward and the two teacher forwards; matmuls only).
Rates per CPU second and per wall second, as in tokenizer_step.py (why: its docstring).
Writes benchmarks/results/dynamics_train.json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dynamics_generate import seed_dynamics_config  # noqa: E402  (benchmarks/ helpers, not a package)
from tokenizer_step import machine, matmul_peak, summarize  # noqa: E402

from dreamerv4.models.dynamics import DynamicsModel  # noqa: E402
from dreamerv4.models.transformer import compile_blocks  # noqa: E402
from dreamerv4.training.config import TrainConfig  # noqa: E402
from dreamerv4.training.runtime import tune_malloc  # noqa: E402
from dreamerv4.training.schedule import make_optimizer  # noqa: E402
from dreamerv4.training.shortcut import shortcut_forcing_loss  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "dynamics_train.json"


def build(checkpoint_activations: bool = False) -> DynamicsModel:
    cfg, _ = seed_dynamics_config()
    cfg.transformer.checkpoint_activations = checkpoint_activations
    torch.manual_seed(0)
    return DynamicsModel(cfg).train()


def make_batch(model: DynamicsModel, batch: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    cfg = model.cfg
    latents = torch.rand(batch, frames, cfg.num_latents, cfg.latent_dim, generator=g) * 2 - 1
    actions = torch.randint(0, model.action_space.num_codes, (batch, frames), generator=g)
    return latents, actions


def make_step(model: DynamicsModel, precision: str, latents: torch.Tensor, actions: torch.Tensor):
    """A closure running one training update like the dynamics training inside loop.train, on the
    device the model and latents are on (benchmarks/gpu.py uses it on CUDA)."""
    cfg = TrainConfig()
    device = latents.device
    optimizer = make_optimizer(model, cfg, device)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    calls = [0]

    def step() -> float:
        calls[0] += 1
        with autocast():
            loss, _ = shortcut_forcing_loss(model, latents, actions,
                                            generator=torch.Generator(device).manual_seed(calls[0]))
        loss = loss.float()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if bool(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def count_flops(args: argparse.Namespace, precision: str) -> float:
    """Matmul FLOPs (forward, backward, teacher passes) of one full step at args.batch x args.frames."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build()
    step = make_step(model, precision, *make_batch(model, args.batch, args.frames))
    with FlopCounterMode(display=False) as counter:
        step()
    return float(sum(counter.get_flop_counts()["Global"].values()))


def worker(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    if not args.untuned_malloc:
        tune_malloc()  # as `train` does (train.tune_malloc)
    model = build(args.checkpoint_activations)
    step = make_step(model, args.worker, *make_batch(model, args.batch, args.frames))
    if args.compile:
        compile_blocks(model)  # what TrainConfig.compile does
    rss_setup_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_before = matmul_peak()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    step()  # warm-up (and compilation with --compile)
    first = {"cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0}
    cpu_s, sys_s, wall_s = [], [], []
    for _ in range(args.repeats):
        usage0, cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
        loss = step()
        cpu_s.append(time.process_time() - cpu0)
        wall_s.append(time.perf_counter() - wall0)
        sys_s.append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - usage0.ru_stime)
    peak_after = matmul_peak()
    return {
        "first_step": first, "cpu_s": cpu_s, "sys_s": sys_s, "wall_s": wall_s, "last_loss": loss,
        "threads": torch.get_num_threads(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_setup_mb": rss_setup_mb,
        "bf16_matmul_peak_before": peak_before, "bf16_matmul_peak_after": peak_after,
        "fp32_matmul_peak": matmul_peak(torch.float32),
    }


def run_worker(precision: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--worker", precision, *sys.argv[1:]], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{precision} worker failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--checkpoint-activations", action="store_true", help="TransformerConfig option")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every transformer block (models/transformer.py compile_blocks, TrainConfig.compile)")
    parser.add_argument("--untuned-malloc", action="store_true",
                        help="glibc's default malloc instead of training/runtime.tune_malloc (what training does)")
    parser.add_argument("--note", default="", help="free text stored in the JSON")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=["fp32", "bf16"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args)))
        return
    cfg, source = seed_dynamics_config()
    run: dict = {
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "out", "note")},
        "model_config_source": source,
        "model": {"embed_dim": cfg.transformer.embed_dim, "depth": cfg.transformer.depth,
                  "num_heads": cfg.transformer.num_heads, "time_every": cfg.transformer.time_every,
                  "num_registers": cfg.transformer.num_registers, "action_space": cfg.action_space,
                  "bootstrap_fraction": cfg.bootstrap_fraction, "single_frame_fraction": cfg.single_frame_fraction,
                  "parameters": sum(p.numel() for p in build().parameters())},
        "machine": machine(), "note": args.note,
        "measurement": f"{args.threads} torch thread(s) on CPU(s) {sorted(os.sched_getaffinity(0))} (step and matmul "
                       "peak alike); rates per CPU second (user + system) and per wall second",
        "load_average_before": os.getloadavg(),
        "flops": {"counter": "torch.utils.flop_counter.FlopCounterMode over one full step (mm, bmm; fwd + bwd + "
                             "the two no-grad teacher passes)"},
        "results": {},
    }
    for precision in args.precisions:
        flops = count_flops(args, precision)
        run["flops"][precision] = flops
        raw = run_worker(precision)
        result = summarize(raw, {"model_fwd_bwd": flops, "lpips": 0.0}, args.batch * args.frames)
        result.pop("utilization_with_lpips_cpu_time")
        run["results"][precision] = result
        print(precision, json.dumps({k: result[k] for k in (
            "frames_per_cpu_s", "frames_per_wall_s", "model_gflop_per_cpu_s", "bf16_matmul_peak_gflop_per_cpu_s",
            "utilization_cpu_time", "peak_rss_gb", "step_cpu_s", "step_wall_s")}), flush=True)
    run["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(run, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

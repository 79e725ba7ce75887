"""Throughput, FLOP/s, matmul utilization and peak memory of one full tokenizer training step on CPU.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/tokenizer_step.py            # reference size, fp32 + bf16
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/tokenizer_step.py --precisions bf16 --repeats 4
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/tokenizer_step.py --batch 2 --profile   # where time goes
    ... --checkpoint-activations | --untuned-malloc | --compile | --threads 2   # variants, see --help

One step is what `dreamerv4 train tokenizer` does per update (training/tokenizer.py + training/loop.py):
forward at the configured mask rate (reference: 0.75), loss = RunningRMS-normalized MSE + 0.2 x
RunningRMS-normalized LPIPS (AlexNet, on the whole reconstructed frames), backward, gradient-norm
clipping at 1.0, AdamW update (the loop's parameter groups), zero_grad. bf16 means
`torch.autocast("cpu", dtype=torch.bfloat16)` around forward and loss, exactly as the loop does.
Frames are random (timing does not depend on content).

Each precision runs in a fresh subprocess, so its peak resident memory (`ru_maxrss`, the whole
process: Python, torch, model, AdamW state, LPIPS, activations) is its own. The same subprocess,
with the same thread count and CPU affinity, measures the bf16 matmul peak (square matmuls of
512..2048, best of several) right before and after the timed steps, and the fp32 one after;
utilization = model FLOP/s / bf16 peak. Pin the whole run to one core (`taskset -c 1`) with one
thread for a fair ratio. Rates are given per second of process CPU time (user + system) *and*
per second of wall-clock time: on this shared 2-core machine other processes time-share the core
(a 1024^3 bf16 matmul measured 220, 100 or 67 GFLOP/s of wall time depending on how many
processes shared it, but a steady ~210 per CPU second), so CPU-time rates are the comparable
ones and wall-clock rates say what a training run would have seen at that moment. System time
(`step_sys_s`) is mostly page faults: by default glibc unmaps freed blocks over its mmap threshold
and the next step faults them back in. The worker tunes malloc as training does (training/runtime.py
`tune_malloc`: blocks up to 32 MB stay in the heap); `--untuned-malloc` measures glibc's default,
`--thp` adds huge pages for the larger blocks.

Model FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` (matmuls, batched matmuls,
convolutions; forward and backward) on a one-sequence step of the same config, scaled by the
batch (every count is linear in it), and cross-checked against the analytic count of the
transformer's matmuls (`analytic_model_flops`). Without activation checkpointing (the count
never includes recomputation: model FLOPs, not hardware FLOPs). LPIPS FLOPs are reported apart.
Writes benchmarks/results/tokenizer_step.json (or --out). To measure an older model version,
put a copy of its `dreamerv4` package first on PYTHONPATH (how the "baseline" results were made).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from dreamerv4.models.tokenizer import Tokenizer, TokenizerConfig, patchify, unpatchify
from dreamerv4.models.transformer import TransformerConfig, compile_blocks
from dreamerv4.training.config import TrainConfig
from dreamerv4.training.loss_norm import RunningRMS
from dreamerv4.training.runtime import tune_malloc
from dreamerv4.training.schedule import make_optimizer

RESULTS = Path(__file__).parent / "results" / "tokenizer_step.json"
PEAK_SIZES = (512, 1024, 2048)
LPIPS_WEIGHT = 0.2  # TokenizerStage.lpips_weight default (the paper's 0.2)


# ---------------------------------------------------------------------------------------------
# The step


def build(args: argparse.Namespace) -> tuple[Tokenizer, torch.nn.Module | None]:
    stack = TransformerConfig(
        embed_dim=args.width, depth=args.depth, num_heads=args.heads, num_kv_heads=args.kv_heads,
        time_every=args.time_every, num_registers=args.registers,
        checkpoint_activations=args.checkpoint_activations,
    )
    torch.manual_seed(0)
    model = Tokenizer(TokenizerConfig(encoder=stack, decoder=stack, mask_rate=args.mask_rate)).train()
    lpips = None
    if not args.no_lpips:
        from dreamerv4.models.lpips import LPIPS

        lpips = LPIPS("alexnet").eval().requires_grad_(False)
    return model, lpips


def make_step(model: Tokenizer, lpips: torch.nn.Module | None, precision: str, frames: torch.Tensor):
    """A closure running one training update like training/tokenizer.py's loss_fn inside loop.train,
    on the device the model and frames are on (benchmarks/gpu.py uses it on CUDA)."""
    cfg = TrainConfig()
    device = frames.device
    optimizer = make_optimizer(model, cfg, device)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norms = {"mse": RunningRMS().to(device), "lpips": RunningRMS().to(device)}
    patch = model.cfg.patch_size
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def step() -> float:
        with autocast():
            out = model(frames)
            mse = (out["reconstructed"].float() - patchify(frames, patch)).square().mean()
            loss = norms["mse"](mse)
            if lpips is not None:
                recon = unpatchify(out["reconstructed"], patch).flatten(0, 1)
                perceptual = lpips(recon, frames.flatten(0, 1)).mean().float()
                loss = loss + LPIPS_WEIGHT * norms["lpips"](perceptual)
        loss = loss.float()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if bool(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


# ---------------------------------------------------------------------------------------------
# FLOPs and the matmul peak


def analytic_model_flops(args: argparse.Namespace) -> dict[str, float]:
    """Forward matmul FLOPs of the tokenizer (2 per multiply-add), per training step; backward = 2x forward."""
    width, depth, heads, kv_heads = args.width, args.depth, args.heads, args.kv_heads
    head_dim = width // heads
    ffn = -(-int(width * 4 * 2 / 3) // 64) * 64
    patches, patch_dim, latents, latent_dim = 64, 192, 16, 32
    tokens_per_frame = patches + latents + args.registers  # same in encoder and decoder
    frames = args.batch * args.frames
    tokens = frames * tokens_per_frame
    linear = 2 * width * (width + 2 * kv_heads * head_dim + width + 3 * ffn)  # qkv, out, gate_up, down
    time_layers = sum(1 for i in range(depth) if (i + 1) % args.time_every == 0)
    space_layers = depth - time_layers
    # QK^T and AV: 2 matmuls x 2 FLOPs x keys x width per token (full rectangles, causal included).
    attention = 4 * width * (space_layers * tokens_per_frame + time_layers * args.frames)
    stacks = 2 * tokens * (depth * linear + attention)
    io = frames * 2 * (patches * patch_dim * width + latents * width * latent_dim      # patch embed, to_latent
                       + latents * latent_dim * width + patches * width * patch_dim)  # from_latent, to_patch
    forward = stacks + io
    return {"forward": forward, "forward_backward": 3 * forward}


def count_flops(args: argparse.Namespace, precision: str) -> dict[str, float]:
    """FlopCounterMode over one full step of a single sequence, scaled to args.batch."""
    from torch.utils.flop_counter import FlopCounterMode

    one = argparse.Namespace(**{**vars(args), "batch": 1, "checkpoint_activations": False})
    model, lpips = build(one)
    frames = torch.rand(1, args.frames, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    step = make_step(model, lpips, precision, frames)
    with FlopCounterMode(display=False) as counter:
        step()
    by_module = counter.get_flop_counts()
    total = sum(by_module["Global"].values())
    lpips_flops = sum(by_module.get("LPIPS", {}).values())
    return {"model_fwd_bwd": args.batch * (total - lpips_flops), "lpips": args.batch * lpips_flops,
            "ops": {str(op): args.batch * n for op, n in by_module["Global"].items()}}


def matmul_peak(dtype: torch.dtype = torch.bfloat16, seconds_per_size: float = 0.5) -> dict[str, float]:
    """Best FLOP/s of square matmuls, per CPU second and per wall second (the best single call)."""
    best_cpu, best_wall = 0.0, 0.0
    for n in PEAK_SIZES:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        spent = 0.0
        while spent < seconds_per_size:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            a @ b
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            spent += cpu
            if cpu > 0.01:  # process_time ticks are coarse; skip calls too short to time
                best_cpu = max(best_cpu, 2 * n**3 / cpu)
            best_wall = max(best_wall, 2 * n**3 / wall)
    return {"per_cpu_s": best_cpu, "per_wall_s": best_wall}


# ---------------------------------------------------------------------------------------------
# One precision, in its own process


def worker(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    if not args.untuned_malloc:
        tune_malloc()  # as `train` does (train.tune_malloc)
    precision = args.worker
    model, lpips = build(args)
    frames = torch.rand(args.batch, args.frames, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    step = make_step(model, lpips, precision, frames)
    if args.compile:
        compile_blocks(model)  # what TrainConfig.compile does
    rss_setup_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_before = matmul_peak()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    step()  # warm-up: allocator, kernel selection (and compilation with --compile)
    first = {"cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0}
    cpu_s, sys_s, wall_s = [], [], []
    for _ in range(args.repeats):
        usage0, cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
        loss = step()
        cpu_s.append(time.process_time() - cpu0)
        wall_s.append(time.perf_counter() - wall0)
        sys_s.append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - usage0.ru_stime)  # page faults, mostly
    peak_after = matmul_peak()
    return {
        "first_step": first, "cpu_s": cpu_s, "sys_s": sys_s, "wall_s": wall_s, "last_loss": loss,
        "threads": torch.get_num_threads(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_setup_mb": rss_setup_mb,
        "bf16_matmul_peak_before": peak_before, "bf16_matmul_peak_after": peak_after,
        "fp32_matmul_peak": matmul_peak(torch.float32),
    }


# PyTorch's CPU allocator: 2 MB-aligned blocks with transparent huge pages (madvise), so a block
# over glibc's 32 MB limit costs one fault per 2 MB instead of one per 4 KB page.
THP_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def run_worker(args: argparse.Namespace, precision: str) -> dict:
    argv = [sys.executable, __file__, "--worker", precision, *sys.argv[1:]]
    env = {**os.environ, **(THP_ENV if args.thp else {})}
    result = subprocess.run(argv, capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"{precision} worker failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def summarize(raw: dict, flops: dict, frames_per_step: int) -> dict:
    best_cpu, best_wall = min(raw["cpu_s"]), min(raw["wall_s"])
    median_cpu = sorted(raw["cpu_s"])[len(raw["cpu_s"]) // 2]
    peak_cpu = max(raw["bf16_matmul_peak_before"]["per_cpu_s"], raw["bf16_matmul_peak_after"]["per_cpu_s"])
    peak_wall = max(raw["bf16_matmul_peak_before"]["per_wall_s"], raw["bf16_matmul_peak_after"]["per_wall_s"])
    model_flops, all_flops = flops["model_fwd_bwd"], flops["model_fwd_bwd"] + flops["lpips"]
    return {
        "frames_per_cpu_s": frames_per_step / best_cpu,
        "frames_per_cpu_s_median": frames_per_step / median_cpu,
        "frames_per_wall_s": frames_per_step / best_wall,
        "step_cpu_s": raw["cpu_s"], "step_sys_s": raw["sys_s"], "step_wall_s": raw["wall_s"],
        "first_step": raw["first_step"],
        "model_gflop_per_cpu_s": model_flops / best_cpu / 1e9,
        "model_gflop_per_wall_s": model_flops / best_wall / 1e9,
        "bf16_matmul_peak_gflop_per_cpu_s": peak_cpu / 1e9,
        "bf16_matmul_peak_gflop_per_wall_s": peak_wall / 1e9,
        "fp32_matmul_peak_gflop_per_cpu_s": raw["fp32_matmul_peak"]["per_cpu_s"] / 1e9,
        "utilization_cpu_time": model_flops / best_cpu / peak_cpu,
        "utilization_with_lpips_cpu_time": all_flops / best_cpu / peak_cpu,
        "utilization_wall_time": model_flops / best_wall / peak_wall,
        "peak_rss_gb": raw["peak_rss_mb"] / 1024, "rss_after_setup_gb": raw["rss_after_setup_mb"] / 1024,
        "threads": raw["threads"], "last_loss": raw["last_loss"],
        "matmul_peak_probes": {k: raw[k] for k in ("bf16_matmul_peak_before", "bf16_matmul_peak_after")},
    }


# ---------------------------------------------------------------------------------------------
# Profile: where the time of a (smaller) step goes


CATEGORIES = {  # first matching substring of the op name wins
    "matmul (mm/bmm/addmm)": ("aten::mm", "aten::bmm", "aten::addmm"),
    "lpips convolutions": ("convolution", "max_pool"),
    "softmax + soft cap": ("softmax", "tanh", "sigmoid"),
    "dtype casts and copies": ("aten::copy_", "aten::_to_copy", "aten::cat", "aten::clone"),
    "optimizer": ("lerp", "addcdiv", "_foreach", "sqrt"),
    "swiglu": ("silu",),
    "other elementwise": ("aten::mul", "aten::add", "aten::div", "aten::sub", "aten::pow", "aten::neg",
                          "aten::rsqrt", "aten::mean", "aten::sum", "aten::where", "aten::clamp", "rms_norm",
                          "vector_norm", "aten::mv", "aten::masked_fill", "aten::square", "aten::fill_",
                          "aten::zero_"),
}


def profile(args: argparse.Namespace) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(args.threads)
    out = {}
    for precision in args.precisions:
        model, lpips = build(args)
        frames = torch.rand(args.batch, args.frames, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        step = make_step(model, lpips, precision, frames)
        step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        totals: dict[str, float] = {}
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        for event in ops:
            category = next((c for c, keys in CATEGORIES.items() if any(k in event.key for k in keys)), "rest")
            totals[category] = totals.get(category, 0.0) + event.self_cpu_time_total / 1e6
        everything = sum(totals.values())
        out[precision] = {
            "self_cpu_s": everything,
            "share": {c: round(s / everything, 3) for c, s in sorted(totals.items(), key=lambda kv: -kv[1])},
            "top_ops_s": {e.key: round(e.self_cpu_time_total / 1e6, 4) for e in ops[:20]},
        }
        print(precision, json.dumps(out[precision], indent=1), flush=True)
    return out


# ---------------------------------------------------------------------------------------------


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model_name = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line), "")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return {
        "cpu": model_name or platform.processor(), "logical_cpus": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)), "bf16_flags": [f for f in flags if "bf16" in f or "amx" in f],
        "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--time-every", type=int, default=4)
    parser.add_argument("--registers", type=int, default=4)
    parser.add_argument("--mask-rate", type=float, default=0.75)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--checkpoint-activations", action="store_true", help="TransformerConfig option")
    parser.add_argument("--compile", action="store_true", help="torch.compile every transformer block (models/transformer.py compile_blocks, TrainConfig.compile)")
    parser.add_argument("--no-lpips", action="store_true", help="MSE only (the training's lpips_weight=0)")
    parser.add_argument("--untuned-malloc", action="store_true",
                        help="glibc's default malloc instead of training/runtime.tune_malloc (what training does, train.tune_malloc)")
    parser.add_argument("--thp", action="store_true", help=f"run the steps with {THP_ENV}")
    parser.add_argument("--profile", action="store_true", help="op-time breakdown of one step instead")
    parser.add_argument("--note", default="", help="free text stored in the JSON")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=["fp32", "bf16"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args)))
        return
    config = {k: v for k, v in vars(args).items() if k not in ("worker", "out", "note", "profile")}
    run: dict = {
        "config": config, "machine": machine(), "note": args.note,
        "measurement": f"{args.threads} torch thread(s) on CPU(s) {sorted(os.sched_getaffinity(0))} (step and matmul "
                       "peak alike); rates per CPU second (user + system) and per wall second",
        "load_average_before": os.getloadavg(),
    }
    if args.profile:
        run["profile"] = profile(args)
    else:
        frames_per_step = args.batch * args.frames
        run["flops"] = {"counter": "torch.utils.flop_counter.FlopCounterMode (mm, bmm, conv; fwd + bwd)",
                        "analytic_model": analytic_model_flops(args)}
        run["results"] = {}
        for precision in args.precisions:
            flops = count_flops(args, precision)
            run["flops"][precision] = flops
            raw = run_worker(args, precision)
            run["results"][precision] = summarize(raw, flops, frames_per_step)
            shown = {k: run["results"][precision][k] for k in (
                "frames_per_cpu_s", "frames_per_wall_s", "model_gflop_per_cpu_s", "bf16_matmul_peak_gflop_per_cpu_s",
                "utilization_cpu_time", "peak_rss_gb", "step_cpu_s", "step_wall_s")}
            print(precision, json.dumps(shown), flush=True)
    run["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(run, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

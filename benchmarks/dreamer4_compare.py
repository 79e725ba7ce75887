"""Issue 3 and 4's 10x checks: our training step against the `dreamer4` package's (PyPI, lucidrains) at the same sizes.

    taskset -c 0 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dreamer4_compare.py --d4-python /work/exp/d4venv/bin/python
    ... --models dynamics --batch 8 --frames 8      # smaller, for both implementations alike
    ... --compile --warmup 2 --steps 2 --threads 2  # ours compiled (train.compile: true), both on 2 threads

`dreamer4` is not a dependency of this project: install it into a separate environment
(python3 -m venv D && D/bin/pip install torch==2.13.0 && D/bin/pip install 'dreamer4==0.20.*') and
pass that interpreter. When it cannot import dreamer4, only our numbers are written and the JSON
says why. Each (implementation, model, precision) runs in its own subprocess under the same
thread count and CPU affinity (inherited: pin the whole run with taskset) and an address-space
limit (--memory-limit-gb; a worker that hits it is reported as out of memory instead of pushing
the machine into swap or the OOM killer).

Both sides get the same sizes: width 256, 6 layers, 8 heads of 32, a time layer every 4th layer,
8x8 patches of 64x64 frames, 16 latents x 32 (our reference config, configs/minerl.yaml), and the same
optimizer step: loss, backward, gradient-norm clipping at 1.0, torch AdamW (lr 3e-4), zero_grad,
with bf16 = torch.autocast("cpu", bfloat16) around the loss. Per model:
- tokenizer. Ours: `benchmarks/tokenizer_step.py` make_step (masked autoencoding at rate 0.75,
  RMS-normalized MSE + 0.2 LPIPS on AlexNet over every frame). Theirs: VideoTokenizer(dim 256,
  encoder/decoder depth 6, attn_heads 8, attn_dim_head 32, patch 8, 16 latents x 32; it has no
  register tokens; its defaults otherwise) with its own loss (masking U(0, 0.9), MSE + 0.2 LPIPS on VGG16 over
  one sampled frame per video); the VGG16 has random weights (torchvision's pretrained ones would
  be downloaded at run time, which this project never does; the compute is the same).
- dynamics. Ours: `benchmarks/dynamics_train.py` make_step (shortcut forcing, training/shortcut.py).
  Theirs: DynamicsWorldModel(dim 256, depth 6, attn_heads 8, attn_dim_head 32, 16 latents x 32 as
  16 spatial tokens, 4 registers, K_max 64, 17 discrete actions) trained on latents with its
  forward loss (shortcut/flow loss plus its agent and action heads, as its training does).
Ours tunes glibc malloc as its training does (training/runtime.py `tune_malloc`, train.tune_malloc);
--untuned-malloc measures ours without it, --tune-theirs-malloc gives the dreamer4 process the
same settings. Frames/s = B x T per step, over process CPU seconds (and wall seconds); `warmup`
untimed steps first. Writes benchmarks/results/dreamer4_compare.json (or --out).
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

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "dreamer4_compare.json"
WIDTH, DEPTH, HEADS, HEAD_DIM, TIME_EVERY, PATCH, IMAGE, LATENTS, LATENT_DIM, REGISTERS = 256, 6, 8, 32, 4, 8, 64, 16, 32, 4
LR, GRAD_CLIP, NUM_ACTIONS = 3e-4, 1.0, 17


# ---------------------------------------------------------------------------------------------
# Steps (each builds its model; imports stay inside so the dreamer4 side never imports dreamerv4)


def ours_tokenizer_step(precision: str, batch: int, frames: int, compile: bool = False):
    sys.path.insert(0, str(HERE))
    from tokenizer_step import build, make_step

    from dreamerv4.models.transformer import compile_blocks

    args = argparse.Namespace(width=WIDTH, depth=DEPTH, heads=HEADS, kv_heads=HEADS, time_every=TIME_EVERY,
                              registers=REGISTERS, checkpoint_activations=False, mask_rate=0.75, no_lpips=False)
    model, lpips = build(args)
    if compile:
        compile_blocks(model)  # what TrainConfig.compile does
    video = torch.rand(batch, frames, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    return model, make_step(model, lpips, precision, video)


def ours_dynamics_step(precision: str, batch: int, frames: int, compile: bool = False):
    sys.path.insert(0, str(HERE))
    from dynamics_train import build, make_batch, make_step

    from dreamerv4.models.transformer import compile_blocks

    model = build()
    if compile:
        compile_blocks(model)  # what TrainConfig.compile does
    return model, make_step(model, precision, *make_batch(model, batch, frames))


def _theirs_step(model: torch.nn.Module, precision: str, loss_fn):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def step() -> float:
        with autocast():
            loss = loss_fn()
        loss = loss.float()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def theirs_tokenizer_step(precision: str, batch: int, frames: int):
    import torchvision
    from dreamer4 import VideoTokenizer

    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)  # LPIPSLoss's network, without downloading weights
    vgg.classifier = torch.nn.Sequential(*vgg.classifier[:-2])
    model = VideoTokenizer(
        dim=WIDTH, dim_latent=LATENT_DIM, patch_size=PATCH, image_size=IMAGE, num_latent_tokens=LATENTS,
        encoder_depth=DEPTH, decoder_depth=DEPTH, attn_heads=HEADS, attn_dim_head=HEAD_DIM,
        time_block_every=TIME_EVERY, lpips_loss_network=vgg,
    ).train()
    video = torch.rand(batch, 3, frames, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    return model, _theirs_step(model, precision, lambda: model(video))


def theirs_dynamics_step(precision: str, batch: int, frames: int):
    from dreamer4 import DynamicsWorldModel

    torch.manual_seed(0)
    model = DynamicsWorldModel(
        dim=WIDTH, dim_latent=LATENT_DIM, num_latent_tokens=LATENTS, num_spatial_tokens=LATENTS,
        depth=DEPTH, attn_heads=HEADS, attn_dim_head=HEAD_DIM, time_block_every=TIME_EVERY,
        num_register_tokens=REGISTERS, max_steps=64, num_discrete_actions=NUM_ACTIONS,
    ).train()
    g = torch.Generator().manual_seed(1)
    latents = torch.rand(batch, frames, LATENTS, LATENT_DIM, generator=g) * 2 - 1
    actions = torch.randint(0, NUM_ACTIONS, (batch, frames, 1), generator=g)
    return model, _theirs_step(model, precision, lambda: model(latents=latents, discrete_actions=actions))


STEPS = {("ours", "tokenizer"): ours_tokenizer_step, ("ours", "dynamics"): ours_dynamics_step,
         ("theirs", "tokenizer"): theirs_tokenizer_step, ("theirs", "dynamics"): theirs_dynamics_step}


def worker(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    side, model_name = args.worker.split("/")
    out: dict = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if side == "theirs":
        from importlib.metadata import version

        out["dreamer4"] = version("dreamer4")
    if side == "ours" and not args.untuned_malloc:
        from dreamerv4.training.runtime import tune_malloc

        out["malloc_tuned"] = tune_malloc()  # as `train` does (train.tune_malloc)
    try:
        extra = {"compile": args.compile} if side == "ours" else {}
        model, step = STEPS[(side, model_name)](args.worker_precision, args.batch, args.frames, **extra)
        out["parameters"] = sum(p.numel() for p in model.parameters())
        cpu_s, wall_s = [], []
        for i in range(args.warmup + args.steps):
            cpu0, wall0 = time.process_time(), time.perf_counter()
            out["last_loss"] = step()
            if i >= args.warmup:
                cpu_s.append(time.process_time() - cpu0)
                wall_s.append(time.perf_counter() - wall0)
            else:
                out.setdefault("warmup_cpu_s", []).append(time.process_time() - cpu0)
        out.update(step_cpu_s=cpu_s, step_wall_s=wall_s)
    except (MemoryError, RuntimeError) as error:
        if not isinstance(error, MemoryError) and "alloc" not in str(error).lower():
            raise
        out["out_of_memory"] = f"{type(error).__name__}: {str(error)[:300]}"
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return out


def run_worker(python: str, side: str, model: str, precision: str, args: argparse.Namespace) -> dict:
    limit = int(args.memory_limit_gb * 1024**3)

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    argv = [python, __file__, "--worker", f"{side}/{model}", "--worker-precision", precision, *sys.argv[1:]]
    env = dict(os.environ)
    if side == "theirs" and args.tune_theirs_malloc:
        # training/runtime.tune_malloc's settings through glibc's environment (that side never imports dreamerv4)
        from dreamerv4.training.runtime import MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD

        env.update(MALLOC_MMAP_THRESHOLD_=str(MALLOC_MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_=str(MALLOC_TRIM_THRESHOLD))
    result = subprocess.run(argv, capture_output=True, text=True, preexec_fn=limit_memory, env=env)
    if result.returncode:
        tail = result.stderr.strip().splitlines()[-5:]
        if result.returncode < 0 or any("alloc" in line.lower() or "MemoryError" in line for line in tail):
            return {"out_of_memory": f"exit {result.returncode}: {' | '.join(tail)[:500]}"}
        raise SystemExit(f"{side}/{model}/{precision} worker failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def summarize(raw: dict, frames_per_step: int) -> dict:
    if "step_cpu_s" not in raw:
        return raw
    best_cpu, best_wall = min(raw["step_cpu_s"]), min(raw["step_wall_s"])
    return {"frames_per_cpu_s": frames_per_step / best_cpu, "frames_per_wall_s": frames_per_step / best_wall, **raw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d4-python", default="/work/exp/d4venv/bin/python", help="interpreter with dreamer4 installed")
    parser.add_argument("--models", nargs="+", default=["dynamics", "tokenizer"], choices=["tokenizer", "dynamics"])
    parser.add_argument("--precisions", nargs="+", default=["bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per worker")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true",
                        help="ours with torch.compile per transformer block (train.compile: true); give --warmup >= 1")
    parser.add_argument("--untuned-malloc", action="store_true",
                        help="ours with glibc's default malloc (training tunes it: train.tune_malloc)")
    parser.add_argument("--tune-theirs-malloc", action="store_true",
                        help="give the dreamer4 process the same glibc malloc settings (environment)")
    parser.add_argument("--memory-limit-gb", type=float, default=14.0, help="address-space limit per worker")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-precision", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args)))
        return
    probe = subprocess.run([args.d4_python, "-c", "import dreamer4, importlib.metadata as m; print(m.version('dreamer4'))"],
                           capture_output=True, text=True) if Path(args.d4_python).exists() else None
    theirs_ok = probe is not None and probe.returncode == 0
    sys.path.insert(0, str(HERE))
    from tokenizer_step import machine

    run: dict = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                   if k not in ("worker", "worker_precision", "out", "note")},
        "sizes": {"width": WIDTH, "depth": DEPTH, "heads": HEADS, "head_dim": HEAD_DIM, "time_every": TIME_EVERY,
                  "patch": PATCH, "image": IMAGE, "latents": LATENTS, "latent_dim": LATENT_DIM, "registers": REGISTERS},
        "machine": machine(), "note": args.note,
        "dreamer4": probe.stdout.strip() if theirs_ok else
        f"not importable with {args.d4_python}: {(probe.stderr.strip().splitlines() or [''])[-1] if probe else 'no such file'}",
        "measurement": f"{args.threads} torch thread(s) on CPU(s) {sorted(os.sched_getaffinity(0))} for both; "
                       "frames/s = B x T / best timed step, per CPU second and per wall second",
        "load_average_before": os.getloadavg(),
        "results": {},
    }
    frames_per_step = args.batch * args.frames
    for model in args.models:
        for precision in args.precisions:
            key = f"{model}/{precision}"
            row = {"ours": summarize(run_worker(sys.executable, "ours", model, precision, args), frames_per_step)}
            if theirs_ok:
                row["dreamer4"] = summarize(run_worker(args.d4_python, "theirs", model, precision, args), frames_per_step)
                ours_rate, theirs_rate = (row[s].get("frames_per_cpu_s") for s in ("ours", "dreamer4"))
                if ours_rate and theirs_rate:
                    row["speedup_cpu_time"] = ours_rate / theirs_rate
                    row["speedup_wall_time"] = row["ours"]["frames_per_wall_s"] / row["dreamer4"]["frames_per_wall_s"]
                    row["at_least_10x"] = row["speedup_cpu_time"] >= 10
            run["results"][key] = row
            print(key, json.dumps({side: {k: row[side].get(k) for k in ("frames_per_cpu_s", "frames_per_wall_s",
                                                                        "peak_rss_gb", "out_of_memory")}
                                   for side in ("ours", "dreamer4") if side in row}),
                  "speedup", row.get("speedup_cpu_time"), flush=True)
    run["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(run, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

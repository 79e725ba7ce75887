"""Generation speed of the dynamics model: imagined frames/s at K shortcut steps, with and without the KVCache.

    taskset -c 0 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dynamics_generate.py    # 11 min wall here, core shared
    ... --precisions bf16 --batches 64 --contexts 16 256 --no-uncached     # one corner, quicker
    ... --kernels-only                                                      # attention kernels at cached shapes
    ... --kv-heads 2                                                         # grouped-query variant (paper), 2 key/value heads

What is timed is what imagination does per frame (models/dynamics.py `Rollout.step`): `imagine`
(K = 4 shortcut steps, each one transformer pass over the new frame after the context) followed by
`observe` (the finished frame re-noised into the context: with the cache one more one-frame pass
that appends its keys/values, without it a concatenation). With the cache every pass reads the
cached context; without it every pass re-runs the whole context. The model is the reference config
(configs/minerl.yaml sizes: width 256, 6 layers, 8 heads, 4 registers, a time layer every 4th
layer, 16 latents x 32, MineRL actions), randomly initialised (speed does not depend on weights).

Per cell (precision x batch x context length x cache): a fresh Rollout observes `context` random
latent frames (timed apart as `context_s`), generates `--warmup` frames untimed, then `--frames`
timed frames; the context grows by one frame per generated frame (256 -> 256 + warmup + frames).
`per_frame_cpu_s` is the median over timed frames of process CPU seconds (the core may be
time-shared: CPU time is the comparable measure, see benchmarks/tokenizer_step.py), wall seconds
alongside; `frames_per_cpu_s` = batch / per_frame_cpu_s counts every imagined frame of the batch.
Uncached cells grow linearly with the context and get expensive (B=64 at context 256 re-runs
16k frames per pass): a cell whose estimated time, extrapolated from the previous context of the
same batch and precision, exceeds --max-cell-s is timed on a single frame without warm-up, or
skipped with its estimate when even that would exceed it.

The check of issue 4: with the cache, per-frame time at context 256 within 1.5x of context 16;
without it, it grows (`checks` in the JSON). `attention_kernels` times the attention candidates
at the cached time-layer shape (one query frame over the context, no gradient).
Writes benchmarks/results/dynamics_generate.json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tokenizer_step import machine  # noqa: E402  (benchmarks/ helper, not a package)

from dreamerv4.models import transformer as transformer_module  # noqa: E402
from dreamerv4.models.dynamics import DynamicsConfig, DynamicsModel, Rollout, previous_actions  # noqa: E402
from dreamerv4.models.transformer import TransformerConfig  # noqa: E402
from dreamerv4.training.runtime import cpu_supports_bf16  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "dynamics_generate.json"
OBSERVE_CHUNK = 32  # context frames per observe call
SEED_CONFIG = Path(__file__).parent.parent / "configs" / "minerl.yaml"


def seed_dynamics_config() -> tuple[DynamicsConfig, str]:
    """The dynamics section of configs/minerl.yaml when it has one, else the reference numbers
    (the tokenizer's stack sizes) with the yaml's action space."""
    import yaml

    from dreamerv4.config import load_config
    from dreamerv4.run_config import RunConfig

    run = load_config(RunConfig, SEED_CONFIG, [])
    if "dynamics" in (yaml.safe_load(SEED_CONFIG.read_text()) or {}):
        return run.dynamics.model, f"{SEED_CONFIG.name}: dynamics.model"
    stack = TransformerConfig(embed_dim=256, depth=6, num_heads=8, num_kv_heads=8, time_every=4, num_registers=4)
    return DynamicsConfig(transformer=stack, action_space=run.data.action_space), (
        f"seed numbers (no dynamics section in {SEED_CONFIG.name}); action space from its data section"
    )


def autocast_for(precision: str):
    if precision == "bf16":
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _timed(fn) -> tuple[float, float]:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu0, time.perf_counter() - wall0


def run_cell(model: DynamicsModel, precision: str, batch: int, context: int, use_cache: bool, steps: int,
             warmup: int, frames: int) -> dict:
    g = torch.Generator().manual_seed(0)
    cfg = model.cfg
    latents = torch.rand(batch, context, cfg.num_latents, cfg.latent_dim, generator=g) * 2 - 1
    codes = torch.randint(0, model.action_space.num_codes, (batch, context + warmup + frames), generator=g)
    prev = previous_actions(codes)
    rollout = Rollout(model, use_cache=use_cache, generator=torch.Generator().manual_seed(1))
    autocast = autocast_for(precision)
    with torch.no_grad(), autocast():
        # In chunks, which bounds the memory of the context pass (same result as one call).
        context_cpu, context_wall = _timed(lambda: [
            rollout.observe(latents[:, i : i + OBSERVE_CHUNK], prev[:, i : min(i + OBSERVE_CHUNK, context)])
            for i in range(0, context, OBSERVE_CHUNK)
        ])
        cpu_s, wall_s = [], []
        for i in range(warmup + frames):
            c, w = _timed(lambda: rollout.step(prev[:, context + i], steps))
            if i >= warmup:
                cpu_s.append(c)
                wall_s.append(w)
    per_frame_cpu, per_frame_wall = statistics.median(cpu_s), statistics.median(wall_s)
    return {
        "per_frame_cpu_s": per_frame_cpu, "per_frame_wall_s": per_frame_wall,
        "frames_per_cpu_s": batch / per_frame_cpu, "frames_per_wall_s": batch / per_frame_wall,
        "best_frame_cpu_s": min(cpu_s), "frame_cpu_s": cpu_s, "frame_wall_s": wall_s, "context_s": {"cpu": context_cpu, "wall": context_wall},
        "warmup_frames": warmup, "timed_frames": frames,
    }


# ---------------------------------------------------------------------------------------------
# Attention kernels at the cached shape: one query frame over `context` cached frames.


def attention_kernels(cfg: DynamicsConfig, batch: int, contexts: list[int], precisions: list[str],
                      repeats: int) -> dict:
    """CPU seconds per call (best of `repeats`) of ways to attend, without gradient, from one new
    frame's queries q (N,H,1,Dh) over L = context + 1 frames of keys/values, N = batch x (latents +
    2 + registers) token streams, soft cap as configured:
    - padded_buffer_masked: what the KVCache does now: `attention` over its whole zero-filled
      buffer (capacity L + max(16, L // 4)) with the unused space masked out;
    - strided_prefix_view: `attention` over a view of the first L frames of a larger buffer;
    - concatenate_then_attend: torch.cat of the cached frames and the new one, then `attention`
      (the cache before this benchmark);
    - explicit_ops: softmax(cap tanh(qk / cap)) v in plain PyTorch ops on contiguous k, v;
    - sdpa_without_soft_cap: PyTorch's fused SDPA on contiguous k, v; it cannot soft-cap, so it
      computes something else: a lower bound for reference only."""
    import torch.nn.functional as F

    from dreamerv4.models.transformer import _allowed

    t = cfg.transformer
    streams = batch * (cfg.num_latents + 2 + t.num_registers)
    heads, dh, cap = t.num_heads, t.head_dim, t.soft_cap
    out = {}
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        for context in contexts:
            g = torch.Generator().manual_seed(0)
            length = context + 1
            capacity = length + max(16, length // 4)
            q = torch.randn(streams, heads, 1, dh, generator=g).to(dtype)
            buf_k = torch.zeros(streams, t.num_kv_heads, capacity, dh, dtype=dtype)
            buf_v = torch.zeros(streams, t.num_kv_heads, capacity, dh, dtype=dtype)
            buf_k[:, :, :length] = torch.randn(streams, t.num_kv_heads, length, dh, generator=g).to(dtype)
            buf_v[:, :, :length] = torch.randn(streams, t.num_kv_heads, length, dh, generator=g).to(dtype)
            k, v = buf_k[:, :, :length], buf_v[:, :, :length]
            k_past, v_past = k[:, :, :-1].contiguous(), v[:, :, :-1].contiguous()
            k_new, v_new = k[:, :, -1:].contiguous(), v[:, :, -1:].contiguous()
            kc, vc = k.contiguous(), v.contiguous()
            q_grouped = q.reshape(streams, t.num_kv_heads, heads // t.num_kv_heads, dh)
            mask = F.pad(_allowed(1, length, True, None, q.device), (0, capacity - length), value=False)
            scale = 1.0 / math.sqrt(dh)
            candidates = {
                "padded_buffer_masked": lambda: transformer_module.attention(
                    q, buf_k, buf_v, causal=False, mask=mask, soft_cap=cap),
                "strided_prefix_view": lambda: transformer_module.attention(q, k, v, causal=True, soft_cap=cap),
                "concatenate_then_attend": lambda: transformer_module.attention(
                    q, torch.cat((k_past, k_new), 2), torch.cat((v_past, v_new), 2), causal=True, soft_cap=cap),
                # query heads sharing a key/value head folded into the query axis (grouped-query attention)
                "explicit_ops": lambda: torch.matmul(torch.softmax(
                    cap * torch.tanh(torch.matmul(q_grouped * scale, kc.transpose(-1, -2)).float() / cap), dim=-1
                ).to(dtype), vc).view(q.shape),
                "sdpa_without_soft_cap": lambda: F.scaled_dot_product_attention(
                    q, kc, vc, scale=scale, enable_gqa=t.num_kv_heads < heads),
            }
            row = {}
            with torch.no_grad():
                reference = candidates["explicit_ops"]().float()
                for name, fn in candidates.items():
                    result = fn()
                    row[name] = {"cpu_s": min(_timed(fn)[0] for _ in range(repeats))}
                    if name != "sdpa_without_soft_cap":
                        row[name]["max_abs_diff_vs_explicit"] = float((result.float() - reference).abs().max())
            key = f"{precision}/B{batch}/context{context}"
            out[key] = row
            print("kernels", key, json.dumps({n: round(r["cpu_s"] * 1e3, 3) for n, r in row.items()}), "ms", flush=True)
    return out


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--contexts", nargs="+", type=int, default=[16, 64, 256])
    parser.add_argument("--steps", type=int, default=4, help="K shortcut steps per frame")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--frames", type=int, default=3, help="timed frames per cell")
    parser.add_argument("--max-cell-s", type=float, default=40.0,
                        help="CPU-second budget of one uncached cell (see the module docstring)")
    parser.add_argument("--no-uncached", action="store_true")
    parser.add_argument("--kernels-only", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kv-heads", type=int, default=0,
                        help="key/value heads of every attention layer (grouped-query attention, as in the "
                             "paper); 0: the config's (the reference: 8, one per query head)")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cfg, source = seed_dynamics_config()
    if args.kv_heads:
        cfg = dataclasses.replace(cfg, transformer=dataclasses.replace(cfg.transformer, num_kv_heads=args.kv_heads))
        source += f"; num_kv_heads={args.kv_heads} (--kv-heads)"
    precisions = [p for p in args.precisions if p == "fp32" or cpu_supports_bf16()]
    run: dict = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model_config_source": source,
        "model": {"embed_dim": cfg.transformer.embed_dim, "depth": cfg.transformer.depth,
                  "num_heads": cfg.transformer.num_heads, "num_kv_heads": cfg.transformer.num_kv_heads,
                  "time_every": cfg.transformer.time_every, "num_registers": cfg.transformer.num_registers,
                  "num_latents": cfg.num_latents, "latent_dim": cfg.latent_dim, "action_space": cfg.action_space},
        "machine": machine(), "note": args.note,
        "measurement": f"{torch.get_num_threads()} torch thread(s) on CPU(s) {sorted(os.sched_getaffinity(0))}; "
                       "per-frame time = median over timed frames of one Rollout.step (imagine K passes + observe)",
        "bf16_skipped": "bf16" in args.precisions and "bf16" not in precisions,
        "load_average_before": os.getloadavg(),
    }
    torch.manual_seed(0)
    model = DynamicsModel(cfg).eval()
    run["parameters"] = sum(p.numel() for p in model.parameters())
    run["attention_kernels"] = attention_kernels(cfg, max(args.batches), args.contexts, precisions, repeats=5)
    if not args.kernels_only:
        cells: dict[str, dict] = {}
        for precision in precisions:
            for batch in args.batches:
                for use_cache in ([True] if args.no_uncached else [True, False]):
                    previous: tuple[int, float] | None = None
                    for context in sorted(args.contexts):
                        key = f"{precision}/B{batch}/context{context}/{'cache' if use_cache else 'no_cache'}"
                        warmup, frames = args.warmup, args.frames
                        estimate = None
                        if not use_cache and previous is not None:
                            estimate = previous[1] * (context + 1) / (previous[0] + 1)
                            if estimate * (warmup + frames) > args.max_cell_s:
                                warmup, frames = 0, 1
                            if estimate > args.max_cell_s:
                                cells[key] = {"skipped": True, "estimated_per_frame_cpu_s": estimate}
                                print(key, "skipped, estimated", round(estimate, 1), "s per frame", flush=True)
                                continue
                        cell = run_cell(model, precision, batch, context, use_cache, args.steps, warmup, frames)
                        if estimate is not None:
                            cell["estimated_per_frame_cpu_s"] = estimate
                        cells[key] = cell
                        previous = (context, cell["per_frame_cpu_s"])
                        print(key, json.dumps({k: round(cell[k], 4) for k in (
                            "per_frame_cpu_s", "per_frame_wall_s", "frames_per_cpu_s")}), flush=True)
        run["cells"] = cells
        run["checks"] = checks(cells, precisions, args.batches, sorted(args.contexts))
        print(json.dumps(run["checks"], indent=1))
    run["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    run["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(run, indent=2) + "\n")
    print(f"wrote {args.out}")


def checks(cells: dict, precisions: list[str], batches: list[int], contexts: list[int]) -> dict:
    """Issue 4: cached per-frame time at the longest context / at the shortest <= 1.5; uncached grows."""
    out = {}
    lo, hi = contexts[0], contexts[-1]
    for precision in precisions:
        for batch in batches:
            row = {}
            for kind in ("cache", "no_cache"):
                a, b = cells.get(f"{precision}/B{batch}/context{lo}/{kind}"), cells.get(f"{precision}/B{batch}/context{hi}/{kind}")
                if not a or not b or a.get("skipped"):
                    continue
                if b.get("skipped"):
                    row[f"{kind}_ratio_{hi}_vs_{lo}_estimated"] = b["estimated_per_frame_cpu_s"] / a["per_frame_cpu_s"]
                    continue
                row[f"{kind}_ratio_{hi}_vs_{lo}"] = b["per_frame_cpu_s"] / a["per_frame_cpu_s"]
                row[f"{kind}_ratio_{hi}_vs_{lo}_wall"] = b["per_frame_wall_s"] / a["per_frame_wall_s"]
            if f"cache_ratio_{hi}_vs_{lo}" in row:
                row["cache_within_1.5x"] = row[f"cache_ratio_{hi}_vs_{lo}"] <= 1.5
            ratio = row.get(f"no_cache_ratio_{hi}_vs_{lo}", row.get(f"no_cache_ratio_{hi}_vs_{lo}_estimated"))
            if ratio is not None:
                row["no_cache_grows"] = ratio > 1.5
            out[f"{precision}/B{batch}"] = row
    return out


if __name__ == "__main__":
    main()

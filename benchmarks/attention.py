"""Which attention kernel to use on this CPU: forward+backward timings of the candidates.

    python benchmarks/attention.py             # ~2.5 minutes
    python benchmarks/attention.py --compile   # adds torch.compile(transformer) (~1.5 more minutes)

Two levels, each in fp32 and under bf16 autocast:
- "attention": the attention op alone at the tokenizer's shapes: space layers (64 frames x 8
  heads x 84 tokens = 64 patches + 16 latents + 4 registers, head_dim 32) and time layers
  (4 sequences x 84 token positions, 16 frames, causal).
- "transformer": a 6-layer width-256 `SpaceTimeTransformer` (time layer every 4th) on
  B=2, T=16, S=80 (32 frames per step), with `transformer.attention` swapped for each
  candidate; reported as frames per CPU second of fwd+bwd.
Timed in process CPU seconds on one thread by default (see `_time` for why). Candidates that
cannot soft-cap logits (PyTorch SDPA) run with soft_cap=0, flagged in the key. Writes
benchmarks/results/attention.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dreamerv4.models import transformer as transformer_module
from dreamerv4.models.transformer import SpaceTimeTransformer, TransformerConfig, attention

RESULTS = Path(__file__).parent / "results" / "attention.json"
SOFT_CAP = 50.0


def _no_bias(bias) -> None:
    if bias is not None:  # the benchmarked transformer has no locality prior
        raise ValueError("benchmark candidates do not implement an attention bias")


def plain_low_precision_softmax(q, k, v, *, causal, mask=None, soft_cap=0.0, bias=None):
    """Like `attention` (without its CUDA branch) but the softmax stays in the input dtype."""
    _no_bias(bias)
    n, hq, lq, dh = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    q = q.reshape(n, hkv, -1, dh) * (1.0 / (math.sqrt(dh) * (soft_cap or 1.0)))
    logits = torch.matmul(q, k.transpose(-1, -2))
    if soft_cap > 0.0:
        logits = torch.tanh(logits) * soft_cap
    allowed = transformer_module._allowed(lq, lk, causal, mask, q.device)
    if allowed is not None:
        logits = logits.view(n, hkv, -1, lq, lk).masked_fill(~allowed, float("-inf")).view(n, hkv, -1, lk)
    return torch.matmul(torch.softmax(logits, dim=-1), v).reshape(n, hq, lq, dh)


def _sdpa(backend: SDPBackend | None):
    def run(q, k, v, *, causal, mask=None, soft_cap=0.0, bias=None):
        _no_bias(bias)
        lq, lk = q.shape[2], k.shape[2]
        square_causal = causal and mask is None and lq == lk
        allowed = None if square_causal else transformer_module._allowed(lq, lk, causal, mask, q.device)
        context = sdpa_kernel(backend) if backend is not None else nullcontext()
        with context:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, is_causal=allowed is None and causal, enable_gqa=q.shape[1] != k.shape[1]
            )

    return run


# name -> (function, supports soft cap)
CANDIDATES: dict[str, tuple[Callable, bool]] = {
    "plain (chosen: transformer.attention)": (attention, True),
    "plain, softmax in input dtype": (plain_low_precision_softmax, True),
    "sdpa default (fused CPU flash kernel)": (_sdpa(None), False),
    "sdpa math backend": (_sdpa(SDPBackend.MATH), False),
}


def _time(step: Callable[[], None], warmup: int, repeats: int) -> float:
    """Fewest process CPU seconds `step` took, after `warmup` untimed calls.

    CPU time rather than wall-clock: on this shared 2-core machine other jobs stretched wall
    times up to 10x between identical runs, while CPU time of a single-threaded run stayed
    within a few percent. The minimum is the run least disturbed (cache and memory contention).
    """
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        step()
        times.append(time.process_time() - start)
    return min(times)


def _autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def bench_attention_op(fn: Callable, soft_cap: float, dtype: str, repeats: int) -> dict[str, float]:
    """CPU milliseconds of fwd+bwd through `fn` alone at the space- and time-layer shapes."""
    shapes = {"space": ((64, 8, 84, 32), False), "time": ((4 * 84, 8, 16, 32), True)}
    result = {}
    for name, (shape, causal) in shapes.items():
        tensor_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        q, k, v = (torch.randn(shape, dtype=tensor_dtype, requires_grad=True) for _ in range(3))

        def step() -> None:
            with _autocast(dtype):
                out = fn(q, k, v, causal=causal, soft_cap=soft_cap)
            out.float().square().mean().backward()

        result[f"{name}_cpu_ms"] = round(1000 * _time(step, warmup=2, repeats=3 * repeats), 2)
    return result


def bench_transformer(fn: Callable, soft_cap: float, dtype: str, repeats: int, compile_model: bool = False) -> float:
    """Frames per CPU second of fwd+bwd through a 6-layer width-256 transformer using `fn` for attention."""
    torch.manual_seed(0)
    model = SpaceTimeTransformer(TransformerConfig(embed_dim=256, depth=6, soft_cap=soft_cap))
    x = torch.randn(2, 16, 80, 256)
    forward = torch.compile(model) if compile_model else model
    original = transformer_module.attention
    transformer_module.attention = fn
    try:

        def step() -> None:
            with _autocast(dtype):
                out = forward(x)
            out.float().square().mean().backward()

        seconds = _time(step, warmup=3 if compile_model else 1, repeats=repeats)
    finally:
        transformer_module.attention = original
    return round(x.shape[0] * x.shape[1] / seconds, 1)


def _report(results: dict, key: str) -> None:
    op = results["attention_op_cpu_ms"].get(key, "")
    print(key, op, f"{results['transformer_frames_per_cpu_s'][key]} frames/cpu-s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time equals wall time)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the whole transformer")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    candidates = dict(CANDIDATES)
    results: dict = {
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "note": "fwd+bwd, fewest process CPU seconds of the repeats (see _time); at 2 threads a quiet "
        "2-core machine runs up to about twice these rates per wall-clock second",
        "load_average_before": os.getloadavg(),
        "attention_op_cpu_ms": {},
        "transformer_frames_per_cpu_s": {},
    }
    for name, (fn, supports_cap) in candidates.items():
        cap = SOFT_CAP if supports_cap else 0.0
        for dtype in ("fp32", "bf16"):
            key = f"{name} | {dtype} | soft_cap={cap:g}"
            results["attention_op_cpu_ms"][key] = bench_attention_op(fn, cap, dtype, args.repeats)
            results["transformer_frames_per_cpu_s"][key] = bench_transformer(fn, cap, dtype, args.repeats)
            _report(results, key)
    # What the soft cap costs in the chosen kernel.
    for dtype in ("fp32", "bf16"):
        key = f"plain (chosen: transformer.attention) | {dtype} | soft_cap=0"
        results["attention_op_cpu_ms"][key] = bench_attention_op(attention, 0.0, dtype, args.repeats)
        results["transformer_frames_per_cpu_s"][key] = bench_transformer(attention, 0.0, dtype, args.repeats)
        _report(results, key)
    if args.compile:
        for dtype in ("fp32", "bf16"):
            key = f"plain, torch.compile(whole transformer) | {dtype} | soft_cap={SOFT_CAP:g}"
            rate = bench_transformer(attention, SOFT_CAP, dtype, args.repeats, compile_model=True)
            results["transformer_frames_per_cpu_s"][key] = rate
            print(key, f"{results['transformer_frames_per_cpu_s'][key]} frames/cpu-s", flush=True)
    results["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""GPU checks and speeds on one CUDA device: does each stage compute the same there, and how fast.

    DREAMERV4_LPIPS_WEIGHTS=DIR python benchmarks/gpu.py            # ~2 minutes on one H100
    ... --no-compile                                                 # skip the torch.compile rows

Sections of benchmarks/results/gpu.json:
- correctness: the same weights on CPU and on CUDA in fp32: `attention` (soft cap, grouped-query
  heads, causal, a boolean mask, a bias; outputs and gradients), the tokenizer forward, the
  shortcut-forcing loss with its gradients; and on CUDA, cached against uncached generation.
- attention: forward+backward milliseconds, bf16, at the reference tokenizer's shapes (space layers:
  256 frames x 8 heads x 84 tokens; time layers: 1344 streams x 8 heads x 16 frames, causal) of what
  `attention` runs on CUDA now (`dispatch`), the same formula in plain PyTorch ops, FlexAttention with
  the soft cap as a score_mod (compiled), and PyTorch's fused SDPA without the cap (it computes
  something else: a floor, for reference).
- train: one seed-config training step (configs/minerl.yaml sizes, B=16, T=16) of the tokenizer
  (masked autoencoding, MSE + 0.2 LPIPS, benchmarks/tokenizer_step.py make_step) and of the dynamics
  model (shortcut forcing, benchmarks/dynamics_train.py make_step), fp32 and bf16 autocast, eager
  and with the training's `compile_blocks` (`blocks_compiled` says how many: 0 on a torch too old
  for it): frames/s, model TFLOP/s (FlopCounterMode, matmuls only, LPIPS excluded), utilization
  against the bf16 matmul peak measured in the same run, peak memory.
- generate: imagined frames/s at K=4 shortcut steps, batch 1 and 64, contexts 16/64/256, with and
  without the KV cache, bf16 (what benchmarks/dynamics_generate.py measures on CPU).
Times are CUDA-event milliseconds after warm-up, the median of the repeats.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import dynamics_train  # noqa: E402  (benchmarks/ helpers, not a package)
import tokenizer_step  # noqa: E402
from dynamics_generate import OBSERVE_CHUNK, seed_dynamics_config  # noqa: E402

from dreamerv4.models import transformer as transformer_module  # noqa: E402
from dreamerv4.models.dynamics import DynamicsModel, Rollout, previous_actions  # noqa: E402
from dreamerv4.training.shortcut import sample_step_and_signal, shortcut_forcing_loss  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "gpu.json"
SOFT_CAP = 50.0  # TransformerConfig.soft_cap default


def cuda_ms(fn, warmup: int = 3, repeats: int = 10) -> float:
    """Median CUDA-event milliseconds of fn() after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max())


def guarded(label: str, key: str, fn, out: dict) -> None:
    """Run one measurement into out[key]; an exception is recorded there instead of ending the run."""
    started = time.perf_counter()
    try:
        out[key] = fn()
    except Exception as exc:  # noqa: BLE001  (a benchmark reports what failed and goes on)
        out[key] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    print(f"{label}/{key}", f"({time.perf_counter() - started:.1f} s)", json.dumps(out[key])[:600], flush=True)


# ---------------------------------------------------------------------------------------------
# Correctness: CPU and CUDA agree


def check_attention() -> dict:
    """`attention` on CUDA vs CPU, fp32, outputs and q/k/v gradients, in the cases the models use."""
    g = torch.Generator().manual_seed(0)
    cases = {
        "space_softcap": dict(n=6, hq=8, hkv=8, lq=84, lk=84, causal=False, cap=SOFT_CAP),
        "time_causal_softcap_gqa": dict(n=6, hq=8, hkv=2, lq=16, lk=16, causal=True, cap=SOFT_CAP),
        "cached_query_softcap": dict(n=6, hq=8, hkv=8, lq=1, lk=40, causal=True, cap=SOFT_CAP),
        "mask_and_bias_softcap": dict(n=6, hq=8, hkv=8, lq=84, lk=84, causal=False, cap=SOFT_CAP, mask=True, bias=True),
        "causal_no_cap_sdpa": dict(n=6, hq=8, hkv=8, lq=16, lk=16, causal=True, cap=0.0),
        "mask_and_bias_no_cap_sdpa": dict(n=6, hq=8, hkv=2, lq=84, lk=84, causal=False, cap=0.0, mask=True, bias=True),
    }
    out = {}
    for name, c in cases.items():
        q = torch.randn(c["n"], c["hq"], c["lq"], 32, generator=g) * 3
        k = torch.randn(c["n"], c["hkv"], c["lk"], 32, generator=g) * 3
        v = torch.randn(c["n"], c["hkv"], c["lk"], 32, generator=g)
        mask = torch.rand(c["lq"], c["lk"], generator=g) < 0.7 if c.get("mask") else None
        if mask is not None:
            mask[:, 0] = True  # every query reads at least one key
        bias = torch.randn(c["hq"], c["lq"], c["lk"], generator=g) if c.get("bias") else None
        grad_out = torch.randn(c["n"], c["hq"], c["lq"], 32, generator=g)
        results = []
        for device in ("cpu", "cuda"):
            leaves = [t.detach().to(device).clone().requires_grad_(True) for t in (q, k, v)]
            y = transformer_module.attention(
                *leaves, causal=c["causal"], soft_cap=c["cap"],
                mask=None if mask is None else mask.to(device), bias=None if bias is None else bias.to(device))
            y.backward(grad_out.to(device))
            results.append([y] + [t.grad for t in leaves])
        out[name] = {part: max_diff(a, b) for part, a, b in zip(("out", "grad_q", "grad_k", "grad_v"), *results)}
    return out


def check_tokenizer(lpips_ok: bool) -> dict:
    """The seed tokenizer's forward (mask rate 0) and its MSE gradients on CPU and CUDA, fp32."""
    model, _ = tokenizer_step.build(tokenizer_args(batch=2, frames=4, no_lpips=True))
    frames = torch.rand(2, 4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    outs = []
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        o = m(frames.to(device), mask_rate=0.0)
        o["reconstructed"].square().mean().backward()
        grads = torch.cat([p.grad.flatten().cpu() for p in m.parameters() if p.grad is not None])
        outs.append((o["latents"], o["reconstructed"], grads))
    (lat0, rec0, g0), (lat1, rec1, g1) = outs
    return {"latents": max_diff(lat0, lat1), "reconstructed": max_diff(rec0, rec1),
            "grad_relative": float((g0 - g1).norm() / g0.norm()), "lpips_weights_found": lpips_ok}


def check_dynamics() -> dict:
    """The shortcut-forcing loss with the same tau, d and noise on CPU and CUDA (fp32), its gradient,
    and cached vs uncached generation on CUDA (same generator seed)."""
    model = dynamics_train.build()
    latents, actions = dynamics_train.make_batch(model, 4, 8)
    g = torch.Generator().manual_seed(2)
    tau, d = sample_step_and_signal(4, 8, model.cfg.k_max, model.cfg.bootstrap_fraction, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    results = []
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        loss, _ = shortcut_forcing_loss(m, latents.to(device), actions.to(device), tau.to(device), d.to(device),
                                        noise.to(device))
        loss.backward()
        grads = torch.cat([p.grad.flatten().cpu() for p in m.parameters() if p.grad is not None])
        results.append((float(loss.detach()), grads))
    (l0, g0), (l1, g1) = results
    m = model.to("cuda").eval()
    context, ctx_actions = latents[:, :4].cuda(), actions[:, :4].cuda()
    future = actions[:, 4:].cuda()
    with torch.no_grad():
        gen = [m.generate(context, ctx_actions, future, cache=cache, generator=torch.Generator("cuda").manual_seed(3))
               for cache in (True, False)]
    return {"loss_cpu": l0, "loss_cuda": l1, "grad_relative": float((g0 - g1).norm() / g0.norm()),
            "generate_cached_vs_uncached": max_diff(*gen)}


# ---------------------------------------------------------------------------------------------
# Attention kernels


def flex_softcap(cap: float):
    from torch.nn.attention.flex_attention import flex_attention

    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    compiled = torch.compile(flex_attention)

    def run(q, k, v, block_mask):
        return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)

    return run


def attention_speeds(compile_: bool) -> dict:
    shapes = {"space": (256, 84, False), "time": (84 * 16, 16, True)}
    out = {}
    for shape_name, (n, length, causal) in shapes.items():
        g = torch.Generator("cuda").manual_seed(0)
        q, k, v = (torch.randn(n, 8, length, 32, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_(True)
                   for _ in range(3))
        grad = torch.randn_like(q)
        scale = 1 / math.sqrt(32)
        allowed = transformer_module._allowed(length, length, causal, None, q.device)

        def explicit():
            logits = SOFT_CAP * torch.tanh(torch.matmul(q * scale, k.transpose(-1, -2)).float() / SOFT_CAP)
            if allowed is not None:
                logits = logits.masked_fill(~allowed, float("-inf"))
            return torch.matmul(torch.softmax(logits, -1).to(v.dtype), v)

        candidates = {
            "dispatch": lambda: transformer_module.attention(q, k, v, causal=causal, soft_cap=SOFT_CAP),
            "explicit_ops": explicit,
            "sdpa_without_soft_cap": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
        }
        if compile_:
            from torch.nn.attention.flex_attention import create_block_mask

            block_mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, length, length) if causal else None
            flex = flex_softcap(SOFT_CAP)
            candidates["flex_softcap_compiled"] = lambda: flex(q, k, v, block_mask)
            candidates["explicit_ops_compiled"] = torch.compile(explicit)
        row = {}
        reference = explicit().float()
        for name, fn in candidates.items():
            def fwd_bwd():
                fn().backward(grad)
                q.grad = k.grad = v.grad = None

            def measure():
                result = {"fwd_bwd_ms": cuda_ms(fwd_bwd), "fwd_ms": cuda_ms(lambda: fn().detach())}
                if name != "sdpa_without_soft_cap":
                    result["max_abs_diff_vs_explicit"] = max_diff(fn(), reference)
                return result
            guarded(f"attention/{shape_name}", name, measure, row)
        out[shape_name] = row
    return out


# ---------------------------------------------------------------------------------------------
# Training steps and the matmul peak


def tokenizer_args(batch: int = 16, frames: int = 16, no_lpips: bool = False) -> argparse.Namespace:
    return argparse.Namespace(width=256, depth=6, heads=8, kv_heads=8, time_every=4, registers=4, mask_rate=0.75,
                              checkpoint_activations=False, no_lpips=no_lpips, batch=batch, frames=frames)


def matmul_peak_tflops(dtype: torch.dtype, n: int = 8192) -> float:
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    return 2 * n**3 / (cuda_ms(lambda: a @ b, warmup=3, repeats=10) / 1e3) / 1e12


def step_flops(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    counts = counter.get_flop_counts()
    return float(sum(counts["Global"].values()) - sum(counts.get("LPIPS", {}).values()))


def train_speed(model_name: str, precision: str, compiled: bool, peak_bf16: float) -> dict:
    from dreamerv4.models.transformer import compile_blocks

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    batch, frames = 16, 16
    if model_name == "tokenizer":
        model, lpips = tokenizer_step.build(tokenizer_args())
        model, lpips = model.cuda(), lpips.cuda()
        data = torch.rand(batch, frames, 3, 64, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        make = lambda m: tokenizer_step.make_step(m, lpips, precision, data)  # noqa: E731
    else:
        model = dynamics_train.build().cuda()
        latents, actions = dynamics_train.make_batch(model, batch, frames)
        make = lambda m: dynamics_train.make_step(m, precision, latents.cuda(), actions.cuda())  # noqa: E731
    flops = step_flops(make(copy.deepcopy(model)))  # counted on a copy: the timed model starts fresh
    blocks_compiled = compile_blocks(model) if compiled else 0  # 0 on torch < MIN_COMPILE_TORCH
    step = make(model)
    started = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - started
    ms = cuda_ms(step, warmup=3, repeats=10)
    return {"step_ms": ms, "frames_per_s": batch * frames / (ms / 1e3), "first_step_s": first_s,
            "model_tflop_per_s": flops / (ms / 1e3) / 1e12, "utilization_of_bf16_peak": flops / (ms / 1e3) / peak_bf16,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9, "blocks_compiled": blocks_compiled,
            "last_loss": step()}


# ---------------------------------------------------------------------------------------------
# Generation


def generate_speed(model: DynamicsModel, batch: int, context: int, use_cache: bool, frames: int = 5) -> dict:
    g = torch.Generator("cuda").manual_seed(0)
    cfg = model.cfg
    latents = torch.rand(batch, context, cfg.num_latents, cfg.latent_dim, device="cuda", generator=g) * 2 - 1
    codes = torch.randint(0, model.action_space.num_codes, (batch, context + frames + 1), device="cuda", generator=g)
    prev = previous_actions(codes)
    rollout = Rollout(model, use_cache=use_cache, generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for i in range(0, context, OBSERVE_CHUNK):
            rollout.observe(latents[:, i: i + OBSERVE_CHUNK], prev[:, i: min(i + OBSERVE_CHUNK, context)])
        rollout.step(prev[:, context], 4)  # warm-up frame
        times = []
        for i in range(frames):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            rollout.step(prev[:, context + 1 + i], 4)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    ms = statistics.median(times)
    return {"per_frame_ms": ms, "frames_per_s": batch / (ms / 1e3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-compile", action="store_true", help="skip FlexAttention and compile_blocks rows")
    parser.add_argument("--sections", nargs="+", default=["correctness", "attention", "train", "generate"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA device (torch.cuda.is_available() is False)")
    compile_ = not args.no_compile
    result = {"machine": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                          "cuda": torch.version.cuda, "python": platform.python_version()}}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))

    if "correctness" in args.sections:
        from dreamerv4.models.lpips import weights_path

        try:
            weights_path("alexnet")
            lpips_ok = True
        except Exception:  # noqa: BLE001
            lpips_ok = False
        section = result["correctness"] = {}
        guarded("correctness", "attention", check_attention, section)
        guarded("correctness", "tokenizer", lambda: check_tokenizer(lpips_ok), section)
        guarded("correctness", "dynamics", check_dynamics, section)
        save()
    if "attention" in args.sections:
        result["attention"] = attention_speeds(compile_)
        save()
    if "train" in args.sections:
        section = result["train"] = {}
        peak = {"bf16": matmul_peak_tflops(torch.bfloat16) * 1e12}
        torch.backends.cuda.matmul.allow_tf32 = False
        peak["fp32"] = matmul_peak_tflops(torch.float32) * 1e12
        section["matmul_peak_tflop_per_s"] = {k: v / 1e12 for k, v in peak.items()}
        print("matmul peak", section["matmul_peak_tflop_per_s"], flush=True)
        for model_name in ("tokenizer", "dynamics"):
            for precision in ("fp32", "bf16"):
                for compiled in (False, True) if compile_ else (False,):
                    if compiled and precision == "fp32":
                        continue
                    key = f"{model_name}/{precision}/{'compiled' if compiled else 'eager'}"
                    guarded("train", key, lambda: train_speed(model_name, precision, compiled, peak["bf16"]), section)
                    save()
    if "generate" in args.sections:
        section = result["generate"] = {}
        model = DynamicsModel(seed_dynamics_config()[0]).cuda().eval()
        for batch in (1, 64):
            for use_cache in (True, False):
                for context in (16, 64, 256):
                    key = f"B{batch}/context{context}/{'cache' if use_cache else 'no_cache'}"
                    guarded("generate", key, lambda: generate_speed(model, batch, context, use_cache), section)
            save()
        for batch in (1, 64):
            for kind in ("cache", "no_cache"):
                a, b = section.get(f"B{batch}/context16/{kind}", {}), section.get(f"B{batch}/context256/{kind}", {})
                if "per_frame_ms" in a and "per_frame_ms" in b:
                    section[f"B{batch}/{kind}_ratio_256_vs_16"] = b["per_frame_ms"] / a["per_frame_ms"]
        save()
    print("wrote", args.out)


if __name__ == "__main__":
    main()

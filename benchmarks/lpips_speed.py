"""Forward+backward time of LPIPS on one tokenizer batch (it runs every training step).

    python benchmarks/lpips_speed.py [--net alexnet] [--batch 256] [--size 64] [--repeats 5]

Times fp32 and bf16 autocast, reports the distance gap between them, and writes
benchmarks/results/lpips_speed.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dreamerv4.models.lpips import LPIPS


def time_step(model: LPIPS, a: torch.Tensor, b: torch.Tensor, bf16: bool, repeats: int) -> tuple[float, torch.Tensor]:
    times = []
    for _ in range(repeats + 1):  # the first call warms up the allocator and kernels
        x = a.clone().requires_grad_(True)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            distance = model(x, b)
        distance.mean().backward()
        times.append(time.perf_counter() - start)
    return min(times[1:]), distance.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", default="alexnet")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LPIPS(args.net)
    real = torch.rand(args.batch, 3, args.size, args.size)
    recon = (real + 0.1 * torch.randn_like(real)).clamp(0, 1)
    fp32_s, fp32_d = time_step(model, recon, real, bf16=False, repeats=args.repeats)
    bf16_s, bf16_d = time_step(model, recon, real, bf16=True, repeats=args.repeats)
    result = {
        "net": args.net, "batch": args.batch, "size": args.size, "threads": torch.get_num_threads(),
        "fp32_fwd_bwd_s": round(fp32_s, 4), "bf16_fwd_bwd_s": round(bf16_s, 4),
        "bf16_max_rel_error": round(float(((bf16_d - fp32_d).abs() / fp32_d).max()), 4),
    }
    print(json.dumps(result))
    out = Path(__file__).parent / "results" / "lpips_speed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

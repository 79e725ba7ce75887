"""Forward+backward time of the tokenizer model on this CPU, to plan training presets.

    python benchmarks/tokenizer_step.py                      # seed size: B=16, T=16, width 256, 6+6 layers
    python benchmarks/tokenizer_step.py --batch 4 --frames 8 --width 128 --depth 4

One step = forward at the configured mask rate (seed: 0.75), MSE on all reconstructed patches,
backward; no optimizer (the training loop's cost is separate). Timed in fp32 and under
`torch.autocast("cpu", dtype=torch.bfloat16)`. Writes benchmarks/results/tokenizer_step.json
with wall-clock and process CPU seconds per step; the machine is shared, so the load average is
recorded too.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from dreamerv4.models.tokenizer import Tokenizer, TokenizerConfig, patchify
from dreamerv4.models.transformer import TransformerConfig

RESULTS = Path(__file__).parent / "results" / "tokenizer_step.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    stack = TransformerConfig(embed_dim=args.width, depth=args.depth, num_heads=args.heads, num_kv_heads=args.heads)
    torch.manual_seed(0)
    model = Tokenizer(TokenizerConfig(encoder=stack, decoder=stack))
    frames = torch.rand(args.batch, args.frames, 3, 64, 64)
    target = patchify(frames, model.cfg.patch_size)
    run = {
        "config": vars(args) | {"out": str(args.out)},
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_before": os.getloadavg(),
        "steps": {},
    }
    for precision in ("fp32", "bf16"):
        context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
        wall, cpu = [], []
        for i in range(args.repeats + 1):  # the first step warms up allocators and kernels
            model.zero_grad(set_to_none=True)
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            with context:
                out = model(frames)
            loss = (out["reconstructed"] - target).square().mean()
            loss.backward()
            if i:
                wall.append(time.perf_counter() - start_wall)
                cpu.append(time.process_time() - start_cpu)
        frames_per_step = args.batch * args.frames
        run["steps"][precision] = {
            "wall_s": [round(s, 3) for s in wall],
            "process_cpu_s": [round(s, 3) for s in cpu],
            "frames_per_s_best": round(frames_per_step / min(wall), 1),
        }
        print(precision, run["steps"][precision], flush=True)
    run["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(run, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

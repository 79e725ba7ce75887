"""Closed-loop play in the real Crafter game: a trained policy (or the uniform random one) acts live.

    dreamerv4 eval crafter --checkpoint runs/x/agent/checkpoint.pt --episodes 100 --seed 100000
    dreamerv4 eval crafter --checkpoint random --episodes 100 --seed 100000 --out runs/x/eval/crafter_random.json
    dreamerv4 eval compare runs/x/eval/crafter_imagine.json runs/x/eval/crafter_bc.json   # paired, same worlds

Episode i is played in `make_crafter_env(seed + i)` (data/crafter_record.py: the real game with
reproducible creature despawning), and the policy's sampling and world-model noise come from a
generator seeded with (seed, i): the same command gives the same numbers. Reports (JSON; default
`<run>/eval/crafter_<bc|imagine>.json` for `<run>/<agent|imagine>/checkpoint.pt`, else next to
the checkpoint; `crafter_random.json` in the working folder for `random`): mean_return and its 95%
confidence interval (normal approximation, mean +- 1.96 s / sqrt(n); null for n = 1), returns and
lengths per episode, achievements (success rate of each of the 22 in [0, 1]: unlocked at least once
in the episode), crafter_score (data/crafter_record.py crafter_score; docs/design.md, Evaluation), and a GIF of the first episode's first
`VIDEO_STEPS` frames beside the JSON.

The policy acts as `models/policy.py` describes (`AgentPolicy`: a capped world-model context of
the live frames, encoded exactly as `data tokenize` encoded the training episodes); `--batch`
episodes are played at a time in lockstep, each with its own generator (tested equal to one at a
time).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dreamerv4.data.crafter_record import crafter_score
from dreamerv4.errors import UserError
from dreamerv4.evaluation.report_data import paired_returns
from dreamerv4.media import write_side_by_side
from dreamerv4.models.policy import AgentPolicy, RandomPolicy, play_episodes, policy_seed
from dreamerv4.training.stages import load_agent, load_tokenizer, tokenizer_context

VIDEO_STEPS = 500  # frames of the first episode saved as a GIF


def load_policy(checkpoint: str, max_context: int | None = None, greedy: bool = False):
    """("random" | AgentPolicy, label) for a checkpoint path or the word `random`."""
    if checkpoint == "random":
        return RandomPolicy(), "random"
    agent, run = load_agent(checkpoint)
    tokenizer, tok_cfg = load_tokenizer(run.dynamics.tokenizer_checkpoint)
    context = max_context or run.agent.train.seq_len
    return AgentPolicy(agent, tokenizer, tokenizer_context(run, tok_cfg), context, greedy), policy_label(checkpoint)


def policy_label(checkpoint: str | Path) -> str:
    """"bc" for <run>/agent/checkpoint.pt, "imagine" for <run>/imagine/checkpoint.pt, else the folder name."""
    parent = Path(checkpoint).parent.name
    return {"agent": "bc", "imagine": "imagine"}.get(parent, parent)


def write_json_report(out: Path, report: dict) -> None:
    """Write `report` to `out` atomically (temp file + rename), creating its folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)


def default_out(checkpoint: str, label: str) -> Path:
    if checkpoint == "random":
        return Path("crafter_random.json")
    path = Path(checkpoint)
    if path.parent.name in ("agent", "imagine"):
        return path.parent.parent / "eval" / f"crafter_{label}.json"
    return path.with_name("eval_crafter.json")


def evaluate_crafter(checkpoint: str, episodes: int, seed: int = 100_000, max_steps: int = 10_000,
                     out: str | Path | None = None, max_context: int | None = None, greedy: bool = False,
                     progress: bool = True, batch: int = 32) -> dict:
    """Play `episodes` episodes, `batch` at a time in lockstep (module docstring); returns the report,
    also written as JSON."""
    if episodes < 1 or max_steps < 1 or batch < 1:
        raise UserError(f"--episodes ({episodes}), --max-steps ({max_steps}) and --batch ({batch}) must be at least 1")
    import crafter

    started = time.perf_counter()
    policy, label = load_policy(checkpoint, max_context, greedy)
    out = Path(out) if out is not None else default_out(checkpoint, label)
    names = sorted(crafter.constants.achievements)
    bar = tqdm(total=episodes, desc=f"crafter {label}", unit="episode", disable=None if progress else True,
               file=sys.stderr)
    finished: list[float] = []

    def on_done(result: dict) -> None:
        finished.append(result["return"])
        bar.update(1)
        bar.set_postfix(mean_return=f"{np.mean(finished):.2f}", length=result["length"])

    results = []
    for first in range(0, episodes, batch):
        ids = range(first, min(first + batch, episodes))
        generators = [torch.Generator().manual_seed(policy_seed(seed, i)) for i in ids]
        results += play_episodes(policy, [seed + i for i in ids], generators, max_steps,
                                 keep_frames=VIDEO_STEPS if first == 0 else 0, on_done=on_done)
    bar.close()
    returns, lengths = [r["return"] for r in results], [r["length"] for r in results]
    unlocked, video = [r["unlocked"] for r in results], results[0]["frames"]
    returns_arr = np.asarray(returns)
    mean = float(returns_arr.mean())
    half = 1.96 * float(returns_arr.std(ddof=1)) / math.sqrt(episodes) if episodes > 1 else None
    success = {name: float(np.mean([name in u for u in unlocked])) for name in names}
    video_path = None
    if video is not None:
        video_path = write_side_by_side(out.with_name(out.stem + "_episode0"), [video], fps=8, scale=2,
                                        mp4=False)["gif"]
    report = {
        "policy": label,
        "checkpoint": checkpoint,
        "episodes": episodes,
        "seed": seed,
        "env_seeds": [seed + i for i in range(episodes)],
        "max_steps": max_steps,
        "greedy": greedy,
        "batch": batch,
        "max_context": getattr(policy, "max_context", None),
        "mean_return": mean,
        "return_ci95": None if half is None else [mean - half, mean + half],
        "returns": returns,
        "lengths": lengths,
        "mean_length": float(np.mean(lengths)),
        "crafter_score": crafter_score(success),
        "achievements": success,
        "context_restarts": getattr(policy, "restarts", 0),
        "video": None if video_path is None else str(video_path),
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json_report(out, report)
    report["out"] = str(out)
    return report


def cmd_eval(args) -> int:
    r = evaluate_crafter(args.checkpoint, args.episodes, args.seed, getattr(args, "max_steps", 10_000), args.out,
                         getattr(args, "max_context", None), getattr(args, "greedy", False),
                         batch=getattr(args, "batch", 32))
    ci = "n/a" if r["return_ci95"] is None else f"[{r['return_ci95'][0]:.2f}, {r['return_ci95'][1]:.2f}]"
    achieved = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["achievements"].items() if v > 0) or "none"
    print(f"{r['policy']}: {r['episodes']} episodes, mean return {r['mean_return']:.2f} (95% CI {ci}), "
          f"crafter score {r['crafter_score']:.2f}%, mean length {r['mean_length']:.0f}")
    print(f"  achievements: {achieved}")
    print(f"  report {r['out']}" + (f", video {r['video']}" if r["video"] else ""))
    return 0


def _read_result(path: str) -> dict:
    try:
        result = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (write it with `dreamerv4 eval crafter --out`)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a readable JSON report ({err})") from None
    if not isinstance(result, dict) or not isinstance(result.get("returns"), list) or not result["returns"]:
        raise UserError(f"{path}: not an `eval crafter` report (no per-episode `returns`)")
    return result


def cmd_compare(args) -> int:
    """Two `eval crafter` reports on the same worlds: each mean with its interval, then a - b paired."""
    a, b = _read_result(args.a), _read_result(args.b)
    if a.get("env_seeds") != b.get("env_seeds"):
        raise UserError(f"{args.a} and {args.b} were played on different worlds (env_seeds differ): "
                        "evaluate both with the same --seed and --episodes")
    paired = paired_returns(a, b)
    if paired is None:
        raise UserError(f"{args.a} and {args.b}: a return is missing or not a number")
    for path, r in ((args.a, a), (args.b, b)):
        ci = r.get("return_ci95")
        ci_text = "n/a" if ci is None else f"{ci[0]:.2f}-{ci[1]:.2f}"
        print(f"{path}: {r.get('policy', '?')} mean return {r['mean_return']:.2f} ({ci_text}), "
              f"crafter score {r.get('crafter_score', float('nan')):.2f}%")
    ci = paired["ci95"]
    ratio = "n/a" if paired["ratio"] is None else f"{paired['ratio']:.2f}x"
    print(f"paired a - b over {paired['episodes']} worlds: {paired['diff']:+.2f}"
          + ("" if ci is None else f" (95% CI {ci[0]:+.2f} to {ci[1]:+.2f})") + f", ratio of means {ratio}")
    if args.json:
        write_json_report(Path(args.json), {"a": args.a, "b": args.b, **paired,
                                            "ci95": None if ci is None else list(ci)})
    return 0

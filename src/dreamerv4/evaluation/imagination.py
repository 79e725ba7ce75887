"""The model-exploitation instrument: the same actions from the same state, in the world model and in
the real game.

    dreamerv4 eval imagination --checkpoint runs/x/imagine/checkpoint.pt --data data/crafter-heldout \
        --starts 64 --horizon 15

Start states are real game states: step t0 of a recorded held-out Crafter episode, reached again by
replaying the recorded actions 0..t0-1 in `make_crafter_env(episode seed)` (the game is deterministic
per seed; every replay is checked to show the recorded frame t0). From there:
- imagination: the agent's world model observes the recorded context (the last `context` frames up to
  t0, encoded as `data tokenize` encodes them) and runs `training/imagine.py imagine` for H steps,
  exactly as imagination training does: the policy samples a_t at each imagined state, the reward
  head reads r_t at s_{t+1}, the continuation head gives c_t;
- the real game: the same actions a_0..a_{H-1} are played from the replayed state; its rewards,
  deaths, health and achievement counters are recorded and its frames encoded by the same tokenizer.
Crafter rewards +1 on a step that unlocks an achievement for the first time in the episode (once per
step; a repeat earns nothing) and +-0.1 per health point gained or lost, so the instrument splits steps into first unlocks, repeats
(an achievement counter rose again) and the rest. Reported (JSON) per horizon step h = 1..H over the
starts whose real episode is still running: imagined and real reward, latent MSE and pixel PSNR of
the imagined frame against the real one; and over all steps: imagined vs real return, imagined reward
on unlock / repeat / other steps, the reward head's precision and recall for unlocks (imagined reward
> 0.5), the health part of the reward, real deaths against imagined ones (1 - prod c_t).
A policy that exploits the model shows imagined return far above the real one, often with imagined
unlocks the game never paid (low precision) or reward on repeats.
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

from dreamerv4.data.crafter_record import make_crafter_env
from dreamerv4.data.episodes import find_episodes, load_actions, load_frames, load_rewards
from dreamerv4.data.latents import decode_latents, encode_episode
from dreamerv4.errors import DataError, UserError
from dreamerv4.evaluation.crafter import policy_label, write_json_report
from dreamerv4.evaluation.metrics import psnr
from dreamerv4.training.imagine import imagine
from dreamerv4.training.stages import load_agent, load_tokenizer, tokenizer_context

UNLOCK_REWARD = 0.5  # a step's reward above this is an achievement unlock (+1); health changes are +-0.1 each


def episode_seeds(data: Path) -> tuple[dict[str, int], int]:
    """({episode folder name: crafter.Env seed}, episode length cap) from the recording.json that
    `data crafter` writes."""
    path = data / "recording.json"
    try:
        summary = json.loads(path.read_text())
        seeds = [int(s) for s in summary["episode_seeds"]]
        max_steps = int(summary["max_steps"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: needed to replay the recorded episodes, unreadable "
                        f"({type(exc).__name__}: {exc}); record the data with `dreamerv4 data crafter`") from exc
    return {f"episode_{i:05d}": seed for i, seed in enumerate(seeds)}, max_steps


def replay(env_seed: int, actions: np.ndarray, max_steps: int = 10000):
    """The real game after `actions` from its reset: (env, frames (len+1, 64, 64, 3), rewards (len,)).
    Raises DataError if the episode ends before the last action."""
    env = make_crafter_env(env_seed, max_steps)
    frames, rewards = [env.reset()], []
    for t, action in enumerate(actions):
        obs, reward, done, _ = env.step(int(action))
        frames.append(obs)
        rewards.append(float(reward))
        if done and t < len(actions) - 1:
            raise DataError(f"replaying seed {env_seed}: the episode ended at step {t}, before its last action")
    return env, np.stack(frames), np.asarray(rewards, np.float32)


def play_actions(env, actions: np.ndarray) -> dict[str, np.ndarray]:
    """Play `actions` (H,) from the env's current state; per step: reward, alive (the episode was still
    running when the action was taken), died, unlock, repeat, health change; frames (H, 64, 64, 3)
    (after the episode ends the last frame repeats)."""
    horizon = len(actions)
    out = {k: np.zeros(horizon, np.float32) for k in ("reward", "alive", "died", "unlock", "repeat", "health")}
    frames = []
    counts = dict(env._player.achievements)
    health = env._player.inventory["health"]
    frame, done = None, False
    for h, action in enumerate(actions):
        if done:
            frames.append(frame)
            continue
        frame, reward, done, info = env.step(int(action))
        frames.append(frame)
        out["alive"][h] = 1.0
        out["reward"][h] = reward
        out["died"][h] = float(done and info["discount"] == 0.0)
        new = info["achievements"]
        rose = [name for name, count in new.items() if count > counts.get(name, 0)]
        out["unlock"][h] = float(any(counts.get(name, 0) == 0 for name in rose))
        out["repeat"][h] = float(any(counts.get(name, 0) > 0 for name in rose))
        out["health"][h] = info["inventory"]["health"] - health
        counts, health = dict(new), info["inventory"]["health"]
    out["frames"] = np.stack(frames)
    return out


def _mean(values: np.ndarray, mask: np.ndarray) -> float | None:
    return float(values[mask].mean()) if mask.any() else None


def summarize(imagined: dict[str, np.ndarray], real: dict[str, np.ndarray]) -> dict:
    """The report's numbers (module docstring) from arrays (N, H): imagined reward / continue /
    latent_mse / psnr and real reward / alive / died / unlock / repeat."""
    alive = real["alive"] > 0
    r_im, r_re = imagined["reward"], real["reward"]
    unlock, repeat = (real["unlock"] > 0) & alive, (real["repeat"] > 0) & alive & (real["unlock"] == 0)
    other = alive & ~unlock & ~repeat
    predicted = (r_im > UNLOCK_REWARD) & alive
    true_unlock = (r_re > UNLOCK_REWARD) & alive
    tp = int((predicted & true_unlock).sum())
    small = lambda r: np.where(np.abs(r) < UNLOCK_REWARD, r, 0.0)  # noqa: E731  the health part of a reward
    imagined_alive = np.cumprod(imagined["continue"], axis=1)[:, -1]
    per_h = []
    for h in range(r_im.shape[1]):
        m = alive[:, h]
        per_h.append({"h": h + 1, "starts": int(m.sum()), "imagined_reward": _mean(r_im[:, h], m),
                      "real_reward": _mean(r_re[:, h], m), "latent_mse": _mean(imagined["latent_mse"][:, h], m),
                      "psnr": _mean(imagined["psnr"][:, h], m)})
    return {
        "starts": int(r_im.shape[0]),
        "horizon": int(r_im.shape[1]),
        "imagined_return": float((r_im * alive).sum(1).mean()),
        "real_return": float((r_re * alive).sum(1).mean()),
        "imagined_unlocks": float(predicted.sum(1).mean()),
        "real_unlocks": float(true_unlock.sum(1).mean()),
        "unlock_precision": tp / int(predicted.sum()) if predicted.any() else None,
        "unlock_recall": tp / int(true_unlock.sum()) if true_unlock.any() else None,
        "imagined_reward_on_unlock": _mean(r_im, unlock),
        "imagined_reward_on_repeat": _mean(r_im, repeat),
        "imagined_reward_on_other": _mean(r_im, other),
        "unlock_steps": int(unlock.sum()),
        "repeat_steps": int(repeat.sum()),
        "imagined_health_reward": float((small(r_im) * alive).sum(1).mean()),
        "real_health_reward": float((small(r_re) * alive).sum(1).mean()),
        "real_death_rate": float(real["died"].max(1).mean()),
        "imagined_death_rate": float((1.0 - imagined_alive).mean()),
        "continue_on_death_steps": _mean(imagined["continue"], (real["died"] > 0) & alive),
        "continue_on_other_steps": _mean(imagined["continue"], (real["died"] == 0) & alive),
        "per_horizon": per_h,
    }


def _pick_starts(lengths: dict[str, int], count: int, context: int, rng: np.random.Generator):
    """`count` (episode name, t0) pairs, episodes in turn, t0 uniform with `context` frames before it."""
    names = [n for n, length in lengths.items() if length > context]
    if not names:
        raise DataError(f"no episode longer than the context of {context} frames")
    return [(names[i % len(names)], int(rng.integers(context - 1, lengths[names[i % len(names)]])))
            for i in range(count)]


@torch.no_grad()
def evaluate_imagination(checkpoint: str | Path, data: str | Path, starts: int = 64, horizon: int = 15,
                         seed: int = 0, sampling_steps: int | None = None, context: int | None = None,
                         out: str | Path | None = None, progress: bool = True, reward: str = "auto") -> dict:
    """Run the instrument (module docstring) for the agent or imagine checkpoint; returns the report,
    also written as JSON (default: <run>/eval/imagination_<bc|imagine>.json). reward: the imagined
    reward, as `imagine.reward` ("head" or "unlocks", which starts from the replayed state's unlocked
    achievements); "auto": the checkpoint's own imagine.reward (the one its policy was trained on)."""
    if starts < 1 or horizon < 1:
        raise UserError(f"--starts ({starts}) and --horizon ({horizon}) must be at least 1")
    started = time.perf_counter()
    data = Path(data)
    agent, run = load_agent(checkpoint)
    if agent.action_space.name != "crafter":
        raise UserError(f"{checkpoint}: a {agent.action_space.name} agent; the instrument replays Crafter")
    if reward == "auto":  # the reward the policy was trained on (an agent checkpoint's config says "head")
        reward = run.imagine.reward
    if reward not in ("head", "unlocks") or (reward == "unlocks" and not agent.has_unlock_head):
        raise UserError(f"--reward {reward}: expected auto, head or unlocks (unlocks needs an agent with an unlock head)")
    tokenizer, tok_cfg = load_tokenizer(run.dynamics.tokenizer_checkpoint)
    tok_context = tokenizer_context(run, tok_cfg)
    max_frames = run.agent.train.seq_len
    context = context or max(1, min(4, max_frames - 1))
    if context >= max_frames:
        raise UserError(f"--context {context} must be below the agent's training window of {max_frames} frames")
    seeds, max_steps = episode_seeds(data)
    episodes = {p.name: p for p in find_episodes(data) if p.name in seeds}
    if not episodes:
        raise DataError(f"{data}: no recorded episode named in its recording.json")
    lengths = {name: len(load_rewards(path)) for name, path in episodes.items()}
    picks = _pick_starts(lengths, starts, context, np.random.default_rng(seed))
    generator = torch.Generator().manual_seed(seed)
    # Starts visit the episodes in turn: each episode's actions and latents are computed once
    # (frames stay memory-mapped; latents are 2 KiB a frame).
    cache: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    im = {k: [] for k in ("reward", "continue", "latent_mse", "psnr")}
    re = {k: [] for k in ("reward", "alive", "died", "unlock", "repeat", "health")}
    mismatched = 0
    bar = tqdm(picks, desc="imagination vs real", unit="start", disable=None if progress else True, file=sys.stderr)
    for name, t0 in bar:
        if name not in cache:
            frames = load_frames(episodes[name])
            codes = load_actions(episodes[name])["action"].astype(np.int64)
            cache[name] = (frames, codes, encode_episode(tokenizer, frames, tok_context))
        frames, codes, latents = cache[name]
        env, replayed, _ = replay(seeds[name], codes[:t0], max_steps)
        if not np.array_equal(replayed[-1], frames[t0]):
            mismatched += 1
        ctx = torch.from_numpy(np.array(latents[t0 - context + 1: t0 + 1]))[None]
        ctx_actions = torch.from_numpy(codes[t0 - context + 1: t0 + 1])[None]  # the last one is not used
        unlocked = None
        if reward == "unlocks":  # the achievements unlocked before the start, in the recording's (sorted) order
            counts = env._player.achievements
            unlocked = torch.tensor([[float(counts[k] > 0) for k in sorted(counts)]])
        rollout = imagine(agent, ctx, ctx_actions, horizon, sampling_steps, generator=generator,
                          max_frames=max_frames, unlocked=unlocked)
        actions = rollout["imagined_actions"][0].numpy()
        real = play_actions(env, actions)
        # Encoded as `data tokenize` would encode the continued episode: only the chunk holding frame
        # t0 + 1 needs frames from before it (chunks are aligned at step 0).
        chunk = tok_context * ((t0 + 1) // tok_context)
        real_latents = encode_episode(tokenizer, np.concatenate([frames[chunk: t0 + 1], real["frames"]]),
                                      tok_context)[t0 + 1 - chunk:]
        imagined_latents = rollout["imagined_latents"][0]
        decoded = decode_latents(tokenizer, imagined_latents[None], tok_context)[0].clamp(0, 1)
        truth = torch.from_numpy(real["frames"]).permute(0, 3, 1, 2).float() / 255.0
        im["reward"].append(rollout["imagined_rewards"][0].numpy())
        im["continue"].append(rollout["continues"][0].numpy())
        im["latent_mse"].append(((imagined_latents - torch.from_numpy(real_latents)) ** 2).mean((1, 2)).numpy())
        im["psnr"].append(psnr(decoded, truth).numpy())
        for k in re:
            re[k].append(real[k])
    bar.close()
    if mismatched:
        raise DataError(f"{data}: {mismatched} of {len(picks)} replays did not show the recorded frame "
                        "(recorded with another Crafter version or not by `dreamerv4 data crafter`?)")
    report = summarize({k: np.stack(v) for k, v in im.items()}, {k: np.stack(v) for k, v in re.items()})
    label = policy_label(checkpoint)
    report.update(policy=label, checkpoint=str(checkpoint), data=str(data), context=context, seed=seed, reward=reward,
                  sampling_steps=sampling_steps, seconds=round(time.perf_counter() - started, 2))
    if out is None:
        path = Path(checkpoint)
        out = (path.parent.parent / "eval" if label in ("bc", "imagine") else path.parent) / f"imagination_{label}.json"
    out = Path(out)
    write_json_report(out, report)
    report["out"] = str(out)
    return report


def format_report(r: dict) -> str:
    """A few lines for the terminal."""
    f = lambda v, d=2: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"  # noqa: E731
    return "\n".join([
        f"{r['policy']}: {r['starts']} starts x {r['horizon']} steps: imagined return {f(r['imagined_return'])}, "
        f"real {f(r['real_return'])}",
        f"  unlocks per start imagined {f(r['imagined_unlocks'])} / real {f(r['real_unlocks'])}: precision "
        f"{f(r['unlock_precision'])}, recall {f(r['unlock_recall'])}",
        f"  imagined reward on first unlocks {f(r['imagined_reward_on_unlock'])} ({r['unlock_steps']} steps), "
        f"repeats {f(r['imagined_reward_on_repeat'])} ({r['repeat_steps']}), other {f(r['imagined_reward_on_other'], 3)}",
        f"  health reward imagined {f(r['imagined_health_reward'])} / real {f(r['real_health_reward'])}; deaths "
        f"imagined {f(r['imagined_death_rate'])} / real {f(r['real_death_rate'])}",
        "  per h: " + ", ".join(f"h{p['h']} psnr {f(p['psnr'], 1)}" for p in r["per_horizon"][:: max(1, r['horizon'] // 4)]),
    ])


def cmd_eval(args) -> int:
    report = evaluate_imagination(args.checkpoint, args.data, args.starts, args.horizon, args.seed,
                                  args.sampling_steps, args.context, args.out, reward=args.reward)
    print(format_report(report))
    print(f"  report {report['out']}")
    return 0

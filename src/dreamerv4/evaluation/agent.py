"""Evaluate a Phase 2 agent on held-out episodes: behaviour cloning and reward prediction vs baselines.

    dreamerv4 eval agent --checkpoint runs/x/agent/checkpoint.pt --data data/crafter-heldout [--out report.json]

`--data` is an episode folder (frames are encoded with the agent's frozen tokenizer exactly as `data
tokenize` does, data/latents.py) or a latent folder made by `data tokenize`. Episodes are cut into
non-overlapping windows of the agent's training seq_len (a shorter tail is dropped); each window is
read like at play time (frames at the context signal level, d_min; fixed noise seed 0), offset 0.

Actions (policy offset 0 at frame t against the recorded actions[t]), per component of the action
space (Crafter: one categorical "action"; MineRL: keys, camera, item):
  accuracy                  the mode of the policy equals the recorded value (keys: all 8 bits)
  log_likelihood            mean ln pi(recorded value) (nats per step; the total sums the components)
  majority_accuracy         always predicting the most frequent training value
  marginal_log_likelihood   the empirical marginal of the training actions (add-one smoothed), the
                            best constant predictor of the likelihood (a point mass would be -inf)
Baselines are fitted on the training split of the agent's latent folder (`baseline_source` says
which; the held-out data itself only when no training data is found).

Rewards (reward offset 0 at frame t + 1 against rewards[t], the reward for the action at t):
  mae, rmse of the decoded reward; baseline_mae: the training mean reward as a constant;
  auroc: how well the predicted reward ranks the steps with reward > 0.5 above the rest. Crafter
  gives +1 on a step with a first unlock of an achievement (once per step) and +-0.1 per health point gained or lost, so
  > 0.5 selects exactly the achievement unlocks, the rare events that matter (health changes are
  frequent and mostly follow from hunger/thirst timers). auroc_positive uses reward > 0 instead.
  AUROC is the Mann-Whitney statistic with ties counted half; null when a class is empty.
  unlock_reward (agents with an unlock head): mae and auroc of `AgentModel.step_reward` given the
  recorded unlocked achievements, the reward `imagine.reward = unlocks` pays.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from dreamerv4.data.dataset import SequenceDataset
from dreamerv4.data.episodes import find_episodes, load_frames, read_episode_info
from dreamerv4.data.latents import MANIFEST_FILE, LatentSequenceDataset, encode_episode, read_achievements
from dreamerv4.errors import DataError
from dreamerv4.models.agent import AgentModel
from dreamerv4.run_config import RunConfig
from dreamerv4.training.stages import load_agent, load_tokenizer, tokenizer_context

BATCH = 16
REWARD_EVENT = 0.5


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve of `scores` for boolean `labels` (ties count half); None if a class is empty."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i: j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def heldout_windows(data: str | Path, run: RunConfig, seq_len: int) -> list[dict[str, np.ndarray]]:
    """Non-overlapping windows {latents (T,L,C), actions (T,), rewards (T,), achievements (T,K)} of a latent
    or episode folder (K = 0 when the episodes record no achievements)."""
    data = Path(data)
    space = run.dynamics.model.action_space
    if (data / MANIFEST_FILE).is_file():
        ds = LatentSequenceDataset(data, seq_len=seq_len, stride=seq_len, split="all", action_space=space)
        episodes = [(np.asarray(np.load(i.path / "latents.npy", mmap_mode="r")), i.codes, i.rewards, i.achievements)
                    for i in ds.episodes]
    else:
        paths = find_episodes(data)
        if not paths:
            raise DataError(f"{data}: no episode folders and no {MANIFEST_FILE}")
        tokenizer, tok_cfg = load_tokenizer(run.dynamics.tokenizer_checkpoint)
        context = tokenizer_context(run, tok_cfg)
        episodes = []
        for path in paths:
            info = read_episode_info(path, space)
            if info.length >= seq_len:
                episodes.append((encode_episode(tokenizer, load_frames(path), context), info.codes, info.rewards,
                                 read_achievements(path, info.length)))
    windows = []
    for latents, codes, rewards, achievements in episodes:
        for start in range(0, len(codes) - seq_len + 1, seq_len):
            stop = start + seq_len
            windows.append({"latents": latents[start:stop], "actions": codes[start:stop], "rewards": rewards[start:stop],
                            "achievements": achievements[start:stop]})
    if not windows:
        raise DataError(f"{data}: no episode of at least {seq_len} steps")
    if len({w["achievements"].shape[1] for w in windows}) > 1:
        raise DataError(f"{data}: episodes record different numbers of achievements; re-record them with one tool")
    return windows


def training_codes_and_rewards(run: RunConfig) -> tuple[np.ndarray, np.ndarray, str] | None:
    """Actions and rewards of the agent's training split (latent folder, else the episode folder)."""
    split = dict(val_fraction=run.data.val_fraction, split_seed=run.data.split_seed,
                 action_space=run.dynamics.model.action_space)
    for root, make in ((run.agent.latents or run.dynamics.latents, LatentSequenceDataset), (run.data.path, SequenceDataset)):
        try:
            ds = make(root, seq_len=1, stride=1, split="train", **split)
        except DataError:
            continue
        return (np.concatenate([i.codes for i in ds.episodes]), np.concatenate([i.rewards for i in ds.episodes]),
                f"{root} (train split)")
    return None


def component_values(space, codes: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in space.unpack(np.asarray(codes, dtype=np.int64)).items()}


def baseline_scores(space, train_codes: np.ndarray, codes: np.ndarray) -> dict[str, dict[str, float]]:
    """Majority-class accuracy and add-one-smoothed marginal log-likelihood per component."""
    fit, test = component_values(space, train_codes), component_values(space, codes)
    out = {}
    for c in space.components:
        if c.kind == "bernoulli":
            bits_fit = (fit[c.name][:, None] >> np.arange(c.num_logits)) & 1
            bits_test = (test[c.name][:, None] >> np.arange(c.num_logits)) & 1
            p = (bits_fit.sum(0) + 1.0) / (len(bits_fit) + 2.0)
            majority = (p > 0.5).astype(np.int64)
            accuracy = float((bits_test == majority).all(1).mean())
            ll = float((bits_test * np.log(p) + (1 - bits_test) * np.log(1 - p)).sum(1).mean())
        else:
            counts = np.bincount(fit[c.name], minlength=c.num_logits).astype(np.float64)
            p = (counts + 1.0) / (counts.sum() + c.num_logits)
            accuracy = float((test[c.name] == int(counts.argmax())).mean())
            ll = float(np.log(p[test[c.name]]).mean())
        out[c.name] = {"majority_accuracy": accuracy, "marginal_log_likelihood": ll}
    return out


@torch.no_grad()
def predict(agent: AgentModel, windows: list[dict], seed: int = 0) -> dict[str, np.ndarray]:
    """Offset-0 policy log-probs and modes per component at every step, and decoded rewards for the
    steps with a next frame in the window (module docstring)."""
    space = agent.action_space
    generator = torch.Generator().manual_seed(seed)
    logp = {c.name: [] for c in space.components}
    mode_ok = {c.name: [] for c in space.components}
    reward_pred, reward_true, unlock_pred = [], [], []
    use_unlocks = agent.has_unlock_head and windows[0]["achievements"].shape[-1] == agent.cfg.num_achievements
    for i in range(0, len(windows), BATCH):
        chunk = windows[i: i + BATCH]
        latents = torch.from_numpy(np.stack([w["latents"] for w in chunk])).float()
        actions = torch.from_numpy(np.stack([w["actions"] for w in chunk])).long()
        rewards = np.stack([w["rewards"] for w in chunk])
        noise = torch.randn(latents.shape, generator=generator)
        out = agent(latents, actions, noise=noise)
        for name, value in space.component_log_probs(out["policy_logits"], actions).items():
            logp[name].append(value.flatten().numpy())
        predicted, recorded = space.unpack(space.mode(out["policy_logits"])), space.unpack(actions)
        for name in mode_ok:
            mode_ok[name].append((predicted[name] == recorded[name]).flatten().numpy())
        reward_pred.append(agent.two_hot.decode(out["reward_logits"][:, 1:]).flatten().numpy())
        reward_true.append(rewards[:, :-1].reshape(-1))
        if use_unlocks:  # what imagine.reward = unlocks pays, given the recorded unlocked achievements
            before = torch.from_numpy(np.stack([w["achievements"] for w in chunk])[:, :-1]).float()
            unlock_pred.append(agent.step_reward(out["agent_hidden"][:, 1:].float(), before)[0].flatten().numpy())
    cat = lambda d: {k: np.concatenate(v) for k, v in d.items()}  # noqa: E731
    result = {"log_prob": cat(logp), "correct": cat(mode_ok), "reward_pred": np.concatenate(reward_pred),
              "reward_true": np.concatenate(reward_true)}
    if use_unlocks:
        result["unlock_reward_pred"] = np.concatenate(unlock_pred)
    return result


def evaluate_agent(checkpoint: str | Path, data: str | Path, out: str | Path | None = None) -> dict:
    """Score the agent of `checkpoint` on `data` (module docstring); writes JSON to `out` (default
    eval.json next to the checkpoint) and returns the report."""
    started = time.perf_counter()
    agent, run = load_agent(checkpoint)
    seq_len = run.agent.train.seq_len
    windows = heldout_windows(data, run, seq_len)
    codes = np.concatenate([w["actions"] for w in windows])
    fitted = training_codes_and_rewards(run)
    if fitted is None:
        train_codes, train_rewards, source = codes, np.concatenate([w["rewards"] for w in windows]), f"{data} (held-out data itself)"
    else:
        train_codes, train_rewards, source = fitted
    pred = predict(agent, windows)
    space = agent.action_space
    baselines = baseline_scores(space, train_codes, codes)
    components = {}
    for c in space.components:
        components[c.name] = {"accuracy": float(pred["correct"][c.name].mean()),
                              "log_likelihood": float(pred["log_prob"][c.name].mean()), **baselines[c.name]}
    total_ll = float(sum(pred["log_prob"].values()).mean())
    r_pred, r_true = pred["reward_pred"], pred["reward_true"]
    report = {
        "checkpoint": str(checkpoint),
        "data": str(data),
        "windows": len(windows),
        "seq_len": seq_len,
        "steps": int(len(codes)),
        "baseline_source": source,
        "action": {
            "components": components,
            "log_likelihood": total_ll,
            "marginal_log_likelihood": float(sum(b["marginal_log_likelihood"] for b in baselines.values())),
            "accuracy": float(np.logical_and.reduce([pred["correct"][c.name] for c in space.components]).mean()),
        },
        "reward": {
            "steps": int(len(r_true)),
            "mae": float(np.abs(r_pred - r_true).mean()),
            "rmse": float(np.sqrt(((r_pred - r_true) ** 2).mean())),
            "baseline_mae": float(np.abs(float(train_rewards.mean()) - r_true).mean()),
            "event_threshold": REWARD_EVENT,
            "events": int((r_true > REWARD_EVENT).sum()),
            "auroc": auroc(r_pred, r_true > REWARD_EVENT),
            "positive_steps": int((r_true > 0).sum()),
            "auroc_positive": auroc(r_pred, r_true > 0),
        },
        **({"unlock_reward": {  # the unlock head's reward given the recorded unlocked achievements
            "mae": float(np.abs(pred["unlock_reward_pred"] - r_true).mean()),
            "auroc": auroc(pred["unlock_reward_pred"], r_true > REWARD_EVENT),
        }} if "unlock_reward_pred" in pred else {}),
        "seconds": round(time.perf_counter() - started, 2),
    }
    out = Path(out) if out is not None else Path(checkpoint).with_name("eval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_finite(report), indent=2))
    return report


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def cmd_eval(args) -> int:
    r = evaluate_agent(args.checkpoint, args.data, args.out)
    a, w = r["action"], r["reward"]
    print(f"{r['steps']} steps in {r['windows']} windows of {r['seq_len']}; baselines from {r['baseline_source']}")
    for name, c in a["components"].items():
        print(f"  {name}: accuracy {c['accuracy']:.3f} (majority {c['majority_accuracy']:.3f}), log-likelihood "
              f"{c['log_likelihood']:.3f} (marginal {c['marginal_log_likelihood']:.3f})")
    auc = "n/a" if w["auroc"] is None else f"{w['auroc']:.3f}"
    print(f"  reward: mae {w['mae']:.4f} (constant mean {w['baseline_mae']:.4f}), AUROC of {w['events']} "
          f"reward > {REWARD_EVENT} steps {auc}")
    if "unlock_reward" in r:
        u = r["unlock_reward"]
        print(f"  unlock head's reward: mae {u['mae']:.4f}, AUROC " + ("n/a" if u["auroc"] is None else f"{u['auroc']:.3f}"))
    return 0

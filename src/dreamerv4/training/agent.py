"""Phase 2 training: agent tokens and policy / reward / value heads on the dynamics model (behaviour cloning).

    dreamerv4 train agent --config configs/crafter-small.yaml [--resume] [key=value ...]

Starts from the finished dynamics checkpoint `agent.dynamics_checkpoint` (default
`<out_dir>/dynamics/checkpoint.pt`; the model is rebuilt from the config stored inside it) and reads
the latent folder `agent.latents` (default: the dynamics stage's, `dynamics.latents` or
`<out_dir>/latents`, which must come from the tokenizer the dynamics model was trained on), windows
of `agent.train.seq_len` steps of its training split. The whole model trains (paper: the
transformer is finetuned with the heads). Writes `<out_dir>/agent/`: checkpoint.pt (the AgentModel:
dynamics + agent tokens + heads), config.yaml (its `dynamics` section is the one of the dynamics run
it started from, paths resolved), metrics.jsonl, tb/.

Loss per batch (models/agent.py has the target alignment), each term divided by a running RMS of
itself (training/loss_norm.py) so that no term wins by scale, then weighted (agent.model.*_weight):
- video: `shortcut_forcing_loss` on the same windows (Phase 1B's objective stays on, as in the paper).
  It runs on the bare DynamicsModel: agent tokens never change the world model's predictions
  (tested), so this equals the loss with agent tokens present, without their cost.
- bc: negative log-likelihood of the recorded actions actions[t+n] under the factorized policy of
  offset n (`ActionSpace.log_prob`), mean over all valid (window, frame, offset) entries.
- reward: two-hot cross-entropy of rewards[t+n-1] under the reward head of offset n, same mean.
- value: two-hot cross-entropy of the behaviour policy's discounted return-to-go in the recorded
  episode, sum_k gamma^k rewards[t+k] (gamma = agent.model.value_gamma; Monte Carlo, truncated at
  the recording's end), a starting point for Phase 3's critic (value_weight 0 switches it off).
- continue: binary cross-entropy of the continuation logit at frame t against 1 - terminals[t] (the
  recorded deaths; models/agent.py ALIGNMENT), Phase 3's c_t (continue_weight 0 switches it off).
- unlock (only with agent.model.num_achievements > 0): binary cross-entropy per achievement of "the
  action before frame t unlocked k", summed over the achievements not yet unlocked and averaged over
  steps, plus the squared error of the other reward (`unlock_targets`); Phase 3's `imagine.reward =
  unlocks` pays from it.
Which frames the agent reads: its own pass over the window with every frame noised to the context
signal level with d_min (tau = dynamics.model.context_signal, e.g. 58/64), the exact input it gets
at play time (`AgentRollout.observe`) and in imagination. Reading the video loss's pass instead
would show the heads frames at random tau down to pure noise, which play never produces.

Logged: loss; video_loss (+ flow/bootstrap parts), bc_nll, reward_nll, value_nll, continue_nll, unlock_nll (unnormalized);
bc_nll_0 and action_acc_0 (offset 0, the action taken now); reward_mae_0; and every
`train.eval_every` steps the same offset-0 numbers on fixed validation windows (val_*).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dreamerv4.config import load_config, to_dict
from dreamerv4.data.dataset import collate_windows
from dreamerv4.data.latents import LatentSequenceDataset
from dreamerv4.errors import ConfigError, UserError
from dreamerv4.models.agent import AgentModel, mtp_targets
from dreamerv4.run_config import RunConfig
from dreamerv4.training.dynamics import validation_batches, validation_windows
from dreamerv4.training.loop import TrainSummary, train
from dreamerv4.training.loss_norm import RunningRMS
from dreamerv4.training.runtime import resolve_device
from dreamerv4.training.shortcut import shortcut_forcing_loss
from dreamerv4.training.stages import load_dynamics, resolve_agent_paths, tokenizer_identity


def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """(T,) -> (T,) float32 return-to-go sum_k gamma^k rewards[t + k] to the end of the array."""
    out = np.empty(len(rewards), dtype=np.float64)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = float(rewards[t]) + gamma * running
        out[t] = running
    return out.astype(np.float32)


class WithReturns(Dataset):
    """A LatentSequenceDataset whose items also hold "returns" (seq_len,): the discounted return-to-go
    of every step in its recorded episode (the value target)."""

    def __init__(self, data: LatentSequenceDataset, gamma: float):
        self.data = data
        self.returns = [discounted_returns(info.rewards, gamma) for info in data.episodes]
        self._episode = {name: i for i, name in enumerate(data.episode_names)}

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = dict(self.data[index])
        name, start = self.data.window(index)
        item["returns"] = torch.from_numpy(self.returns[self._episode[name]][start: start + self.data.seq_len].copy())
        return item


def unlock_targets(achievements: torch.Tensor, rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Targets of the unlock head at frames 1..T-1 (models/agent.py ALIGNMENT) from achievements (B,T,K)
    (unlocked before each frame) and rewards (B,T): {"unlocked" (B,T-1,K) 1 where the action before
    frame t unlocked k, "valid" (B,T-1,K) where k was not unlocked before it, "other" (B,T-1) the rest of
    that action's reward}. Crafter pays +1 once for a step with any new unlock (two at once still pay 1)."""
    before, after = achievements[:, :-1].float(), achievements[:, 1:].float()
    unlocked = (after - before).clamp_min(0.0)
    any_unlock = (unlocked.sum(-1) > 0).float()
    return {"unlocked": unlocked, "valid": 1.0 - before, "other": rewards[:, :-1].float() - any_unlock}


def agent_losses(model: AgentModel, out: dict, actions: torch.Tensor, rewards: torch.Tensor,
                 returns: torch.Tensor | None = None, terminals: torch.Tensor | None = None,
                 achievements: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The heads' terms of a window (unnormalized; module docstring) plus offset-0 diagnostics."""
    targets = mtp_targets(actions, rewards, model.cfg.mtp_length)
    action_valid, reward_valid = targets["action_valid"].float(), targets["reward_valid"].float()
    logp = model.action_space.log_prob(out["policy_logits_mtp"], targets["actions"])  # (B,T,L)
    reward_nll = model.two_hot.loss(out["reward_logits_mtp"], targets["rewards"])
    losses = {
        "bc_nll": -(logp * action_valid).sum() / action_valid.sum().clamp_min(1.0),
        "reward_nll": (reward_nll * reward_valid).sum() / reward_valid.sum().clamp_min(1.0),
    }
    with torch.no_grad():
        mode = model.action_space.mode(out["policy_logits"])
        losses["bc_nll_0"] = -logp[:, :, 0].mean()
        losses["action_acc_0"] = (mode == actions).float().mean()
        predicted = model.two_hot.decode(out["reward_logits"][:, 1:])  # frame t+1 offset 0: rewards[t]
        losses["reward_mae_0"] = (predicted - rewards[:, :-1].float()).abs().mean() if actions.shape[1] > 1 \
            else torch.zeros(())
    if returns is not None:
        losses["value_nll"] = model.two_hot.loss(out["value_logits"], returns).mean()
    if terminals is not None:
        losses["continue_nll"] = F.binary_cross_entropy_with_logits(out["continue_logits"], 1.0 - terminals.float())
        with torch.no_grad():
            losses["death_frac"] = terminals.float().mean()
    if achievements is not None and model.has_unlock_head:
        if achievements.shape[-1] != model.cfg.num_achievements:
            raise ConfigError(f"the data records {achievements.shape[-1]} achievements, but "
                              f"agent.model.num_achievements is {model.cfg.num_achievements}")
        target = unlock_targets(achievements, rewards)
        nll = F.binary_cross_entropy_with_logits(out["unlock_logits"][:, 1:], target["unlocked"], reduction="none")
        valid = target["valid"]
        # summed over achievements, averaged over steps: each step's unlock is one event to predict
        losses["unlock_nll"] = (nll * valid).sum() / valid[..., 0].numel() \
            + (out["other_reward"][:, 1:] - target["other"]).square().mean()
        with torch.no_grad():
            losses["unlock_frac"] = target["unlocked"].sum(-1).mean()
    return losses


def train_agent(cfg: RunConfig, resume: bool = False) -> TrainSummary:
    """Train cfg.agent from the dynamics checkpoint into <cfg.out_dir>/agent (module docstring)."""
    cfg = resolve_agent_paths(cfg)
    stage = cfg.agent
    if stage.train.seq_len < 2:
        raise ConfigError(f"agent.train.seq_len must be >= 2, got {stage.train.seq_len}")
    dynamics, dyn_run = load_dynamics(stage.dynamics_checkpoint, require_done=True)
    identity = tokenizer_identity(stage.dynamics_checkpoint)
    if dyn_run.dynamics.model.action_space != cfg.data.action_space:
        raise ConfigError(f"{stage.dynamics_checkpoint}: a {dyn_run.dynamics.model.action_space} model, but "
                          f"data.action_space is {cfg.data.action_space!r}")
    cfg = dataclasses.replace(cfg, dynamics=dyn_run.dynamics)  # the agent run records what it started from
    split = dict(stride=cfg.data.stride, val_fraction=cfg.data.val_fraction, split_seed=cfg.data.split_seed,
                 action_space=cfg.data.action_space)
    latents = LatentSequenceDataset(stage.latents, seq_len=stage.train.seq_len, split="train", **split)
    fingerprint = latents.manifest["tokenizer"]["fingerprint"]
    if identity.get("fingerprint") and identity["fingerprint"] != fingerprint:
        raise UserError(f"{stage.latents}: made by another tokenizer ({fingerprint[:12]}) than the dynamics model "
                        f"{stage.dynamics_checkpoint} was trained on ({identity['fingerprint'][:12]}); set agent.latents")
    data = WithReturns(latents, stage.model.value_gamma)
    torch.manual_seed(stage.train.seed)
    model = AgentModel(dynamics, stage.model)
    weights = stage.model
    norms = {name: RunningRMS() for name in ("video", "bc", "reward", "value", "continue")}
    if stage.model.num_achievements:
        if latents.num_achievements != stage.model.num_achievements:
            raise ConfigError(f"{stage.latents}: the episodes record {latents.num_achievements} achievements, but "
                              f"agent.model.num_achievements is {stage.model.num_achievements} (0: no unlock head)")
        norms["unlock"] = RunningRMS()
    device = resolve_device(stage.train)

    def loss_fn(model: AgentModel, batch: dict) -> tuple[torch.Tensor, dict]:
        latents_, actions, rewards = batch["latents"], batch["actions"], batch["rewards"]
        video, video_metrics = shortcut_forcing_loss(model.dynamics, latents_, actions)
        out = model(latents_, actions)
        losses = agent_losses(model, out, actions, rewards, batch["returns"] if weights.value_weight > 0 else None,
                              batch["terminals"] if weights.continue_weight > 0 else None,
                              batch["achievements"] if weights.num_achievements else None)
        loss = weights.video_weight * norms["video"](video) + weights.bc_weight * norms["bc"](losses["bc_nll"]) \
            + weights.reward_weight * norms["reward"](losses["reward_nll"])
        if weights.value_weight > 0:
            loss = loss + weights.value_weight * norms["value"](losses["value_nll"])
        if weights.continue_weight > 0:
            loss = loss + weights.continue_weight * norms["continue"](losses["continue_nll"])
        if weights.num_achievements:
            loss = loss + weights.unlock_weight * norms["unlock"](losses["unlock_nll"])
        metrics = {k: v.detach() for k, v in losses.items()}
        metrics.update(video_loss=video.detach(), flow_loss=video_metrics["flow_loss"],
                       bootstrap_loss=video_metrics["bootstrap_loss"], x_mse=video_metrics["x_mse"])
        return loss, metrics

    eval_fn = None
    val = validation_windows(stage.latents, stage.train.seq_len, stage.train.eval_every, **split)
    if val is not None:
        val_batches = validation_batches(val)

        def eval_fn(model: AgentModel) -> dict:
            sums: dict[str, float] = {}
            count = 0
            for batch in val_batches:
                b = {k: v.to(device) for k, v in batch.items()}
                out = model(b["latents"], b["actions"], noise=b["noise"])
                losses = agent_losses(model, out, b["actions"], b["rewards"],
                                      achievements=b["achievements"] if weights.num_achievements else None)
                n = b["actions"].shape[0]
                for k in ("bc_nll_0", "action_acc_0", "reward_mae_0", "bc_nll", "reward_nll", "unlock_nll"):
                    if k in losses:
                        sums[k] = sums.get(k, 0.0) + float(losses[k]) * n
                count += n
            return {f"val_{k}": v / count for k, v in sums.items()}

    return train(
        model, data, loss_fn, stage.train, Path(cfg.out_dir) / "agent", resume=resume, config_dict=to_dict(cfg),
        extra_state=norms, eval_fn=eval_fn, frames_per_sample=stage.train.seq_len,
        num_workers=cfg.data.num_workers, collate_fn=collate_windows,
    )


def cmd_train(args) -> int:
    cfg = load_config(RunConfig, args.config, args.overrides)
    summary = train_agent(cfg, resume=args.resume)
    print(summary)
    return 0

"""Phase 3: reinforcement learning in imagination, PMPO + TD(lambda) (DreamerV4 section 3.3;
docs/design.md, Models).

    dreamerv4 train imagine --config configs/crafter-small.yaml [--resume] [key=value ...]

Starts from the behaviour-cloning agent `imagine.agent_checkpoint` (default
`<out_dir>/agent/checkpoint.pt`; the AgentModel is rebuilt from the run config inside it) and takes
contexts of `imagine.train.seq_len` real frames from the latent folder `imagine.latents` (default: the
one the agent was trained on). Each step:
1. `imagine` (no grad): the frozen world model observes the context (KVCache), then for H =
   `imagine.horizon` steps the policy samples a_t at the latest frame s_t, the model generates s_{t+1}
   in K = `imagine.sampling_steps` shortcut steps and observes it. Per models/agent.py's ALIGNMENT
   the reward for a_t is read at s_{t+1}: r_t = reward(h_{t+1}); v_t = value(h_t), t = 0..H. With
   imagine.reward = unlocks, r_t = other(h_{t+1}) + 1 - prod_k (1 - P_k(h_{t+1}) (1 - u_k)): the unlock head's
   achievements pay only while not yet unlocked, u starting from the context's recorded achievements
   and accumulating P_k along the rollout (Crafter pays only first unlocks, which the screen does not show).
   The transformer never sees more than `imagine.max_context` frames at once (default
   agent.train.seq_len, the windows the agent was trained on): a full context restarts from its last
   half, exactly as the real-game policy of `dreamerv4 eval crafter` does. Continuation
   c_t = sigmoid(continuation(h_t)), the agent's head trained on the recorded deaths (Eq. 10; exactly
   1 when agent.model.continue_weight is 0).
2. `lambda_returns` with gamma, lam and c_t, bootstrapped from v_H; advantages A_t = R_t - v_t (t < H);
   with imagine.center_advantages minus their batch mean (so both PMPO sets fill when the critic is off).
3. `pmpo_loss` on ln pi(a_t | s_t) with the reverse KL(pi || prior) to a frozen copy of the BC policy
   head (alpha, beta), plus value_weight x two-hot cross-entropy of value(h_t) against sg(R_t). Steps
   after an imagined death (alive_t = prod_{k<t} c_k below 0.5) count in neither loss.
   With imagine.fresh_value the value head starts from zero (the paper's critic learns in imagination
   only) instead of the BC agent's head, which was fitted to the recording policy's Monte Carlo returns.
Only the policy and value heads train (their inputs are the detached agent readouts); the
transformer, the world model, the agent tokens and the reward head are frozen. The checkpoint's model
is the whole AgentModel (so `load_agent` and `dreamerv4 eval crafter` read it like an agent
checkpoint); the prior head is extra state. The run config saved with it has the agent run's
`dynamics` and `agent` sections (what it started from).

Writes `<out_dir>/imagine/`: checkpoint.pt, config.yaml, metrics.jsonl, tb/. Logged: imagined_return
(mean R_t), imagined_reward (mean sum of r_t over the horizon), adv_mean (before centring), adv_pos_frac (|D+|/N) and
adv_neg_frac, kl_prior, value_error (mean |v_t - R_t|), policy_loss, value_loss, entropy,
continue_mean (mean c_t) and alive_frac (share of steps that count), reward_spread (with
imagine.disagreement: mean sum over the horizon of |r_a - r_b| between two samples of each frame); with
`imagine.eval_episodes` > 0 and `train.eval_every` > 0, crafter_return and crafter_score of that many
real-game episodes every eval_every steps, played as `dreamerv4 eval crafter` plays them but from
`imagine.eval_seed` (default 200000, apart from eval crafter's 100000 so monitoring never tunes on it).

Cost: almost all of an update is the rollout's one-frame transformer passes, about H x (K + 1);
measured seconds per update are in docs/results.md.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn

from dreamerv4.config import load_config, to_dict
from dreamerv4.data.crafter_record import crafter_score
from dreamerv4.data.dataset import collate_windows
from dreamerv4.data.latents import LatentSequenceDataset
from dreamerv4.errors import ConfigError
from dreamerv4.models.agent import AgentModel, AgentRollout
from dreamerv4.models.dynamics import NO_ACTION, previous_actions
from dreamerv4.models.policy import AgentPolicy, play_episodes, policy_seed
from dreamerv4.run_config import ImagineStage, RunConfig
from dreamerv4.training.loop import TrainSummary, train
from dreamerv4.training.returns import lambda_returns, pmpo_loss, value_loss
from dreamerv4.training.stages import load_agent, load_tokenizer, resolve_agent_paths, tokenizer_context


class PriorPolicy(nn.Module):
    """A frozen copy of the agent's policy head: the PMPO prior (the behaviour-cloning policy)."""

    def __init__(self, agent: AgentModel):
        super().__init__()
        self.head = copy.deepcopy(agent.policy_head).requires_grad_(False)
        self.shape = (agent.cfg.mtp_length, agent.action_space.num_logits)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., width) -> offset-0 policy logits (..., num_logits) float32, like AgentModel.policy."""
        return self.head(hidden).float().unflatten(-1, self.shape)[..., 0, :]


def freeze_for_imagination(agent: AgentModel) -> list[str]:
    """Freeze everything except the policy and value heads; returns the names of the trainable parameters."""
    agent.requires_grad_(False)
    agent.policy_head.requires_grad_(True)
    agent.value_head.requires_grad_(True)
    return [name for name, p in agent.named_parameters() if p.requires_grad]


def reset_value_head(agent: AgentModel) -> None:
    """Start the critic from scratch: a fresh value head (zero output layer: every value reads 0)."""
    agent.value_head.reset_parameters()


@torch.no_grad()
def imagine(
    agent: AgentModel,
    context_latents: torch.Tensor,
    context_actions: torch.Tensor,
    horizon: int,
    steps: int | None = None,
    gamma: float = 0.997,
    lam: float = 0.95,
    generator: torch.Generator | None = None,
    max_frames: int | None = None,
    unlocked: torch.Tensor | None = None,
    disagreement: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Roll the frozen world model forward from real contexts with actions from the agent's policy.

    context_latents (B,C,16,32) clean and context_actions (B,C) dataset-aligned codes (a window of
    the latent dataset; the last context action is not used: the policy acts at the last frame).
    Returns a dict, all float32 / int64 and detached:
      imagined_latents (B,H,L,C)  s_1..s_H, the frames the actions led to
      imagined_actions (B,H)      a_t sampled from the policy at s_t (s_0 the last context frame)
      imagined_rewards (B,H)      r_t, the reward for a_t (read at s_{t+1})
      returns, advantages (B,H)   R_t (lambda-returns) and R_t - v_t
      continues (B,H)             c_t, the probability that the episode goes on after a_t
      alive (B,H)                 prod_{k<t} c_k, the probability that s_t is reached alive
    plus values (B,H+1) v(s_0..s_H) and agent_hidden (B,H+1,width), the agent readouts of s_0..s_H
    (inputs for the heads' losses). All noise and action draws come from `generator` (or the global RNG).
    max_frames: the most frames the transformer sees in one sequence (None: no cap), e.g. the window
    length it was trained on. When the context holds max_frames frames, a fresh rollout observes the
    last max_frames // 2 frames again (the first with no previous action), exactly as the real-game
    policy (models/policy.py AgentPolicy) caps its context; requires C < max_frames.
    unlocked (B,K): the achievements unlocked before s_0 (None: rewards from the reward head). Given, the
    reward is the unlock head's `step_reward`, which pays an achievement only while it is not yet
    unlocked; unlocked_k accumulates P_k along the rollout (also returned, (B,K), after s_H).
    disagreement > 0: a pessimistic reward. Each s_{t+1} is sampled a second time (other noise, not added
    to the context) and r_t = mean(r_a, r_b) - disagreement x |r_a - r_b| of the rewards the two samples'
    readouts predict (0.5: their minimum); `reward_spread` (B,H) returns |r_a - r_b|. It doubles the cost.
    """
    b, c = context_latents.shape[:2]
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if c < 1 or tuple(context_actions.shape) != (b, c):
        raise ValueError(f"need >= 1 context frame and actions (B, C) matching latents {tuple(context_latents.shape)}, "
                         f"got {tuple(context_actions.shape)}")
    if max_frames is not None and (max_frames < 2 or max_frames <= c):
        raise ValueError(f"max_frames must be >= 2 and above the context length {c}, got {max_frames}")
    space = agent.action_space
    rollout = AgentRollout(agent, generator=generator, steps=steps)
    prev = previous_actions(context_actions)
    hidden = rollout.observe(context_latents, prev)
    frames, prevs = list(context_latents.float().unbind(1)), list(prev.unbind(1))  # what the context holds
    hiddens, latents, actions, alt_hiddens = [hidden], [], [], []
    for _ in range(horizon):
        action = space.sample(agent.policy(hidden), generator=generator)
        if max_frames is not None and rollout.num_frames >= max_frames:
            keep = max_frames // 2
            rollout = AgentRollout(agent, generator=generator, steps=steps)
            restart_prev = torch.stack(prevs[-keep:], dim=1).clone()
            restart_prev[:, 0] = NO_ACTION
            rollout.observe(torch.stack(frames[-keep:], dim=1), restart_prev)
        if disagreement > 0:  # a second sample of the next frame, read out but not added to the context
            alt_hiddens.append(rollout.peek(rollout.imagine(action)[:, None], action[:, None]))
        frame, hidden = rollout.imagine_step(action)
        frames.append(frame)
        prevs.append(action)
        hiddens.append(hidden)
        latents.append(frame)
        actions.append(action)
    agent_hidden = torch.stack(hiddens, dim=1).float()
    extra = {}
    rewards, progress = rollout_rewards(agent, agent_hidden[:, 1:], unlocked)
    if progress is not None:
        extra["unlocked"] = progress
    if disagreement > 0:
        alt_rewards, _ = rollout_rewards(agent, torch.stack(alt_hiddens, dim=1).float(), unlocked)
        spread = (rewards - alt_rewards).abs()
        rewards = 0.5 * (rewards + alt_rewards) - disagreement * spread
        extra["reward_spread"] = spread
    values = agent.two_hot.decode(agent.value(agent_hidden))
    continues = agent.continue_prob(agent_hidden[:, :-1])
    alive = torch.cumprod(torch.cat((torch.ones_like(continues[:, :1]), continues[:, :-1]), dim=1), dim=1)
    returns = lambda_returns(rewards, values, continues, gamma=gamma, lam=lam)
    return {
        "imagined_latents": torch.stack(latents, dim=1).float(),
        "imagined_actions": torch.stack(actions, dim=1),
        "imagined_rewards": rewards,
        "advantages": returns - values[:, :-1],
        "returns": returns,
        "continues": continues,
        "alive": alive,
        "values": values,
        "agent_hidden": agent_hidden,
        **extra,
    }


def rollout_rewards(
    agent: AgentModel, hidden: torch.Tensor, unlocked: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """r_t (B,H) from the readouts (B,H,width) of s_1..s_H: the reward head's when `unlocked` is None, else
    the unlock head's `step_reward` from the achievements unlocked before s_1 (B,K), which it also returns
    as accumulated after s_H (None with the reward head)."""
    if unlocked is None:
        return agent.two_hot.decode(agent.reward(hidden)), None
    step_rewards, progress = [], unlocked.float()
    for t in range(hidden.shape[1]):
        reward, progress = agent.step_reward(hidden[:, t], progress)
        step_rewards.append(reward)
    return torch.stack(step_rewards, dim=1), progress


def imagination_loss(
    agent: AgentModel, prior: PriorPolicy, rollout: dict[str, torch.Tensor], stage: ImagineStage
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PMPO + value loss on an `imagine` output (module docstring); gradients reach only the heads."""
    hidden = rollout["agent_hidden"][:, :-1].detach()  # s_0..s_{H-1}: where actions were taken
    logits = agent.policy(hidden)
    space = agent.action_space
    log_probs = space.log_prob(logits, rollout["imagined_actions"])
    with torch.no_grad():
        prior_logits = prior(hidden)
    kl = space.kl(logits, prior_logits)
    alive = rollout["alive"] >= 0.5
    advantages = rollout["advantages"]
    if stage.center_advantages and alive.any():
        # a critic that reads low (or high) everywhere puts every sample in one PMPO set; centring keeps
        # the sign's meaning "better than this batch's average" (a deviation from Eq. 11, docs/design.md)
        advantages = advantages - advantages[alive].mean()
    policy_loss, stats = pmpo_loss(log_probs, advantages, kl, alpha=stage.alpha, beta=stage.beta, mask=alive)
    value_logits = agent.value(hidden)
    v_loss = value_loss(value_logits, rollout["returns"], agent.two_hot, mask=alive)
    loss = policy_loss + stage.value_weight * v_loss
    with torch.no_grad():
        metrics = {
            "imagined_return": rollout["returns"].mean(),
            "imagined_reward": rollout["imagined_rewards"].sum(1).mean(),
            "adv_pos_frac": stats["pos_frac"],
            "adv_mean": rollout["advantages"][alive].mean() if alive.any() else torch.zeros(()),
            "adv_neg_frac": stats["neg_frac"],
            "kl_prior": stats["kl"],
            "value_error": (rollout["values"][:, :-1] - rollout["returns"]).abs().mean(),
            "policy_loss": policy_loss.detach(),
            "value_loss": v_loss.detach(),
            "entropy": space.entropy(logits).mean(),
            "continue_mean": rollout["continues"].mean(),
            "alive_frac": alive.float().mean(),
        }
        if "reward_spread" in rollout:
            metrics["reward_spread"] = rollout["reward_spread"].sum(1).mean()
    return loss, metrics


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """cfg with imagine.agent_checkpoint filled in when empty (<out_dir>/agent/checkpoint.pt)."""
    default = str(Path(cfg.out_dir) / "agent" / "checkpoint.pt")
    stage = dataclasses.replace(cfg.imagine, agent_checkpoint=cfg.imagine.agent_checkpoint or default)
    return dataclasses.replace(cfg, imagine=stage)


def train_imagine(cfg: RunConfig, resume: bool = False) -> TrainSummary:
    """Train cfg.imagine from the agent checkpoint into <cfg.out_dir>/imagine (module docstring)."""
    cfg = resolve_paths(cfg)
    stage = cfg.imagine
    agent, agent_run = load_agent(stage.agent_checkpoint, require_done=True)
    if agent.action_space.name != cfg.data.action_space:
        raise ConfigError(f"{stage.agent_checkpoint}: a {agent.action_space.name} agent, but data.action_space is "
                          f"{cfg.data.action_space!r}")
    agent_run = resolve_agent_paths(agent_run)
    latents_path = stage.latents or agent_run.agent.latents
    cfg = dataclasses.replace(cfg, dynamics=agent_run.dynamics, agent=agent_run.agent,
                              imagine=dataclasses.replace(stage, latents=latents_path))
    data = LatentSequenceDataset(latents_path, seq_len=stage.train.seq_len, stride=cfg.data.stride, split="train",
                                 val_fraction=cfg.data.val_fraction, split_seed=cfg.data.split_seed,
                                 action_space=cfg.data.action_space)
    max_frames = stage.max_context or agent_run.agent.train.seq_len
    if stage.train.seq_len >= max_frames:
        raise ConfigError(f"imagine.train.seq_len ({stage.train.seq_len}, the real context) must be below "
                          f"imagine.max_context ({max_frames}; 0 means agent.train.seq_len)")
    if stage.reward == "unlocks" and (not agent.has_unlock_head or data.num_achievements != agent.cfg.num_achievements):
        raise ConfigError(f"imagine.reward = unlocks needs an agent with an unlock head (agent.model.num_achievements, "
                          f"here {agent.cfg.num_achievements}) and latents that record as many achievements "
                          f"({latents_path}: {data.num_achievements})")
    if stage.fresh_value:
        reset_value_head(agent)
    freeze_for_imagination(agent)
    prior = PriorPolicy(agent)
    torch.manual_seed(stage.train.seed)

    def loss_fn(model: AgentModel, batch: dict) -> tuple[torch.Tensor, dict]:
        unlocked = batch["achievements"][:, -1] if stage.reward == "unlocks" else None  # before s_0
        rollout = imagine(model, batch["latents"], batch["actions"], stage.horizon, stage.sampling_steps,
                          gamma=stage.gamma, lam=stage.lam, max_frames=max_frames, unlocked=unlocked,
                          disagreement=stage.disagreement)
        return imagination_loss(model, prior, rollout, stage)

    eval_fn = None
    if stage.eval_episodes > 0 and stage.train.eval_every > 0:
        eval_fn = _crafter_eval_fn(cfg)

    return train(
        agent, data, loss_fn, stage.train, Path(cfg.out_dir) / "imagine", resume=resume, config_dict=to_dict(cfg),
        extra_state={"prior": prior}, eval_fn=eval_fn, frames_per_sample=stage.horizon,
        num_workers=cfg.data.num_workers, collate_fn=collate_windows,
    )


def _crafter_eval_fn(cfg: RunConfig):
    """eval_fn: `imagine.eval_episodes` real Crafter episodes with the current policy, played exactly as
    `dreamerv4 eval crafter` plays them (same env and policy seeds from imagine.eval_seed, same context
    cap, the agent's tokenizer on live frames); logs crafter_return (mean) and crafter_score."""
    import crafter

    stage = cfg.imagine
    if cfg.data.action_space != "crafter":
        raise ConfigError(f"imagine.eval_episodes: real-game evaluation needs Crafter, not {cfg.data.action_space!r}")
    tokenizer, tok_cfg = load_tokenizer(cfg.dynamics.tokenizer_checkpoint)
    context = tokenizer_context(cfg, tok_cfg)
    names = sorted(crafter.constants.achievements)

    def eval_fn(model: AgentModel) -> dict[str, float]:
        device = next(model.parameters()).device
        policy = AgentPolicy(model, tokenizer.to(device), context, cfg.agent.train.seq_len)
        ids = range(stage.eval_episodes)  # all at once, in lockstep
        generators = [torch.Generator(device).manual_seed(policy_seed(stage.eval_seed, i)) for i in ids]  # the policy's noise is drawn there
        results = play_episodes(policy, [stage.eval_seed + i for i in ids], generators, stage.eval_max_steps)
        returns, unlocked = [r["return"] for r in results], [r["unlocked"] for r in results]
        success = {name: sum(name in u for u in unlocked) / len(unlocked) for name in names}
        return {"crafter_return": sum(returns) / len(returns), "crafter_score": crafter_score(success)}

    return eval_fn


def cmd_train(args) -> int:
    cfg = load_config(RunConfig, args.config, args.overrides)
    summary = train_imagine(cfg, resume=args.resume)
    print(summary)
    return 0

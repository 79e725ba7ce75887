"""Acting in the real Crafter game: a trained agent on live frames, the uniform random baseline, and
the loop that plays a batch of episodes with either (`dreamerv4 eval crafter`, imagination training's
real-game check, `dreamerv4 play`).

    policy = AgentPolicy(agent, tokenizer, tokenizer_context, max_context)      # or RandomPolicy()
    results = play_episodes(policy, env_seeds, generators, max_steps)          # one generator per episode

The policy (`AgentPolicy`) keeps a world-model context of the live frames:
- each new frame is encoded by the agent's frozen tokenizer with its own KVCache, in chunks of the
  tokenizer's context aligned at the episode start (exactly how `data tokenize` encoded the training
  episodes, data/latents.py), so the latents match the training latents;
- the latent enters an `AgentRollout` (cached time attention) with the action that led to it,
  re-noised to the context signal level like every training input of the agent; the agent token's
  readout gives the policy logits (offset 0), from which the action is sampled.
Episodes are played in lockstep (one batched transformer pass per step for all of them; a finished
episode leaves the batch); each draws its noise and actions from its own generator, so its play
does not depend on the batch size up to float rounding (tested equal).
Context cap: the agent was trained on windows of `seq_len` frames, so its context holds at most
`max_context` = seq_len frames: when full, a fresh rollout observes the last `max_context // 2` real
frames again (the first with no previous action, like a training window's first frame) and play
goes on. Each step then costs one cached frame pass; a restart one pass over max_context // 2 frames.
"""

from __future__ import annotations

import numpy as np
import torch

from dreamerv4.actions import CRAFTER_ACTIONS
from dreamerv4.data.crafter_record import make_crafter_env
from dreamerv4.data.latents import frames_to_float
from dreamerv4.errors import UserError
from dreamerv4.models.agent import AgentModel, AgentRollout
from dreamerv4.models.dynamics import NO_ACTION
from dreamerv4.models.transformer import KVCache


def policy_seed(seed: int, episode: int) -> int:
    return int(np.random.SeedSequence([seed, episode, 2]).generate_state(1)[0])


def sample_rows(space, logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Draw row b's action from logits[b] with generators[b], as a batch of one would (codes (B,))."""
    return torch.cat([space.sample(logits[b: b + 1], g) for b, g in enumerate(generators)])


class RandomPolicy:
    """Uniform over Crafter's 17 actions; the baseline, run through the same evaluation code."""

    def reset(self, generators: list[torch.Generator]) -> None:
        self.generators = list(generators)

    def act(self, frames: np.ndarray) -> np.ndarray:
        """frames (B, 64, 64, 3) -> actions (B,)."""
        return np.array([int(torch.randint(len(CRAFTER_ACTIONS), (1,), generator=g)) for g in self.generators])

    def select_rows(self, rows: list[int]) -> None:
        self.generators = [self.generators[i] for i in rows]


class AgentPolicy:
    """A trained agent acting on live frames of a batch of episodes in lockstep (module docstring).
    `greedy` takes the policy's mode instead of sampling. Each row draws its noise and actions from
    its own generator, so an episode plays the same whatever else is in the batch (up to float
    rounding of the batched matmuls).

        policy.reset(generators)                  # one per episode
        actions = policy.act(frames)              # (B, 64, 64, 3) uint8 -> (B,) codes
        policy.select_rows(rows)                  # keep the episodes still running
    """

    def __init__(self, agent: AgentModel, tokenizer, tokenizer_context: int, max_context: int,
                 greedy: bool = False):
        if agent.action_space.name != "crafter":
            raise UserError(f"the agent acts in the {agent.action_space.name!r} action space, not Crafter's")
        if max_context < 2 or tokenizer_context < 1:
            raise ValueError(f"max_context must be >= 2 and tokenizer_context >= 1, got {max_context}, {tokenizer_context}")
        self.agent, self.tokenizer = agent.eval(), tokenizer.eval()
        self.tokenizer_context, self.max_context, self.greedy = tokenizer_context, max_context, greedy
        self.restarts = 0

    def reset(self, generators: torch.Generator | list[torch.Generator]) -> None:
        self.generators = [generators] if isinstance(generators, torch.Generator) else list(generators)
        self.device = next(self.agent.parameters()).device  # frames and actions go where the models are
        self.step = 0
        self.latents: list[torch.Tensor] = []  # (B, L, C) per real frame, the last max_context kept
        self.prev_actions: list[torch.Tensor] = []  # (B,) the action that led to each kept frame
        self.last_action = torch.full((len(self.generators),), NO_ACTION, device=self.device)
        self.token_cache: KVCache | None = None
        self.rollout: AgentRollout | None = None

    def select_rows(self, rows: list[int]) -> None:
        batch, index = len(self.generators), torch.as_tensor(rows, device=self.device)
        self.generators = [self.generators[i] for i in rows]
        self.latents = [x[index] for x in self.latents]
        self.prev_actions = [x[index] for x in self.prev_actions]
        self.last_action = self.last_action[index]
        if self.token_cache is not None:
            self.token_cache.select_rows(rows, batch)
        if self.rollout is not None:
            self.rollout.select_rows(rows)

    @torch.no_grad()
    def act(self, frames: np.ndarray) -> np.ndarray | int:
        """frames (B, 64, 64, 3) uint8 -> actions (B,); a single frame (64, 64, 3) -> one int (batch of one)."""
        if frames.ndim == 3:
            return int(self.act(frames[None])[0])
        device = self.device
        if len(frames) != len(self.generators):
            raise ValueError(f"{len(frames)} frames for {len(self.generators)} episodes")
        if self.step % self.tokenizer_context == 0:
            self.token_cache = KVCache()
        latent = self.tokenizer.encode(frames_to_float(frames)[:, None].to(device), cache=self.token_cache)[:, 0]
        self.latents = (self.latents + [latent])[-self.max_context:]
        self.prev_actions = (self.prev_actions + [self.last_action])[-self.max_context:]
        if self.rollout is None or self.rollout.num_frames >= self.max_context:
            keep = 1 if self.rollout is None else self.max_context // 2
            if self.rollout is not None:
                self.restarts += len(frames)
            self.rollout = AgentRollout(self.agent, generator=self.generators)
            prev = torch.stack(self.prev_actions[-keep:], dim=1).clone()
            prev[:, 0] = NO_ACTION
            hidden = self.rollout.observe(torch.stack(self.latents[-keep:], dim=1), prev)
        else:
            hidden = self.rollout.observe(latent[:, None], self.last_action[:, None])
        logits = self.agent.policy(hidden)
        space = self.agent.action_space
        action = space.mode(logits) if self.greedy else sample_rows(space, logits, self.generators)
        self.last_action = action.to(device)
        self.step += 1
        return action.cpu().numpy()


def play_episodes(policy, env_seeds: list[int], generators: list[torch.Generator], max_steps: int,
                  keep_frames: int = 0, on_done=None) -> list[dict]:
    """Episodes of the real game in lockstep, one per env seed and generator; a finished episode leaves
    the batch. Returns per episode: return, length, unlocked achievements, and for the first up to
    `keep_frames` frames (T, 64, 64, 3) uint8 (else None). on_done(result) is called as each ends."""
    envs = [make_crafter_env(seed, max_steps) for seed in env_seeds]
    obs = [env.reset() for env in envs]
    policy.reset(generators)
    results = [{"return": 0.0, "length": 0, "unlocked": set(), "frames": None} for _ in envs]
    frames = [obs[0]] if keep_frames else []
    active = list(range(len(envs)))
    while active:
        actions = policy.act(np.stack([obs[i] for i in active]))
        running = []
        for row, i in enumerate(active):
            obs[i], reward, done, info = envs[i].step(int(actions[row]))
            result = results[i]
            result["return"] += float(reward)
            result["length"] += 1
            result["unlocked"] |= {name for name, count in info["achievements"].items() if count > 0}
            if i == 0 and len(frames) < keep_frames:
                frames.append(obs[i])
            if done:
                if on_done is not None:
                    on_done(result)
            else:
                running.append(row)
        if len(running) < len(active):
            active = [active[row] for row in running]
            if active:
                policy.select_rows(running)
    if frames:
        results[0]["frames"] = np.stack(frames)
    return results

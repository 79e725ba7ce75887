"""Phase 2: agent tokens on the dynamics transformer, with policy, reward and value heads (DreamerV4 section 3.3;
docs/design.md, Models).

    agent = AgentModel(dynamics_model, AgentConfig())        # wraps a (trained) DynamicsModel
    out = agent(latents, actions)                             # latents (B,T,16,32) clean, actions (B,T) codes
    out["policy_logits"]   (B,T,A)     A = 17 (Crafter) or 144 (MineRL), offset 0
    out["reward_logits"]   (B,T,255)   offset 0
    out["value_logits"]    (B,T,255)
    out["continue_logits"] (B,T)       logit of P(the episode goes on after the action taken at frame t)
    out["unlock_logits"] (B,T,K), out["other_reward"] (B,T)   only with an unlock head (num_achievements K > 0)
    out["policy_logits_mtp"] (B,T,L,A), out["reward_logits_mtp"] (B,T,L,255)   all L offsets
    out["predicted_latents"], out["noisy_latents"] (B,T,16,32)    the world model's output, unchanged
    out["agent_hidden"]    (B,T,width)  the agent tokens' transformer output (mean over agent tokens)

Token layout: each frame's tokens are [agent_1..agent_A | action | (tau, d) | latent_1..latent_16]
(the dynamics model's frame tokens, `DynamicsModel.frame_tokens`, after A learned agent tokens; the
transformer appends its registers). Agent tokens go *first* so the other tokens keep their relative
RoPE offsets (space RoPE is relative; registers sit after the frame's tokens).
Information flow (paper: agent tokens read everything, nothing reads them):
- space layers: a boolean attention mask; agent queries read every token of their frame, other
  queries never read an agent key. SpaceTimeTransformer extends a mask to its registers so that a
  register reads a token only if every token may (`_with_registers`), so no register relays the
  agent tokens either. (`space_bias` would not do: it is padded with 0 for registers.)
- time layers attend per token slot, so agent slot k of frame t reads agent slot k of frames <= t only.
Hence the world model's predictions are exactly those of the bare DynamicsModel with the same weights
(up to float rounding from the longer rows), whatever the agent tokens hold (tests check both).

ALIGNMENT (docs/design.md, Data contract: actions[t] is taken after seeing frames[t]; rewards[t] is received on that
step, i.e. it is the reward *for* actions[t]). The agent token of frame t sees frames <= t and the
action tokens of frames <= t, i.e. actions[0..t-1] (frame t carries actions[t-1], the action that led
to it). With MTP offsets n = 0..L-1 (L = cfg.mtp_length):
- policy offset n at frame t predicts actions[t + n]     (offset 0: the action to take now).
- reward offset n at frame t predicts rewards[t + n - 1] (offset 0: the reward of the action that led
  to frame t, which the token has seen: its consequence is in frame t; DreamerV3's convention). So
  reward(h_{t+1}) is the reward for the action taken at frame t. Targets outside the window are
  masked (offset-0 reward of a window's first frame, actions/rewards past the window end).
  This deliberately differs from reading rewards[t] at frame t: that reward depends on the action not
  yet taken, so in imagination the sampled action's reward would never reach its own return.
- unlocks at frame t (like the reward, for the action that led to frame t): achievement k was
  unlocked by it, achievements[t, k] - achievements[t - 1, k] (observations.npz `achievements`:
  unlocked before each frame), trained only where k was not yet unlocked at t - 1, so the head learns
  P(k happens) rather than P(k happens for the first time), which the screen cannot tell; the
  other reward is rewards[t - 1] minus 1 if anything was unlocked (Crafter: the health change / 10).
- value at frame t: the return from frame t onwards, sum_k gamma^k rewards[t + k] (Phase 3 trains it).
- continuation at frame t: 1 - terminals[t], whether the episode goes on after the action taken at
  frame t (DreamerV4 Eq. 10's c_t). Read at frame t, not t+1 like the reward, because recordings
  drop the frame after the last step, so no frame shows a death that already happened. In Crafter
  death follows from the state on screen (health, a zombie next to the player), rarely from the
  action itself. Phase 3 uses c_t = sigmoid(continue logit at s_t) in the lambda-returns.
`mtp_targets` builds these targets from a dataset window.

Imagination / closed loop (`AgentRollout`, built on `dynamics.Rollout` semantics with a KVCache):
    rollout = AgentRollout(agent, generator=g)                 # under the hood: no_grad, cached keys/values
    h = rollout.observe(latents, prev_actions)                 # (B,N,16,32), (B,N) -> (B,width), last frame
    logits = rollout.policy(h); a = agent.action_space.sample(logits, g)
    z_next, h_next = rollout.imagine_step(a)                   # next frame (B,16,32) after action a, then observed
    r = agent.two_hot.decode(rollout.reward(h_next))           # the reward for a (see ALIGNMENT)
    v = agent.two_hot.decode(rollout.value(h_next))
Observed frames enter re-noised to the context signal level with d_min, exactly as in
`Rollout.observe`; training reads the agent tokens from frames noised the same way (see
training/agent.py), so heads see at play time what they saw in training. Heads are plain modules:
call them on detached hidden states with gradients enabled to train only the heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dreamerv4.models.dynamics import DynamicsConfig, DynamicsModel, _is_power_of_two, add_noise, previous_actions
from dreamerv4.models.heads import MLPHead, TwoHot
from dreamerv4.models.transformer import KVCache


@dataclass
class AgentConfig:
    num_agent_tokens: int = 1
    mtp_length: int = 8  # L: offsets 0..L-1 of actions and rewards predicted from each agent token
    head_hidden: int = 0  # hidden width of the head MLPs (0: the transformer width)
    head_layers: int = 2  # hidden layers per head
    num_bins: int = 255  # two-hot bins for reward and value, uniform in symlog space on [bin_low, bin_high]
    bin_low: float = -20.0
    bin_high: float = 20.0
    # Loss weights (training/agent.py): each term is first divided by a running RMS of itself.
    bc_weight: float = 1.0
    reward_weight: float = 1.0
    video_weight: float = 1.0  # the shortcut-forcing video-prediction loss stays on (paper)
    value_weight: float = 1.0  # value head on the behaviour policy's discounted return-to-go (0: off)
    value_gamma: float = 0.997  # discount of that return (Phase 3's gamma)
    continue_weight: float = 1.0  # continuation head on the recorded terminal flags (0: off, c_t = 1 in Phase 3)
    # Unlock head (0: none): per achievement, P(it happens on this step | not yet unlocked), plus the
    # rest of the reward (health). Crafter pays only an achievement's first unlock, which the screen
    # does not show; Phase 3 can then pay sum_k P_k (1 - unlocked_k) with unlocked_k tracked along
    # the rollout (imagine.reward = unlocks). Crafter has 22 achievements.
    num_achievements: int = 0
    unlock_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.num_agent_tokens < 1 or self.mtp_length < 1 or self.head_layers < 0 or self.head_hidden < 0:
            raise ValueError("num_agent_tokens and mtp_length must be >= 1, head_layers and head_hidden >= 0")
        if self.num_bins < 2 or not self.bin_low < self.bin_high:
            raise ValueError(f"need num_bins >= 2 and bin_low < bin_high, got {self.num_bins}, "
                             f"[{self.bin_low}, {self.bin_high}]")
        if not 0.0 <= self.value_gamma <= 1.0:
            raise ValueError(f"value_gamma must be in [0, 1], got {self.value_gamma}")
        if self.num_achievements < 0:
            raise ValueError(f"num_achievements must be >= 0, got {self.num_achievements}")
        for name in ("bc_weight", "reward_weight", "video_weight", "value_weight", "continue_weight", "unlock_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def mtp_targets(actions: torch.Tensor, rewards: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
    """Multi-token targets of a dataset-aligned window (module docstring, ALIGNMENT).

    actions (B,T) codes, rewards (B,T) -> {"actions" (B,T,L) = actions[t+n], "action_valid" (B,T,L),
    "rewards" (B,T,L) = rewards[t+n-1], "reward_valid" (B,T,L)}; invalid entries hold 0."""
    b, t = actions.shape
    index = torch.arange(t, device=actions.device)[:, None] + torch.arange(length, device=actions.device)[None, :]
    action_valid = (index < t).expand(b, t, length)
    reward_index = index - 1
    reward_valid = ((reward_index >= 0) & (reward_index < t)).expand(b, t, length)
    gather = lambda x, i: x[:, i.clamp(0, t - 1)]  # noqa: E731  (B,T) -> (B,T,L)
    return {
        "actions": torch.where(action_valid, gather(actions, index), torch.zeros_like(actions[:, :1, None])),
        "action_valid": action_valid,
        "rewards": torch.where(reward_valid, gather(rewards, reward_index), torch.zeros_like(rewards[:, :1, None])),
        "reward_valid": reward_valid,
    }


class AgentModel(nn.Module):
    """A DynamicsModel with agent tokens and policy / reward / value heads; see the module docstring."""

    def __init__(self, dynamics: DynamicsModel, cfg: AgentConfig):
        super().__init__()
        self.cfg = cfg
        self.dynamics = dynamics
        self.action_space = dynamics.action_space
        width = dynamics.cfg.transformer.embed_dim
        hidden = cfg.head_hidden or width
        length, logits = cfg.mtp_length, self.action_space.num_logits
        self.agent_tokens = nn.Parameter(torch.randn(cfg.num_agent_tokens, width) * 0.02)
        self.policy_head = MLPHead(width, hidden, length * logits, cfg.head_layers)
        self.reward_head = MLPHead(width, hidden, length * cfg.num_bins, cfg.head_layers, zero_init=True)
        self.value_head = MLPHead(width, hidden, cfg.num_bins, cfg.head_layers, zero_init=True)
        self.continue_head = MLPHead(width, hidden, 1, cfg.head_layers, zero_init=True)
        with torch.no_grad():  # start at P(continue) ~ 0.99: deaths are rare (about one step in 200)
            self.continue_head.out.bias.fill_(5.0)
        if cfg.num_achievements:
            # outputs: one unlock logit per achievement, then the other (health) reward
            self.unlock_head = MLPHead(width, hidden, cfg.num_achievements + 1, cfg.head_layers, zero_init=True)
            with torch.no_grad():  # start at P(unlock) ~ 0.007: an achievement happens on few steps
                self.unlock_head.out.bias[:-1].fill_(-5.0)
        self.two_hot = TwoHot(cfg.num_bins, cfg.bin_low, cfg.bin_high)

    @classmethod
    def build(cls, dynamics_cfg: DynamicsConfig, cfg: AgentConfig) -> "AgentModel":
        return cls(DynamicsModel(dynamics_cfg), cfg)

    @property
    def width(self) -> int:
        return self.dynamics.cfg.transformer.embed_dim

    def attention_mask(self, frame_tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Space-attention mask (A+S, A+S) for A agent tokens first and S frame tokens: True where the
        query (row) may read the key (column). Agent queries read all; other queries no agent key."""
        a = self.cfg.num_agent_tokens
        mask = torch.ones(a + frame_tokens, a + frame_tokens, dtype=torch.bool, device=device)
        mask[a:, :a] = False
        return mask

    # -- the transformer pass ----------------------------------------------------------------------

    def encode(
        self,
        noisy: torch.Tensor,
        prev_actions: torch.Tensor,
        tau: torch.Tensor,
        d: torch.Tensor,
        cache: KVCache | None = None,
        update_cache: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One transformer pass with agent tokens: like `DynamicsModel.denoise` (same arguments) ->
        (predicted clean latents (B,T,L,C) float32, agent_hidden (B,T,width) in the compute dtype)."""
        tokens = self.dynamics.frame_tokens(noisy, prev_actions, tau, d)
        b, t, s, w = tokens.shape
        a = self.cfg.num_agent_tokens
        agent = self.agent_tokens.to(tokens.dtype).expand(b, t, a, w)
        hidden = self.dynamics.transformer(
            torch.cat((agent, tokens), dim=2), mask=self.attention_mask(s, tokens.device),
            cache=cache, update_cache=update_cache,
        )
        predicted = self.dynamics.latent_out(hidden[:, :, -self.dynamics.cfg.num_latents:]).float()
        return predicted, hidden[:, :, :a].mean(dim=2)

    # -- heads (callable on any (..., width) hidden state, e.g. detached ones) ---------------------

    def policy_mtp(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., width) -> policy logits (..., L, num_logits) float32 for offsets 0..L-1."""
        return self.policy_head(hidden).float().unflatten(-1, (self.cfg.mtp_length, self.action_space.num_logits))

    def reward_mtp(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., width) -> reward two-hot logits (..., L, bins) float32 for offsets 0..L-1."""
        return self.reward_head(hidden).float().unflatten(-1, (self.cfg.mtp_length, self.cfg.num_bins))

    def policy(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., width) -> logits (..., num_logits) of the action to take at this frame (offset 0)."""
        return self.policy_mtp(hidden)[..., 0, :]

    def reward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., width) -> two-hot logits (..., bins) of the reward for the action that led to this frame."""
        return self.reward_mtp(hidden)[..., 0, :]

    def value(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., width) -> two-hot logits (..., bins) of the return from this frame on."""
        return self.value_head(hidden).float()

    def continuation(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., width) -> logit (...) float32 that the episode goes on after the action taken at this frame."""
        return self.continue_head(hidden).float()[..., 0]

    def continue_prob(self, hidden: torch.Tensor) -> torch.Tensor:
        """c_t in [0, 1] (...) for the lambda-returns; exactly 1 when the head is off (continue_weight 0)."""
        if self.cfg.continue_weight == 0:
            return torch.ones(hidden.shape[:-1], device=hidden.device)
        return torch.sigmoid(self.continuation(hidden))

    @property
    def has_unlock_head(self) -> bool:
        return self.cfg.num_achievements > 0

    def unlocks(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., width) -> (unlock logits (..., K), other reward (...)) float32 for the action that led to
        this frame (read like `reward`): logit of P(achievement k happened | it was not yet unlocked),
        and the reward apart from unlocks (Crafter: the health change / 10)."""
        if not self.has_unlock_head:
            raise ValueError("this agent has no unlock head (agent.model.num_achievements is 0)")
        out = self.unlock_head(hidden).float()
        return out[..., :-1], out[..., -1]

    def step_reward(self, hidden: torch.Tensor, unlocked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The expected reward for the action that led to this frame given which achievements were already
        unlocked: other + P(at least one new unlock) = other + 1 - prod_k (1 - P_k (1 - unlocked_k)) (Crafter
        pays +1 once for a step with any new unlock; the achievements are taken as independent).
        hidden (..., width), unlocked (..., K) in [0, 1] (probabilities along an imagined rollout) ->
        (reward (...), unlocked after this step (..., K))."""
        logits, other = self.unlocks(hidden)
        if unlocked.shape != logits.shape:
            raise ValueError(f"unlocked must be (..., {logits.shape[-1]}) like the unlock logits, "
                             f"got {tuple(unlocked.shape)}")
        p = torch.sigmoid(logits)
        fresh = p * (1.0 - unlocked.float())
        return other + 1.0 - torch.prod(1.0 - fresh, dim=-1), unlocked.float() + fresh

    # -- the output dict --------------------------------------------------------------------------

    def forward(
        self,
        latents: torch.Tensor,
        actions: torch.Tensor,
        tau: torch.Tensor | None = None,
        d: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Clean latents (B,T,L,C) and dataset-aligned actions (B,T) -> the output dict (module doc).

        tau and d (B,T) default to how frames enter the context at play time: the context signal
        level and d_min. Noise ~ N(0, I) unless given."""
        cfg = self.dynamics.cfg
        b, t = latents.shape[:2]
        if tau is None:
            tau = torch.full((b, t), cfg.context_signal_level, device=latents.device)
        if d is None:
            d = torch.full((b, t), cfg.d_min, device=latents.device)
        if noise is None:
            noise = torch.randn_like(latents, dtype=torch.float32)
        noisy = add_noise(self.dynamics.to_model(latents), noise, tau)
        predicted, hidden = self.encode(noisy, previous_actions(actions), tau, d)
        policy, reward = self.policy_mtp(hidden), self.reward_mtp(hidden)
        extra = {}
        if self.has_unlock_head:
            extra["unlock_logits"], extra["other_reward"] = self.unlocks(hidden)
        return {
            **extra,
            "policy_logits": policy[:, :, 0],
            "reward_logits": reward[:, :, 0],
            "value_logits": self.value(hidden),
            "continue_logits": self.continuation(hidden),
            "policy_logits_mtp": policy,
            "reward_logits_mtp": reward,
            "predicted_latents": self.dynamics.from_model(predicted),
            "noisy_latents": self.dynamics.from_model(noisy),
            "agent_hidden": hidden,
        }


class AgentRollout:
    """Closed-loop and imagination state of an AgentModel: the re-noised context in a KVCache (time
    layers only; every observed frame costs one one-frame pass), agent readouts per frame.

        rollout = AgentRollout(agent, generator=g)
        h = rollout.observe(latents, prev_actions)   # (B,N,L,C), (B,N) codes of the action that led to each frame
        z, h = rollout.imagine_step(action)          # action (B,) taken at the latest frame

    observe / imagine / imagine_step run under torch.no_grad (the transformer is frozen wherever this
    is used) and return float32 tensors. All noise comes from `generator` (or the global RNG) in a
    fixed order, so a seeded generator reproduces a rollout; a list of generators gives each batch
    row its own, so that a row's draws do not depend on the rest of the batch. The context only grows; to cap it, start
    a new AgentRollout and observe the last frames again (cropping a KVCache is not equivalent, see
    dynamics.Rollout).
    """

    def __init__(self, model: AgentModel, generator: torch.Generator | list[torch.Generator] | None = None,
                 steps: int | None = None):
        dyn = model.dynamics.cfg
        self.steps = dyn.sampling_steps if steps is None else steps
        if not _is_power_of_two(self.steps) or self.steps > dyn.k_max:
            raise ValueError(f"steps must be a power of two <= k_max ({dyn.k_max}), got {self.steps}")
        self.model = model
        self.generator = generator
        self.cache = KVCache()
        self.last_hidden: torch.Tensor | None = None  # (B,width) agent readout of the latest observed frame

    @property
    def num_frames(self) -> int:
        """Frames in the context so far."""
        return self.cache.length

    def _noise(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        if isinstance(self.generator, list):  # one generator per row: row b draws what a batch of one would
            if len(self.generator) != shape[0]:
                raise ValueError(f"{len(self.generator)} generators for a batch of {shape[0]}")
            return torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=torch.float32)
                                for g in self.generator])
        return torch.randn(shape, generator=self.generator, device=device, dtype=torch.float32)

    def select_rows(self, rows: list[int]) -> None:
        """Keep only the batch rows `rows` (and their generators), e.g. when some episodes end."""
        batch = self.last_hidden.shape[0] if self.last_hidden is not None else len(self.generator)
        self.cache.select_rows(rows, batch)
        if self.last_hidden is not None:
            self.last_hidden = self.last_hidden[torch.as_tensor(rows, device=self.last_hidden.device)]
        if isinstance(self.generator, list):
            self.generator = [self.generator[i] for i in rows]

    @torch.no_grad()
    def observe(self, latents: torch.Tensor, prev_actions: torch.Tensor) -> torch.Tensor:
        """Append frames (B,N,L,C), each with the code of the action that led to it (B,N) (NO_ACTION
        for none), re-noised to the context signal level with d_min. Returns the agent readout of the
        last of them (B,width)."""
        self.last_hidden = self._readout(latents, prev_actions, update_cache=True)
        return self.last_hidden

    @torch.no_grad()
    def peek(self, latents: torch.Tensor, prev_actions: torch.Tensor) -> torch.Tensor:
        """observe() without adding the frames to the context: the agent readout (B,width) that the last
        of them would get, e.g. of a second sample of the next frame."""
        return self._readout(latents, prev_actions, update_cache=False)

    def _readout(self, latents: torch.Tensor, prev_actions: torch.Tensor, update_cache: bool) -> torch.Tensor:
        cfg = self.model.dynamics.cfg
        level = cfg.context_signal_level
        noisy = add_noise(self.model.dynamics.to_model(latents), self._noise(tuple(latents.shape), latents.device), level)
        full = lambda v: torch.full(noisy.shape[:2], v, device=noisy.device)  # noqa: E731
        _, hidden = self.model.encode(noisy, prev_actions, full(level), full(cfg.d_min), cache=self.cache,
                                      update_cache=update_cache)
        return hidden[:, -1].float()

    @torch.no_grad()
    def imagine(self, action: torch.Tensor) -> torch.Tensor:
        """Sample the frame (B,L,C) that follows `action` (B,) taken at the latest frame, in K = steps
        shortcut steps from pure noise (as `Rollout.imagine`). It is not added to the context."""
        cfg = self.model.dynamics.cfg
        b = action.shape[0]
        z = self._noise((b, 1, cfg.num_latents, cfg.latent_dim), action.device)
        d = 1.0 / self.steps
        for i in range(self.steps):
            tau = i * d
            full = lambda v: torch.full((b, 1), v, device=z.device)  # noqa: E731
            predicted, _ = self.model.encode(z, action[:, None], full(tau), full(d), cache=self.cache,
                                             update_cache=False)
            z = z + (predicted - z) * (d / (1.0 - tau))  # Euler step of b = (x^ - z) / (1 - tau)
        return self.model.dynamics.from_model(z[:, 0])

    def imagine_step(self, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """imagine() the frame after `action` (B,), then observe() it: (next latents (B,L,C), its agent
        readout (B,width)). reward(readout) is the reward for `action`."""
        frame = self.imagine(action)
        return frame, self.observe(frame[:, None], action[:, None])

    def policy(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.policy(hidden)

    def reward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.reward(hidden)

    def value(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.value(hidden)

    def continuation(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.continuation(hidden)

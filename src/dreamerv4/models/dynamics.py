"""Phase 1B: the shortcut-forcing dynamics model, the world model (docs/design.md, Models; DreamerV4 section 3.2).

It predicts clean tokenizer latents (x-prediction) from noisy ones, frame by frame and causal in
time, on the shared `SpaceTimeTransformer`. Each frame is 2 + num_latents tokens (the transformer
adds its registers):
    [action token | (tau, d) token | latent_1 ... latent_16]
- action token: the action that *led to* this frame. Data alignment (docs/design.md, Data contract): actions[t] is
  taken after seeing frames[t], so frame t is conditioned on actions[t - 1]. `previous_actions`
  does that shift; frames without a known previous action (the first frame of a window, single
  training frames, a first generated frame) get a learned "no action" embedding (code NO_ACTION).
  The action's components are embedded and summed: one table per categorical component (Crafter's
  17 actions; MineRL's camera and item), and one pair of vectors per Bernoulli bit (MineRL's keys).
- (tau, d) token: two embedding lookups concatenated, each half the width. tau is the signal level
  (0 = pure noise, 1 = clean) on the grid i / k_max, i = 0..k_max; d is the step size 1 / 2^e,
  e = 0..log2(k_max). Values off those grids are rejected.
- latent tokens: a linear map 32 -> width of the noisy latents plus a learned per-slot embedding.
The read-out is a linear map width -> 32 of the latent tokens: the predicted clean latents.

    model = DynamicsModel(DynamicsConfig(action_space="crafter"))
    out = model(latents, actions, tau, d)       # latents (B,T,16,32) clean, actions (B,T) codes,
    out["predicted_latents"], out["noisy_latents"]   # tau, d (B,T) per frame -> both (B,T,16,32)
    future = model.generate(context_latents, context_actions, future_actions)   # (B,H,16,32)

Noising (docs/design.md, Models): z~ = (1 - tau) z0 + tau z1, z0 ~ N(0, I) noise, z1 the data (`add_noise`).
The training objective lives in `training/shortcut.py`.

Latent scale: the tokenizer's tanh latents have a std near 0.26 on Crafter, against unit noise, so
at most signal levels tau the data is a small part of z~ and the model learns little beyond a mean
(the same reason latent diffusion rescales its VAE latents). With `latent_scale` s the model sees
and predicts s * latents: every method takes and returns tokenizer latents (`to_model`,
`from_model`); only `denoise` and the shortcut loss's internals work in the scaled space.

Generation (`generate`, `Rollout`): frames one at a time, K shortcut steps each (d = 1/K, Euler
steps of the velocity (x^ - z)/(1 - tau), starting from pure noise at tau = 0). A finished frame,
like every real context frame, enters the context re-noised to signal `context_signal` (snapped to
the 1/k_max grid: 0.9 -> 58/64) with step-size token d_min: in training such frames are flow-loss
frames, which the bootstrap passes hold still, i.e. exactly a fixed context. With the cache, the
context lives in the transformer's KVCache (keys/values of the time-attention layers for every
token of every context frame); each denoising step of a new frame reads it without storing
(update_cache=False) and only the re-noised finished frame is appended, so a new frame costs the
same K + 1 one-frame passes whatever the context length. Without the cache, every step re-runs the
whole context (same numbers, for testing and benchmarks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from dreamerv4.actions import get_action_space
from dreamerv4.models.transformer import KVCache, SpaceTimeTransformer, TransformerConfig

NO_ACTION = -1  # previous-action code of a frame with no known previous action


@dataclass
class DynamicsConfig:
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    num_latents: int = 16
    latent_dim: int = 32
    action_space: str = "crafter"  # "crafter" or "minerl" (dreamerv4.actions)
    k_max: int = 64  # finest shortcut grid: d_min = 1 / k_max
    context_signal: float = 0.9  # signal level of re-noised context frames at generation (paper: tau_ctx = 0.1 noise)
    single_frame_fraction: float = 0.3  # share of each training batch trained as sequences of one frame
    # Share of training frames with d > d_min (bootstrap loss); the rest get d_min (flow loss). 6/7
    # would make d uniform over the 7 step sizes; too few flow frames let the model sit in the
    # bootstrap's constant-prediction fixed point (see training/shortcut.py).
    bootstrap_fraction: float = 0.25
    sampling_steps: int = 4  # K shortcut steps per generated frame (d = 1 / K)
    # True: the action embedding is also added to every latent token of its frame, besides the action
    # token (a deviation, docs/design.md): at small budgets the model learns to read one token late.
    action_to_latents: bool = False
    # The model works on latents * latent_scale (module docstring, "Latent scale"). 0: measured as
    # 1 / std of the training latents when `train dynamics` starts, and stored in its checkpoint.
    latent_scale: float = 1.0

    def __post_init__(self) -> None:
        if not _is_power_of_two(self.k_max):
            raise ValueError(f"k_max must be a power of two, got {self.k_max}")
        if not _is_power_of_two(self.sampling_steps) or self.sampling_steps > self.k_max:
            raise ValueError(
                f"sampling_steps must be a power of two <= k_max ({self.k_max}), got {self.sampling_steps}"
            )
        if not 0.0 < self.context_signal <= 1.0:
            raise ValueError(f"context_signal must be in (0, 1], got {self.context_signal}")
        for name in ("single_frame_fraction", "bootstrap_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.num_latents < 1 or self.latent_dim < 1:
            raise ValueError("num_latents and latent_dim must be >= 1")
        if not (self.latent_scale >= 0 and math.isfinite(self.latent_scale)):
            raise ValueError(f"latent_scale must be a finite number >= 0 (0: measure it), got {self.latent_scale}")
        get_action_space(self.action_space)  # ValueError naming the choices

    @property
    def d_min(self) -> float:
        return 1.0 / self.k_max

    @property
    def context_signal_level(self) -> float:
        """context_signal snapped to the signal grid i / k_max (0.9 -> 58/64 = 0.906 at k_max 64)."""
        return round(self.context_signal * self.k_max) / self.k_max


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def add_noise(clean: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """z~ = (1 - tau) z0 + tau z1 (docs/design.md, Models): clean z1 and noise z0 (B,T,L,C), tau (B,T) or a float."""
    if isinstance(tau, torch.Tensor):
        tau = tau[..., None, None].to(clean.dtype)
    return (1.0 - tau) * noise + tau * clean


def previous_actions(actions: torch.Tensor) -> torch.Tensor:
    """Dataset-aligned actions (B,T) (actions[t] taken after frame t) -> the action that led to each
    frame (B,T): [NO_ACTION, actions[0], ..., actions[T-2]]. The last action conditions no frame."""
    first = torch.full_like(actions[:, :1], NO_ACTION)
    return torch.cat((first, actions[:, :-1]), dim=1)


class DynamicsModel(nn.Module):
    """Shortcut-forcing world model on the shared transformer; see the module docstring."""

    def __init__(self, cfg: DynamicsConfig):
        super().__init__()
        self.cfg = cfg
        self.action_space = get_action_space(cfg.action_space)
        width = cfg.transformer.embed_dim
        # Categorical components: one vector per value. Bernoulli components (MineRL's 8 keys): one
        # vector per (bit, value), summed over bits, so unseen key combinations still embed.
        self.action_embeds = nn.ModuleList(  # in the action space's component order
            nn.Embedding(2 * c.num_logits if c.kind == "bernoulli" else c.num_values, width)
            for c in self.action_space.components
        )
        self.no_action = nn.Parameter(torch.randn(width) * 0.02)
        # tau index i: tau = i / k_max. Index k_max (tau = 1, clean) is accepted as input, but the
        # shortcut loss never trains it (tau < 1 there) and generation never uses it.
        self.signal_embed = nn.Embedding(cfg.k_max + 1, width // 2)
        self.step_embed = nn.Embedding(int(math.log2(cfg.k_max)) + 1, width - width // 2)  # e: d = 2^-e
        self.latent_in = nn.Linear(cfg.latent_dim, width, bias=False)
        self.latent_slot = nn.Parameter(torch.randn(cfg.num_latents, width) * 0.02)
        self.transformer = SpaceTimeTransformer(cfg.transformer)
        self.latent_out = nn.Linear(width, cfg.latent_dim)
        if cfg.latent_scale <= 0:
            raise ValueError("latent_scale 0 means `measure it`: train dynamics resolves it before building the model")
        for embedding in (*self.action_embeds, self.signal_embed, self.step_embed):
            nn.init.normal_(embedding.weight, std=0.02)
        for linear in (self.latent_in, self.latent_out):
            nn.init.trunc_normal_(linear.weight, std=0.02, a=-0.04, b=0.04)
        nn.init.zeros_(self.latent_out.bias)

    # -- conditioning ----------------------------------------------------------------------------

    def signal_index(self, tau: torch.Tensor) -> torch.Tensor:
        """tau (B,T) on the grid i / k_max -> i (B,T) int64; ValueError off the grid."""
        scaled = tau.float() * self.cfg.k_max
        index = torch.round(scaled)
        if bool((((index - scaled).abs() > 1e-3) | (index < 0) | (index > self.cfg.k_max)).any()):
            raise ValueError(f"signal level tau must be a multiple of 1/{self.cfg.k_max} in [0, 1]")
        return index.long()

    def step_index(self, d: torch.Tensor) -> torch.Tensor:
        """d (B,T) = 2^-e with 0 <= e <= log2(k_max) -> e (B,T) int64; ValueError otherwise."""
        exponent = torch.round(-torch.log2(d.float()))
        max_exponent = int(math.log2(self.cfg.k_max))
        bad = ((torch.exp2(-exponent) - d.float()).abs() > 1e-6) | (exponent < 0) | (exponent > max_exponent)
        if bool(bad.any()):
            raise ValueError(f"step size d must be 1/2^e with 0 <= e <= {max_exponent} (d_min = 1/{self.cfg.k_max})")
        return exponent.long()

    def to_model(self, latents: torch.Tensor) -> torch.Tensor:
        """Tokenizer latents -> the model's space (float32)."""
        return latents.float() * self.cfg.latent_scale

    def from_model(self, z: torch.Tensor) -> torch.Tensor:
        """The model's space -> tokenizer latents."""
        return z / self.cfg.latent_scale

    def embed_actions(self, prev_actions: torch.Tensor) -> torch.Tensor:
        """Codes (B,T) of the action that led to each frame (NO_ACTION: none) -> tokens (B,T,width)."""
        if prev_actions.is_floating_point() or bool((prev_actions < NO_ACTION).any()):
            raise ValueError(f"actions must be integer codes >= {NO_ACTION} (NO_ACTION), got {prev_actions.dtype}")
        known = prev_actions >= 0
        parts = self.action_space.unpack(prev_actions.clamp_min(0))  # ValueError on codes out of range
        total = 0
        for c, embed in zip(self.action_space.components, self.action_embeds):
            value = parts[c.name]
            if c.kind == "bernoulli":
                bit = torch.arange(c.num_logits, device=value.device)
                total = total + embed(2 * bit + ((value[..., None] >> bit) & 1)).sum(-2)
            else:
                total = total + embed(value)
        return torch.where(known[..., None], total, self.no_action)

    def frame_tokens(
        self, noisy: torch.Tensor, prev_actions: torch.Tensor, tau: torch.Tensor, d: torch.Tensor
    ) -> torch.Tensor:
        """(B,T,L,C) noisy latents + per-frame conditioning -> (B,T,2+L,width) transformer input."""
        cfg = self.cfg
        b, t = noisy.shape[:2]
        if noisy.dim() != 4 or tuple(noisy.shape[2:]) != (cfg.num_latents, cfg.latent_dim):
            raise ValueError(
                f"expected latents (B, T, {cfg.num_latents}, {cfg.latent_dim}), got {tuple(noisy.shape)}"
            )
        for name, value in (("actions", prev_actions), ("tau", tau), ("d", d)):
            if tuple(value.shape) != (b, t):
                raise ValueError(f"{name} must be ({b}, {t}) like the latents' first axes, got {tuple(value.shape)}")
        latent_tokens = self.latent_in(noisy) + self.latent_slot
        dtype = latent_tokens.dtype
        level = torch.cat((self.signal_embed(self.signal_index(tau)), self.step_embed(self.step_index(d))), dim=-1)
        action = self.embed_actions(prev_actions)
        if cfg.action_to_latents:
            latent_tokens = latent_tokens + action[:, :, None].to(dtype)
        return torch.cat((action[:, :, None].to(dtype), level[:, :, None].to(dtype), latent_tokens), dim=2)

    # -- prediction ------------------------------------------------------------------------------

    def denoise(
        self,
        noisy: torch.Tensor,
        prev_actions: torch.Tensor,
        tau: torch.Tensor,
        d: torch.Tensor,
        cache: KVCache | None = None,
        update_cache: bool = True,
        cache_only: bool = False,
    ) -> torch.Tensor | None:
        """f(z~, tau, d, a): predicted clean latents (B,T,L,C) float32 (x-prediction).

        noisy (B,T,L,C) at signal levels tau (B,T), step sizes d (B,T), prev_actions (B,T) the code of
        the action that led to each frame (`previous_actions`; NO_ACTION for none). With a `cache`
        the frames come after the cached ones (see SpaceTimeTransformer.forward); `cache_only` only
        appends them to the cache and returns None.
        """
        tokens = self.frame_tokens(noisy, prev_actions, tau, d)
        hidden = self.transformer(tokens, cache=cache, update_cache=update_cache, cache_only=cache_only)
        return None if cache_only else self.latent_out(hidden[:, :, 2:]).float()

    def forward(
        self,
        latents: torch.Tensor,
        actions: torch.Tensor,
        tau: torch.Tensor,
        d: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Clean latents (B,T,L,C), dataset-aligned actions (B,T), per-frame tau and d (B,T) ->
        {"predicted_latents", "noisy_latents"} (B,T,L,C) float32. Noise ~ N(0, I) unless given."""
        if noise is None:
            noise = torch.randn_like(latents, dtype=torch.float32)
        noisy = add_noise(self.to_model(latents), noise, tau)
        predicted = self.denoise(noisy, previous_actions(actions), tau, d)
        return {"predicted_latents": self.from_model(predicted), "noisy_latents": self.from_model(noisy)}

    # -- generation ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        context_latents: torch.Tensor,
        context_actions: torch.Tensor,
        future_actions: torch.Tensor,
        steps: int | None = None,
        cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Imagine H frames after C real ones: (B,C,L,C') + (B,C) + (B,H) actions -> (B,H,L,C').

        Actions follow the data alignment: cat(context_actions, future_actions) lines up with
        cat(context_latents, imagined) like a dataset window, and frame n is conditioned on action
        n - 1. So imagined frame 0 follows context_actions[:, -1], imagined frame h follows
        future_actions[:, h - 1], and future_actions[:, -1] is unused. C may be 0 (the first frame
        is then generated with no action). steps: K shortcut steps per frame (default
        cfg.sampling_steps). cache=False recomputes the whole context at every step (same result).
        All noise is drawn from `generator` (or the global RNG) in a fixed order.
        """
        b, c = context_latents.shape[:2]
        h = future_actions.shape[1]
        if tuple(context_actions.shape) != (b, c) or future_actions.shape[0] != b:
            raise ValueError(
                f"context_actions must be ({b}, {c}) and future_actions ({b}, H), "
                f"got {tuple(context_actions.shape)} and {tuple(future_actions.shape)}"
            )
        prev = previous_actions(torch.cat((context_actions, future_actions), dim=1))
        rollout = Rollout(self, use_cache=cache, generator=generator)
        if c:
            rollout.observe(context_latents, prev[:, :c])
        frames = []
        for i in range(h):
            frame = rollout.imagine(prev[:, c + i], steps)
            frames.append(frame)
            if i < h - 1:  # the last frame never serves as context
                rollout.observe(frame[:, None], prev[:, c + i : c + i + 1])
        if not frames:
            return context_latents.new_zeros(b, 0, *context_latents.shape[2:]).float()
        return torch.stack(frames, dim=1)


class Rollout:
    """Frame-by-frame generation state: the (re-noised) context so far, held in a KVCache or, with
    use_cache=False, as latents that every step re-runs. Imagination steps one action at a time:

        rollout = Rollout(model)
        rollout.observe(context_latents, previous_actions(context_actions))  # (B,C,L,C'), (B,C)
        next_latents = rollout.step(action)   # action (B,) taken after the latest frame -> (B,L,C')

    Call it under torch.no_grad() (generate does). The context only grows: no frame is dropped,
    since cropping a KVCache is not the same as re-running the remaining frames (their cached keys
    and values already carry the dropped frames through the earlier time layers).
    """

    def __init__(
        self,
        model: DynamicsModel,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ):
        self.model = model
        self.generator = generator
        self.cache = KVCache() if use_cache else None
        self.context: torch.Tensor | None = None  # without cache: re-noised context latents (B,n,L,C)
        self.context_prev_actions: torch.Tensor | None = None  # (B,n)

    def _noise(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=like.device, dtype=torch.float32)

    def _full(self, like: torch.Tensor, value: float) -> torch.Tensor:
        return torch.full(like.shape[:2], value, device=like.device)

    def observe(self, latents: torch.Tensor, prev_actions: torch.Tensor) -> None:
        """Append frames (B,N,L,C) to the context, re-noised to the context signal level, each with
        the code of the action that led to it (B,N) (NO_ACTION for none)."""
        cfg = self.model.cfg
        noisy = add_noise(self.model.to_model(latents), self._noise(tuple(latents.shape), latents),
                          cfg.context_signal_level)
        if self.cache is not None:
            tau, d = self._full(noisy, cfg.context_signal_level), self._full(noisy, cfg.d_min)
            self.model.denoise(noisy, prev_actions, tau, d, cache=self.cache, cache_only=True)
            return
        if self.context is None:
            self.context, self.context_prev_actions = noisy, prev_actions
        else:
            self.context = torch.cat((self.context, noisy), dim=1)
            self.context_prev_actions = torch.cat((self.context_prev_actions, prev_actions), dim=1)

    def _predict(self, z: torch.Tensor, prev_action: torch.Tensor, tau: float, d: float) -> torch.Tensor:
        """The model's clean prediction for the new frame z (B,1,L,C) after the context."""
        cfg = self.model.cfg
        if self.cache is not None:
            return self.model.denoise(
                z, prev_action[:, None], self._full(z, tau), self._full(z, d), cache=self.cache, update_cache=False
            )
        if self.context is None:
            return self.model.denoise(z, prev_action[:, None], self._full(z, tau), self._full(z, d))
        n = self.context.shape[1]
        seq = torch.cat((self.context, z), dim=1)
        taus = torch.full(seq.shape[:2], cfg.context_signal_level, device=z.device)
        ds = torch.full(seq.shape[:2], cfg.d_min, device=z.device)
        taus[:, n], ds[:, n] = tau, d
        prev = torch.cat((self.context_prev_actions, prev_action[:, None]), dim=1)
        return self.model.denoise(seq, prev, taus, ds)[:, n:]

    def imagine(self, prev_action: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """Sample the next frame (B,L,C) after the context, given the action (B,) that leads to it,
        in K = steps shortcut steps from pure noise. The frame is not added to the context."""
        cfg = self.model.cfg
        steps = cfg.sampling_steps if steps is None else steps
        if not _is_power_of_two(steps) or steps > cfg.k_max:
            raise ValueError(f"steps must be a power of two <= k_max ({cfg.k_max}), got {steps}")
        z = self._noise((prev_action.shape[0], 1, cfg.num_latents, cfg.latent_dim), prev_action)
        d = 1.0 / steps
        for i in range(steps):
            tau = i * d
            predicted = self._predict(z, prev_action, tau, d)
            z = z + (predicted - z) * (d / (1.0 - tau))  # Euler step of b = (x^ - z) / (1 - tau); last step lands on x^
        return self.model.from_model(z[:, 0])

    def step(self, prev_action: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """imagine() the next frame, then observe() it; returns it (B,L,C)."""
        frame = self.imagine(prev_action, steps)
        self.observe(frame[:, None], prev_action[:, None])
        return frame

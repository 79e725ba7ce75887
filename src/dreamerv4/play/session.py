"""What one browser tab plays: the real Crafter game, the world model's dream, or both side by side,
driven by the keyboard or by the trained agent. No web code here (the server is play/server.py).

    models = load_play_models(run_dir="runs/crafter-small")          # or checkpoint=".../checkpoint.pt"
    session = PlaySession(models)
    frame = session.reset(mode="side", seed=0, steps=4)              # one start state for real and dream
    frame = session.act(CRAFTER_ACTIONS.index("move_left"))          # a key: both worlds take it
    session.reset(mode="agent", agent_world="dream"); session.agent_step()   # the policy acts

Modes: "dream" (keys drive the world model), "real" (keys drive the real game), "side" (each key goes
to both; the per-frame PSNR of the dream against the real frame says where it drifts), "agent" (the
BC or imagination policy acts in the dream or the real game; its action probabilities and the
reward, value and continuation heads' readings come with every frame).

The dream starts from the tokenizer's encoding of the real game's first frame (crafter.Env(seed) is
deterministic per seed, so the real game starts from the same state), observed with no previous
action; each action then costs K shortcut steps + 1 cached pass of the world model (models/dynamics.py
`Rollout.step`, models/agent.py `AgentRollout.imagine_step`) and one tokenizer decode. The context
is capped at `max_context` frames (the world model's training seq_len) like `AgentPolicy` caps it:
when full, a fresh rollout observes the last max_context // 2 frames again. Latents are encoded and
decoded with a tokenizer KVCache in chunks of the tokenizer's context aligned at the episode start,
as `data tokenize` encoded the training data. Real-game agent play is `models/policy.py
AgentPolicy`, unchanged.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dreamerv4.actions import CRAFTER_ACTIONS
from dreamerv4.checkpoint import checkpoint_stage, load_checkpoint
from dreamerv4.data.crafter_record import make_crafter_env
from dreamerv4.data.latents import frames_to_float
from dreamerv4.errors import CheckpointError, UserError
from dreamerv4.evaluation.metrics import psnr
from dreamerv4.media import write_side_by_side
from dreamerv4.models.agent import AgentModel, AgentRollout
from dreamerv4.models.dynamics import NO_ACTION, DynamicsModel, Rollout
from dreamerv4.models.policy import AgentPolicy
from dreamerv4.models.transformer import KVCache
from dreamerv4.training.stages import load_agent, load_dynamics, load_tokenizer, tokenizer_context

MODES = ("dream", "real", "side", "agent")
AGENT_WORLDS = ("dream", "real")
MAX_EPISODE_STEPS = 10_000  # Crafter's own time limit
MAX_RECORDED_FRAMES = 2_000  # frames kept per episode for the GIF/MP4 download


@dataclass
class PlayModels:
    """Everything a tab needs, loaded once and shared read-only by every tab."""

    tokenizer: torch.nn.Module
    tokenizer_context: int
    world: DynamicsModel | AgentModel  # what dreams under the keyboard
    max_context: int
    agent: AgentModel | None = None
    agent_label: str = ""  # "bc" or "imagine"
    agent_note: str = ""  # why agent mode is off, when it is
    sources: dict[str, str] = field(default_factory=dict)  # what was loaded from where
    default_steps: int = 4


def _is_agent_checkpoint(path: Path) -> bool:
    return checkpoint_stage(load_checkpoint(path)) in ("agent", "imagine")


def _require_crafter(space_name: str, path: Path, what: str) -> None:
    if space_name != "crafter":
        raise UserError(f"{path}: the {what} acts in the {space_name!r} action space; play needs a Crafter one")


def load_play_models(run_dir: str | Path | None = None, checkpoint: str | Path | None = None,
                     tokenizer: str | Path | None = None, policy: str = "auto",
                     allow_unfinished: bool = False) -> PlayModels:
    """Load the world model, its tokenizer and (when there is one) an agent.

    run_dir: a `dreamerv4 run` folder: dynamics/checkpoint.pt dreams, tokenizer/checkpoint.pt decodes,
    and `policy` picks the agent: "imagine" (imagine/checkpoint.pt), "bc" (agent/checkpoint.pt) or
    "auto" (imagine when present, else bc, else none). checkpoint: a dynamics checkpoint (no agent
    mode) or an agent/imagine checkpoint (its own world model dreams). UserError on bad input."""
    if (run_dir is None) == (checkpoint is None):
        raise UserError("give exactly one of --run RUN_DIR and --checkpoint PATH")
    if policy not in ("auto", "bc", "imagine"):
        raise UserError(f"--policy must be auto, bc or imagine, got {policy!r}")
    agent, agent_path, note = None, None, ""
    if run_dir is not None:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise UserError(f"{run_dir}: no such run folder (make one with `dreamerv4 run --config ...`)")
        dynamics_path = run_dir / "dynamics" / "checkpoint.pt"
        if not dynamics_path.is_file():
            raise UserError(f"{run_dir}: unfinished run folder, no dynamics/checkpoint.pt (the world model); "
                            "finish it with the same `dreamerv4 run` command")
        tokenizer_path = Path(tokenizer) if tokenizer else run_dir / "tokenizer" / "checkpoint.pt"
        candidates = {"imagine": ["imagine"], "bc": ["agent"], "auto": ["imagine", "agent"]}[policy]
        found = [run_dir / c / "checkpoint.pt" for c in candidates if (run_dir / c / "checkpoint.pt").is_file()]
        if found:
            agent_path = found[0]
        else:
            note = f"no {' or '.join(c + '/checkpoint.pt' for c in candidates)} in {run_dir} (the run stopped before it)"
            if policy != "auto":
                raise UserError(f"--policy {policy}: {note}")
        world, run = load_dynamics(dynamics_path, require_done=not allow_unfinished)
        _require_crafter(world.action_space.name, dynamics_path, "world model")
        world_path = dynamics_path
    else:
        world_path = Path(checkpoint)
        if not world_path.is_file():
            raise UserError(f"{world_path}: no such checkpoint")
        if _is_agent_checkpoint(world_path):
            agent_path = world_path
            world = None
        else:
            world, run = load_dynamics(world_path, require_done=not allow_unfinished)
            _require_crafter(world.action_space.name, world_path, "world model")
            note = f"{world_path} is a world model without an agent (pass an agent or imagine checkpoint)"
        tokenizer_path = None if tokenizer is None else Path(tokenizer)
    if agent_path is not None:
        agent, agent_run = load_agent(agent_path, require_done=not allow_unfinished)
        _require_crafter(agent.action_space.name, agent_path, "agent")
        if world is None:
            world, run = agent, agent_run
    if tokenizer_path is None:  # the one the run trained with, else the run folder's beside the checkpoint
        candidates = [Path(p) for p in (run.dynamics.tokenizer_checkpoint,) if p]
        candidates += [world_path.parent.parent / "tokenizer" / "checkpoint.pt",
                       Path(run.out_dir) / "tokenizer" / "checkpoint.pt"]
        tokenizer_path = next((p for p in candidates if p.is_file()), candidates[0])
    if not tokenizer_path.is_file():
        raise UserError(f"{tokenizer_path}: the tokenizer checkpoint is missing (pass --tokenizer PATH)")
    tok, tok_cfg = load_tokenizer(tokenizer_path)
    expected = (world.dynamics.cfg if isinstance(world, AgentModel) else world.cfg)
    if (tok.cfg.num_latents, tok.cfg.latent_dim) != (expected.num_latents, expected.latent_dim):
        raise CheckpointError(f"{tokenizer_path}: latents {tok.cfg.num_latents}x{tok.cfg.latent_dim} do not match "
                              f"the world model's {expected.num_latents}x{expected.latent_dim}")
    label = {"agent": "bc", "imagine": "imagine"}.get(agent_path.parent.name, "agent") if agent_path else ""
    sources = {"world model": str(world_path), "tokenizer": str(tokenizer_path)}
    if agent_path:
        sources["agent"] = str(agent_path)
    return PlayModels(tokenizer=tok, tokenizer_context=tokenizer_context(run, tok_cfg), world=world,
                      max_context=max(2, int(run.dynamics.train.seq_len)), agent=agent, agent_label=label,
                      agent_note=note, sources=sources, default_steps=int(expected.sampling_steps))


class Dream:
    """A world model imagining one frame per action from a start latent, with a capped context.
    Works with a bare DynamicsModel and with an AgentModel (which also returns its agent readout)."""

    def __init__(self, model: DynamicsModel | AgentModel, steps: int, max_context: int,
                 generator: torch.Generator):
        self.model, self.steps, self.max_context, self.generator = model, steps, max_context, generator
        self.latents: list[torch.Tensor] = []  # (L, C) per frame, the last max_context kept
        self.prev_actions: list[int] = []
        self.restarts = 0
        self.rollout = self._new_rollout()

    def _new_rollout(self):
        if isinstance(self.model, AgentModel):
            return AgentRollout(self.model, generator=self.generator, steps=self.steps)
        return Rollout(self.model, generator=self.generator)

    def _keep(self, latent: torch.Tensor, action: int) -> None:
        self.latents = (self.latents + [latent])[-self.max_context:]
        self.prev_actions = (self.prev_actions + [action])[-self.max_context:]

    def start(self, latent: torch.Tensor) -> torch.Tensor | None:
        """Observe the first frame's latent (L, C); returns the agent readout (width,) or None."""
        self._keep(latent, NO_ACTION)
        hidden = self.rollout.observe(latent[None, None], torch.tensor([[NO_ACTION]]))
        return None if hidden is None else hidden[0]

    def step(self, action: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next frame's latent (L, C) after `action`, and its agent readout (width,) or None."""
        if self.rollout.cache.length >= self.max_context:
            keep = self.max_context // 2
            self.restarts += 1
            self.rollout = self._new_rollout()
            prev = torch.tensor([[NO_ACTION] + self.prev_actions[-keep:][1:]])
            self.rollout.observe(torch.stack(self.latents[-keep:])[None], prev)
        code = torch.tensor([action])
        if isinstance(self.rollout, AgentRollout):
            latent, hidden = self.rollout.imagine_step(code)
            latent, hidden = latent[0], hidden[0]
        else:
            latent, hidden = self.rollout.step(code, self.steps)[0], None
        self._keep(latent, action)
        return latent, hidden


class ChunkedCodec:
    """Tokenizer encode/decode of one frame at a time with a KVCache per chunk of `context` frames
    aligned at the episode start (exactly the chunks `data tokenize` used)."""

    def __init__(self, tokenizer, context: int):
        self.tokenizer, self.context = tokenizer, context
        self.encoded = self.decoded = 0
        self.encode_cache = self.decode_cache = KVCache()

    def encode(self, frame: np.ndarray) -> torch.Tensor:
        """(64, 64, 3) uint8 -> latent (L, C)."""
        if self.encoded % self.context == 0:
            self.encode_cache = KVCache()
        self.encoded += 1
        return self.tokenizer.encode(frames_to_float(frame[None])[None], cache=self.encode_cache)[0, 0]

    def decode(self, latent: torch.Tensor) -> np.ndarray:
        """latent (L, C) -> (64, 64, 3) uint8."""
        if self.decoded % self.context == 0:
            self.decode_cache = KVCache()
        self.decoded += 1
        image = self.tokenizer.decode(latent[None, None].float(), cache=self.decode_cache)[0, 0]
        return (image.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)


def frame_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 frames (inf when identical), as evaluation/metrics.py computes it."""
    to_float = lambda x: frames_to_float(x[None])  # noqa: E731
    return float(psnr(to_float(a), to_float(b))[0])


class PlaySession:
    """One tab's episode (module docstring). Not thread-safe: the server runs one call at a time."""

    def __init__(self, models: PlayModels, precision: str = "fp32"):
        self.models = models
        self.precision = precision
        self.mode, self.agent_world, self.seed, self.steps = "dream", "dream", 0, models.default_steps
        self.env = None
        self.frames: dict[str, list[np.ndarray]] = {}

    # -- helpers --------------------------------------------------------------------------------
    def _compute(self):
        """inference_mode, plus bf16 autocast when asked for (benchmarks/play_speed.py measures it)."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.precision == "bf16":
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        return stack

    @property
    def panels(self) -> tuple[str, ...]:
        if self.mode == "side":
            return ("real", "dream")
        if self.mode == "agent":
            return (self.agent_world,)
        return (self.mode,)

    def _record(self, frames: dict[str, np.ndarray]) -> None:
        for name, frame in frames.items():
            if len(self.frames.setdefault(name, [])) < MAX_RECORDED_FRAMES:
                self.frames[name].append(frame)

    def _readings(self, hidden: torch.Tensor | None) -> dict | None:
        """The agent's action probabilities and reward / value / continuation heads at a readout."""
        agent = self.models.agent
        if agent is None or hidden is None:
            return None
        h = hidden[None].float()
        probs = torch.softmax(agent.policy(h)[0].float(), -1)
        continuation = torch.sigmoid(agent.continuation(h).float()).flatten()[0].item() \
            if hasattr(agent, "continuation") else None
        return {"probs": [round(float(p), 4) for p in probs],
                "reward": float(agent.two_hot.decode(agent.reward(h))[0]),
                "value": float(agent.two_hot.decode(agent.value(h))[0]),
                "continuation": continuation}

    # -- episode --------------------------------------------------------------------------------
    def reset(self, mode: str = "dream", seed: int = 0, steps: int | None = None, agent_world: str = "dream") -> dict:
        """Start an episode; returns the first frame message (see `_message`)."""
        if mode not in MODES:
            raise UserError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if agent_world not in AGENT_WORLDS:
            raise UserError(f"unknown agent world {agent_world!r}; choose dream or real")
        if mode == "agent" and self.models.agent is None:
            raise UserError(f"agent mode is off: {self.models.agent_note}")
        steps = self.models.default_steps if steps is None else int(steps)
        k_max = (self.models.world.dynamics.cfg if isinstance(self.models.world, AgentModel)
                 else self.models.world.cfg).k_max
        if steps < 1 or steps & (steps - 1) or steps > k_max:
            raise UserError(f"K (shortcut steps) must be a power of two from 1 to {k_max}, got {steps}")
        self.mode, self.seed, self.steps, self.agent_world = mode, int(seed), steps, agent_world
        self.step_count, self.real_return, self.done, self.frames = 0, 0.0, False, {}
        self.generator = torch.Generator().manual_seed(self.seed)
        self.env = make_crafter_env(self.seed, MAX_EPISODE_STEPS)
        self.real_frame = self.env.reset()
        started = time.perf_counter()
        frames, readings = {}, None
        with self._compute():
            if "real" in self.panels:
                frames["real"] = self.real_frame
            if mode == "agent" and agent_world == "real":
                self.policy = AgentPolicy(self.models.agent, self.models.tokenizer, self.models.tokenizer_context,
                                          self.models.max_context)
                self.policy.reset(self.generator)
                self.pending_action = self.policy.act(self.real_frame)
                readings = self._readings(self.policy.rollout.last_hidden[0])
            if "dream" in self.panels:
                world = self.models.agent if mode == "agent" else self.models.world
                self.codec = ChunkedCodec(self.models.tokenizer, self.models.tokenizer_context)
                self.dream = Dream(world, steps, self.models.max_context, self.generator)
                latent = self.codec.encode(self.real_frame)
                hidden = self.dream.start(latent)
                frames["dream"] = self.codec.decode(latent)
                if mode == "agent":
                    readings = self._readings(hidden)
                    self.pending_action = self._sample(hidden)
        self._record(frames)
        return self._message(frames, None, 0.0, readings, time.perf_counter() - started)

    def _sample(self, hidden: torch.Tensor) -> int:
        logits = self.models.agent.policy(hidden[None].float())
        return int(self.models.agent.action_space.sample(logits, self.generator)[0])

    def act(self, action: int) -> dict:
        """A key press: every world of the mode takes `action`; returns the next frame message."""
        if self.env is None:
            raise UserError("reset first")
        if self.mode == "agent":
            raise UserError("in agent mode the policy acts (send agent_step); switch mode to play")
        if not 0 <= int(action) < len(CRAFTER_ACTIONS):
            raise UserError(f"action must be 0..{len(CRAFTER_ACTIONS) - 1}, got {action}")
        return self._advance(int(action))

    def agent_step(self) -> dict:
        """The agent takes the action it drew at the current frame; returns the next frame message."""
        if self.env is None or self.mode != "agent":
            raise UserError("agent_step needs agent mode (reset with mode=agent)")
        return self._advance(self.pending_action)

    def _advance(self, action: int) -> dict:
        if self.done:
            return self._message({}, action, 0.0, None, 0.0)
        started = time.perf_counter()
        frames, reward, readings = {}, 0.0, None
        with self._compute():
            if "real" in self.panels:
                self.real_frame, reward, self.done, _ = self.env.step(action)
                self.real_return += float(reward)
                frames["real"] = self.real_frame
                if self.mode == "agent":
                    self.pending_action = self.policy.act(self.real_frame)
                    readings = self._readings(self.policy.rollout.last_hidden[0])
            if "dream" in self.panels:
                latent, hidden = self.dream.step(action)
                frames["dream"] = self.codec.decode(latent)
                if self.mode == "agent":
                    readings = self._readings(hidden)
                    self.pending_action = self._sample(hidden)
        self.step_count += 1
        self.done = self.done or self.step_count >= MAX_EPISODE_STEPS
        self._record(frames)
        return self._message(frames, action, float(reward), readings, time.perf_counter() - started)

    def _message(self, frames: dict[str, np.ndarray], action: int | None, reward: float, readings: dict | None,
                 seconds: float) -> dict:
        psnr = frame_psnr(frames["real"], frames["dream"]) if {"real", "dream"} <= frames.keys() else None
        message = {"type": "frame", "mode": self.mode, "step": self.step_count, "frames": frames,
                   "action": None if action is None else CRAFTER_ACTIONS[action], "reward": reward,
                   "return": self.real_return, "done": self.done, "ms": round(1000.0 * seconds, 1),
                   "psnr": None if psnr is None else (psnr if np.isfinite(psnr) else 99.0), "steps": self.steps}
        if readings is not None:
            message["agent"] = {**readings, "next_action": CRAFTER_ACTIONS[self.pending_action]}
        return message

    def episode_video(self, fps: float, kind: str, folder: Path) -> Path:
        """The episode so far (each panel side by side, 4x upscaled) as <folder>/episode.gif or .mp4."""
        if not self.frames:
            raise UserError("nothing played yet")
        panels = [np.stack(self.frames[name]) for name in self.panels if name in self.frames]
        paths = write_side_by_side(folder / "episode", panels, fps=fps, scale=4, mp4=(kind == "mp4"))
        if paths[kind] is None:
            raise UserError("MP4 encoding is not available here (imageio-ffmpeg); download the GIF")
        return paths[kind]

"""Action spaces: one int64 code per step, and the factorized distribution a policy's logits define.

    space = get_action_space("minerl")          # or "crafter"
    codes, report = space.codes_from_actions(np.load("episode/actions.npz"))
    parts = space.unpack(torch.as_tensor(codes))   # {"keys": ..., "camera": ..., "item": ...}
    logp = space.log_prob(policy_logits, codes)     # policy_logits (..., space.num_logits)

MineRL (docs/design.md, Action space): 144 logits = [8 key logits | 121 camera | 15 items].
- keys: 8 independent Bernoulli bits (KEYS order), packed as a bitfield 0..255 (bit i = KEYS[i]).
- camera: one categorical over 11 x 11 classes; pitch and yaw are each clipped to +-10 degrees, mu-law
  encoded (mu = 10) and rounded to 11 bins (VPT's camera_maxval=10, camera_binsize=2, camera_mu=10);
  class = pitch_bin * 11 + yaw_bin, so no motion is class 60.
- item: one categorical over ITEM_ACTIONS (none + the 14 item actions of the diamond tech tree).
- code = keys + 256 * (camera + 121 * item), lossless; no action is ever reduced to one class.
Crafter: one categorical over its 17 actions; the code is the action index.

Raw MineRL actions the layout cannot represent (an item outside ITEM_ACTIONS, several item actions at
one tick, camera beyond +-10 degrees) are counted in an ActionReport, never silently dropped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

Codes = np.ndarray | torch.Tensor

# --- MineRL layout ----------------------------------------------------------------------------------
KEYS = ("forward", "back", "left", "right", "jump", "sneak", "sprint", "attack")
CAMERA_MAX_DEG = 10.0
CAMERA_BIN_SIZE = 2.0
CAMERA_MU = 10.0
CAMERA_BINS = 11
NO_MOTION_CAMERA_CLASS = (CAMERA_BINS // 2) * CAMERA_BINS + CAMERA_BINS // 2  # 60
# Enum keys of MineRL v0.4 in the order used when several fire at one tick (first representable wins).
ITEM_ENUM_KEYS = ("craft", "nearbyCraft", "nearbySmelt", "place", "equip")
ITEM_ACTIONS = (
    "none",
    "craft:planks", "craft:stick", "craft:crafting_table", "craft:torch",
    "nearbyCraft:wooden_pickaxe", "nearbyCraft:stone_pickaxe", "nearbyCraft:iron_pickaxe", "nearbyCraft:furnace",
    "nearbySmelt:iron_ingot",
    "place:crafting_table", "place:furnace",
    "equip:wooden_pickaxe", "equip:stone_pickaxe", "equip:iron_pickaxe",
)
# The values of each enum in MineRL v0.4 ObtainDiamond (minerl/herobraine/env_specs/obtain_specs.py).
# MineRL's Enum space numbers values in sorted order, so an integer enum value v means sorted(values)[v].
MINERL_ENUM_VALUES = {
    "craft": ("none", "torch", "stick", "planks", "crafting_table"),
    "nearbyCraft": ("none", "wooden_axe", "wooden_pickaxe", "stone_axe", "stone_pickaxe", "iron_axe",
                    "iron_pickaxe", "furnace"),
    "nearbySmelt": ("none", "iron_ingot", "coal"),
    "place": ("none", "dirt", "stone", "cobblestone", "crafting_table", "furnace", "torch"),
    "equip": ("none", "air", "wooden_axe", "wooden_pickaxe", "stone_axe", "stone_pickaxe", "iron_axe",
              "iron_pickaxe"),
}

# --- Crafter layout ---------------------------------------------------------------------------------
CRAFTER_ACTIONS = (
    "noop", "move_left", "move_right", "move_up", "move_down", "do", "sleep", "place_stone", "place_table",
    "place_furnace", "place_plant", "make_wood_pickaxe", "make_stone_pickaxe", "make_iron_pickaxe",
    "make_wood_sword", "make_stone_sword", "make_iron_sword",
)


# --- camera quantization (VPT mu-law scheme) ----------------------------------------------------------
def camera_to_bins(degrees: np.ndarray) -> np.ndarray:
    """Degrees -> bin index 0..10 per value: clip to +-10, mu-law encode, round to 2-unit bins."""
    x = np.clip(np.asarray(degrees, dtype=np.float64), -CAMERA_MAX_DEG, CAMERA_MAX_DEG) / CAMERA_MAX_DEG
    encoded = np.sign(x) * np.log1p(CAMERA_MU * np.abs(x)) / np.log1p(CAMERA_MU) * CAMERA_MAX_DEG
    return np.round((encoded + CAMERA_MAX_DEG) / CAMERA_BIN_SIZE).astype(np.int64)


def camera_bin_centres() -> np.ndarray:
    """(11,) degrees each bin decodes to: 0, +-0.615, +-1.609, +-3.215, +-5.809, +-10."""
    v = (np.arange(CAMERA_BINS) * CAMERA_BIN_SIZE - CAMERA_MAX_DEG) / CAMERA_MAX_DEG
    return np.sign(v) * ((1.0 + CAMERA_MU) ** np.abs(v) - 1.0) / CAMERA_MU * CAMERA_MAX_DEG


def camera_to_class(pitch_yaw: np.ndarray) -> np.ndarray:
    """(..., 2) [delta pitch, delta yaw] degrees -> (...) class pitch_bin * 11 + yaw_bin."""
    bins = camera_to_bins(pitch_yaw)
    return bins[..., 0] * CAMERA_BINS + bins[..., 1]


def camera_class_to_degrees(camera_class: np.ndarray) -> np.ndarray:
    """(...) class -> (..., 2) [pitch, yaw] degrees at the bin centres."""
    camera_class = np.asarray(camera_class)
    centres = camera_bin_centres()
    return np.stack([centres[camera_class // CAMERA_BINS], centres[camera_class % CAMERA_BINS]], axis=-1)


# --- the action space ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ActionComponent:
    """One factor of the action distribution."""

    name: str
    kind: str  # "bernoulli": num_logits independent bits; "categorical": one choice among num_logits
    num_logits: int
    value_names: tuple[str, ...]  # bernoulli: one name per bit; categorical: one name per class

    @property
    def num_values(self) -> int:
        """Distinct values of the unpacked component (an embedding table's size)."""
        return 2**self.num_logits if self.kind == "bernoulli" else self.num_logits


@dataclass
class ActionReport:
    """Raw values the action layout cannot represent, counted (per tick) while converting."""

    steps: int = 0
    camera_clipped: int = 0  # ticks with |pitch| or |yaw| beyond CAMERA_MAX_DEG (clipped to the edge bin)
    multiple_item_actions: int = 0  # ticks with more than one non-"none" enum action (first kept)
    unrepresentable_items: Counter = field(default_factory=Counter)  # "key:value" -> ticks (mapped to none)

    @property
    def total(self) -> int:
        return self.camera_clipped + self.multiple_item_actions + sum(self.unrepresentable_items.values())

    def merge(self, other: "ActionReport") -> "ActionReport":
        return ActionReport(
            self.steps + other.steps,
            self.camera_clipped + other.camera_clipped,
            self.multiple_item_actions + other.multiple_item_actions,
            self.unrepresentable_items + other.unrepresentable_items,
        )

    @classmethod
    def from_dict(cls, d: dict) -> "ActionReport":
        return cls(d["steps"], d["camera_clipped"], d["multiple_item_actions"], Counter(d["unrepresentable_items"]))

    def to_dict(self) -> dict:
        return {
            "steps": self.steps,
            "camera_clipped": self.camera_clipped,
            "multiple_item_actions": self.multiple_item_actions,
            "unrepresentable_items": dict(sorted(self.unrepresentable_items.items())),
            "total": self.total,
        }


class ActionSpace:
    """A factorized action distribution over `components`, with codes packed in mixed radix.

    code = sum_i value_i * prod_{j<i} num_values_j, in component order (the order of the logits).
    pack/unpack work on numpy arrays and torch LongTensors of any shape; the distribution methods
    take logits (..., num_logits) and codes (...) as torch tensors and compute in float32.
    """

    name: str = ""

    def __init__(self, components: tuple[ActionComponent, ...]):
        self.components = components
        self.num_logits = sum(c.num_logits for c in components)
        radices, radix = [], 1
        for c in components:
            radices.append(radix)
            radix *= c.num_values
        self._radices = tuple(radices)
        self.num_codes = radix

    # -- codes --
    def pack(self, parts: Mapping[str, Codes], validate: bool = True) -> Codes:
        """Component values (each (...)) -> codes (...) int64, numpy or torch like the inputs."""
        code = None
        for c, radix in zip(self.components, self._radices):
            value = parts[c.name]
            if validate:
                _check_range(value, c.num_values, f"{self.name} action component {c.name!r}")
            value = value.long() if isinstance(value, torch.Tensor) else np.asarray(value, dtype=np.int64)
            code = value * radix if code is None else code + value * radix
        return code

    def unpack(self, codes: Codes, validate: bool = True) -> dict[str, Codes]:
        """Codes (...) -> {component name: values (...) int64}, numpy or torch like the input."""
        if validate:
            _check_range(codes, self.num_codes, f"{self.name} action code")
        if not isinstance(codes, torch.Tensor):
            codes = np.asarray(codes, dtype=np.int64)
        return {c.name: (codes // radix) % c.num_values for c, radix in zip(self.components, self._radices)}

    def is_valid(self, codes: np.ndarray) -> np.ndarray:
        """Boolean mask of codes inside 0..num_codes-1."""
        codes = np.asarray(codes)
        return (codes >= 0) & (codes < self.num_codes)

    @property
    def noop_code(self) -> int:
        return int(self.pack({c.name: np.int64(self._noop_value(c)) for c in self.components}))

    def _noop_value(self, component: ActionComponent) -> int:
        return 0

    # -- distribution --
    def split_logits(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """(..., num_logits) -> {component name: (..., component.num_logits)} in logit order."""
        if logits.shape[-1] != self.num_logits:
            raise ValueError(f"{self.name} action space expects {self.num_logits} logits, got {logits.shape[-1]}")
        return dict(zip((c.name for c in self.components), logits.split([c.num_logits for c in self.components], -1)))

    def component_log_probs(self, logits: torch.Tensor, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """log pi per component, each (...): Bernoulli bits summed over keys, categorical log-softmax.
        Logits (..., num_logits) and codes (...) broadcast against each other."""
        codes = torch.as_tensor(codes, device=logits.device)
        batch = torch.broadcast_shapes(logits.shape[:-1], codes.shape)
        parts = self.unpack(codes.expand(batch))
        out = {}
        for c, (name, lg) in zip(self.components, self.split_logits(logits.float()).items()):
            value = parts[name]
            if c.kind == "bernoulli":
                bits = _bits(value, c.num_logits).float()
                out[name] = (bits * F.logsigmoid(lg) + (1 - bits) * F.logsigmoid(-lg)).sum(-1)
            else:
                logp = F.log_softmax(lg, -1).expand(*batch, c.num_logits)
                out[name] = logp.gather(-1, value.unsqueeze(-1)).squeeze(-1)
        return out

    def log_prob(self, logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """log pi(code) (...) of the factorized distribution: the sum of the components' log-probs."""
        return sum(self.component_log_probs(logits, codes).values())

    def entropy(self, logits: torch.Tensor) -> torch.Tensor:
        """Entropy (...) of the factorized distribution (sum over independent components)."""
        total = 0.0
        for c, lg in zip(self.components, self.split_logits(logits.float()).values()):
            if c.kind == "bernoulli":
                p = torch.sigmoid(lg)
                total = total - (p * F.logsigmoid(lg) + (1 - p) * F.logsigmoid(-lg)).sum(-1)
            else:
                logp = F.log_softmax(lg, -1)
                total = total - (logp.exp() * logp).sum(-1)
        return total

    def kl(self, logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
        """KL(p || q) (...) between two factorized distributions (sum of per-component KLs)."""
        total = 0.0
        for c, lp, lq in zip(self.components, self.split_logits(logits_p.float()).values(),
                             self.split_logits(logits_q.float()).values()):
            if c.kind == "bernoulli":
                p = torch.sigmoid(lp)
                total = total + (p * (F.logsigmoid(lp) - F.logsigmoid(lq))
                                 + (1 - p) * (F.logsigmoid(-lp) - F.logsigmoid(-lq))).sum(-1)
            else:
                logp, logq = F.log_softmax(lp, -1), F.log_softmax(lq, -1)
                total = total + (logp.exp() * (logp - logq)).sum(-1)
        return total

    def sample(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Codes (...) int64 drawn from the distribution; pass a generator for reproducible draws."""
        parts = {}
        for c, lg in zip(self.components, self.split_logits(logits.float()).values()):
            if c.kind == "bernoulli":
                u = torch.rand(lg.shape, generator=generator, device=lg.device)
                parts[c.name] = _from_bits(u < torch.sigmoid(lg))
            else:
                probs = F.softmax(lg, -1).reshape(-1, c.num_logits)
                draw = torch.multinomial(probs, 1, generator=generator)
                parts[c.name] = draw.reshape(lg.shape[:-1])
        return self.pack(parts, validate=False)

    def mode(self, logits: torch.Tensor) -> torch.Tensor:
        """Codes (...) of the most likely action (each factor at its mode)."""
        parts = {}
        for c, lg in zip(self.components, self.split_logits(logits.float()).values()):
            parts[c.name] = _from_bits(lg > 0) if c.kind == "bernoulli" else lg.argmax(-1)
        return self.pack(parts, validate=False)

    # -- data --
    def codes_from_actions(self, actions: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ActionReport]:
        """An episode's actions.npz content -> (codes (T,) int64, report). ValueError on bad input."""
        raise NotImplementedError

    def statistics(self, codes: np.ndarray) -> dict:
        """Per-component frequencies of a set of codes, for `dreamerv4 data validate`."""
        parts = self.unpack(np.asarray(codes, dtype=np.int64))
        n = max(len(codes), 1)
        stats = {}
        for c in self.components:
            value = parts[c.name]
            if c.kind == "bernoulli":
                bits = _bits_np(value, c.num_logits)
                stats[c.name] = {name: float(bits[:, i].sum() / n) for i, name in enumerate(c.value_names)}
            else:
                counts = np.bincount(value, minlength=c.num_logits)
                stats[c.name] = {name: int(k) for name, k in zip(c.value_names, counts)}
        return stats


def _check_range(values: Codes, size: int, what: str) -> None:
    if isinstance(values, torch.Tensor):
        if values.is_floating_point():
            raise ValueError(f"{what}: expected integer values, got {values.dtype}")
        bad = (values < 0) | (values >= size)
        if bool(bad.any()):
            raise ValueError(f"{what}: value {int(values[bad][0])} outside 0..{size - 1}")
        return
    values = np.asarray(values)
    if values.dtype.kind not in "iub":
        raise ValueError(f"{what}: expected integer values, got dtype {values.dtype}")
    bad = (values < 0) | (values >= size)
    if bad.any():
        raise ValueError(f"{what}: value {int(values[bad].flat[0])} outside 0..{size - 1}")


def _bits(value: torch.Tensor, n: int) -> torch.Tensor:
    """(...) bitfield -> (..., n) 0/1 int64, bit i first."""
    return (value.unsqueeze(-1) >> torch.arange(n, device=value.device)) & 1


def _bits_np(value: np.ndarray, n: int) -> np.ndarray:
    return (np.asarray(value)[..., None] >> np.arange(n)) & 1


def _from_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., n) booleans -> (...) bitfield int64."""
    weights = 2 ** torch.arange(bits.shape[-1], device=bits.device)
    return (bits.long() * weights).sum(-1)


class MineRLActionSpace(ActionSpace):
    """MineRL: 8 Bernoulli keys + 121-way camera + 15-way item; 144 logits, 464,640 codes."""

    name = "minerl"

    def __init__(self):
        centres = camera_bin_centres()
        camera_names = tuple(
            f"pitch{centres[p]:+.3f},yaw{centres[y]:+.3f}" for p in range(CAMERA_BINS) for y in range(CAMERA_BINS)
        )
        super().__init__((
            ActionComponent("keys", "bernoulli", len(KEYS), KEYS),
            ActionComponent("camera", "categorical", CAMERA_BINS * CAMERA_BINS, camera_names),
            ActionComponent("item", "categorical", len(ITEM_ACTIONS), ITEM_ACTIONS),
        ))

    def _noop_value(self, component: ActionComponent) -> int:
        return NO_MOTION_CAMERA_CLASS if component.name == "camera" else 0

    def codes_from_actions(self, actions: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ActionReport]:
        """MineRL keys (`action$forward`..., `action$camera` (T, 2) degrees, optional enum keys whose
        values are strings or MineRL Enum integers) -> (codes (T,), report of unrepresentable values)."""
        missing = [f"action${k}" for k in (*KEYS, "camera") if f"action${k}" not in actions]
        if missing:
            raise ValueError(f"missing MineRL action key(s) {', '.join(missing)}")
        camera = np.asarray(actions["action$camera"])
        if camera.ndim != 2 or camera.shape[1] != 2 or camera.dtype.kind != "f":
            raise ValueError(f"action$camera: expected (T, 2) floats, got shape {camera.shape} dtype {camera.dtype}")
        steps = camera.shape[0]
        if not np.isfinite(camera).all():
            raise ValueError(f"action$camera: {int((~np.isfinite(camera)).any(1).sum())} steps are NaN or inf")
        keys = np.zeros(steps, np.int64)
        for i, k in enumerate(KEYS):
            pressed = np.asarray(actions[f"action${k}"])
            if pressed.shape != (steps,):
                raise ValueError(f"action${k}: expected shape ({steps},), got {pressed.shape}")
            if pressed.dtype.kind not in "iub" or not np.isin(pressed, (0, 1)).all():
                raise ValueError(f"action${k}: expected 0/1 integers, got dtype {pressed.dtype} "
                                 f"values {np.unique(pressed)[:5].tolist()}")
            keys |= pressed.astype(np.int64) << i

        report = ActionReport(steps=steps)
        report.camera_clipped = int((np.abs(camera) > CAMERA_MAX_DEG).any(1).sum())
        camera_class = camera_to_class(camera)

        item = np.zeros(steps, np.int64)
        active = np.zeros(steps, np.int64)
        for key in ITEM_ENUM_KEYS:
            if f"action${key}" not in actions:
                continue
            values = _enum_strings(key, np.asarray(actions[f"action${key}"]), steps)
            for value in np.unique(values):
                if value == "none":
                    continue
                ticks = values == value
                active += ticks
                name = f"{key}:{value}"
                if name in ITEM_ACTIONS:
                    item[ticks & (item == 0)] = ITEM_ACTIONS.index(name)
                else:
                    report.unrepresentable_items[name] += int(ticks.sum())
        report.multiple_item_actions = int((active > 1).sum())
        codes = self.pack({"keys": keys, "camera": camera_class, "item": item}, validate=False)
        return codes, report

    def actions_from_codes(self, codes: np.ndarray) -> dict[str, np.ndarray]:
        """Codes (T,) -> MineRL action arrays (camera at the bin centres, enums as strings)."""
        parts = self.unpack(np.asarray(codes, dtype=np.int64))
        out = {f"action${k}": ((parts["keys"] >> i) & 1).astype(np.int64) for i, k in enumerate(KEYS)}
        out["action$camera"] = camera_class_to_degrees(parts["camera"]).astype(np.float32)
        for key in ITEM_ENUM_KEYS:
            values = np.full(len(parts["item"]), "none", dtype=object)
            for index, name in enumerate(ITEM_ACTIONS):
                if name.startswith(key + ":"):
                    values[parts["item"] == index] = name.split(":", 1)[1]
            out[f"action${key}"] = values.astype(str)
        return out


def _enum_strings(key: str, values: np.ndarray, steps: int) -> np.ndarray:
    """An enum action column (strings, bytes or MineRL Enum integers) -> (T,) str array."""
    if values.shape != (steps,):
        raise ValueError(f"action${key}: expected shape ({steps},), got {values.shape}")
    if values.dtype.kind in "iu":
        names = sorted(MINERL_ENUM_VALUES[key])
        if values.size and (values.min() < 0 or values.max() >= len(names)):
            raise ValueError(f"action${key}: integer value {int(values.max())} outside MineRL's enum 0..{len(names) - 1}")
        return np.asarray(names, dtype=str)[values]
    if values.dtype.kind == "S":
        return np.char.decode(values, "utf-8")
    if values.dtype.kind in "UO":
        return values.astype(str)
    raise ValueError(f"action${key}: expected strings or integers, got dtype {values.dtype}")


class CrafterActionSpace(ActionSpace):
    """Crafter: one categorical over its 17 actions; the code is the action index."""

    name = "crafter"

    def __init__(self):
        super().__init__((ActionComponent("action", "categorical", len(CRAFTER_ACTIONS), CRAFTER_ACTIONS),))

    def codes_from_actions(self, actions: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ActionReport]:
        """Crafter's `action` (T,) int64 -> (codes (T,), empty report). ValueError when out of range."""
        if "action" not in actions:
            raise ValueError("missing key 'action' (Crafter episodes store action (T,) int64)")
        codes = np.asarray(actions["action"])
        if codes.ndim != 1 or codes.dtype != np.int64:
            raise ValueError(f"action: expected (T,) int64, got shape {codes.shape} dtype {codes.dtype}")
        _check_range(codes, self.num_codes, "action")
        return codes.astype(np.int64, copy=False), ActionReport(steps=len(codes))


_SPACES = {"minerl": MineRLActionSpace, "crafter": CrafterActionSpace}


def get_action_space(name: str) -> ActionSpace:
    """"minerl" (144 logits) or "crafter" (17 logits)."""
    if name not in _SPACES:
        raise ValueError(f"unknown action space {name!r}; choose one of {sorted(_SPACES)}")
    return _SPACES[name]()


def layout_of(actions: Mapping[str, np.ndarray]) -> str | None:
    """Which action space an actions.npz's keys belong to: "crafter", "minerl", or None."""
    if "action" in actions:
        return "crafter"
    if any(k.startswith("action$") for k in actions):
        return "minerl"
    return None


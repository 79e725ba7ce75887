"""Record episodes of the real Crafter game in the episode-folder layout (dreamerv4.data.episodes).

    dreamerv4 data crafter --episodes 40 --out data/crafter --seed 0 --policy explore

Episode i goes to OUT/episode_{i:05d}, played in `make_crafter_env(episode_seed(seed, i))` (crafter.Env
with reproducible creature despawning) by a policy seeded from (seed, i) too, so every episode can be
recorded again bit for bit. Each folder holds frames/actions/rewards (T steps: frames[t] is seen,
actions[t] taken, rewards[t] received on that step; the observation after the last step is dropped)
and observations.npz with, per frame:
    inventory     (T, 16) int16  crafter's item order (health, food, drink, energy, sapling, wood, ...)
    achievements  (T, 22) uint8  1 where the achievement was unlocked before this frame (sorted names)
    semantic      (T, 7, 9) uint8  labels of the visible world cells (crafter_layout.local_semantic)
    terminal      (T,) bool  the step ended the episode by the player's death (not the time limit)
OUT/recording.json describes the last recording (settings, lengths, returns, achievement rates).

Policies (`--policy`):
    random   uniform over the 17 actions.
    explore  sticky random exploration that reacts to the 4 cells next to the player (it reads the
             semantic view, privileged information that only data collection uses): it turns to and hits ('do') zombies, skeletons, trees (wood < 9), water
             and cows (when thirsty / hungry) and, with the right pickaxe, stone, coal, iron and
             diamond. Otherwise, 30% of the time it place/makes something it can afford where the game
             allows it (table or furnace in the 3x3 around it for make_*, a suitable cell in front for
             place_*, no second table/furnace in view); else it repeats its sticky action: moves (75%
             of new choices, held 1-8 steps), 'do' (held 1-3), rare noop and sleep, and sleeps when
             energy is low. It unlocks more achievements than random play, so the world model sees
             more of the tech tree.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from dreamerv4.actions import CRAFTER_ACTIONS
from dreamerv4.data.crafter_layout import SEMANTIC_NAMES, local_semantic
from dreamerv4.data.episodes import write_episode
from dreamerv4.errors import DataError, UserError


@dataclass
class RecordConfig:
    episodes: int = 40  # training episodes, recorded with `seed`
    heldout_episodes: int = 10  # held-out episodes, recorded with `heldout_seed` into `<data.path>-heldout`
    seed: int = 0
    heldout_seed: int = 10_000
    policy: str = "random"
    max_steps: int = 10000


def episode_folder(out_dir: str | Path, index: int) -> Path:
    return Path(out_dir) / f"episode_{index:05d}"


def episode_seed(seed: int, index: int) -> int:
    """The crafter.Env seed of episode `index` of a recording made with `seed`."""
    return int(np.random.SeedSequence([seed, index, 0]).generate_state(1)[0] & 0x7FFFFFFF)


def crafter_score(success_rates: dict[str, float]) -> float:
    """Crafter score in percent: exp(mean(log(1 + success%))) - 1 over the 22 achievements."""
    percents = np.array([100.0 * r for r in success_rates.values()])
    return float(np.exp(np.mean(np.log1p(percents))) - 1.0)


# --- policies -----------------------------------------------------------------------------------------
# A policy is called once per step with the inventory (item -> count) and the 7x9 semantic labels of
# the frame it acts on (dreamerv4.data.crafter_layout), and returns an action index.
class RandomPolicy:
    """Uniform over Crafter's 17 actions."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def __call__(self, inventory: dict[str, int], semantic: np.ndarray) -> int:
        return int(self.rng.integers(len(CRAFTER_ACTIONS)))


def _label(name: str) -> int:
    return SEMANTIC_NAMES.index(name)


class ExplorePolicy:
    """Sticky random exploration that interacts with what is next to it and crafts what it can."""

    MOVES = {CRAFTER_ACTIONS.index(f"move_{d}"): cell
             for d, cell in (("left", (3, 3)), ("right", (3, 5)), ("up", (2, 4)), ("down", (4, 4)))}
    DO, SLEEP, NOOP = (CRAFTER_ACTIONS.index(a) for a in ("do", "sleep", "noop"))

    def __init__(self, rng: np.random.Generator):
        import crafter

        self.rng = rng
        self.action, self.hold = self.NOOP, 0
        self.facing = CRAFTER_ACTIONS.index("move_down")  # crafter's player starts facing down
        # Crafter's own rules (data.yaml): what each place/make action uses, needs nearby, or needs in front.
        rules = crafter.constants
        self.crafts: dict[int, tuple[dict[str, int], tuple[int, ...], tuple[int, ...]]] = {}
        for name, rule in rules.place.items():
            where = tuple(_label(m) for m in rule["where"])
            self.crafts[CRAFTER_ACTIONS.index(f"place_{name}")] = (dict(rule["uses"]), (), where)
        for name, rule in rules.make.items():
            stations = tuple(_label(m) for m in rule["nearby"])
            self.crafts[CRAFTER_ACTIONS.index(f"make_{name}")] = (dict(rule["uses"]), stations, ())

    def _wanted(self, inventory: dict[str, int]) -> set[int]:
        """Labels worth facing and hitting with 'do' right now."""
        wanted = {_label("zombie"), _label("skeleton")}
        if inventory.get("wood", 0) < 9:
            wanted.add(_label("tree"))
        if inventory.get("drink", 9) < 9:
            wanted.add(_label("water"))
        if inventory.get("food", 9) < 9:
            wanted.add(_label("cow"))
        if inventory.get("wood_pickaxe", 0):
            wanted |= {_label("stone"), _label("coal")}
        if inventory.get("stone_pickaxe", 0):
            wanted.add(_label("iron"))
        if inventory.get("iron_pickaxe", 0):
            wanted.add(_label("diamond"))
        return wanted

    def _feasible_crafts(self, inventory: dict[str, int], semantic: np.ndarray) -> list[int]:
        around = set(semantic[2:5, 3:6].ravel().tolist())  # crafter's "nearby" is the 3x3 around the player
        in_view = set(semantic.ravel().tolist())
        in_front = int(semantic[self.MOVES[self.facing]])
        feasible = []
        for action, (uses, stations, where) in self.crafts.items():
            if not all(inventory.get(k, 0) >= n for k, n in uses.items()):
                continue
            if not all(s in around for s in stations) or (where and in_front not in where):
                continue
            name = CRAFTER_ACTIONS[action]
            if name in ("place_table", "place_furnace") and _label(name[6:]) in in_view:
                continue  # one station in sight is enough
            feasible.append(action)
        return feasible

    def __call__(self, inventory: dict[str, int], semantic: np.ndarray) -> int:
        action = self._choose(inventory, semantic)
        if action in self.MOVES:
            self.facing = action
        return action

    def _choose(self, inventory: dict[str, int], semantic: np.ndarray) -> int:
        rng = self.rng
        wanted = self._wanted(inventory)
        for move, cell in self.MOVES.items():
            if semantic[cell] in wanted and rng.random() < 0.8:
                self.hold = 0
                return self.DO if self.facing == move else move  # moving into a blocked cell only turns
        feasible = self._feasible_crafts(inventory, semantic)
        if feasible and rng.random() < 0.3:
            self.hold = 0
            return int(rng.choice(feasible))
        if self.hold > 0:
            self.hold -= 1
            return self.action
        if inventory.get("energy", 9) < 3 and rng.random() < 0.5:
            self.action, self.hold = self.SLEEP, 0  # once asleep, crafter keeps sleeping until rested
            return self.action
        r = rng.random()
        if r < 0.75:
            self.action, self.hold = int(rng.choice(list(self.MOVES))), int(rng.integers(0, 8))
        elif r < 0.97:
            self.action, self.hold = self.DO, int(rng.integers(0, 3))
        elif r < 0.99:
            self.action, self.hold = self.NOOP, 0
        else:
            self.action, self.hold = self.SLEEP, 0
        return self.action


POLICIES: dict[str, Callable[[np.random.Generator], Callable[[dict[str, int], np.ndarray], int]]] = {
    "random": RandomPolicy,
    "explore": ExplorePolicy,
}


def make_policy(name: str, rng: np.random.Generator):
    if name not in POLICIES:
        raise UserError(f"--policy {name!r}: unknown policy; choose one of {', '.join(POLICIES)}")
    return POLICIES[name](rng)


# --- recording ----------------------------------------------------------------------------------------
@functools.cache
def _deterministic_env_class():
    import crafter

    class DeterministicCrafterEnv(crafter.Env):
        """crafter.Env with one fix for reproducibility; the game itself is unchanged.

        Crafter keeps each chunk's creatures in a set of objects (ordered by memory address) and
        despawns `creatures[random index]` of it, so the same seed and actions diverged between runs
        after a few hundred steps. Here the creatures are visited in the order they entered the world.
        """

        def _balance_chunk(self, chunk, objs):
            index = self._world._obj_map
            super()._balance_chunk(chunk, sorted(objs, key=lambda obj: int(index[tuple(obj.pos)])))

    return DeterministicCrafterEnv


def make_crafter_env(seed: int, max_steps: int = 10000):
    """The real Crafter game (64x64 frames, 17 actions), reproducible from `seed` and the actions."""
    return _deterministic_env_class()(seed=seed, length=max_steps)


def play_episode(env_seed: int, policy, max_steps: int) -> dict:
    """Play one Crafter episode; returns the episode's arrays (see the module docstring) and stats."""
    env = make_crafter_env(env_seed, max_steps)
    obs = env.reset()
    item_names = list(env._player.inventory)
    achievement_names = sorted(env._player.achievements)
    # Frame 0 comes from reset(), which returns no info: read the same quantities from the env.
    inventory = dict(env._player.inventory)
    frames = [obs]
    semantic = [local_semantic(env._sem_view(), env._player.pos)]
    inventories = [[inventory[k] for k in item_names]]
    unlocked = np.zeros(len(achievement_names), np.uint8)
    achievements = [unlocked.copy()]
    actions, rewards = [], []
    while True:
        action = policy(inventory, semantic[-1])
        obs, reward, done, info = env.step(action)
        actions.append(action)
        rewards.append(reward)
        inventory = info["inventory"]
        unlocked = np.maximum(unlocked, [info["achievements"][k] > 0 for k in achievement_names]).astype(np.uint8)
        if done:
            died = info["discount"] == 0.0
            break
        frames.append(obs)
        semantic.append(local_semantic(info["semantic"], info["player_pos"]))
        inventories.append([inventory[k] for k in item_names])
        achievements.append(unlocked.copy())
    steps = len(actions)
    terminal = np.zeros(steps, bool)
    terminal[-1] = died
    return {
        "frames": np.stack(frames).astype(np.uint8),
        "actions": {"action": np.asarray(actions, np.int64)},
        "rewards": np.asarray(rewards, np.float32),
        "observations": {
            "inventory": np.asarray(inventories, np.int16),
            "achievements": np.stack(achievements),
            "semantic": np.stack(semantic).astype(np.uint8),
            "terminal": terminal,
        },
        "unlocked": {name: bool(u) for name, u in zip(achievement_names, unlocked)},
        "died": bool(died),
    }


def record_crafter(
    out_dir: str | Path,
    episodes: int,
    seed: int = 0,
    policy: str = "random",
    max_steps: int = 10000,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Record `episodes` Crafter episodes into out_dir/episode_XXXXX; returns (and writes to
    out_dir/recording.json) a summary: frames, lengths, returns, achievement success rates, score."""
    from tqdm import tqdm

    if episodes < 1 or max_steps < 1:
        raise UserError(f"--episodes ({episodes}) and --max-steps ({max_steps}) must be at least 1")
    make_policy(policy, np.random.default_rng(0))  # unknown names fail before anything is written
    out_dir = Path(out_dir)
    existing = [episode_folder(out_dir, i) for i in range(episodes) if episode_folder(out_dir, i).exists()]
    if existing and not overwrite:
        raise DataError(f"{existing[0]}: episode already exists ({len(existing)} of {episodes} do); "
                        f"pass --overwrite to replace them or choose another --out")

    started = time.perf_counter()
    lengths, returns, deaths, unlocked = [], [], 0, []
    bar = tqdm(range(episodes), desc=f"crafter {policy}", unit="episode", disable=not progress)
    for index in bar:
        rng = np.random.default_rng(np.random.SeedSequence([seed, index, 1]))
        episode = play_episode(episode_seed(seed, index), make_policy(policy, rng), max_steps)
        write_episode(episode_folder(out_dir, index), episode["frames"], episode["actions"], episode["rewards"],
                      episode["observations"], overwrite=overwrite)
        lengths.append(len(episode["rewards"]))
        returns.append(float(episode["rewards"].sum()))
        deaths += episode["died"]
        unlocked.append(episode["unlocked"])
        bar.set_postfix(frames=sum(lengths), fps=f"{sum(lengths) / (time.perf_counter() - started):.0f}")
    seconds = time.perf_counter() - started
    success = {name: float(np.mean([u[name] for u in unlocked])) for name in unlocked[0]}
    summary = {
        "out_dir": str(out_dir),
        "episodes": episodes,
        "frames": int(sum(lengths)),
        "seed": seed,
        "policy": policy,
        "max_steps": max_steps,
        "episode_seeds": [episode_seed(seed, i) for i in range(episodes)],
        "episode_lengths": lengths,
        "returns": returns,
        "mean_return": float(np.mean(returns)),
        "deaths": int(deaths),
        "achievement_success": success,
        "crafter_score": crafter_score(success),
        "seconds": round(seconds, 2),
        "frames_per_second": round(sum(lengths) / seconds, 1),
    }
    (out_dir / "recording.json").write_text(json.dumps(summary, indent=2))
    return summary


def cmd_record(args) -> int:
    """`dreamerv4 data crafter --episodes N --out DIR [--seed S] [--policy P] [--max-steps M] [--overwrite]`."""
    s = record_crafter(args.out, args.episodes, args.seed, args.policy, args.max_steps, args.overwrite)
    achieved = ", ".join(f"{k} {100 * v:.0f}%" for k, v in s["achievement_success"].items() if v > 0) or "none"
    print(f"recorded {s['episodes']} episode(s), {s['frames']} frames into {s['out_dir']} "
          f"in {s['seconds']:.1f} s ({s['frames_per_second']:.0f} frames/s)")
    print(f"  mean return {s['mean_return']:.2f}, deaths {s['deaths']}, crafter score {s['crafter_score']:.2f}%")
    print(f"  achievements: {achieved}")
    return 0

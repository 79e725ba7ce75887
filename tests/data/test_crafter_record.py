"""Crafter recording: frame/action/reward alignment against a replay of the real game, reproducibility."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from dreamerv4.actions import CRAFTER_ACTIONS
from dreamerv4.cli import main
from dreamerv4.data.crafter_layout import SEMANTIC_NAMES, local_semantic
from dreamerv4.data.crafter_record import (
    ExplorePolicy,
    RandomPolicy,
    crafter_score,
    episode_seed,
    make_crafter_env,
    make_policy,
    play_episode,
    record_crafter,
)
from dreamerv4.data.episodes import find_episodes, load_actions, load_frames, load_observations, load_rewards
from dreamerv4.errors import DataError, UserError

PLAYER = SEMANTIC_NAMES.index("player")


def test_layout_and_observation_arrays(tiny_crafter_root):
    episodes = find_episodes(tiny_crafter_root)
    assert [p.name for p in episodes] == ["episode_00000", "episode_00001", "episode_00002"]
    for episode in episodes:
        steps = len(load_frames(episode))
        obs = load_observations(episode)
        assert len(load_actions(episode)["action"]) == len(load_rewards(episode)) == steps == 40
        assert obs["inventory"].shape == (steps, 16) and obs["inventory"].dtype == np.int16
        assert obs["achievements"].shape == (steps, 22) and obs["achievements"].dtype == np.uint8
        assert obs["semantic"].shape == (steps, 7, 9) and obs["semantic"].dtype == np.uint8
        assert obs["terminal"].shape == (steps,) and not obs["terminal"].any()  # 40 steps: time limit, no death
        # The player is the centre cell of every frame (frame 0 included, read from the env internals).
        assert (obs["semantic"][:, 3, 4] == PLAYER).all()
        assert obs["inventory"][0, 0] == 9  # health starts full
        assert (np.diff(obs["achievements"].astype(int), axis=0) >= 0).all()  # unlocked stays unlocked
    summary = json.loads((tiny_crafter_root / "recording.json").read_text())
    assert summary["frames"] == 120 and summary["episode_seeds"] == [episode_seed(0, i) for i in range(3)]


def test_alignment_matches_a_replay_of_the_game(tiny_crafter_root):
    """frames[t] is what was seen before actions[t]; rewards[t] is what that step paid."""
    episode = tiny_crafter_root / "episode_00001"
    frames, actions, rewards = load_frames(episode), load_actions(episode)["action"], load_rewards(episode)
    obs = load_observations(episode)
    env = make_crafter_env(episode_seed(0, 1), max_steps=40)
    np.testing.assert_array_equal(env.reset(), frames[0])
    for t, action in enumerate(actions):
        image, reward, done, info = env.step(int(action))
        assert reward == pytest.approx(float(rewards[t]))
        if t + 1 < len(frames):
            np.testing.assert_array_equal(image, frames[t + 1])
            np.testing.assert_array_equal(local_semantic(info["semantic"], info["player_pos"]), obs["semantic"][t + 1])
            assert list(obs["inventory"][t + 1]) == list(info["inventory"].values())
    assert done  # the recording stopped exactly when the game did


def test_recording_is_reproducible(tiny_crafter_root, tmp_path):
    record_crafter(tmp_path, episodes=1, seed=0, max_steps=12, progress=False)
    ours, theirs = tmp_path / "episode_00000", tiny_crafter_root / "episode_00000"
    np.testing.assert_array_equal(load_frames(ours), load_frames(theirs)[:12])
    np.testing.assert_array_equal(load_actions(ours)["action"], load_actions(theirs)["action"][:12])
    assert episode_seed(0, 0) != episode_seed(0, 1) != episode_seed(1, 1)


def test_full_episodes_replay_identically():
    """Plain crafter.Env diverged here after ~100-200 steps (creature despawning followed memory order)."""
    runs = [play_episode(episode_seed(1, 1), RandomPolicy(np.random.default_rng(7)), max_steps=10000) for _ in range(2)]
    assert len(runs[0]["rewards"]) > 100  # a full random-policy episode, ended by death
    np.testing.assert_array_equal(runs[0]["frames"], runs[1]["frames"])
    np.testing.assert_array_equal(runs[0]["actions"]["action"], runs[1]["actions"]["action"])


def test_refuses_existing_episodes_unless_overwrite(tiny_crafter_copy, capsys):
    before = load_frames(tiny_crafter_copy / "episode_00000").copy()
    with pytest.raises(DataError, match="episode_00000: episode already exists"):
        record_crafter(tiny_crafter_copy, episodes=1, seed=5, max_steps=5, progress=False)
    np.testing.assert_array_equal(load_frames(tiny_crafter_copy / "episode_00000"), before)
    args = ["data", "crafter", "--episodes", "1", "--out", str(tiny_crafter_copy), "--seed", "5", "--max-steps", "5"]
    assert main(args) == 2
    assert main(args + ["--overwrite", "--policy", "explore"]) == 0
    assert "recorded 1 episode(s), 5 frames" in capsys.readouterr().out
    assert len(load_frames(tiny_crafter_copy / "episode_00000")) == 5
    assert len(find_episodes(tiny_crafter_copy)) == 3


def test_unknown_policy_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown policy"):
        record_crafter(tmp_path, episodes=1, policy="greedy", progress=False)
    assert list(tmp_path.iterdir()) == []


def grass_view(**cells: tuple[int, int]) -> np.ndarray:
    view = np.full((7, 9), SEMANTIC_NAMES.index("grass"), np.uint8)
    view[3, 4] = PLAYER
    for name, cell in cells.items():
        view[cell] = SEMANTIC_NAMES.index(name)
    return view


POOR = {"health": 9, "food": 9, "drink": 9, "energy": 9, "sapling": 0, "wood": 0, "stone": 0, "coal": 0, "iron": 0}
RICH = POOR | {"sapling": 9, "wood": 9, "stone": 9, "coal": 9, "iron": 9}
CRAFTING = tuple(a for a in CRAFTER_ACTIONS if a.startswith(("place_", "make_")))


def test_explore_policy_wanders_moving_and_doing_when_nothing_is_near():
    policy = ExplorePolicy(np.random.default_rng(0))
    counts = Counter(CRAFTER_ACTIONS[policy(POOR, grass_view())] for _ in range(5000))
    moves = sum(counts[a] for a in ("move_left", "move_right", "move_up", "move_down"))
    assert moves / 5000 > 0.6 and counts["do"] / 5000 > 0.1
    assert not any(counts[a] for a in CRAFTING)  # nothing affordable
    random_policy = make_policy("random", np.random.default_rng(0))
    assert len({random_policy(POOR, grass_view()) for _ in range(500)}) == 17


def test_explore_policy_turns_to_and_hits_what_it_wants():
    policy = ExplorePolicy(np.random.default_rng(0))  # starts facing down
    view = grass_view(tree=(3, 5))  # a tree to the right
    actions = [CRAFTER_ACTIONS[policy(POOR, view)] for _ in range(200)]
    reacting = [a for a in actions if a in ("move_right", "do")]
    assert reacting[0] == "move_right" and actions.count("do") > 100
    full_of_wood = POOR | {"wood": 9}
    assert Counter(CRAFTER_ACTIONS[policy(full_of_wood, view)] for _ in range(500))["do"] < 150


def test_explore_policy_crafts_only_where_the_game_allows():
    policy = ExplorePolicy(np.random.default_rng(0))
    near_table = Counter(CRAFTER_ACTIONS[policy(RICH, grass_view(table=(2, 3)))] for _ in range(3000))
    made = {a for a in CRAFTING if near_table[a]}
    assert {"make_wood_pickaxe", "make_stone_pickaxe", "make_wood_sword", "make_stone_sword"} <= made
    assert not made & {"make_iron_pickaxe", "make_iron_sword", "place_table"}  # no furnace; a table in view
    far_from_table = Counter(CRAFTER_ACTIONS[policy(RICH, grass_view(table=(0, 0)))] for _ in range(3000))
    assert not any(far_from_table[a] for a in CRAFTING if a.startswith("make_"))
    both = Counter(CRAFTER_ACTIONS[policy(RICH, grass_view(table=(2, 3), furnace=(4, 5)))] for _ in range(3000))
    assert both["make_iron_pickaxe"] > 0 and both["place_furnace"] == 0


def test_crafter_score():
    assert crafter_score({"a": 0.0, "b": 0.0}) == pytest.approx(0.0)
    assert crafter_score({"a": 1.0, "b": 1.0}) == pytest.approx(100.0)
    assert crafter_score({"a": 1.0, "b": 0.0}) == pytest.approx(np.sqrt(101) - 1)

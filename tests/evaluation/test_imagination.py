"""The model-exploitation instrument (src/dreamerv4/evaluation/imagination.py): replaying recorded
actions reproduces a recorded episode; the real rollout plays exactly the imagined actions from the
replayed state; the summary's unlock / repeat split, precision and recall on hand-made arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dreamerv4.cli import main
from dreamerv4.data.crafter_record import record_crafter
from dreamerv4.data.episodes import load_actions, load_frames, load_rewards
from dreamerv4.errors import DataError
from dreamerv4.evaluation import imagination
from dreamerv4.evaluation.imagination import episode_seeds, play_actions, replay, summarize

from .test_eval_crafter import make_agent_checkpoint


def test_replaying_recorded_actions_gives_the_recorded_frames_and_rewards(tiny_crafter_root):
    seeds, max_steps = episode_seeds(tiny_crafter_root)
    for name in ("episode_00000", "episode_00002"):
        episode = tiny_crafter_root / name
        actions = load_actions(episode)["action"]
        _, frames, rewards = replay(seeds[name], actions, max_steps)
        assert np.array_equal(frames[:-1], load_frames(episode))  # the recording drops the frame after the last step
        assert np.array_equal(rewards, load_rewards(episode))


def test_play_actions_continues_the_replayed_state(tiny_crafter_root):
    seeds, max_steps = episode_seeds(tiny_crafter_root)
    actions = load_actions(tiny_crafter_root / "episode_00001")["action"]
    env, _, _ = replay(seeds["episode_00001"], actions[:10], max_steps)
    real = play_actions(env, actions[10:25])
    _, frames, rewards = replay(seeds["episode_00001"], actions[:25], max_steps)
    assert np.array_equal(real["frames"], frames[11:26]) and np.array_equal(real["reward"], rewards[10:25])
    assert real["alive"].all() and not real["died"].any()


def test_summary_splits_unlocks_repeats_and_deaths():
    real = {"reward": np.array([[1.0, 0.0, -0.1], [0.0, 1.0, 0.0]]), "alive": np.array([[1, 1, 1], [1, 1, 0.0]]),
            "died": np.array([[0, 0, 0], [0, 1, 0.0]]), "unlock": np.array([[1, 0, 0], [0, 1, 0.0]]),
            "repeat": np.array([[0, 1, 0], [0, 0, 0.0]]), "health": np.zeros((2, 3))}
    imagined = {"reward": np.array([[0.9, 0.8, -0.1], [0.0, 0.2, 5.0]]), "continue": np.array([[1, 1, 1], [1, 0.5, 1.0]]),
                "latent_mse": np.ones((2, 3)), "psnr": np.full((2, 3), 20.0)}
    s = summarize(imagined, real)
    assert s["unlock_precision"] == pytest.approx(0.5)  # imagined unlocks at (0,0) and (0,1); only (0,0) was real
    assert s["unlock_recall"] == pytest.approx(0.5)  # real unlocks at (0,0) and (1,1); (1,1) was missed
    assert s["imagined_reward_on_repeat"] == pytest.approx(0.8) and s["repeat_steps"] == 1
    assert s["imagined_reward_on_unlock"] == pytest.approx(0.55) and s["unlock_steps"] == 2
    assert s["imagined_return"] == pytest.approx((1.6 + 0.2) / 2)  # the step after the real death does not count
    assert s["real_return"] == pytest.approx((0.9 + 1.0) / 2)
    assert s["real_death_rate"] == 0.5 and s["imagined_death_rate"] == pytest.approx(0.25)
    assert s["continue_on_death_steps"] == pytest.approx(0.5)
    assert [p["starts"] for p in s["per_horizon"]] == [2, 2, 1]


def test_instrument_end_to_end_plays_the_imagined_actions(tiny_crafter_root, tmp_path, monkeypatch):
    checkpoint = make_agent_checkpoint(tmp_path / "run")
    played = []
    original = imagination.play_actions

    def spy(env, actions):
        played.append(np.array(actions))
        return original(env, actions)

    imagined = []
    real_imagine = imagination.imagine

    def spy_imagine(*args, **kwargs):
        out = real_imagine(*args, **kwargs)
        imagined.append(out["imagined_actions"][0].numpy())
        return out

    monkeypatch.setattr(imagination, "play_actions", spy)
    monkeypatch.setattr(imagination, "imagine", spy_imagine, raising=True)
    args = ["eval", "imagination", "--checkpoint", str(checkpoint), "--data", str(tiny_crafter_root),
            "--starts", "3", "--horizon", "4", "--context", "2"]
    assert main(args) == 0
    report = json.loads((tmp_path / "run" / "eval" / "imagination_bc.json").read_text())
    assert report["starts"] == 3 and report["horizon"] == 4 and len(report["per_horizon"]) == 4
    assert all(p["psnr"] is not None and p["latent_mse"] >= 0 for p in report["per_horizon"])
    assert len(played) == 3 and all(np.array_equal(a, b) for a, b in zip(played, imagined))
    monkeypatch.undo()
    assert main(args) == 0  # same seed: same numbers
    again = json.loads((tmp_path / "run" / "eval" / "imagination_bc.json").read_text())
    assert again["imagined_return"] == report["imagined_return"] and again["real_return"] == report["real_return"]


def test_instrument_needs_the_recording_summary(tiny_crafter_copy, tmp_path, capsys):
    checkpoint = make_agent_checkpoint(tmp_path / "run")
    (tiny_crafter_copy / "recording.json").unlink()
    assert main(["eval", "imagination", "--checkpoint", str(checkpoint), "--data", str(tiny_crafter_copy)]) == 2
    assert "recording.json" in capsys.readouterr().err
    with pytest.raises(DataError):
        episode_seeds(tiny_crafter_copy)


def test_instrument_with_unlocks_starts_from_the_recorded_achievements(tiny_crafter_root, tmp_path, monkeypatch, capsys):
    plain = make_agent_checkpoint(tmp_path / "plain")
    assert main(["eval", "imagination", "--checkpoint", str(plain), "--data", str(tiny_crafter_root),
                 "--reward", "unlocks"]) == 2
    assert "unlock head" in capsys.readouterr().err
    checkpoint = make_agent_checkpoint(tmp_path / "run", {"num_achievements": 22})
    replays, starts = [], []
    original_replay, real_imagine = imagination.replay, imagination.imagine

    def spy_replay(seed, actions, max_steps):
        replays.append((seed, len(actions)))
        return original_replay(seed, actions, max_steps)

    def spy_imagine(*args, **kwargs):
        starts.append(kwargs["unlocked"])
        return real_imagine(*args, **kwargs)

    monkeypatch.setattr(imagination, "replay", spy_replay)
    monkeypatch.setattr(imagination, "imagine", spy_imagine, raising=True)
    args = ["eval", "imagination", "--checkpoint", str(checkpoint), "--data", str(tiny_crafter_root),
            "--starts", "3", "--horizon", "3", "--context", "2"]
    assert main(args) == 0  # auto: the reward the checkpoint's policy was trained on, "head" for a BC agent
    assert json.loads((tmp_path / "run" / "eval" / "imagination_bc.json").read_text())["reward"] == "head"
    replays.clear(), starts.clear()
    assert main(args + ["--reward", "unlocks"]) == 0
    report = json.loads((tmp_path / "run" / "eval" / "imagination_bc.json").read_text())
    assert report["reward"] == "unlocks"
    seeds, _ = episode_seeds(tiny_crafter_root)
    by_seed = {seed: name for name, seed in seeds.items()}
    assert len(starts) == len(replays) == 3
    for (seed, t0), unlocked in zip(replays, starts):
        with np.load(tiny_crafter_root / by_seed[seed] / "observations.npz") as npz:
            recorded = npz["achievements"][t0] > 0
        assert unlocked.shape == (1, 22) and np.array_equal(unlocked[0].numpy() > 0, recorded)

"""`dreamerv4 play` without a browser (src/dreamerv4/play/): the session's modes on a tiny random-weight
run, the server over a real websocket (a tab closed mid-episode leaves the others served, a clean
shutdown), and bad input as one-line errors."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreamerv4.actions import CRAFTER_ACTIONS
from dreamerv4.cli import main
from dreamerv4.data.crafter_record import make_crafter_env
from dreamerv4.models.agent import AgentModel
from dreamerv4.play.session import PlaySession, frame_psnr, load_play_models

KEYS = [CRAFTER_ACTIONS.index(a) for a in ("move_right", "move_right", "move_down", "do", "move_left", "noop")]


@pytest.fixture(scope="module")
def models(tiny_run):
    return load_play_models(run_dir=tiny_run)


def real_frames(seed: int, actions: list[int]) -> list[np.ndarray]:
    env = make_crafter_env(seed)
    return [env.reset()] + [env.step(a)[0] for a in actions]


def test_side_by_side_shows_the_real_game_and_the_dream_from_one_start(models):
    session = PlaySession(models)
    first = session.reset(mode="side", seed=3, steps=2)
    messages = [first] + [session.act(a) for a in KEYS]
    truth = real_frames(3, KEYS)
    for message, frame in zip(messages, truth):
        assert set(message["frames"]) == {"real", "dream"}
        np.testing.assert_array_equal(message["frames"]["real"], frame)
        assert message["psnr"] == pytest.approx(frame_psnr(frame, message["frames"]["dream"]))
    assert [m["step"] for m in messages] == list(range(len(KEYS) + 1))
    assert messages[1]["action"] == "move_right" and messages[1]["steps"] == 2
    # The dream's first frame is the tokenizer's reconstruction of the real one, then it imagines.
    dreams = [m["frames"]["dream"] for m in messages]
    assert all(not np.array_equal(a, b) for a, b in zip(dreams, dreams[1:]))


def test_the_dream_answers_the_keys_and_replays_per_seed(models):
    session = PlaySession(models)

    def after(action: int) -> np.ndarray:
        session.reset(mode="dream", seed=0)
        return session.act(action)["frames"]["dream"]

    up, down = after(CRAFTER_ACTIONS.index("move_up")), after(CRAFTER_ACTIONS.index("move_down"))
    assert not np.array_equal(up, down)  # same noise (seeded), other action: another frame
    np.testing.assert_array_equal(after(CRAFTER_ACTIONS.index("move_up")), up)
    # Past the context cap (seq_len 6) the dream restarts from its last frames and goes on.
    for a in KEYS * 2:
        message = session.act(a)
    assert session.dream.restarts > 0 and message["step"] == 1 + 2 * len(KEYS)


@pytest.mark.parametrize("world", ["dream", "real"])
def test_agent_mode_acts_and_reads_its_heads(models, world):
    session = PlaySession(models)
    message = session.reset(mode="agent", agent_world=world, seed=5)
    taken = []
    for _ in range(5):
        expected_action = message["agent"]["next_action"]
        message = session.agent_step()
        assert message["action"] == expected_action  # it takes the action it showed as next
        taken.append(CRAFTER_ACTIONS.index(message["action"]))
        agent = message["agent"]
        assert len(agent["probs"]) == len(CRAFTER_ACTIONS) and sum(agent["probs"]) == pytest.approx(1, abs=1e-3)
        assert np.isfinite(agent["reward"]) and np.isfinite(agent["value"])
        if hasattr(AgentModel, "continuation"):
            assert 0.0 <= agent["continuation"] <= 1.0
        else:
            assert agent["continuation"] is None
        assert list(message["frames"]) == [world]
    if world == "real":
        np.testing.assert_array_equal(message["frames"]["real"], real_frames(5, taken)[-1])
    with pytest.raises(Exception, match="agent mode the policy acts"):
        session.act(0)


def test_episode_download_holds_every_frame(models, tmp_path):
    session = PlaySession(models)
    session.reset(mode="side", seed=1)
    for a in KEYS[:3]:
        session.act(a)
    gif = Image.open(session.episode_video(8, "gif", tmp_path))
    assert gif.n_frames == 4 and gif.size[0] > 2 * 4 * 64  # two panels, 4x upscaled
    assert session.episode_video(8, "mp4", tmp_path).stat().st_size > 0


def test_a_checkpoint_alone_brings_its_own_world_model(tiny_run):
    agent_only = load_play_models(checkpoint=tiny_run / "agent" / "checkpoint.pt")
    assert agent_only.agent is agent_only.world and agent_only.agent_label == "bc"
    assert agent_only.sources["tokenizer"] == str(tiny_run / "tokenizer" / "checkpoint.pt")
    world_only = load_play_models(checkpoint=tiny_run / "dynamics" / "checkpoint.pt")
    assert world_only.agent is None and "without an agent" in world_only.agent_note
    with pytest.raises(Exception, match="agent mode is off"):
        PlaySession(world_only).reset(mode="agent")
    assert PlaySession(world_only).reset(mode="dream")["frames"]["dream"].shape == (64, 64, 3)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_bad_input_is_one_line(tmp_path, tiny_run, make_tiny_run, capsys):
    assert main(["play", "--run", str(tmp_path / "missing")]) == 2
    assert "no such run folder" in _error_line(capsys)

    unfinished = tmp_path / "unfinished"
    (unfinished / "tokenizer").mkdir(parents=True)
    assert main(["play", "--run", str(unfinished)]) == 2
    assert "unfinished run folder, no dynamics/checkpoint.pt" in _error_line(capsys)

    stopped = make_tiny_run(tmp_path / "stopped", done=False)
    assert main(["play", "--run", str(stopped)]) == 2
    assert "before it finished" in _error_line(capsys)

    minerl = make_tiny_run(tmp_path / "minerl", action_space="minerl")
    assert main(["play", "--checkpoint", str(minerl / "agent" / "checkpoint.pt")]) == 2
    assert "'minerl' action space; play needs a Crafter one" in _error_line(capsys)

    assert main(["play", "--run", str(tiny_run), "--policy", "imagine"]) == 2
    assert "imagine/checkpoint.pt" in _error_line(capsys)

    assert main(["play", "--run", str(tiny_run), "--steps", "3"]) == 2
    assert "power of two" in _error_line(capsys)

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["play", "--run", str(tiny_run), "--port", str(busy.getsockname()[1])]) == 2
    assert "is another server using it? pass --port N" in _error_line(capsys)


def start_server(run: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`dreamerv4 play` on a free port in a subprocess; returns it and its URL once it serves."""
    proc = subprocess.Popen([sys.executable, "-m", "dreamerv4.cli", "play", "--run", str(run), "--port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        match = re.search(r"serving (http://127\.0\.0\.1:\d+/)", line)
        if match:
            return proc, match.group(1)
        assert time.monotonic() < deadline, "the server did not start"
    raise AssertionError(f"the server exited: {proc.wait()} {proc.stderr.read()}")


def stop_server(proc: subprocess.Popen) -> str:
    """SIGINT, as Ctrl-C; asserts a clean exit and returns stderr."""
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "shutting down" in out and "Traceback" not in err, err
    return err


def test_server_keeps_serving_when_a_tab_closes_mid_episode(tiny_run):
    import aiohttp

    proc, url = start_server(tiny_run)

    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            page = await (await http.get(url)).text()
            assert "dreamerv4 play" in page and "move_left" in page
            gone = await http.ws_connect(url + "ws")
            await gone.receive_json()  # info
            await gone.send_json({"type": "reset", "mode": "side", "seed": 0})
            await gone.send_json({"type": "action", "action": 3})
            await gone.close()  # mid-episode, with requests in flight

            tab = await http.ws_connect(url + "ws")
            info = await tab.receive_json()
            assert info["type"] == "info" and info["agent"] == "bc" and info["actions"] == list(CRAFTER_ACTIONS)
            await tab.send_json({"type": "reset", "mode": "side", "seed": 2, "steps": 1})
            first = await tab.receive_json()
            await tab.send_json({"type": "action", "action": 2})
            second = await tab.receive_json()
            assert first["type"] == second["type"] == "frame" and second["step"] == 1 and second["steps"] == 1
            real = np.asarray(Image.open(io.BytesIO(base64.b64decode(second["frames"]["real"].split(",")[1]))))
            np.testing.assert_array_equal(real, real_frames(2, [2])[-1])
            for bad in ({"type": "jump"}, {"type": "reset", "mode": "nowhere"}, {"type": "action", "action": 99}):
                await tab.send_json(bad)
                assert (await tab.receive_json())["type"] == "error"
            await tab.send_str("{not json")
            assert "bad request" in (await tab.receive_json())["message"]
            gif = await http.get(url + f"episode/{info['session']}.gif")
            assert gif.status == 200 and (await gif.read())[:6] == b"GIF89a"
            assert (await http.get(url + "episode/0123abcd.gif")).status == 404
            await tab.close()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        if proc.poll() is None:
            err = stop_server(proc)
    assert "request failed" not in err

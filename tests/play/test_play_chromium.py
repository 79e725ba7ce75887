"""`dreamerv4 play` in headless Chromium, driven over the DevTools protocol: real key presses change the
dream frame, side-by-side mode shows the real game's true frames, agent mode advances by itself, the
page logs no console error, and the server shuts down cleanly. Chromium is found as the report test
finds it (skipped locally, a failure under CI=1, when it is missing).

Run with SCREENSHOT=path to also save a screenshot of the side-by-side page, and PLAY_RUN=RUN_DIR to
drive a trained run's page instead of the tiny random-weight one (how docs/images/play.png is made):
    PLAY_RUN=runs/crafter-small SCREENSHOT=docs/images/play.png .venv/bin/python -m pytest tests/play/test_play_chromium.py
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreamerv4.actions import CRAFTER_ACTIONS
from evaluation.test_report import chromium_binary
from play.test_play import real_frames, start_server, stop_server

# DevTools key events for the keys used below: key, code, Windows virtual key code.
KEY_EVENTS = {"w": ("w", "KeyW", 87), "a": ("a", "KeyA", 65), "s": ("s", "KeyS", 83), "d": ("d", "KeyD", 68),
              " ": (" ", "Space", 32)}
KEYMAP = {"w": "move_up", "a": "move_left", "s": "move_down", "d": "move_right", " ": "do"}


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket (aiohttp)."""

    def __init__(self, ws):
        self.ws, self.next_id, self.events, self.pending = ws, 0, [], {}
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            else:
                self.events.append(data)

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        future = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        reply = await asyncio.wait_for(future, 30)
        assert "error" not in reply, reply
        return reply.get("result", {})

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self.js(expression)
            if value:
                return value
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expression}; state {await self.js('JSON.stringify(play.state.step)')}")

    async def select_mode(self, mode: str) -> None:
        await self.js(f"{{ const m = document.getElementById('mode'); m.value = '{mode}';"
                      "m.dispatchEvent(new Event('change')); }")

    async def press(self, key: str) -> None:
        name, code, vk = KEY_EVENTS[key]
        await self.call("Input.dispatchKeyEvent", type="keyDown", key=name, code=code, text=name,
                        windowsVirtualKeyCode=vk, nativeVirtualKeyCode=vk)
        await self.call("Input.dispatchKeyEvent", type="keyUp", key=name, code=code, windowsVirtualKeyCode=vk)

    def console_errors(self) -> list[str]:
        out = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append(str(params.get("args")))
            elif method == "Runtime.exceptionThrown":
                out.append(str(params.get("exceptionDetails")))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                out.append(str(params["entry"]))
        return out


def decode_data_url(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


async def drive(page_url: str, devtools_port: int, screenshot: Path | None) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        target = await (await http.put(f"http://127.0.0.1:{devtools_port}/json/new?about:blank")).json()
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            tools = DevTools(ws)
            for domain in ("Runtime", "Log", "Page"):
                await tools.call(f"{domain}.enable")
            await tools.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1,
                             mobile=False)
            await tools.call("Page.navigate", url=page_url)
            await tools.wait_for("window.play && play.state.mode === 'dream' && play.frameCount >= 1")

            # Dream mode: each key press is one generated frame, and the frame changes.
            seen = [await tools.js("play.state.frames.dream")]
            for count, key in enumerate("dds", start=1):
                await tools.press(key)
                await tools.wait_for(f"play.state.step === {count}")
                seen.append(await tools.js("play.state.frames.dream"))
                assert seen[-1] != seen[-2], f"key {key!r} did not change the dream frame"
            assert await tools.js("document.getElementById('stat-action').textContent") == "move_down"
            assert float(await tools.js("play.state.ms")) > 0

            # Side by side: the same keys give the real game's true frames next to the dream.
            keys = "dd sa"
            await tools.js("document.getElementById('seed').value = '4'")
            await tools.select_mode("side")
            await tools.wait_for("play.state.mode === 'side' && play.state.step === 0")
            shown = [await tools.js("play.state.frames.real")]
            for count, key in enumerate(keys, start=1):
                await tools.press(key)
                await tools.wait_for(f"play.state.step === {count}")
                shown.append(await tools.js("play.state.frames.real"))
                psnr_text = await tools.js("document.getElementById('stat-psnr').textContent")
                assert float(psnr_text) > 0, psnr_text
            truth = real_frames(4, [CRAFTER_ACTIONS.index(KEYMAP[k]) for k in keys])
            for url, frame in zip(shown, truth):
                np.testing.assert_array_equal(decode_data_url(url), frame)
            assert await tools.js("!document.getElementById('panel-dream').classList.contains('hidden')")
            if screenshot is not None:
                shot = await tools.call("Page.captureScreenshot", format="png")
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                screenshot.write_bytes(base64.b64decode(shot["data"]))

            # Agent mode: it advances with no key pressed and shows its readings.
            await tools.select_mode("agent")
            await tools.wait_for("play.state.mode === 'agent' && play.state.step >= 3")
            assert await tools.js("document.querySelectorAll('#probs .bar').length") == len(CRAFTER_ACTIONS)
            assert await tools.js("document.getElementById('stat-next').textContent") in CRAFTER_ACTIONS
            float(await tools.js("document.getElementById('stat-value').textContent"))
            await tools.js("document.getElementById('pause').click()")
            paused_at = await tools.js("play.state.step")
            await asyncio.sleep(1.0)
            assert await tools.js("play.state.step") <= paused_at + 1  # at most the request in flight

            # The episode downloads as a GIF from the page's own session.
            size = await tools.js("fetch(`/episode/${play.info.session}.gif`).then(r => r.arrayBuffer())"
                                  ".then(b => b.byteLength)")
            assert size > 100
            assert await tools.js("play.errors") == []
            assert tools.console_errors() == [], tools.console_errors()
            tools.reader.cancel()


def test_play_page_in_chromium(tiny_run, tmp_path):
    binary = chromium_binary()
    proc, url = start_server(Path(os.environ.get("PLAY_RUN") or tiny_run))
    profile = tmp_path / "chromium-profile"
    browser = subprocess.Popen([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                "--no-first-run", "--mute-audio", f"--user-data-dir={profile}",
                                "--remote-debugging-port=0", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert time.monotonic() < deadline and browser.poll() is None, "chromium did not start"
            time.sleep(0.1)
        devtools_port = int(port_file.read_text().split()[0])
        shot = Path(os.environ["SCREENSHOT"]) if os.environ.get("SCREENSHOT") else None
        asyncio.run(asyncio.wait_for(drive(url, devtools_port, shot), 120))
    finally:
        browser.terminate()
        browser.wait(timeout=30)
        err = stop_server(proc) if proc.poll() is None else proc.stderr.read()
    assert "request failed" not in err

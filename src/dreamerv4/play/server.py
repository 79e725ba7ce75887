"""`dreamerv4 play`: a local web page to play in the real Crafter game, in the world model's dream, both
side by side, or to watch the trained agent act (play/session.py says what each mode does).

    dreamerv4 play --run runs/crafter-small [--port 8000] [--steps 4] [--policy auto|bc|imagine]
    dreamerv4 play --checkpoint runs/crafter-small/imagine/checkpoint.pt
    # then open the printed URL (http://127.0.0.1:PORT/); Ctrl-C stops the server

Built on aiohttp: GET / is the page (play/static/index.html, package data), /ws is one websocket per
tab (JSON both ways: the tab sends reset / action / agent_step, the server answers frames as PNG
data URLs with their timings and readings), /episode/ID.gif|mp4 downloads the tab's episode. Every
tab has its own PlaySession; the models are loaded once and shared. Model work runs on one worker
thread, one request at a time (the machine has few cores; the event loop stays free to serve other
tabs and the page). A tab that closes mid-episode only ends its own session; a bad request gets an
error message on its tab, never a crash of the server.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import numpy as np
from aiohttp import WSMsgType, web

from dreamerv4.actions import CRAFTER_ACTIONS
from dreamerv4.errors import UserError
from dreamerv4.play.session import AGENT_WORLDS, MODES, PlayModels, PlaySession

SESSIONS = web.AppKey("sessions", dict)
MODELS = web.AppKey("models", PlayModels)
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
PRECISION = web.AppKey("precision", str)
SOCKETS = web.AppKey("sockets", set)


def png_data_url(frame: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _encode_frames(message: dict) -> dict:
    return {**message, "frames": {name: png_data_url(f) for name, f in message.get("frames", {}).items()}}


async def index(request: web.Request) -> web.Response:
    page = resources.files("dreamerv4.play").joinpath("static/index.html").read_text(encoding="utf-8")
    return web.Response(text=page, content_type="text/html")


async def favicon(request: web.Request) -> web.Response:
    return web.Response(status=204)


def _info(models: PlayModels, sid: str) -> dict:
    return {"type": "info", "session": sid, "actions": list(CRAFTER_ACTIONS), "modes": list(MODES),
            "agent_worlds": list(AGENT_WORLDS), "agent": models.agent_label or None, "agent_note": models.agent_note,
            "sources": models.sources, "default_steps": models.default_steps,
            "continuation": models.agent is not None and hasattr(models.agent, "continuation")}


def _handle(session: PlaySession, request: dict) -> dict:
    """One request of a tab -> the answer (worker thread)."""
    kind = request.get("type")
    if kind == "reset":
        return _encode_frames(session.reset(mode=str(request.get("mode", "dream")), seed=int(request.get("seed", 0)),
                                            steps=request.get("steps"),
                                            agent_world=str(request.get("agent_world", "dream"))))
    if kind == "action":
        return _encode_frames(session.act(int(request["action"])))
    if kind == "agent_step":
        return _encode_frames(session.agent_step())
    raise UserError(f"unknown request type {kind!r}")


async def websocket(request: web.Request) -> web.WebSocketResponse:
    app = request.app
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=1 << 20)
    await ws.prepare(request)
    sid = uuid.uuid4().hex
    session = PlaySession(app[MODELS], precision=app[PRECISION])
    app[SESSIONS][sid] = session
    app[SOCKETS].add(ws)
    loop = asyncio.get_running_loop()
    try:
        await ws.send_json(_info(app[MODELS], sid))
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                answer = await loop.run_in_executor(app[EXECUTOR], _handle, session, json.loads(msg.data))
            except UserError as exc:
                answer = {"type": "error", "message": str(exc)}
            except (ValueError, KeyError, TypeError) as exc:
                answer = {"type": "error", "message": f"bad request ({type(exc).__name__}: {exc})"}
            except Exception as exc:  # a model failure ends this request, not the server
                print(f"play: request failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                answer = {"type": "error", "message": f"internal error ({type(exc).__name__}: {exc})"}
            if ws.closed:
                break
            await ws.send_json(answer)
    except (ConnectionResetError, asyncio.CancelledError):
        pass  # the tab went away mid-episode: only its own session ends
    finally:
        app[SOCKETS].discard(ws)
        app[SESSIONS].pop(sid, None)
    return ws


async def episode(request: web.Request) -> web.Response:
    sid, kind = request.match_info["sid"], request.match_info["kind"]
    session = request.app[SESSIONS].get(sid)
    if session is None:
        raise web.HTTPNotFound(text=f"no open session {sid} (the tab was closed or the server restarted)")
    try:
        fps = min(30.0, max(1.0, float(request.query.get("fps", 8))))
    except ValueError:
        raise web.HTTPBadRequest(text="fps must be a number")

    def write() -> bytes:
        with tempfile.TemporaryDirectory() as folder:
            return session.episode_video(fps, kind, Path(folder)).read_bytes()

    try:
        data = await asyncio.get_running_loop().run_in_executor(request.app[EXECUTOR], write)
    except UserError as exc:
        raise web.HTTPConflict(text=str(exc))
    mime = "image/gif" if kind == "gif" else "video/mp4"
    return web.Response(body=data, content_type=mime,
                        headers={"Content-Disposition": f'attachment; filename="crafter-{session.mode}.{kind}"'})


async def _close_sockets(app: web.Application) -> None:
    for ws in list(app[SOCKETS]):
        await ws.close(code=1001, message=b"server shutting down")


def build_app(models: PlayModels, precision: str = "fp32") -> web.Application:
    app = web.Application()
    app[MODELS], app[PRECISION] = models, precision
    app[SESSIONS], app[SOCKETS] = {}, set()
    app[EXECUTOR] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="play-model")
    app.router.add_get("/", index)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/ws", websocket)
    app.router.add_get(r"/episode/{sid:[0-9a-f]+}.{kind:gif|mp4}", episode)
    app.on_shutdown.append(_close_sockets)
    app.on_cleanup.append(lambda a: asyncio.get_running_loop().run_in_executor(None, a[EXECUTOR].shutdown))
    return app


async def serve(app: web.Application, host: str, port: int, open_browser: bool = False) -> None:
    """Serve until SIGINT / SIGTERM; UserError when the port cannot be bound."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); is another server using it? "
                        "pass --port N, or --port 0 for a free one") from None
    bound = runner.addresses[0][1]
    print(f"play: serving http://{host}:{bound}/ (Ctrl-C stops)", flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(f"http://{host}:{bound}/")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        print("play: shutting down", flush=True)
        await runner.cleanup()


def cmd_play(args) -> int:
    import torch

    from dreamerv4.play.session import load_play_models

    if args.precision not in ("fp32", "bf16"):
        raise UserError(f"--precision must be fp32 or bf16, got {args.precision!r}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    models = load_play_models(run_dir=args.run, checkpoint=args.checkpoint, tokenizer=args.tokenizer,
                              policy=args.policy, allow_unfinished=args.allow_unfinished)
    if args.steps is not None:
        if args.steps < 1 or args.steps & (args.steps - 1):
            raise UserError(f"--steps must be a power of two (1, 2, 4, ...), got {args.steps}")
        models.default_steps = args.steps
    for what, path in models.sources.items():
        print(f"play: {what} {path}", flush=True)
    if models.agent is None:
        print(f"play: agent mode off: {models.agent_note}", flush=True)
    asyncio.run(serve(build_app(models, args.precision), args.host, args.port, args.open))
    return 0

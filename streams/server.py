"""The `serve` command: one HTTP server for the web client, Moshi's websocket and WebRTC.

Routes:
    GET  /           web/index.html (other files of web/ are served as static files)
    GET  /api/chat   Moshi's websocket protocol (streams/moshi_ws.py)
    GET  /api/stats  JSON: active conversations, capacity, per-conversation stats, engine timings
    POST /offer      WebRTC (streams/webrtc.py), when that module is present

Every connection is one conversation of the shared `Agent`; a full server refuses at once
(websocket: a 0x05 error; HTTP: `refuse_full`, status 503), it never queues.

This module is imported by the command line for every command, so aiohttp, torch and the agent
are imported inside the functions that need them.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from dataclasses import asdict
from pathlib import Path

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parents[1] / "web"
DEFAULT_MAX_SESSIONS = 8  # each costs one KV cache: 1.6 GB at bf16 for moshiko's 3000 steps


def refuse_full(agent):
    """The HTTP answer when every conversation slot is taken: 503 with a JSON reason."""
    from aiohttp import web
    return web.json_response(
        {"error": f"server full: all {agent.max_conversations} conversations are in use, "
                  "try again later",
         "capacity": agent.max_conversations},
        status=503, headers={"Retry-After": "5"})


def create_app(agent, static_dir: Path = WEB_DIR):
    from aiohttp import web

    from streams.moshi_ws import MoshiChat

    app = web.Application()
    chat = MoshiChat(agent)
    index = Path(static_dir) / "index.html"

    async def handle_index(request: web.Request) -> web.StreamResponse:
        if not index.is_file():
            return web.Response(status=404, text=f"web client not installed: {index} is missing\n")
        return web.FileResponse(index)

    async def handle_stats(request: web.Request) -> web.Response:
        return web.json_response(stats(agent, chat))

    async def close_sockets(app: web.Application) -> None:
        await chat.close_all()

    app.router.add_get("/", handle_index)
    app.router.add_get("/api/chat", chat.handle)
    app.router.add_get("/api/stats", handle_stats)
    app.on_shutdown.append(close_sockets)
    try:
        from streams import webrtc
    except ModuleNotFoundError as e:
        if e.name != "streams.webrtc":
            raise
        log.warning("streams/webrtc.py not found: WebRTC (POST /offer) is disabled")
    else:
        webrtc.setup_routes(app, agent)
    if Path(static_dir).is_dir():  # last: the other routes take precedence over files
        app.router.add_static("/", static_dir)
    return app


def stats(agent, chat) -> dict:
    driver = agent._driver
    # copy() is atomic under the GIL; the engine thread appends to these deques.
    tick_ms = sorted(driver.tick_ms.copy())
    batch_sizes = driver.batch_sizes.copy()
    return {
        "active": agent.active,
        "capacity": agent.max_conversations,
        "conversations": [{"id": c.id, "slot": c.slot, "backlog": c.backlog, **c.stats.as_dict()}
                          for c in agent.conversations()],
        "engine": {  # timings over the last ticks (up to 2000)
            "ticks": driver.ticks,
            "failed_ticks": driver.failed_ticks,
            "tick_ms_p50": _percentile(tick_ms, 0.5),
            "tick_ms_p99": _percentile(tick_ms, 0.99),
            "batch_size_max": max(batch_sizes, default=None),
            "batch_size_mean": round(sum(batch_sizes) / len(batch_sizes), 2) if batch_sizes else None,
        },
        "websocket": asdict(chat.counters),
    }


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


# -- command line ----------------------------------------------------------------------------------

def register(subparsers, add_checkpoint_args, add_sampling_args) -> None:
    # add_sampling_args is not used: each client chooses its sampling (moshi's query parameters).
    p = subparsers.add_parser("serve", help="serve the web client, Moshi's websocket and WebRTC")
    p.set_defaults(func=run_serve)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8998, help="default 8998; 0 picks a free port")
    p.add_argument("--max-sessions", type=_positive_int, default=DEFAULT_MAX_SESSIONS,
                   help=f"conversations served at once (default {DEFAULT_MAX_SESSIONS}); "
                        "more clients are refused")
    add_checkpoint_args(p)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def run_serve(args) -> int:
    from agent.api import Agent
    agent = Agent.load(args.checkpoint, args.device, args.max_sessions)
    try:
        asyncio.run(serve(agent, args.host, args.port))
    finally:
        agent.close()
    return 0


async def serve(agent, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM, then close every connection and return."""
    from aiohttp import web
    runner = web.AppRunner(create_app(agent), shutdown_timeout=5.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        port = runner.addresses[0][1]  # the real one when port 0 was asked
        print(f"serving on http://{host}:{port} ({agent.max_conversations} conversations max)",
              flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()

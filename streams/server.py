"""The `serve` command: one HTTP server for the web client, Moshi's websocket and WebRTC.

Routes:
    GET  /           web/index.html (other files of web/ are served as static files)
    GET  /api/chat   Moshi's websocket protocol (streams/moshi_ws.py)
    GET  /api/stats  JSON: active conversations, capacity, per-conversation stats (the user's words
                     with a transcriber), engine timings (the transcriber's step)
    GET  /api/voices JSON: a persona checkpoint's voices, {"personas": bool, "voices": [...]}
    GET  /metrics    Prometheus metrics (streams/metrics.py)
    POST /offer      WebRTC (streams/webrtc.py), when that module is present
    GET  /v1/realtime        the OpenAI Realtime API, websocket (streams/realtime/session.py)
    POST /v1/realtime/calls  the same over WebRTC (streams/realtime/call.py), with streams/webrtc.py
    POST /twilio/voice       a phone call's webhook, signed by Twilio (streams/phone/webhook.py),
    GET  /twilio/stream/...  and its media stream (streams/phone/twilio.py), with --public-url

Every connection is one conversation of the shared `Agent`; a full server refuses at once
(websocket: a 0x05 error; HTTP: `security.refuse_full`, status 503), it never queues. The admission rules
(token, origins, sizes, per-client limit) and the time limits (idle, maximum length) are in
streams/security.py, applied to every transport by middleware and by a periodic sweep.

This module is imported by the command line for every command, so aiohttp, torch and the agent
are imported inside the functions that need them.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
from contextlib import suppress
from dataclasses import asdict
from pathlib import Path

from duplex_agent.streams.limits import (DEFAULT_IDLE_TIMEOUT_S, DEFAULT_MAX_CONVERSATION_S,
                                         DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_OFFER_BYTES,
                                         MAX_REQUEST_LINE_BYTES)
from duplex_agent.streams.phone import VOICE_PATH

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parents[1] / "web"
DEFAULT_MAX_SESSIONS = 8  # each costs one KV cache: 1.6 GB at bf16 for moshiko's 3000 steps
STATS_PROMPT_CHARS = 80  # /api/stats shows the start of each conversation's text prompt


def create_app(agent, static_dir: Path = WEB_DIR, policy=None, profile_stages: bool | None = None,
               utterance_rule=None, phone=None):
    """The aiohttp application. `policy`: a streams.security.Policy (default: its defaults);
    `profile_stages`: time the engine's stages for /metrics (default: on CPU only);
    `utterance_rule`: how the Realtime API cuts the agent's stream into responses
    (streams.realtime.events.UtteranceRule, default: its defaults); `phone`: a
    streams.phone.webhook.PhoneSettings to take phone calls (default: none)."""
    from aiohttp import web

    from duplex_agent.streams.metrics import Metrics
    from duplex_agent.streams.realtime import session as realtime
    from duplex_agent.streams.moshi_ws import MoshiChat
    from duplex_agent.streams.security import ConversationTracker, Policy, guard_middleware

    policy = policy or Policy()
    metrics = Metrics()
    tracker = ConversationTracker(agent, policy, metrics)
    app = web.Application(middlewares=[guard_middleware(policy, tracker, metrics)],
                          client_max_size=policy.max_offer_bytes,  # only /offer takes a body
                          handler_args={"max_line_size": MAX_REQUEST_LINE_BYTES})
    chat = MoshiChat(agent, policy, tracker, metrics)
    realtime_api = realtime.setup_routes(app, agent, policy, tracker, metrics, utterance_rule)
    phone_line = None
    if phone is not None:
        from duplex_agent.streams.phone import webhook
        phone_line = webhook.setup_routes(app, agent, phone, policy, tracker, metrics)
    index = Path(static_dir) / "index.html"

    async def handle_index(request: web.Request) -> web.StreamResponse:
        if not index.is_file():
            return web.Response(status=404, text=f"web client not installed: {index} is missing\n")
        return web.FileResponse(index)

    async def handle_stats(request: web.Request) -> web.Response:
        phone_stats = {"phone": phone_line.stats()} if phone_line is not None else {}
        return web.json_response({**stats(agent, chat), "realtime": realtime_api.stats(),
                                  **phone_stats})

    async def handle_voices(request: web.Request) -> web.Response:
        return web.json_response({"personas": agent.engine.bundle.personas is not None,
                                  "voices": agent.voices()})

    async def handle_metrics(request: web.Request) -> web.Response:
        tracker.sweep()  # drop counts up to date
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    background: list[asyncio.Task] = []

    async def start_background(app: web.Application) -> None:
        if agent.engine.bundle.personas is not None:
            await asyncio.to_thread(_load_voices, agent.engine.bundle.personas)
        metrics.attach(agent, profile_stages)
        background.append(asyncio.create_task(_sweep_forever(tracker, policy.sweep_interval_s)))

    async def close_sockets(app: web.Application) -> None:
        await chat.close_all()

    async def stop_background(app: web.Application) -> None:
        for task in background:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        tracker.sweep()  # log the conversations that ended last
        metrics.detach()

    app.router.add_get("/", handle_index)
    app.router.add_get("/api/chat", chat.handle)
    app.router.add_get("/api/stats", handle_stats)
    app.router.add_get("/api/voices", handle_voices)
    app.router.add_get("/metrics", handle_metrics)
    app.on_startup.append(start_background)
    app.on_shutdown.append(close_sockets)
    app.on_cleanup.append(stop_background)
    try:
        from duplex_agent.streams import webrtc
    except ModuleNotFoundError as e:
        if e.name != "duplex_agent.streams.webrtc":
            raise
        log.warning("streams/webrtc.py not found: WebRTC (POST /offer) is disabled")
    else:
        webrtc.setup_routes(app, agent)
        from duplex_agent.streams.realtime.call import add_call_route
        add_call_route(app, realtime_api)
    if Path(static_dir).is_dir():  # last: the other routes take precedence over files
        app.router.add_static("/", static_dir)
    return app


def _load_voices(personas) -> None:
    """Load every voice once, off the event loop (a recording is Mimi-encoded on first use); a
    broken file is reported here and refused, with its reason, to whoever asks for it."""
    from duplex_agent.checkpoints.personaplex import PersonaError
    for name in personas.voices():
        try:
            personas.voice(name)
        except PersonaError as e:
            log.warning("voice %s cannot be used: %s", name, e)


async def _sweep_forever(tracker, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            tracker.sweep()
        except Exception:  # a bug here must not stop the limits for good
            log.exception("conversation sweep failed")


def stats(agent, chat) -> dict:
    from duplex_agent.agent.api import percentile
    driver = agent._driver
    # copy() is atomic under the GIL; the engine thread appends to these deques.
    tick_ms = sorted(driver.tick_ms.copy())
    batch_sizes = driver.batch_sizes.copy()
    transcriber_ms = sorted(agent.engine.transcriber_ms.copy())  # profiled ticks only
    return {
        "active": agent.active,
        "capacity": agent.max_conversations,
        "conversations": [{"id": c.id, "slot": c.slot, "backlog": c.backlog,
                           "voice_prompt": c.voice_prompt, "text_prompt": _shorten(c.text_prompt),
                           **c.stats.as_dict()} for c in agent.conversations()],
        "prompt_cache": agent.engine.prompt_cache.stats(),
        "engine": {  # what runs, and timings over the last ticks (up to 2000)
            **agent.engine.describe(),
            "ticks": driver.ticks,
            "failed_ticks": driver.failed_ticks,
            "tick_ms_p50": percentile(tick_ms, 0.5),
            "tick_ms_p99": percentile(tick_ms, 0.99),
            "batch_size_max": max(batch_sizes, default=None),
            "batch_size_mean": round(sum(batch_sizes) / len(batch_sizes), 2) if batch_sizes else None,
            "user_words": driver.user_words,
            "transcriber_step_ms_p50": percentile(transcriber_ms, 0.5),
            "transcriber_step_ms_p99": percentile(transcriber_ms, 0.99),
        },
        "websocket": asdict(chat.counters),
    }


def _shorten(text: str | None, limit: int = STATS_PROMPT_CHARS) -> str | None:
    return text if text is None or len(text) <= limit else text[:limit - 1] + "…"




# -- command line ----------------------------------------------------------------------------------

def register(subparsers) -> None:
    from duplex_agent.agent.options import add_checkpoint_args, add_persona_args
    # No sampling flags: each client chooses its sampling (moshi's query parameters).
    p = subparsers.add_parser("serve", help="serve the web client, Moshi's websocket and WebRTC")
    p.set_defaults(func=run_serve)
    add_listen_args(p)
    add_checkpoint_args(p)
    add_persona_args(p, conversation=False)  # each client picks its persona
    add_threads_arg(p)
    add_policy_args(p)
    add_realtime_args(p)
    add_phone_args(p)


def add_phone_args(p: argparse.ArgumentParser) -> None:
    """Phone calls over Twilio Media Streams (see `phone_settings_from_args`), shared by `serve`
    and `cluster`."""
    g = p.add_argument_group("phone calls (Twilio Media Streams): the number's webhook is "
                             f"POST PUBLIC_URL{VOICE_PATH}")
    g.add_argument("--twilio-auth-token", default=os.environ.get("TWILIO_AUTH_TOKEN") or None,
                   help="the Twilio account's auth token, which signs its webhooks (default: "
                        "$TWILIO_AUTH_TOKEN); with --public-url, takes phone calls")
    g.add_argument("--public-url", default=None,
                   help="where Twilio reaches this server, e.g. https://agent.example.com (the "
                        "webhook's signature covers it; the media stream's wss:// URL is built "
                        "from it)")
    g.add_argument("--phone-voice", default=None,
                   help="persona checkpoints: the callers' agent's voice, unless the webhook URL "
                        "has ?voice_prompt=")
    g.add_argument("--phone-role", default=None,
                   help="persona checkpoints: the callers' agent's role, unless the webhook URL "
                        "has ?text_prompt=")


def phone_settings_from_args(args):
    """PhoneSettings, or None without --twilio-auth-token and --public-url; ValueError says what
    is wrong."""
    from duplex_agent.streams.phone.webhook import PhoneSettings
    if bool(args.twilio_auth_token) != bool(args.public_url):
        raise ValueError("--twilio-auth-token and --public-url go together")
    if not args.public_url:
        return None
    return PhoneSettings(args.twilio_auth_token, args.public_url, args.phone_voice,
                         args.phone_role)


def add_realtime_args(p: argparse.ArgumentParser) -> None:
    """The Realtime API's flags (see `utterance_rule_from_args`), shared by `serve` and `cluster`."""
    g = p.add_argument_group("OpenAI Realtime API: one agent utterance is one response")
    g.add_argument("--realtime-silence-dbfs", type=float, default=-45.0,
                   help="agent frames at or below this level are silence (default -45)")
    g.add_argument("--realtime-silence-ms", type=_positive_int, default=400,
                   help="this much agent silence ends a response (default 400; whole 80 ms frames)")


def utterance_rule_from_args(args):
    from duplex_agent.streams.realtime.events import UtteranceRule
    return UtteranceRule(args.realtime_silence_dbfs, max(1, round(args.realtime_silence_ms / 80)))


def add_listen_args(p: argparse.ArgumentParser) -> None:
    """--host, --port, --max-sessions: shared by `serve` and `cluster` (streams/cluster/launcher.py)."""
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8998, help="default 8998; 0 picks a free port")
    p.add_argument("--max-sessions", type=_positive_int, default=DEFAULT_MAX_SESSIONS,
                   help=f"conversations served at once (default {DEFAULT_MAX_SESSIONS}); "
                        "more clients are refused")


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: $OMP_NUM_THREADS if set, else the number of "
                        "cores, at most 4): more threads than free cores make every tick wait "
                        "for the slowest one")


def set_torch_threads(threads: int | None) -> int:
    """Set torch's intra-op threads before a model loads; returns the number chosen."""
    import torch
    if threads is None:
        omp = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(omp) if omp.isdigit() and int(omp) > 0 else min(len(os.sched_getaffinity(0)), 4)
    torch.set_num_threads(threads)
    return threads


def settle_heap() -> int:
    """Once the model is loaded: take every object alive now (libraries, model, tables) out of
    the garbage collector's full collections, which otherwise walk them all while holding the
    GIL, pausing the engine thread and every conversation (about 180 ms for serve's ~346k
    objects on a 2-core CPU). Returns how many objects were set aside."""
    import atexit
    import gc
    gc.collect()
    gc.freeze()
    # Handed back at exit, so that what they hold is released as usual (Triton's bindings report
    # every object still alive at shutdown as a leak).
    atexit.unregister(gc.unfreeze)
    atexit.register(gc.unfreeze)
    return gc.get_freeze_count()


def add_policy_args(p: argparse.ArgumentParser) -> None:
    """The security and limit flags (see `policy_from_args`), shared by `serve` and `cluster`."""
    g = p.add_argument_group("security and limits")
    g.add_argument("--auth-token", default=os.environ.get("AGENT_AUTH_TOKEN") or None,
                   help="require this token on /offer, /api/chat, /api/stats, /api/voices and "
                        "/metrics, as "
                        "'Authorization: Bearer TOKEN' or ?token=TOKEN (default: "
                        "$AGENT_AUTH_TOKEN; none: open to anyone who can connect)")
    g.add_argument("--allowed-origins", type=_origins, default=frozenset(),
                   help="comma-separated origins (e.g. https://app.example.com) whose web pages "
                        "may use /offer and /api/chat; requests without an Origin header "
                        "(programs) and this server's own pages are always accepted "
                        "(default: any origin)")
    g.add_argument("--ssl-cert", help="PEM certificate (chain): serve HTTPS and WSS")
    g.add_argument("--ssl-key", help="PEM private key of --ssl-cert")
    g.add_argument("--max-message-bytes", type=_positive_int, default=DEFAULT_MAX_MESSAGE_BYTES,
                   help="largest websocket message; larger ones close the socket with code 1009 "
                        f"(default {DEFAULT_MAX_MESSAGE_BYTES})")
    g.add_argument("--max-offer-bytes", type=_positive_int, default=DEFAULT_MAX_OFFER_BYTES,
                   help="largest POST /offer body; larger ones get 413 "
                        f"(default {DEFAULT_MAX_OFFER_BYTES})")
    g.add_argument("--max-per-client", type=_positive_int, default=None,
                   help="conversations one client address may hold at once (default: no limit)")
    g.add_argument("--idle-timeout", type=_seconds, default=DEFAULT_IDLE_TIMEOUT_S,
                   help="end a conversation whose client sent no audio for this many seconds "
                        f"(default {DEFAULT_IDLE_TIMEOUT_S:g}; 0: never)")
    g.add_argument("--max-conversation-s", type=_seconds, default=DEFAULT_MAX_CONVERSATION_S,
                   help="end conversations at this length in seconds "
                        f"(default {DEFAULT_MAX_CONVERSATION_S:g}; 0: never)")
    g.add_argument("--profile-stages", action="store_true",
                   help="time encode/LM/decode separately for /metrics; on CUDA this synchronises "
                        "the GPU between stages (always on for CPU)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError("must be a number of seconds, 0 or more")
    return value


def _origins(text: str) -> frozenset[str]:
    origins = frozenset(o.strip() for o in text.split(",") if o.strip())
    for origin in origins:
        if "://" not in origin:
            raise argparse.ArgumentTypeError(f"{origin!r} is not an origin like "
                                             "https://host[:port]")
    return origins


def policy_from_args(args):
    from duplex_agent.streams.security import Policy
    return Policy(auth_token=args.auth_token, allowed_origins=args.allowed_origins,
                  max_message_bytes=args.max_message_bytes, max_offer_bytes=args.max_offer_bytes,
                  max_per_client=args.max_per_client, idle_timeout_s=args.idle_timeout or None,
                  max_conversation_s=args.max_conversation_s or None)


def ssl_context_from_args(args):
    """The TLS context of --ssl-cert/--ssl-key (None without them); ValueError says what is wrong."""
    from duplex_agent.streams.security import tls_context
    if bool(args.ssl_cert) != bool(args.ssl_key):
        raise ValueError("--ssl-cert and --ssl-key go together")
    return tls_context(args.ssl_cert, args.ssl_key) if args.ssl_cert else None


def run_serve(args) -> int:
    import sys

    from duplex_agent.agent.api import Agent
    from duplex_agent.agent.options import weight_options
    try:
        ssl_context = ssl_context_from_args(args)
        phone = phone_settings_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    policy = policy_from_args(args)
    set_torch_threads(args.threads)
    agent = Agent.load(args.checkpoint, args.device, args.max_sessions, kv_cache=args.kv_cache,
                       voice_prompt_dir=args.voice_prompt_dir, **weight_options(args))
    settle_heap()
    try:
        asyncio.run(serve(agent, args.host, args.port, policy, ssl_context,
                          profile_stages=args.profile_stages or None,
                          utterance_rule=utterance_rule_from_args(args), phone=phone))
    finally:
        agent.close()
    return 0


async def serve(agent, host: str, port: int, policy=None, ssl_context=None,
                profile_stages: bool | None = None, utterance_rule=None, phone=None) -> None:
    """Serve until SIGINT or SIGTERM, then close every connection and return."""
    from duplex_agent.streams.security import Policy
    policy = policy or Policy()
    _warn_if_exposed(host, policy, ssl_context)
    app = create_app(agent, policy=policy, profile_stages=profile_stages,
                     utterance_rule=utterance_rule, phone=phone)
    engine = agent.engine.describe()
    if phone is not None:
        log.info("taking phone calls: point the Twilio number's webhook at %s%s",
                 phone.public_url, VOICE_PATH)
    await serve_until_signal(app, host, port, ssl_context, lambda url: (
        f"serving on {url} ({agent.max_conversations} conversations max; "
        f"{engine['checkpoint']} on {engine['device']}, {engine['dtype']}, weights "
        f"{engine['weights']} ({engine['weight_bytes'] / 1e9:.1f} GB), KV cache "
        f"{engine['kv_cache']}, kernels {kernels_summary(engine['kernels'])}, CUDA graphs "
        f"{'on' if engine['cuda_graphs'] else 'off'}"
        f"{' (capture failed: eager)' if engine.get('cuda_graphs_why') else ''})"))


def kernels_summary(paths: dict[str, dict]) -> str:
    """One line for the banner: "triton", "torch", or "triton (torch: rms_norm)" after a
    fallback (the warning at load said why)."""
    on_torch = sorted(name for name, p in paths.items() if p["path"] == "torch")
    if not on_torch:
        return "triton"
    if len(on_torch) == len(paths):
        return "torch"
    return f"triton (torch: {', '.join(on_torch)})"


async def serve_until_signal(app, host: str, port: int, ssl_context, banner) -> None:
    """Serve `app` on host:port until SIGINT or SIGTERM, then close every connection and return.
    `banner(url)` is printed once listening (the real port when port 0 was asked)."""
    from aiohttp import web

    from duplex_agent.streams.security import RedactingAccessLogger
    runner = web.AppRunner(app, shutdown_timeout=5.0, access_log_class=RedactingAccessLogger)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
        port = runner.addresses[0][1]
        print(banner(f"{'https' if ssl_context else 'http'}://{host}:{port}"), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()  # closes client sockets (and a cluster's slot holds) first


def _warn_if_exposed(host: str, policy, ssl_context) -> None:
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = host == "localhost"
    if local:
        return
    if not policy.auth_token:
        log.warning("listening on %s without --auth-token: anyone who can reach this port can "
                    "open conversations", host)
    elif ssl_context is None:
        log.warning("listening on %s without TLS: the auth token travels in clear text", host)

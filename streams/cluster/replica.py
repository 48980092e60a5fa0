"""The engine side of `run_agent.py cluster` (streams/cluster/launcher.py): what runs in each Ray Serve
replica.

`EngineReplica` (the deployment's class) loads one `Agent` and serves it with `serve`'s own app
(`server.create_app`) on its own port, on an event loop in its own thread, guarded by a token only
the gateway knows; its WebRTC peers use this process's own UDP ports. Each conversation's slot is
held by one streaming `hold()` call that yields this replica's URL and a one-use ticket; the
gateway brings the ticket with the conversation's request, and the call lasts until that
conversation ends, so Serve counts exactly the conversations (`max_ongoing_requests` = slots).
`Registry` is where replicas say where they listen.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import secrets
import threading
import time
from contextlib import suppress

log = logging.getLogger(__name__)

NAMESPACE = "duplex-agent"  # the Ray namespace of the `cluster` process and the registry actor
TICKET_HEADER = "X-Duplex-Ticket"
TICKET_TIMEOUT_S = 15.0  # a hold whose conversation never reaches the replica frees its slot


class ReplicaServer:
    """One agent served by `create_app` on its own port, on an event loop in its own thread, plus
    the tickets that tie each conversation to the Serve call holding its slot."""

    def __init__(self, settings: dict):
        from duplex_agent.agent.api import Agent
        from duplex_agent.streams.server import set_torch_threads, settle_heap
        set_torch_threads(settings["threads"])  # = the replica's num_cpus, before the model loads
        _not_niced()
        if settings.get("media_host"):
            _restrict_ice_addresses(settings["media_host"])
        self.settings = settings
        self.agent = Agent.load(settings["checkpoint"], settings["device"],
                                settings["max_sessions"], kv_cache=settings["kv_cache"],
                                **settings["weights"])
        settle_heap()
        self._tickets: dict[str, dict] = {}  # key -> {"done": Future, "conv": ..., "used": bool}
        self.loop = asyncio.new_event_loop()
        started: concurrent.futures.Future = concurrent.futures.Future()
        self.thread = threading.Thread(target=self._run, args=(started,), name="replica-http",
                                       daemon=True)
        self.thread.start()
        self.port = started.result(timeout=60)

    # -- the server thread -----------------------------------------------------------------------
    def _run(self, started: concurrent.futures.Future) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.runner = self.loop.run_until_complete(self._start())
        except BaseException as e:  # reported to __init__, which raises it in the replica
            started.set_exception(e)
            return
        started.set_result(self.runner.addresses[0][1])
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()

    async def _start(self):
        from aiohttp import web

        from duplex_agent.streams.security import Policy, RedactingAccessLogger
        from duplex_agent.streams.server import create_app
        s = self.settings
        policy = Policy(auth_token=s["internal_token"], max_message_bytes=s["max_message_bytes"],
                        max_offer_bytes=s["max_offer_bytes"], idle_timeout_s=s["idle_timeout_s"],
                        max_conversation_s=s["max_conversation_s"])
        app = create_app(self.agent, policy=policy, profile_stages=s["profile_stages"],
                         utterance_rule=s["utterance_rule"], phone=s["phone"])
        app.middlewares.append(self._ticket_middleware())  # inside the guard: token checked first
        runner = web.AppRunner(app, shutdown_timeout=5.0, access_log_class=RedactingAccessLogger)
        await runner.setup()
        await web.TCPSite(runner, s["bind_host"], 0).start()
        return runner

    def _ticket_middleware(self):
        from aiohttp import web

        from duplex_agent.streams.security import refusal

        @web.middleware
        async def tickets(request, handler):
            key = request.headers.get(TICKET_HEADER)
            if key is None:  # the gateway's stats and metrics polls
                return await handler(request)
            ticket = self._tickets.get(key)
            if ticket is None or ticket["used"]:
                return refusal(409, "unknown or already used cluster ticket")
            ticket["used"] = True
            before = {c.id for c in self.agent.conversations()}
            try:
                response = await handler(request)  # a websocket's returns when it has ended
            except BaseException:
                self._finish(key)
                raise
            conv = request.get("conversation")  # set by streams/webrtc.py for an answered offer
            if conv is None and 200 <= response.status < 300:  # a Realtime call (201)
                tickets = list(self._tickets.values())  # one step: `expect` adds from Serve's thread
                attached = {t["conv"].id for t in tickets if t["conv"] is not None}
                new = [c for c in self.agent.conversations()
                       if c.id not in before and c.id not in attached]
                conv = new[0] if len(new) == 1 else None
            if 200 <= response.status < 300 and conv is not None and not conv.closed:
                ticket["conv"] = conv
                ticket["watch"] = asyncio.create_task(self._watch(key, conv))
            else:
                self._finish(key)
            return response

        return tickets

    async def _watch(self, key: str, conv) -> None:
        while not conv.closed:  # a WebRTC call ends on the replica (hang-up, limits, errors)
            await asyncio.sleep(0.2)
        self._finish(key)

    def _finish(self, key: str) -> None:  # on the server loop
        ticket = self._tickets.pop(key, None)
        if ticket is not None and not ticket["done"].done():
            ticket["done"].set_result(None)

    def _expire(self, key: str) -> None:
        ticket = self._tickets.get(key)
        if ticket is not None and not ticket["used"]:
            self._finish(key)

    def _release(self, key: str) -> None:  # on the server loop
        ticket = self._tickets.get(key)
        if ticket is not None and ticket.get("conv") is not None and not ticket["conv"].closed:
            ticket["conv"].end("the cluster ended this conversation (shutting down)")
        self._finish(key)

    # -- called from Serve's side ----------------------------------------------------------------
    def expect(self) -> tuple[str, concurrent.futures.Future]:
        """A new ticket and the future resolved when its conversation is over."""
        key = secrets.token_urlsafe(16)
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._tickets[key] = {"done": done, "conv": None, "used": False}
        self.loop.call_soon_threadsafe(self.loop.call_later, TICKET_TIMEOUT_S, self._expire, key)
        return key, done

    def release(self, key: str) -> None:
        """The hold ended (the gateway let go, or shutdown): end the conversation if it lives."""
        if not self.loop.is_closed():
            with suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._release, key)

    def check(self) -> None:
        if not self.thread.is_alive():
            raise RuntimeError("the replica's HTTP server thread has stopped")
        if not self.agent._driver.is_alive():
            raise RuntimeError("the replica's engine thread has stopped")

    def close(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=15)
        self.agent.close()


def _not_niced() -> None:
    """Ray may start workers niced (see run_cluster); an engine must not be."""
    if os.getpriority(os.PRIO_PROCESS, 0) > 0:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        except PermissionError:
            log.warning("this engine runs niced (%d): start Ray with RAY_worker_niceness=0",
                        os.getpriority(os.PRIO_PROCESS, 0))


def _restrict_ice_addresses(host: str) -> None:
    """Gather WebRTC host candidates on `host` only. aiortc has no setting for this; multi-homed
    nodes (and loopback-only machines, where aioice finds nothing) need it."""
    import aioice.ice
    aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=True: [host]


class EngineReplica:
    """The Serve deployment's class: one engine. Deployed by `deploy` with max_ongoing_requests =
    its slots, so each `hold` call is one conversation slot."""

    def __init__(self, settings: dict):
        import ray
        from ray import serve
        self.id = serve.get_replica_context().replica_id.unique_id
        self.server = ReplicaServer(settings)
        host = settings["bind_host"]
        if host in ("0.0.0.0", "::"):
            host = ray.util.get_node_ip_address()
        self.url = f"http://{host}:{self.server.port}"
        self._registry = ray.get_actor(settings["registry"], namespace=NAMESPACE)
        ray.get(self._registry.register.remote(self.id, {"url": self.url, "pid": os.getpid(),
                                                         "node": ray.util.get_node_ip_address()}))
        log.info("replica %s serving on %s", self.id, self.url)

    async def hold(self):
        """Streaming call: yields where to take the conversation, then lasts as long as it does."""
        key, done = self.server.expect()
        try:
            yield {"replica": self.id, "url": self.url, "ticket": key}
            await asyncio.wrap_future(done)
        finally:  # also on cancellation by the gateway
            self.server.release(key)

    def check_health(self) -> None:
        self.server.check()

    def __del__(self):  # Serve calls this after draining, on scale-down and shutdown
        with suppress(Exception):
            self._registry.unregister.remote(self.id)
        self.server.close()


class Registry:
    """Where each replica says where it listens (a Ray actor owned by the `cluster` process)."""

    def __init__(self):
        self._replicas: dict[str, dict] = {}

    def register(self, replica: str, info: dict) -> None:
        self._replicas[replica] = {**info, "since": time.time()}

    def unregister(self, replica: str) -> None:
        self._replicas.pop(replica, None)

    def replicas(self) -> dict[str, dict]:
        return dict(self._replicas)

"""The public side of `run_agent.py cluster` (streams/cluster/launcher.py): the gateway, in the `cluster`
process.

It serves the web page; relays the websockets (`/api/chat`, `/v1/realtime`) to the replica that
holds the conversation; forwards WebRTC offers (`/offer`, `/v1/realtime/calls`, media then flows
straight to the replica) and `/api/voices`; takes phone calls (`POST /twilio/voice`, checked and
forwarded to a replica, whose single-use stream credential then routes `/twilio/stream/...` to
it); and sums the replicas' `/api/stats` and `/metrics`.
A conversation's slot is one Serve handle call (`Hold`), placed by Serve's router. The gateway
sees every hold, so it refuses at once, with `serve`'s refusal shapes, when the running replicas'
slots are all held; the admission rules (token, origins, sizes, per-client limit) apply here,
idle and length limits on the replicas. Ray is imported only where it is used.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from contextlib import suppress
from pathlib import Path

from duplex_agent.streams.cluster.replica import TICKET_HEADER
from duplex_agent.streams.limits import MAX_REQUEST_LINE_BYTES

log = logging.getLogger(__name__)

APP_NAME = "duplex-agent"  # the Serve application
DEPLOYMENT = "engine"
WEBSOCKET_PATHS = ("/api/chat", "/v1/realtime")  # relayed to the replica
OFFER_PATHS = ("/offer", "/v1/realtime/calls")  # WebRTC: forwarded to the replica
ADMISSION_TIMEOUT_S = 5.0  # Serve's router had no room though the gateway counted some (a replica just died)
STATS_TIMEOUT_S = 3.0
FORGET_UNREACHABLE_S = 30.0  # a replica that does not answer this long is dropped from the list
REPLICA_FAILED = ("the engine serving this conversation stopped (replica {replica} failed); "
                  "start a new conversation")


class ClusterFull(Exception):
    """Every slot of the running replicas is held."""


class NoReplica(Exception):
    """Serve could not place the call (e.g. no replica is healthy); the message says why."""


class Hold:
    """One conversation's slot: the streaming `hold` call and where it points."""

    def __init__(self, gateway: "Gateway", client: str | None, transport: str):
        self.gateway, self.client, self.transport = gateway, client, transport
        self.replica = self.url = self.ticket = None
        self.error: str | None = None
        self.released = False
        self._call = None
        self._task: asyncio.Task | None = None

    @property
    def closed(self) -> bool:
        return self._task is not None and self._task.done()

    async def start(self, handle) -> None:
        self._call = handle.options(stream=True).hold.remote()
        try:
            info = await asyncio.wait_for(self._call.__anext__(), ADMISSION_TIMEOUT_S)
        except BaseException:
            self._call.cancel()
            raise
        self.replica, self.url, self.ticket = info["replica"], info["url"], info["ticket"]
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        try:
            async for _ in self._call:
                pass
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the replica died (Ray reports it here), or we cancelled
            if not self.released:
                self.error = f"{type(e).__name__}: {e}"
                log.info("hold on replica %s ended: %s", self.replica, self.error)
        finally:
            self.gateway._holds.discard(self)

    def release(self) -> None:
        self.released = True
        if self._call is not None and not self.closed:
            self._call.cancel()
        self.gateway._holds.discard(self)

    async def wait(self, timeout: float) -> None:
        if self._task is not None:
            await asyncio.wait([self._task], timeout=timeout)


class Gateway:
    """The public address of the cluster (see the module docstring). Also the conversation
    tracker that `security.guard_middleware` asks about clients (`count`, `reserve`, `claim`)."""

    def __init__(self, handle, registry, slots: int, policy, internal_token: str,
                 static_dir: Path | None = None, phone=None):
        from duplex_agent.streams.metrics import Metrics
        from duplex_agent.streams.security import Reservations
        from duplex_agent.streams.server import WEB_DIR
        self.handle, self.registry, self.slots = handle, registry, slots
        self.policy, self.internal_token = policy, internal_token
        self.static_dir = Path(static_dir or WEB_DIR)
        self.metrics = Metrics()  # the gateway's own refusals; summed with the replicas' metrics
        self.running_replicas = 0
        self._holds: set[Hold] = set()
        self._reserved = Reservations()
        self._sockets: set = set()
        self._unreachable_since: dict[str, float] = {}
        self.counters = Counter()  # websocket refusals and relay failures at the gateway
        self.phone = phone  # streams.phone.webhook.PhoneSettings, or None
        self._phone_streams: dict[str, tuple[Hold, float]] = {}  # credential -> (hold, expiry)
        self.session = None

    # -- capacity --------------------------------------------------------------------------------
    @property
    def max_conversations(self) -> int:
        """Slots of the running replicas (what `security.refuse_full` reports)."""
        return self.running_replicas * self.slots

    async def _follow_serve(self) -> None:
        from ray import serve
        while True:
            try:
                status = await asyncio.to_thread(serve.status)
                deployment = status.applications[APP_NAME].deployments[DEPLOYMENT]
                self.running_replicas = deployment.replica_states.get("RUNNING", 0)
            except Exception:
                log.exception("cannot read Serve's status")
            await asyncio.sleep(0.5)

    async def reserve_slot(self, client: str | None, transport: str) -> Hold:
        """Hold a slot on a replica chosen by Serve's router; ClusterFull when none is free."""
        if len(self._holds) >= self.max_conversations:
            raise ClusterFull
        hold = Hold(self, client, transport)
        self._holds.add(hold)  # counted before the await, so a burst cannot over-admit
        try:
            await hold.start(self.handle)
        except asyncio.TimeoutError:
            self._holds.discard(hold)
            raise ClusterFull from None
        except Exception as e:
            self._holds.discard(hold)
            log.warning("no replica took a conversation: %s: %s", type(e).__name__, e)
            raise NoReplica(f"no engine replica could take the conversation ({type(e).__name__})"
                            ", try again later") from e
        except BaseException:
            self._holds.discard(hold)
            raise
        return hold

    # -- the tracker interface of security.guard_middleware ------------------------------------
    def count(self, client: str) -> int:
        return sum(1 for h in self._holds if h.client == client) + self._reserved[client]

    def reserve(self, client: str):
        return self._reserved.hold(client)

    def claim(self, hold: Hold, client: str | None, transport: str) -> None:
        hold.client, hold.transport = client, transport

    # -- the app ---------------------------------------------------------------------------------
    def create_app(self):
        from aiohttp import web

        from duplex_agent.streams.security import guard_middleware
        app = web.Application(middlewares=[guard_middleware(self.policy, self, self.metrics)],
                              client_max_size=self.policy.max_offer_bytes,
                              handler_args={"max_line_size": MAX_REQUEST_LINE_BYTES})
        index = self.static_dir / "index.html"

        async def handle_index(request):
            if not index.is_file():
                return web.Response(status=404, text=f"web client not installed: {index} is missing\n")
            return web.FileResponse(index)

        async def start(app):
            import aiohttp
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=5))
            self._background = [asyncio.create_task(self._follow_serve())]
            while not self.running_replicas:  # the first status before the first client
                await asyncio.sleep(0.05)

        async def shutdown(app):
            from aiohttp import WSCloseCode
            await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY,
                                            message=b"server shutting down")
                                   for ws in list(self._sockets)), return_exceptions=True)
            holds = list(self._holds)
            for hold in holds:
                hold.release()
            await asyncio.gather(*(h.wait(5.0) for h in holds))

        async def cleanup(app):
            for task in self._background:
                task.cancel()
            await self.session.close()

        app.router.add_get("/", handle_index)
        for path in WEBSOCKET_PATHS:
            app.router.add_get(path, self.handle_websocket)
        for path in OFFER_PATHS:
            app.router.add_post(path, self.handle_offer)
        if self.phone is not None:
            from duplex_agent.streams.phone.webhook import STREAM_PATH, VOICE_PATH
            app.router.add_post(VOICE_PATH, self.handle_phone_call)
            app.router.add_get(STREAM_PATH + "/{credential}", self.handle_phone_stream)
        app.router.add_get("/api/stats", self.handle_stats)
        app.router.add_get("/api/voices", self.handle_voices)
        app.router.add_get("/metrics", self.handle_metrics)
        if self.static_dir.is_dir():
            app.router.add_static("/", self.static_dir)
        app.on_startup.append(start)
        app.on_shutdown.append(shutdown)
        app.on_cleanup.append(cleanup)
        return app

    def _upstream_headers(self, hold: Hold) -> dict:
        return {"Authorization": f"Bearer {self.internal_token}", TICKET_HEADER: hold.ticket}

    # -- websockets: relayed to the replica that holds the conversation -------------------------
    async def handle_websocket(self, request):
        """Refusals keep each protocol's shape: on `/api/chat` a 0x05 message after the upgrade;
        on `/v1/realtime` an HTTP status before it, as `serve` refuses (a Realtime client whose
        socket opens and closes reconnects at once), the replica's own refusal passed on."""
        import aiohttp
        from aiohttp import web

        from duplex_agent.streams.moshi_ws import HEARTBEAT_S
        from duplex_agent.streams.security import (over_client_limit, refusal, refuse_full,
                                                   too_many_message)
        protocol = "moshi" if request.path == "/api/chat" else "realtime"
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
                     if p.strip()]
        ws = web.WebSocketResponse(max_msg_size=self.policy.max_message_bytes + 1, autoclose=False,
                                   heartbeat=HEARTBEAT_S, protocols=protocols)

        async def refuse(reason: str, code: str, message: str, status: int, **extra):
            self.counters[f"refused_{reason}"] += 1
            self.metrics.refused(reason)
            if protocol != "moshi":
                return refuse_full(self) if reason == "full" else refusal(
                    status, message, code=code, **extra)
            await ws.prepare(request)
            await _ws_error(ws, protocol, code, message)
            await ws.close()
            return ws

        client = request.remote or "unknown"
        if over_client_limit(self.policy, self, client):
            limit = self.policy.max_per_client
            return await refuse("per_client", "rate_limit_exceeded",
                                too_many_message(client, limit), 429, limit=limit)
        try:
            hold = await self.reserve_slot(client, "websocket")
        except ClusterFull:
            return await refuse("full", "server_full", f"server full: all "
                                f"{self.max_conversations} conversations are in use, try again "
                                "later", 503)
        except NoReplica as e:
            return await refuse("replica", "server_error", str(e), 503)
        query = {k: v for k, v in request.query.items() if k != "token"}
        try:
            upstream = await self.session.ws_connect(
                hold.url + request.path, params=query, headers=self._upstream_headers(hold),
                protocols=protocols, max_msg_size=0, heartbeat=HEARTBEAT_S)
        except aiohttp.WSServerHandshakeError as e:
            hold.release()
            if protocol != "moshi" and 400 <= e.status < 500:  # the replica refused the client's request
                return refusal(e.status, e.message or "refused by the replica")
            return await refuse("replica", "server_error",
                                f"the replica {hold.replica} refused the connection: {e}", 502)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            hold.release()
            return await refuse("replica", "server_error",
                                f"the replica {hold.replica} cannot be reached: {e}", 502)
        self._sockets.add(ws)
        try:
            await ws.prepare(request)
            await self._relay(ws, upstream, hold, protocol)
        finally:
            self._sockets.discard(ws)
            if not upstream.closed:
                await upstream.close()
            hold.release()
        return ws

    async def _relay(self, ws, upstream, hold: Hold, protocol: str) -> None:
        from aiohttp import WSCloseCode, WSMsgType

        async def forward(msg, to) -> None:
            if msg.type == WSMsgType.BINARY:
                await to.send_bytes(msg.data)
            elif msg.type == WSMsgType.TEXT:
                await to.send_str(msg.data)

        async def down() -> str:  # replica -> client, as it comes
            async for msg in upstream:
                try:
                    await forward(msg, ws)
                except ConnectionError:
                    return "client"
            return "replica"

        async def up() -> str:  # client -> replica; ends on the client's close or a broken frame
            async for msg in ws:
                if msg.type == WSMsgType.ERROR:
                    break
                try:
                    await forward(msg, upstream)
                except ConnectionError:  # the replica's connection broke under our feet
                    return "replica"
            return "client"

        tasks = [asyncio.create_task(down()), asyncio.create_task(up())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        ended = {"error" if t.exception() else t.result() for t in done}
        for task in done:
            if task.exception():
                log.warning("relay on replica %s failed: %r", hold.replica, task.exception())
        if "client" in ended:  # the client left: free the slot, then answer
            await upstream.close()
            if not ws.closed:
                await ws.close()
            return
        code = upstream.close_code
        if code in (WSCloseCode.OK, WSCloseCode.GOING_AWAY):  # the replica ended it, as serve does
            await ws.close(code=code)
            return
        self.counters["replica_failed"] += 1
        self.metrics.ended("replica_failed")
        message = REPLICA_FAILED.format(replica=hold.replica)
        log.warning("conversation on replica %s lost (close code %s)", hold.replica, code)
        await _ws_error(ws, protocol, "server_error", message)
        await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"replica failed")

    # -- phone calls: the webhook places the call, its credential routes the stream -------------
    async def handle_phone_call(self, request):
        """Checked here (signature, per-caller limit, capacity: the busy TwiML at once), then
        forwarded as it came to the replica holding the slot, which checks the signature again
        and answers the TwiML; the stream URL's credential is remembered for the stream."""
        import aiohttp
        import xml.etree.ElementTree as ElementTree
        from aiohttp import web

        from duplex_agent.streams.phone.webhook import (BUSY_MESSAGE, caller_id, say_and_hang_up,
                                                        signature_valid)
        from duplex_agent.streams.security import over_client_limit, refusal
        from twilio.request_validator import SIGNATURE_HEADER, SIGNATURE_SETTINGS_HEADER
        form = await request.post()
        if not signature_valid(self.phone, request, form):
            self.counters["phone_bad_signatures"] += 1
            self.metrics.refused("auth")
            return refusal(403, f"invalid X-Twilio-Signature for {self.phone.signed_url(request)}")
        self._forget_phone_streams()
        client = caller_id(form)
        if over_client_limit(self.policy, self, client):
            self.counters["phone_refused_per_client"] += 1
            self.metrics.refused("per_client")
            return say_and_hang_up(BUSY_MESSAGE)
        try:
            hold = await self.reserve_slot(client, "phone")
        except (ClusterFull, NoReplica):
            self.counters["phone_refused_full"] += 1
            self.metrics.refused("full")
            return say_and_hang_up(BUSY_MESSAGE)
        headers = {**self._upstream_headers(hold), "Content-Type": request.headers["Content-Type"]}
        for name in (SIGNATURE_HEADER, SIGNATURE_SETTINGS_HEADER):
            if name in request.headers:
                headers[name] = request.headers[name]
        try:
            async with self.session.post(hold.url + request.path_qs, data=await request.read(),
                                         headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=30)) as r:
                status, payload, content_type = r.status, await r.read(), r.content_type
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            hold.release()
            return refusal(502, f"the replica {hold.replica} did not answer the webhook: {e}")
        stream = None
        if status == 200:
            stream = ElementTree.fromstring(payload).find("Connect/Stream")
        if stream is None:  # refused there (busy, a persona it cannot serve): no slot is held
            hold.release()
        else:
            credential = stream.get("url").rsplit("/", 1)[1]
            self._phone_streams[credential] = (hold, time.monotonic()
                                               + self.phone.connect_timeout_s)
        return web.Response(status=status, body=payload, content_type=content_type,
                            headers={"X-Duplex-Replica": hold.replica})

    def _forget_phone_streams(self) -> None:
        now = time.monotonic()
        for credential, (hold, expires) in list(self._phone_streams.items()):
            if expires <= now:
                del self._phone_streams[credential]

    async def handle_phone_stream(self, request):
        """Relayed to the replica that answered the call's webhook; an unknown or used
        credential is refused (403) before the upgrade, as `serve` does."""
        import aiohttp
        from aiohttp import web

        from duplex_agent.streams.phone.twilio import HEARTBEAT_S
        from duplex_agent.streams.security import refusal
        self._forget_phone_streams()
        hold, _ = self._phone_streams.pop(request.match_info["credential"], (None, None))
        if hold is None or hold.closed:
            self.counters["phone_bad_credentials"] += 1
            self.metrics.refused("auth")
            return refusal(403, "unknown or already used media stream credential")
        ws = web.WebSocketResponse(max_msg_size=self.policy.max_message_bytes + 1, autoclose=False,
                                   heartbeat=HEARTBEAT_S)
        await ws.prepare(request)
        try:
            upstream = await self.session.ws_connect(
                hold.url + request.path, max_msg_size=0, heartbeat=HEARTBEAT_S,
                headers={"Authorization": f"Bearer {self.internal_token}"})
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            hold.release()
            log.warning("phone stream: the replica %s cannot be reached: %s", hold.replica, e)
            await ws.close(code=aiohttp.WSCloseCode.INTERNAL_ERROR, message=b"replica failed")
            return ws
        self._sockets.add(ws)
        try:
            await self._relay(ws, upstream, hold, "twilio")
        finally:
            self._sockets.discard(ws)
            hold.release()
        return ws

    # -- WebRTC: only the offer/answer passes here ----------------------------------------------
    async def handle_offer(self, request):
        """`/offer` and `/v1/realtime/calls`, forwarded as they came. The guard (size, per-client
        limit, counting) has run; it counts a 503 as 'full'."""
        import aiohttp
        from aiohttp import web

        from duplex_agent.streams.security import refusal, refuse_full
        body = await request.read()
        try:
            hold = await self.reserve_slot(request.remote, "webrtc")
        except ClusterFull:
            return refuse_full(self)
        except NoReplica as e:
            return refusal(503, str(e), headers={"Retry-After": "5"})
        headers = {**self._upstream_headers(hold),
                   "Content-Type": request.headers.get("Content-Type", "application/json")}
        try:
            async with self.session.post(hold.url + request.path_qs, data=body, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=30)) as r:
                status, payload, content_type = r.status, await r.read(), r.content_type
                location = r.headers.get("Location")
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            hold.release()
            return refusal(502, f"the replica {hold.replica} did not answer the offer: {e}")
        if not 200 <= status < 300:
            hold.release()
            return web.Response(status=status, body=payload, content_type=content_type)
        request["conversation"] = hold  # the guard counts it for its client
        response = web.Response(status=status, body=payload, content_type=content_type,
                                headers={"X-Duplex-Replica": hold.replica})
        if location:
            response.headers["Location"] = location
        if content_type == "application/json":  # /offer's answer also names the replica
            import json
            response.body = json.dumps({**json.loads(payload), "replica": hold.replica}).encode()
        return response

    async def handle_voices(self, request):
        """The replicas share one checkpoint: any running one answers."""
        from aiohttp import web

        from duplex_agent.streams.security import refusal
        for _, _, answer in await self._poll("/api/voices"):
            if answer is not None:
                return web.json_response(answer)
        return refusal(503, "no replica is running yet, try again later")

    # -- the whole cluster's figures ------------------------------------------------------------
    async def _poll(self, path: str) -> list[tuple[str, dict, object]]:
        """(replica id, its registry entry, its answer to GET path or None) for every replica."""
        import aiohttp
        entries = await self.registry.replicas.remote()

        async def get(info):
            try:
                async with self.session.get(info["url"] + path, headers={
                        "Authorization": f"Bearer {self.internal_token}"},
                        timeout=aiohttp.ClientTimeout(total=STATS_TIMEOUT_S)) as r:
                    if r.status == 200:
                        return await (r.text() if path == "/metrics" else r.json())
            except Exception:  # down, or not answering in time
                pass
            return None

        answers = await asyncio.gather(*(get(info) for info in entries.values()))
        now = time.monotonic()
        for replica, answer in zip(entries, answers):
            if answer is not None:
                self._unreachable_since.pop(replica, None)
            elif now - self._unreachable_since.setdefault(replica, now) > FORGET_UNREACHABLE_S:
                await self.registry.unregister.remote(replica)
        return [(r, entries[r], a) for r, a in zip(entries, answers)]

    async def handle_stats(self, request):
        from aiohttp import web
        return web.json_response(await self.stats())

    async def stats(self) -> dict:
        polled = await self._poll("/api/stats")
        up = [(r, s) for r, _, s in polled if s is not None]
        replicas = [{"id": r, "state": "running" if s is not None else "unreachable",
                     "url": info["url"], "node": info["node"], "pid": info["pid"],
                     "slots_used": s["active"] if s else None,
                     "slots_free": s["capacity"] - s["active"] if s else None}
                    for r, info, s in polled]
        websocket = Counter()
        for _, s in up:
            websocket.update(s.get("websocket", {}))
        websocket["refused_full"] += self.counters["refused_full"]
        websocket["refused_per_client"] += self.counters["refused_per_client"]
        websocket["connections"] += self.counters["refused_full"] + self.counters["refused_per_client"]
        realtime, phone = _numbers_summed(up, "realtime"), _numbers_summed(up, "phone")
        for name in ("bad_signatures", "refused_full", "refused_per_client", "bad_credentials"):
            phone[name] += self.counters[f"phone_{name}"]
        engines = [s["engine"] for _, s in up]
        engine = {}
        if engines:
            def slowest(key: str):  # the slowest replica's figure: what its conversations live with
                return max(e.get(key) or 0 for e in engines)

            engine = {**engines[0],
                      "ticks": sum(e["ticks"] for e in engines),
                      "failed_ticks": sum(e["failed_ticks"] for e in engines),
                      "tick_ms_p50": slowest("tick_ms_p50"),
                      "tick_ms_p99": slowest("tick_ms_p99"),
                      "batch_size_max": slowest("batch_size_max"),
                      "user_words": sum(e.get("user_words", 0) for e in engines),
                      "transcriber_step_ms_p50": slowest("transcriber_step_ms_p50"),
                      "transcriber_step_ms_p99": slowest("transcriber_step_ms_p99")}
            engine.pop("batch_size_mean", None)
        return {
            "active": sum(s["active"] for _, s in up),
            "capacity": sum(s["capacity"] for _, s in up),
            "conversations": [{**c, "replica": r} for r, s in up for c in s["conversations"]],
            "engine": engine,
            "websocket": dict(websocket),
            "realtime": dict(realtime),
            **({"phone": {**phone, "calls": [{**c, "replica": r} for r, s in up
                                              for c in s.get("phone", {}).get("calls", [])]}}
               if self.phone is not None else {}),
            "replicas": replicas,
            "gateway": {"held": len(self._holds), "running_replicas": self.running_replicas,
                        "relay_failures": self.counters["replica_failed"]},
        }

    async def handle_metrics(self, request):
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST
        polled = await self._poll("/metrics")
        own, _ = self.metrics.render()
        texts = [own.decode()] + [t for _, _, t in polled if t is not None]
        body = merge_metrics(texts, running_replicas=self.running_replicas)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _ws_error(ws, protocol: str, code: str, message: str) -> None:
    """An error in the client's protocol: Moshi's 0x05 message, a Realtime `error` event;
    Twilio's media streams have none (the close says it)."""
    import json

    from duplex_agent.streams.moshi_ws import KIND_ERROR
    from duplex_agent.streams.realtime.events import error_event
    with suppress(ConnectionError):
        if protocol == "moshi":
            await ws.send_bytes(KIND_ERROR + message.encode())
        elif protocol == "realtime":
            await ws.send_str(json.dumps(error_event(code, message)))


def _numbers_summed(stats: list[tuple[str, dict]], section: str) -> Counter:
    """The numeric fields of one section of the replicas' /api/stats, summed (figures that are
    not numbers, such as latency summaries, are left out)."""
    total = Counter()
    for _, s in stats:
        total.update({k: v for k, v in s.get(section, {}).items() if isinstance(v, (int, float))})
    return total


def merge_metrics(texts: list[str], running_replicas: int) -> bytes:
    """Prometheus expositions summed sample by sample (counters, gauges and histogram buckets all
    add up across replicas), plus `duplex_cluster_replicas_running`."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families
    families: dict[str, Metric] = {}
    sums: dict[str, dict] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                sums[family.name] = {}
            for s in family.samples:
                if s.name.endswith("_created"):  # timestamps, not amounts
                    continue
                key = (s.name, tuple(sorted(s.labels.items())))
                sums[family.name][key] = sums[family.name].get(key, 0.0) + s.value
    replicas = Metric("duplex_cluster_replicas_running", "Engine replicas Serve reports running",
                      "gauge")
    replicas.add_sample("duplex_cluster_replicas_running", {}, running_replicas)
    for name, metric in families.items():
        for (sample, labels), value in sums[name].items():
            metric.add_sample(sample, dict(labels), value)

    class Merged:
        def collect(self):
            yield from families.values()
            yield replicas

    registry = CollectorRegistry()
    registry.register(Merged())
    return generate_latest(registry)

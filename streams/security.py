"""Who may open a conversation, and for how long: the server's admission rules and limits.

- `Policy`: the `serve` flags (auth token, allowed origins, size limits, conversations per client
  address, idle timeout, maximum conversation length).
- `guard_middleware`: HTTP-level checks in front of the routes. Every refusal is JSON and counted
  in the metrics by reason:
      401 no or wrong token (on /offer, /api/chat, /api/stats, /api/voices, /metrics, when a
          token is set; the page passes its own ?token= on)
      403 Origin not allowed (on /offer and /api/chat, when origins are given)
      413 /offer (or /v1/realtime/calls) body over the size limit
      429 too many conversations from this client address (/offer, /v1/realtime/calls)
  The other transports apply the per-client limit themselves (`over_client_limit`): /v1/realtime
  refuses with an HTTP status before the upgrade (429, as here), /api/chat with a 0x05 message
  after it, a phone call's webhook with TwiML that says the line is busy.
  The Realtime paths (/v1/realtime, /v1/realtime/calls) take the token and Origin rules too.
  The same middleware attributes each WebRTC conversation to its client, so streams/webrtc.py
  needs no knowledge of these rules.
- `ConversationTracker`: every open conversation of the agent, whichever transport opened it. A
  periodic sweep ends conversations that went idle or reached the maximum length (the client gets
  the reason: a 0x05 message on the websocket, an error on the WebRTC data channel), adds their
  dropped frames to the metrics, and logs one line per conversation when it ends.
- `tls_context`, `RedactingAccessLogger`: HTTPS/WSS, and access logs without `?token=` values.
"""
from __future__ import annotations

import hmac
import logging
import re
import ssl
import time
import weakref
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from duplex_agent.streams.limits import (DEFAULT_IDLE_TIMEOUT_S, DEFAULT_MAX_CONVERSATION_S,
                                         DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_OFFER_BYTES)
from duplex_agent.streams.phone import STREAM_PATH

log = logging.getLogger(__name__)

OFFER_PATHS = frozenset({"/offer", "/v1/realtime/calls"})  # WebRTC: a conversation per POST
TOKEN_PATHS = frozenset({"/offer", "/api/chat", "/api/stats", "/api/voices", "/metrics",
                         "/v1/realtime", "/v1/realtime/calls"})
OPENAI_KEY_PROTOCOL = "openai-insecure-api-key."
ORIGIN_PATHS = frozenset({"/offer", "/api/chat", "/v1/realtime", "/v1/realtime/calls"})  # what a hostile web page could drive


@dataclass(frozen=True)
class Policy:
    """The server's limits. None (or an empty set) switches a rule off."""
    auth_token: str | None = None
    allowed_origins: frozenset[str] = frozenset()
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_offer_bytes: int = DEFAULT_MAX_OFFER_BYTES
    max_per_client: int | None = None
    idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S
    max_conversation_s: float | None = DEFAULT_MAX_CONVERSATION_S

    def __post_init__(self):
        object.__setattr__(self, "allowed_origins",
                           frozenset(_normalize_origin(o) for o in self.allowed_origins))

    @property
    def sweep_interval_s(self) -> float:
        """How often the tracker checks the time limits: a tenth of the shortest limit,
        within [50 ms, 1 s]."""
        limits = [s for s in (self.idle_timeout_s, self.max_conversation_s) if s]
        return min(1.0, max(0.05, min(limits, default=10.0) / 10))


def _normalize_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def token_matches(request: web.Request, token: str) -> bool:
    """`Authorization: Bearer TOKEN`, or `?token=TOKEN` for clients that cannot set headers
    (browsers' WebSocket, the moshi web client), or the websocket subprotocol
    `openai-insecure-api-key.TOKEN` that OpenAI's browser clients send. Constant-time comparison."""
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        given = header[7:].strip()
    else:
        given = request.query.get("token", "")
        for protocol in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
            if protocol.strip().startswith(OPENAI_KEY_PROTOCOL):
                given = protocol.strip()[len(OPENAI_KEY_PROTOCOL):]
    return hmac.compare_digest(given.encode(), token.encode())


def origin_allowed(request: web.Request, allowed: frozenset[str]) -> bool:
    """An empty `allowed` accepts any origin. Requests without an Origin header come from programs,
    not from web pages, and are accepted; the page's own origin (same scheme and host) always is."""
    origin = request.headers.get("Origin")
    if not allowed or origin is None:
        return True
    origin = _normalize_origin(origin)
    return origin in allowed or origin == f"{request.scheme}://{request.host}".lower()


def refusal(status: int, message: str, headers: dict | None = None, **extra) -> web.Response:
    """The JSON shape of every refusal: {"error": message, **extra}."""
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer", **(headers or {})}
    return web.json_response({"error": message, **extra}, status=status, headers=headers)


def over_client_limit(policy: Policy, tracker, client: str) -> bool:
    """`client` holds its --max-per-client conversations already (`tracker`: anything that
    counts a client's conversations, a ConversationTracker or the cluster's gateway)."""
    limit = policy.max_per_client
    return bool(limit) and tracker.count(client) >= limit


def too_many_message(client: str, limit: int) -> str:
    return f"too many conversations from {client}: at most {limit} per client"


def refuse_per_client(client: str, limit: int, **extra) -> web.Response:
    """The HTTP answer to a client over its limit: 429 with a JSON reason and the limit."""
    return refusal(429, too_many_message(client, limit), **extra, limit=limit)


def refuse_full(agent):
    """The HTTP answer when every conversation slot is taken: 503 with a JSON reason."""
    return refusal(503, f"server full: all {agent.max_conversations} conversations are in use, "
                        "try again later", headers={"Retry-After": "5"},
                   capacity=agent.max_conversations)


def guard_middleware(policy: Policy, tracker: "ConversationTracker", metrics):
    """The aiohttp middleware that applies `policy` to requests (see the module docstring)."""

    @web.middleware
    async def guard(request: web.Request, handler):
        path = request.path
        token = policy.auth_token
        if token and path in TOKEN_PATHS and not token_matches(request, token):
            metrics.refused("auth")
            return refusal(401, "missing or wrong token: send 'Authorization: Bearer TOKEN' "
                                "or add ?token=TOKEN to the URL")
        if path in ORIGIN_PATHS and not origin_allowed(request, policy.allowed_origins):
            metrics.refused("origin")
            return refusal(403, f"origin {request.headers.get('Origin')!r} is not allowed")
        if path in OFFER_PATHS and request.method == "POST":
            return await _guard_offer(request, handler)
        return await handler(request)

    def too_big() -> web.Response:
        metrics.refused("size")
        return refusal(413, f"the offer is larger than {policy.max_offer_bytes} bytes",
                       limit=policy.max_offer_bytes)

    async def _guard_offer(request: web.Request, handler) -> web.StreamResponse:
        if (request.content_length or 0) > policy.max_offer_bytes:
            return too_big()
        client = request.remote or "unknown"
        if over_client_limit(policy, tracker, client):
            metrics.refused("per_client")
            return refuse_per_client(client, policy.max_per_client)
        with tracker.reserve(client):  # the offer's conversation counts while it is negotiated
            try:
                response = await handler(request)
            except web.HTTPRequestEntityTooLarge:  # no Content-Length; reading went past the limit
                return too_big()
        if response.status == 400:
            metrics.refused("bad_input")
        elif response.status == 503:
            metrics.refused("full")
        elif response.status == 200 and "conversation" in request:
            tracker.claim(request["conversation"], client, "webrtc")  # set by streams/webrtc.py
        return response

    return guard


# -- open conversations --------------------------------------------------------------------------

@dataclass
class _Tracked:
    conv: object
    client: str | None
    transport: str
    opened: float  # time.monotonic()
    last_active: float  # when its frames_in last grew
    frames_in: int = 0
    dropped_in: int = 0  # already added to the metrics
    dropped_out: int = 0


class Reservations(Counter):
    """Per client address, the conversations still being set up (an offer in negotiation), which
    count against --max-per-client before they exist."""

    @contextmanager
    def hold(self, client: str):
        self[client] += 1
        try:
            yield
        finally:
            self[client] -= 1
            if not self[client]:
                del self[client]


class ConversationTracker:
    """Open conversations with their client and age: per-client counts, time limits, drop
    accounting and end-of-conversation logs. Used from the event loop only."""

    def __init__(self, agent, policy: Policy, metrics):
        self.agent, self.policy, self.metrics = agent, policy, metrics
        self._tracked: dict[str, _Tracked] = {}  # by conversation id
        self._reserved = Reservations()  # offers being negotiated, by client
        # Conversations this tracker ended ("idle", "max_length"), for as long as they exist.
        self._ended: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # -- attribution -----------------------------------------------------------------------------
    def count(self, client: str) -> int:
        """Open conversations of this client address, plus its offers in negotiation."""
        live = sum(1 for t in self._tracked.values() if t.client == client and not t.conv.closed)
        return live + self._reserved[client]

    def reserve(self, client: str):
        """Count an offer in negotiation against its client's limit (a context manager)."""
        return self._reserved.hold(client)

    def claim(self, conv, client: str | None, transport: str) -> None:
        """Record who opened `conv`; call right after `agent.open()`."""
        entry = self._track(conv)
        entry.client, entry.transport = client, transport
        log.info("conversation %s opened: %s from %s (%d/%d active)", conv.id, transport, client,
                 self.agent.active, self.agent.max_conversations)

    def _track(self, conv) -> _Tracked:
        entry = self._tracked.get(conv.id)
        if entry is None:
            now = time.monotonic()
            entry = self._tracked[conv.id] = _Tracked(conv, None, "other", now, now,
                                                      conv.stats.frames_in)
            self.metrics.opened()
        return entry

    def ended_by_server(self, conv) -> str | None:
        """"idle" or "max_length" if the tracker ended `conv`, else None."""
        return self._ended.get(conv)

    # -- the sweep -------------------------------------------------------------------------------
    def sweep(self) -> None:
        """Adopt conversations opened elsewhere, enforce the time limits, count drops, and retire
        conversations that have ended."""
        now = time.monotonic()
        for conv in self.agent.conversations():
            self._track(conv)
        for entry in list(self._tracked.values()):
            conv = entry.conv
            if conv.closed:
                self.finish(conv)
                continue
            self._account(entry)
            if conv.stats.frames_in != entry.frames_in:
                entry.frames_in, entry.last_active = conv.stats.frames_in, now
            idle, age = self.policy.idle_timeout_s, self.policy.max_conversation_s
            if idle and now - entry.last_active >= idle:
                self._end(entry, "idle", f"closed after {idle:g} s without audio from the client")
            elif age and now - entry.opened >= age:
                self._end(entry, "max_length",
                          f"the conversation reached the maximum length of {age:g} s")

    def _end(self, entry: _Tracked, reason: str, message: str) -> None:
        self._ended[entry.conv] = reason
        # Conversation._end is how the engine driver reports errors too: the consumer gets an
        # ErrorOut with the message (a 0x05 on the websocket), then the end of its events.
        entry.conv.end(message)
        self.finish(entry.conv)

    def _account(self, entry: _Tracked) -> None:
        stats = entry.conv.stats
        self.metrics.dropped(stats.dropped_input_frames - entry.dropped_in,
                             stats.dropped_output_frames - entry.dropped_out)
        entry.dropped_in = stats.dropped_input_frames
        entry.dropped_out = stats.dropped_output_frames

    def finish(self, conv, reason: str | None = None) -> None:
        """Retire a closed conversation: final drop counts, the `ended` metric, one log line.
        `reason` is the transport's (e.g. "bad_input"); a limit the tracker enforced or an engine
        error takes precedence. Safe to call more than once."""
        entry = self._tracked.pop(conv.id, None)
        if entry is None:
            return
        self._account(entry)
        reason = self._ended.get(conv) or ("error" if conv.error else reason or "closed")
        self.metrics.ended(reason)
        self.metrics.turn_taking(conv.turns)
        stats = conv.stats
        log.info("conversation %s ended (%s): %s from %s, %.1f s, %d frames in, %d out, "
                 "dropped %d in / %d out", conv.id, reason, entry.transport, entry.client,
                 time.monotonic() - entry.opened, stats.frames_in, stats.frames_out,
                 stats.dropped_input_frames, stats.dropped_output_frames)


# -- TLS and logs ----------------------------------------------------------------------------------

def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server TLS context (TLS 1.2 or newer) from PEM files. Raises ValueError with a message."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"cannot use the TLS certificate {cert_file} with key {key_file}: "
                         f"{e}") from None
    return context


_TOKEN_IN_QUERY = re.compile(r"(?<=[?&]token=)[^&]*")
_CREDENTIAL_IN_PATH = re.compile(rf"(?<=^{re.escape(STREAM_PATH)}/)[^/?]+")  # a call's media stream


class RedactingAccessLogger(AbstractAccessLogger):
    """aiohttp's access log, with the value of `?token=` and phone streams' credentials replaced
    by ***."""

    def log(self, request, response, time: float) -> None:
        path = _CREDENTIAL_IN_PATH.sub("***", _TOKEN_IN_QUERY.sub("***", request.path_qs))
        self.logger.info('%s "%s %s" %d %.1f ms', request.remote, request.method, path,
                         response.status, time * 1000)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

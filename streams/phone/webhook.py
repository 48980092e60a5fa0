"""Phone calls' HTTP side: `POST /twilio/voice`, the webhook a Twilio number calls, and the
media stream's admission, `GET /twilio/stream/{credential}`.

Enabled by `serve --twilio-auth-token TOKEN --public-url URL` (and `cluster`):

- The webhook is signed: `X-Twilio-Signature` is checked by the `twilio` library's
  `RequestValidator` against `--public-url` + the path and query the request came with (what
  Twilio signed, whatever proxy stands between), with the POSTed form. A bad signature gets 403.
- The call's conversation opens here, with the persona: `voice_prompt` and `text_prompt` from the
  webhook URL's query (it is signed with it), else `--phone-voice` / `--phone-role`. Its prompt
  is prefilled while Twilio connects the stream. The caller's number is the client address
  `--max-per-client` counts.
- The answer is TwiML `<Connect><Stream url="wss://PUBLIC/twilio/stream/CREDENTIAL">` with the
  persona as `<Parameter>`s (Twilio's Stream URL takes no query string). The credential is
  single-use and bound to the call (its `start` must name the same CallSid); a stream that does
  not come within `connect_timeout_s` frees the slot.
- A full server (or a caller over its limit) answers a short `<Say>` and `<Hangup/>`, at once.

Everything else about the call is in streams/phone/twilio.py.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from aiohttp import WSCloseCode, web
from twilio.request_validator import SIGNATURE_HEADER, SIGNATURE_SETTINGS_HEADER, \
    RequestValidator, get_signature_algorithm
from twilio.twiml.voice_response import Connect, VoiceResponse

from duplex_agent.agent.api import AgentFull, percentile
from duplex_agent.checkpoints.personaplex import PersonaError
from duplex_agent.streams.phone import STREAM_PATH, VOICE_PATH
from duplex_agent.streams.phone.twilio import HEARTBEAT_S, TwilioCall
from duplex_agent.streams.security import over_client_limit, refusal

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT_S = 15.0  # Twilio connects the stream within a second or two
BUSY_MESSAGE = "Sorry, all our lines are busy. Please call again later."
BROKEN_MESSAGE = "Sorry, this line cannot take calls right now."


@dataclass(frozen=True)
class PhoneSettings:
    """What `serve` knows about its phone line: Twilio's auth token (it signs the webhooks), the
    public URL Twilio reaches this server at, and the default persona."""
    auth_token: str
    public_url: str
    voice: str | None = None
    role: str | None = None
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S

    def __post_init__(self):
        parts = urlsplit(self.public_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"--public-url {self.public_url!r}: expected http(s)://host[:port]"
                             "[/prefix], the address Twilio reaches this server at")
        object.__setattr__(self, "public_url", self.public_url.rstrip("/"))

    def signed_url(self, request: web.Request) -> str:
        """The URL Twilio requested (and signed): the public URL, then the path and query."""
        return self.public_url + request.path_qs

    def stream_url(self, credential: str) -> str:
        parts = urlsplit(self.public_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return urlunsplit((scheme, parts.netloc, f"{parts.path}{STREAM_PATH}/{credential}", "", ""))


def caller_id(form) -> str:
    """The client address a call counts against --max-per-client: the caller's number."""
    return f"tel:{form.get('From') or 'unknown'}"


def signature_valid(settings: PhoneSettings, request: web.Request, form) -> bool:
    algorithm = get_signature_algorithm(request.headers.get(SIGNATURE_SETTINGS_HEADER))
    return RequestValidator(settings.auth_token).validate(
        settings.signed_url(request), form, request.headers.get(SIGNATURE_HEADER, ""), algorithm)


def twiml(response: VoiceResponse) -> web.Response:
    return web.Response(text=str(response), content_type="text/xml")


def say_and_hang_up(message: str) -> web.Response:
    """What a caller hears when the call cannot be taken (Twilio needs a 200 to play it)."""
    response = VoiceResponse()
    response.say(message)
    response.hangup()
    return twiml(response)


def connect_twiml(stream_url: str, parameters: dict[str, str]) -> web.Response:
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=stream_url)
    for name, value in parameters.items():
        stream.parameter(name=name, value=value)
    response.append(connect)
    return twiml(response)


@dataclass
class PendingCall:
    """A call whose webhook opened its conversation and whose stream has not come yet."""
    call_sid: str
    conv: object
    expires: float  # time.monotonic()


class PhoneEndpoint:
    """The phone routes of one server, with their counters, pending credentials and live calls."""

    COUNTERS = ("webhooks", "bad_signatures", "bad_requests", "refused_full", "refused_per_client",
                "streams", "bad_credentials", "streams_never_opened", "bad_messages",
                "unknown_events", "bad_media", "media_before_start", "repeated_starts",
                "odd_media", "other_tracks", "lost_chunks", "stray_marks", "dtmf_digits",
                "clears", "cut_ms", "unheard_ms", "ended_by_limits", "engine_errors")

    def __init__(self, agent, settings: PhoneSettings, policy, tracker, metrics):
        self.agent, self.settings = agent, settings
        self.policy, self.tracker, self.metrics = policy, tracker, metrics
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self._pending: dict[str, PendingCall] = {}  # by credential
        self.calls: dict[str, TwilioCall] = {}  # live streams by CallSid
        self.latency_ms: deque[float] = deque(maxlen=20_000)  # frame in -> its first chunk sent
        self.lag_ms: deque[float] = deque(maxlen=20_000)  # mark sent -> echoed
        metrics.watch_calls(self._call_lags)

    # -- what the calls report -------------------------------------------------------------------
    def count(self, name: str, amount: float = 1) -> None:
        self.counters[name] += amount

    def websocket_error(self, kind: str) -> None:
        self.metrics.websocket_error(kind)

    def cut(self, seconds: float) -> None:
        self.count("cut_ms", seconds * 1000)
        self.metrics.phone_cut(seconds)

    def cleared(self) -> None:
        self.count("clears")

    def frame_sent(self, ms: float) -> None:
        self.latency_ms.append(ms)

    def playback_lag(self, seconds: float) -> None:
        self.lag_ms.append(seconds * 1000)
        self.metrics.phone_lag(seconds)

    def dtmf(self) -> None:
        self.count("dtmf_digits")
        self.metrics.phone_dtmf()

    def ended_by_server(self, conv, message: str) -> None:
        if self.tracker.ended_by_server(conv):
            self.count("ended_by_limits")
        else:
            self.count("engine_errors")
        log.info("phone conversation %s ended by the server: %s", conv.id, message)

    def _call_lags(self) -> list[tuple[str, float]]:
        """(CallSid, last playback lag in seconds) of the live calls, for /metrics."""
        return [(sid, call.stats.last_lag_ms / 1000) for sid, call in self.calls.items()
                if call.stats.last_lag_ms is not None]

    def stats(self) -> dict:
        lat, lag = sorted(self.latency_ms), sorted(self.lag_ms)
        return {**{k: round(v) for k, v in self.counters.items()},
                "pending": len(self._pending),
                "latency_ms": {"count": len(lat), "p50": percentile(lat, 0.5),
                               "p90": percentile(lat, 0.9), "p99": percentile(lat, 0.99)},
                "playback_lag_ms": {"count": len(lag), "p50": percentile(lag, 0.5),
                                    "p90": percentile(lag, 0.9), "p99": percentile(lag, 0.99)},
                "calls": [call.stats.as_dict() for call in self.calls.values()]}

    # -- the webhook -----------------------------------------------------------------------------
    async def handle_voice(self, request: web.Request) -> web.Response:
        self.count("webhooks")
        form = await request.post()
        if not signature_valid(self.settings, request, form):
            self.count("bad_signatures")
            self.metrics.refused("auth")
            log.info("phone webhook refused: bad signature for %s", self.settings.signed_url(request))
            return refusal(403, "invalid X-Twilio-Signature for "
                                f"{self.settings.signed_url(request)} (is --public-url the address "
                                "Twilio calls?)")
        call_sid = form.get("CallSid")
        if not call_sid:
            self.count("bad_requests")
            self.metrics.refused("bad_input")
            return refusal(400, "the webhook has no CallSid")
        self._expire()
        client = caller_id(form)
        if over_client_limit(self.policy, self.tracker, client):
            self.count("refused_per_client")
            self.metrics.refused("per_client")
            return say_and_hang_up(BUSY_MESSAGE)
        persona = {"voice_prompt": request.query.get("voice_prompt") or self.settings.voice,
                   "text_prompt": request.query.get("text_prompt") or self.settings.role}
        try:
            conv = self.agent.open(**persona)
        except AgentFull:
            self.count("refused_full")
            self.metrics.refused("full")
            return say_and_hang_up(BUSY_MESSAGE)
        except PersonaError as e:  # the line's configuration, not the caller's doing
            self.count("bad_requests")
            self.metrics.refused("bad_input")
            log.warning("phone call %s refused: %s", call_sid, e)
            return say_and_hang_up(BROKEN_MESSAGE)
        self.tracker.claim(conv, client, "phone")
        credential = secrets.token_urlsafe(24)
        self._pending[credential] = PendingCall(call_sid, conv,
                                                time.monotonic() + self.settings.connect_timeout_s)
        asyncio.get_running_loop().call_later(self.settings.connect_timeout_s + 0.1, self._expire)
        request["conversation"] = conv  # a cluster replica follows it (streams/cluster/replica.py)
        return connect_twiml(self.settings.stream_url(credential),
                             {k: v for k, v in persona.items() if v})

    def _expire(self) -> None:
        """Free the slots of calls whose stream never came."""
        now = time.monotonic()
        for credential, pending in list(self._pending.items()):
            if pending.expires <= now:
                del self._pending[credential]
                self.count("streams_never_opened")
                log.info("phone call %s: no media stream within %g s; slot freed",
                         pending.call_sid, self.settings.connect_timeout_s)
                pending.conv.close()
                self.tracker.finish(pending.conv, "closed")

    # -- the media stream ------------------------------------------------------------------------
    async def handle_stream(self, request: web.Request) -> web.StreamResponse:
        """Admitted with the credential of the call's TwiML, once; refused (403) before the
        upgrade otherwise."""
        self._expire()
        pending = self._pending.pop(request.match_info["credential"], None)
        if pending is None:
            self.count("bad_credentials")
            self.metrics.refused("auth")
            return refusal(403, "unknown or already used media stream credential: the stream URL "
                                "comes from this server's answer to the call's webhook")
        ws = web.WebSocketResponse(max_msg_size=self.policy.max_message_bytes + 1, autoclose=False,
                                   heartbeat=HEARTBEAT_S)
        try:
            await ws.prepare(request)
        except BaseException:
            pending.conv.close()
            self.tracker.finish(pending.conv)
            raise
        self.count("streams")
        call = TwilioCall(self, pending, ws)
        self.calls[call.call_sid] = call
        reason = None
        try:
            reason = await call.run()
        finally:
            self.calls.pop(call.call_sid, None)
            self.tracker.finish(call.conv, reason)
            log.info("phone call %s ended: %s", call.call_sid, call.stats.as_dict())
        await ws.close()
        return ws

    async def close_all(self) -> None:
        for pending in self._pending.values():
            pending.conv.close()
            self.tracker.finish(pending.conv)
        self._pending.clear()
        await asyncio.gather(*(call.ws.close(code=WSCloseCode.GOING_AWAY,
                                             message=b"server shutting down")
                               for call in list(self.calls.values())), return_exceptions=True)


def setup_routes(app: web.Application, agent, settings: PhoneSettings, policy, tracker,
                 metrics) -> PhoneEndpoint:
    endpoint = PhoneEndpoint(agent, settings, policy, tracker, metrics)
    app.router.add_post(VOICE_PATH, endpoint.handle_voice)
    app.router.add_get(STREAM_PATH + "/{credential}", endpoint.handle_stream)

    async def close_all(_app) -> None:
        await endpoint.close_all()

    app.on_shutdown.append(close_all)
    return endpoint

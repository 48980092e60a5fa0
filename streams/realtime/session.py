"""The OpenAI Realtime API over the agent: `GET /v1/realtime` (websocket) and
`POST /v1/realtime/calls` (WebRTC, events on the `oai-events` data channel).

A product written against the Realtime API (the official SDKs, pipecat's or LiveKit's realtime
services, telephony bridges) switches to this server by changing its base URL. The mapping of a
full-duplex stream onto the protocol's request/response shape is in README.md ("Realtime API");
the protocol's pieces (session config, codecs, utterance cutting) are in streams/realtime/events.py.

- One Realtime session is one engine conversation, batched with all the others. On the websocket
  it opens at the first `input_audio_buffer.append`, with the session's `instructions` (text
  prompt) and `audio.output.voice` (voice prompt) as they are then; a later change of either is an
  error. A WebRTC call opens it at the POST, with the offer's `session`.
- Input audio goes to the model as it arrives (there is no buffer to commit); webrtcvad on the same
  audio gives `input_audio_buffer.speech_started`/`_stopped` and the user's items.
- The agent's stream becomes responses: one utterance (first voiced frame to a stretch of silence)
  is one response; between responses nothing is sent. `response.cancel` ends the response
  (`cancelled`) and mutes the rest of that utterance, transport-side, until the model falls silent.
- Sampling comes from the URL query, as on /api/chat (`seed`, `text_temperature`, ...).
- Refusals: wrong token 401 and bad Origin 403 (streams/security.py); a full server, a client over
  its limit, a wrong `model=` or bad sampling get an `error` event and the socket closes. A bad
  client event gets an `error` event naming its `event_id`, and the session goes on.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import weakref
from collections import deque
from contextlib import ExitStack, suppress
from dataclasses import dataclass

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from duplex_agent.agent.api import (AgentFull, AudioOut, ConversationClosed, ErrorOut, TextOut,
                                    percentile)
from duplex_agent.agent.config import sampling_from_params
from duplex_agent.agent.turns import TurnTaking
from duplex_agent.streams.realtime.events import (AudioEncoder, ProtocolError, Response,
                                                  SessionConfig, UtteranceRule, Utterances,
                                                  decode_audio, error_event, new_id,
                                                  user_item_events, vad_timing)

log = logging.getLogger(__name__)

WS_PATH = "/v1/realtime"
CALLS_PATH = "/v1/realtime/calls"
HEARTBEAT_S = 20.0
HARD_LIMIT_FACTOR = 4  # messages up to 4x --max-message-bytes get an error event; larger close
MAX_PENDING_TEXT = 4096  # transcript held between responses (characters)
# OpenAI's built-in voices: on a checkpoint without personas they are accepted and change nothing.
BUILTIN_VOICES = frozenset({"alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer",
                            "verse", "marin", "cedar"})


@dataclass
class RealtimeCounters:
    """Server-wide counts since start, in /api/stats under "realtime"."""
    connections: int = 0
    calls: int = 0  # WebRTC
    refused_full: int = 0
    refused_per_client: int = 0
    bad_requests: int = 0  # wrong model, bad sampling parameters, bad offers
    bad_events: int = 0  # client events answered with an error event
    too_big: int = 0
    responses: int = 0
    cancelled_responses: int = 0
    muted_frames: int = 0  # agent frames withheld after response.cancel
    unheard_input_ms: int = 0  # audio appended while the conversation could not open
    ended_by_limits: int = 0
    engine_errors: int = 0


class Fatal(ProtocolError):
    """An error after which the session ends."""


class RealtimeSession:
    """One Realtime session over any transport: `send` delivers a server event (JSON-ready dict);
    `close` ends the transport. `audio_out(pcm, t_in)`, when given (WebRTC), takes every agent
    frame (silence while muted) instead of `response.output_audio.delta` events."""

    def __init__(self, endpoint: "RealtimeEndpoint", client: str, sampling, send, close,
                 audio_out=None):
        self.endpoint, self.agent = endpoint, endpoint.agent
        self.client, self.sampling = client, sampling
        self._send, self._close, self.audio_out = send, close, audio_out
        self.config = SessionConfig(id=new_id("sess"), model=endpoint.model)
        self.conv = None
        self.finished = False
        self._lock = asyncio.Lock()
        self._reservation = ExitStack()
        self._pump: asyncio.Task | None = None
        self._refused_config = None  # the config an open failed with, not retried
        self._conversation_id = new_id("conv")
        self._last_item: str | None = None
        # user side
        self._vad: TurnTaking | None = None
        self._vad_rate = 0
        self._input_s = 0.0  # seconds of audio appended so far
        self._seen = 0  # VAD segments reported
        self._speaking = False
        self._user_item: str | None = None
        self._uncommitted = 0.0  # seconds appended since the last commit
        # agent side
        self._utterances = Utterances(endpoint.rule)
        self._encoder = AudioEncoder(self.config.output_format)
        self.response: Response | None = None
        self._pending_text = ""

    # -- events out ------------------------------------------------------------------------------
    async def emit(self, *events: dict) -> None:
        """Send in order; every producer builds its events before awaiting, so order is kept."""
        async with self._lock:
            for event in events:
                event.setdefault("event_id", new_id("event"))
                await self._send(event)

    async def start(self) -> None:
        await self.emit({"type": "session.created", "session": self.config.to_json()})

    # -- events in -------------------------------------------------------------------------------
    async def handle(self, text: str) -> None:
        event_id = None
        try:
            try:
                event = json.loads(text)
            except ValueError:
                raise ProtocolError("invalid_json", "the message is not JSON") from None
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise ProtocolError("invalid_event", "an event is a JSON object with a 'type'")
            event_id = event.get("event_id")
            handler = self._HANDLERS.get(event["type"])
            if handler is None:
                raise ProtocolError("invalid_event", f"unknown event type {event['type']!r}",
                                    "type")
            await handler(self, event)
        except ProtocolError as e:
            self.endpoint.counters.bad_events += 1
            self.endpoint.metrics.websocket_error("bad_event")
            await self.emit(error_event(e.code, e.message, event_id, e.param))
            if isinstance(e, Fatal):
                await self.finish()

    async def _session_update(self, event: dict) -> None:
        new = self.config.updated(event.get("session"))
        if (new.voice, new.instructions) != (self.config.voice, self.config.instructions):
            self._check_persona(new)
        if self.conv is not None and (new.voice, new.instructions) != (self.config.voice,
                                                                       self.config.instructions):
            raise ProtocolError("unsupported", "instructions and voice are fixed once the "
                                "conversation has started (at the first audio): the agent was "
                                "prefilled with them", "session")
        if new.turn_detection != self.config.turn_detection:
            await self._reset_vad()
        if new.output_format != self.config.output_format:
            self._encoder = AudioEncoder(new.output_format)
        self.config = new
        await self.emit({"type": "session.updated", "session": new.to_json()})

    def _check_persona(self, config: SessionConfig) -> None:
        """Refuse what the checkpoint cannot take; "NATF0" names the voice "NATF0.pt"."""
        voices = self.agent.voices()
        if config.voice is not None and f"{config.voice}.pt" in voices:
            config.voice += ".pt"
        if config.voice is not None and config.voice not in voices and not (
                not voices and config.voice in BUILTIN_VOICES):
            known = ", ".join(voices) if voices else "none: this checkpoint has one voice"
            raise ProtocolError("invalid_value", f"unknown voice {config.voice!r}; available: "
                                f"{known}", "session.audio.output.voice")
        if config.instructions and not voices:
            raise ProtocolError("unsupported", "this checkpoint has no persona training: it "
                                "cannot take instructions", "session.instructions")

    async def _append(self, event: dict) -> None:
        if self.audio_out is not None:
            raise ProtocolError("unsupported", "on a WebRTC call the audio comes over the media "
                                "track", "type")
        pcm, rate = decode_audio(event.get("audio"), self.config.input_format)
        await self.add_input(pcm.astype(np.float32) / 32768.0, rate)

    async def add_input(self, pcm: np.ndarray, rate: int) -> None:
        """The user's audio, as it arrives: to the model, and to the voice activity detector."""
        if self.conv is None:
            try:
                opened = self._open()
            except Fatal:
                self.endpoint.counters.refused_full += 1
                self.endpoint.metrics.refused("full")
                raise
            if not opened:
                self.endpoint.counters.unheard_input_ms += len(pcm) * 1000 // rate
                return
        try:
            self.conv.push(pcm, rate)
        except ConversationClosed:
            return  # ended by a limit or the engine; the pump reports why
        t = self._input_s
        self._input_s += len(pcm) / rate
        self._uncommitted += len(pcm) / rate
        await self._detect_speech(pcm, rate, t)

    def _open(self) -> bool:
        """Open the engine conversation with the session's prompts. False (reported once per
        configuration) if the persona cannot be used; raises Fatal if the server is full."""
        if self._refused_config is self.config:
            return False
        prompts = {}
        if self.config.voice is not None and self.config.voice not in BUILTIN_VOICES:
            prompts["voice_prompt"] = self.config.voice
        if self.config.instructions:
            prompts["text_prompt"] = self.config.instructions
        try:
            self.conv = self.agent.open(self.sampling, **prompts)
        except AgentFull:
            raise Fatal("server_full", f"server full: all {self.agent.max_conversations} "
                        "conversations are in use, try again later") from None
        except ValueError as e:  # PersonaError: a prompt the checkpoint cannot take
            self._refused_config = self.config
            raise ProtocolError("invalid_value", f"cannot open the conversation: {e}",
                                "session") from None
        self.endpoint.tracker.claim(self.conv, self.client, "realtime")
        self._reservation.close()
        self._pump = asyncio.create_task(self._pump_events())
        return True

    async def _commit(self, event: dict) -> None:
        if self._uncommitted <= 0:
            raise ProtocolError("input_audio_buffer_commit_empty", "no audio was appended since "
                                "the last commit")
        # A fresh item: the one of speech in progress is committed when the speech stops.
        await self.emit(*self._commit_events(new_id("item")))
        if self.agent.translates and self.conv is not None and not self.conv.closed:
            self.conv.end_input()  # a translation's source is complete: finish translating it

    def _commit_events(self, item_id: str) -> list[dict]:
        self._uncommitted = 0.0
        previous, self._last_item = self._last_item, item_id
        return user_item_events(item_id, previous)

    async def _clear(self, event: dict) -> None:
        self._uncommitted = 0.0  # what the model heard stays heard
        await self.emit({"type": "input_audio_buffer.cleared"})

    async def _cancel(self, event: dict) -> None:
        wanted = event.get("response_id")
        if self.response is None or wanted not in (None, self.response.id):
            raise ProtocolError("response_cancel_not_active", "there is no response in progress"
                                + (f" with id {wanted!r}" if wanted else ""), "response_id")
        self._utterances.cancel()
        self.endpoint.counters.cancelled_responses += 1
        await self.emit(*self._response_end("cancelled", "client_cancelled"))

    async def _create_response(self, event: dict) -> None:
        given = {k for k, v in (event.get("response") or {}).items() if v is not None}
        if given - {"metadata", "conversation", "output_modalities", "audio"}:
            raise ProtocolError("unsupported", "a full-duplex agent speaks when it decides to; "
                                "response.create takes no per-response instructions, input or "
                                f"tools (got {', '.join(sorted(given))})", "response")
        # Bare response.create: nothing to do, the agent's next utterance is the response.

    async def _unsupported(self, event: dict) -> None:
        raise ProtocolError("unsupported", f"{event['type']} is not supported by a full-duplex "
                            "speech model: stream audio with input_audio_buffer.append and the "
                            "agent answers by itself", "type")

    _HANDLERS = {
        "session.update": _session_update,
        "input_audio_buffer.append": _append,
        "input_audio_buffer.commit": _commit,
        "input_audio_buffer.clear": _clear,
        "response.cancel": _cancel,
        "response.create": _create_response,
        "conversation.item.create": _unsupported,
        "conversation.item.delete": _unsupported,
        "conversation.item.retrieve": _unsupported,
        "conversation.item.truncate": _unsupported,
        "output_audio_buffer.clear": _unsupported,
    }

    # -- the user's speech -----------------------------------------------------------------------
    async def _detect_speech(self, pcm: np.ndarray, rate: int, t: float) -> None:
        td = self.config.turn_detection
        if td is None:
            return
        silence_s, padding_s = vad_timing(td)
        if self._vad is None or self._vad_rate != rate:
            await self._reset_vad()
            self._vad, self._vad_rate = TurnTaking(rate, merge_gap_s=silence_s), rate
        self._vad.add_user(pcm, t)
        track, events = self._vad.user, []
        segments = track.segments()  # the closed ones, then the open one if long enough
        while self._seen < len(segments):
            start, end = segments[self._seen]
            if not self._speaking:
                self._speaking, self._user_item = True, new_id("item")
                events.append({"type": "input_audio_buffer.speech_started",
                               "audio_start_ms": int(max(0.0, start - padding_s) * 1000),
                               "item_id": self._user_item})
            if self._seen >= len(track.closed):
                break
            events += self._speech_stopped(end)
        await self.emit(*events)

    def _speech_stopped(self, end_s: float) -> list[dict]:
        self._seen += 1
        self._speaking, item, self._user_item = False, self._user_item, None
        return [{"type": "input_audio_buffer.speech_stopped", "audio_end_ms": int(end_s * 1000),
                 "item_id": item}, *self._commit_events(item)]

    async def _reset_vad(self) -> None:
        """New VAD settings or input rate: an utterance in progress ends here."""
        if self._speaking:
            await self.emit(*self._speech_stopped(self._input_s))
        self._vad, self._seen = None, 0

    # -- the agent's speech ----------------------------------------------------------------------
    async def _pump_events(self) -> None:
        try:
            await self._forward(self.conv)
        except ConnectionError:
            pass  # the client went away; the transport's side ends the session

    async def _forward(self, conv) -> None:
        async for event in conv.events():
            if isinstance(event, AudioOut):
                await self._on_audio(event)
            elif isinstance(event, TextOut):
                await self._on_text(event.text)
            elif isinstance(event, ErrorOut):
                reason = self.endpoint.tracker.ended_by_server(conv)
                if reason:
                    self.endpoint.counters.ended_by_limits += 1
                else:
                    self.endpoint.counters.engine_errors += 1
                events = self._response_end("failed") if self.response else []
                await self.emit(*events, error_event(reason or "server_error", event.message,
                                                     kind="server_error"))
                await self.finish()
        if conv.input_ended and conv.error is None:  # a translation completed: the session too
            await self.emit(*(self._response_end("completed") if self.response else []))
            await self.finish()

    async def _on_audio(self, event: AudioOut) -> None:
        action, frames = self._utterances.feed(event.pcm)
        if action == "muted":
            self.endpoint.counters.muted_frames += 1
        if self.audio_out is not None:  # WebRTC: the track carries everything but muted audio
            self.audio_out(np.zeros_like(event.pcm) if action == "muted" else event.pcm,
                           event.t_in)
        events = []
        if action == "start":
            events += self._response_start()
        elif action == "end":
            events += self._response_end("completed")
        if action in ("start", "audio") and self.audio_out is None:
            events += [self.response.part("response.output_audio.delta",
                                          delta=self._encoder.encode(pcm)) for pcm in frames]
        await self.emit(*events)
        if events and action in ("start", "audio") and self.audio_out is None:
            self.endpoint.latency_ms.append((time.monotonic() - event.t_in) * 1000)

    async def _on_text(self, text: str) -> None:
        if self._utterances.muted:
            return
        if self.response is None:  # said before the audio: it opens the next response
            self._pending_text = (self._pending_text + text)[-MAX_PENDING_TEXT:]
            return
        await self.emit(self.response.say(text))

    def _response_start(self) -> list[dict]:
        self.endpoint.counters.responses += 1
        self.response = Response(self._conversation_id, self._last_item, self.config,
                                 webrtc=self.audio_out is not None)
        self._last_item = self.response.item_id
        events = self.response.start_events()
        if self._pending_text:
            events.append(self.response.say(self._pending_text))
            self._pending_text = ""
        return events

    def _response_end(self, status: str, reason: str | None = None) -> list[dict]:
        events, self.response = self.response.end_events(status, reason), None
        return events

    # -- end -------------------------------------------------------------------------------------
    async def finish(self) -> None:
        """End the session from the server's side (fatal error, limit, engine error)."""
        if not self.finished:
            self.finished = True
            await self._close()

    async def close(self, reason: str | None = None) -> None:
        """Release everything; the transport has ended."""
        self.finished = True
        self._reservation.close()
        if self.conv is not None:
            self.conv.close()
            if self._pump is not None and self._pump is not asyncio.current_task():
                self._pump.cancel()
                await asyncio.wait([self._pump])
            self.endpoint.tracker.finish(self.conv, reason)


class RealtimeEndpoint:
    """The Realtime routes of one server, with their counters and open sessions."""

    def __init__(self, agent, policy, tracker, metrics, rule: UtteranceRule | None = None):
        self.agent, self.policy, self.tracker, self.metrics = agent, policy, tracker, metrics
        self.rule = rule or UtteranceRule()
        self.model = agent.engine.describe()["checkpoint"]
        self.counters = RealtimeCounters()
        self.latency_ms: deque[float] = deque(maxlen=20_000)  # frame in -> its delta sent
        self._pending = 0  # sessions connected whose conversation is not open yet
        self._sockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
        self._calls: set = set()

    def stats(self) -> dict:
        lat = sorted(self.latency_ms)
        return {**self.counters.__dict__,
                "delta_latency_ms": {"count": len(lat), "p50": percentile(lat, 0.5),
                                     "p90": percentile(lat, 0.9), "p99": percentile(lat, 0.99)}}

    def admission_error(self, request: web.Request) -> tuple[str, str] | None:
        """(code, message) if this client may not start a session now."""
        model = request.query.get("model")
        if model not in (None, "", self.model):
            self.counters.bad_requests += 1
            self.metrics.refused("bad_input")
            return "model_not_found", f"this server serves the model {self.model!r}, not {model!r}"
        if "realtime=v1" in request.headers.get("OpenAI-Beta", ""):
            self.counters.bad_requests += 1
            self.metrics.refused("bad_input")
            return "unsupported", ("this server speaks the GA Realtime protocol, not the beta "
                                   "(drop the 'OpenAI-Beta: realtime=v1' header)")
        limit = self.policy.max_per_client
        if limit and self.tracker.count(request.remote or "unknown") >= limit:
            self.counters.refused_per_client += 1
            self.metrics.refused("per_client")
            return "rate_limit_exceeded", (f"too many conversations from {request.remote}: at "
                                           f"most {limit} per client")
        if self.agent.active + self._pending >= self.agent.max_conversations:
            self.counters.refused_full += 1
            self.metrics.refused("full")
            return "server_full", (f"server full: all {self.agent.max_conversations} "
                                   "conversations are in use, try again later")
        return None

    # -- websocket -------------------------------------------------------------------------------
    async def handle_ws(self, request: web.Request) -> web.WebSocketResponse:
        limit = self.policy.max_message_bytes
        ws = web.WebSocketResponse(max_msg_size=HARD_LIMIT_FACTOR * limit + 1, autoclose=False,
                                   heartbeat=HEARTBEAT_S, protocols=("realtime",))
        await ws.prepare(request)
        self.counters.connections += 1
        client = request.remote or "unknown"
        try:
            sampling = sampling_from_params(request.query, self.agent.sampling_defaults,
                                            strings=True)
        except ValueError as e:
            self.counters.bad_requests += 1
            self.metrics.refused("bad_input")
            return await _refuse(ws, "invalid_value", str(e))
        refused = self.admission_error(request)
        if refused:
            busy = refused[0] in ("server_full", "rate_limit_exceeded")
            return await _refuse(ws, *refused, close_code=WSCloseCode.TRY_AGAIN_LATER if busy
                                 else WSCloseCode.POLICY_VIOLATION)

        async def close() -> None:
            await ws.close()

        session = RealtimeSession(self, client, sampling, _ws_sender(ws), close)
        session._reservation.enter_context(self.tracker.reserve(client))
        session._reservation.callback(self._unpend)
        self._pending += 1
        self._sockets.add(ws)
        reason = None
        try:
            await session.start()
            reason = await self._receive(ws, session)
        except ConnectionError:
            pass
        finally:
            await session.close(reason)
        await ws.close()
        return ws

    def _unpend(self) -> None:
        self._pending -= 1

    async def _receive(self, ws: web.WebSocketResponse, session: RealtimeSession) -> str | None:
        idle = self.policy.idle_timeout_s
        deadline = time.monotonic() + idle if idle else None
        while not session.finished:
            # Until the conversation opens, the idle limit is ours; then the tracker's.
            timeout = None if session.conv is not None or deadline is None else max(
                0.0, deadline - time.monotonic())
            try:
                msg = await ws.receive(timeout=timeout)
            except asyncio.TimeoutError:
                await session.emit(error_event("idle_timeout", f"closed after {idle:g} s without "
                                               "audio from the client", kind="server_error"))
                return "idle"
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return None
            if msg.type == WSMsgType.ERROR:
                too_big = getattr(msg.data, "code", None) == WSCloseCode.MESSAGE_TOO_BIG
                self.counters.too_big += too_big
                self.metrics.websocket_error("too_big" if too_big else "protocol")
                return "too_big" if too_big else "protocol"
            if msg.type != WSMsgType.TEXT:
                await session.emit(error_event("invalid_event", "events are JSON text messages"))
                self.counters.bad_events += 1
                continue
            if len(msg.data) > self.policy.max_message_bytes:
                self.counters.too_big += 1
                self.metrics.websocket_error("too_big")
                await session.emit(error_event(
                    "message_too_large", f"the message has {len(msg.data)} bytes; the limit is "
                    f"{self.policy.max_message_bytes}: send audio in smaller appends",
                    _event_id_of(msg.data)))
                continue
            await session.handle(msg.data)
        return None

    async def close_all(self) -> None:
        await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY,
                                        message=b"server shutting down")
                               for ws in list(self._sockets)), return_exceptions=True)
        await asyncio.gather(*(call.close() for call in list(self._calls)), return_exceptions=True)


def _ws_sender(ws: web.WebSocketResponse):
    async def send(event: dict) -> None:
        await ws.send_str(json.dumps(event))
    return send


def _event_id_of(text: str) -> str | None:
    """The event_id of an oversized event, read from its head without parsing it all."""
    match = re.search(r'"event_id"\s*:\s*"([^"]{1,128})"', text[:512])
    return match.group(1) if match else None


async def _refuse(ws: web.WebSocketResponse, code: str, message: str,
                  close_code: int = WSCloseCode.POLICY_VIOLATION) -> web.WebSocketResponse:
    log.info("realtime session refused: %s", message)
    with suppress(ConnectionError):
        await ws.send_str(json.dumps(error_event(code, message)))
    await ws.close(code=close_code, message=code.encode())
    return ws


def setup_routes(app: web.Application, agent, policy, tracker, metrics,
                 rule: UtteranceRule | None = None) -> RealtimeEndpoint:
    """Add GET /v1/realtime; streams/realtime/call.py adds the WebRTC route to the endpoint."""
    endpoint = RealtimeEndpoint(agent, policy, tracker, metrics, rule)
    app.router.add_get(WS_PATH, endpoint.handle_ws)

    async def close_all(_app) -> None:
        await endpoint.close_all()

    app.on_shutdown.append(close_all)
    return endpoint

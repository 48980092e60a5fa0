"""The OpenAI Realtime API over the agent: `GET /v1/realtime` (websocket) and
`POST /v1/realtime/calls` (WebRTC, events on the `oai-events` data channel).

A product written against the Realtime API (the official SDKs, pipecat's and LiveKit's realtime
services with their defaults, telephony bridges) switches to this server by changing its base
URL. The mapping of a full-duplex stream onto the protocol's request/response shape is in
README.md ("The OpenAI Realtime API"); the protocol's pieces (session config, items, responses,
codecs, utterance cutting) are in streams/realtime/events.py.

The rule: a client's mistakes (malformed events and values) get an `error` naming the param, and
the session goes on; a setting the model cannot honour is accepted, reported as what is in effect
(`session.updated`, items, responses), and logged once per session. Frameworks treat most errors
as fatal, and their default traffic carries many such settings.

- One Realtime session is one engine conversation, batched with all the others. On the websocket
  it opens at the first `input_audio_buffer.append`, with the session's `instructions` (and, on
  persona checkpoints, the system/developer text items added before it) as text prompt and
  `audio.output.voice` as voice prompt; both are fixed from then on. A WebRTC call opens it at
  the POST, with the offer's `session`.
- Input audio goes to the model as it arrives (there is no buffer to commit); webrtcvad on the same
  audio gives `input_audio_buffer.speech_started`/`_stopped` and the user's items. With a
  transcriber that has pause heads, `semantic_vad` ends the user's speech where Kyutai's semantic
  VAD says the turn ended (agent/turns.py), webrtcvad only after a long silence (by eagerness).
- With a transcriber and `audio.input.transcription` set, each user item gets its words as
  `conversation.item.input_audio_transcription.delta`/`.completed` (streams/realtime/transcripts.py).
- The agent's stream becomes responses: one utterance (first voiced frame to a stretch of silence)
  is one response; between responses nothing is sent. `response.create` opens a response at once
  that takes the agent's current or next utterance. `response.cancel` and the truncation or
  deletion of a speaking item end the response (`cancelled`) and mute the rest of that utterance,
  transport-side, until the model falls silent.
- Sampling comes from the URL query, as on /api/chat (`seed`, `text_temperature`, ...).
- Refusals come before the websocket upgrade, as HTTP statuses: wrong token 401 and bad Origin
  403 (streams/security.py), bad sampling 400, a client over its limit 429, a full server 503.
  Any `model` name is served by the loaded checkpoint.
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
                                    UserWord, percentile)
from duplex_agent.agent.config import FRAME_RATE, SAMPLE_RATE, sampling_from_params
from duplex_agent.agent.turns import PauseDetector, TurnTaking
from duplex_agent.streams.realtime.events import (BUILTIN_VOICES, AudioEncoder,
                                                  ConversationItems, ProtocolError, Response,
                                                  SessionConfig, UtteranceRule, Utterances,
                                                  client_item, decode_audio, error_event,
                                                  is_int, item_text, new_id, user_audio_item,
                                                  user_item_events, vad_timing)
from duplex_agent.streams.realtime.transcripts import InputTranscripts
from duplex_agent.streams.security import (over_client_limit, refusal, refuse_full,
                                           refuse_per_client, too_many_message)

log = logging.getLogger(__name__)

WS_PATH = "/v1/realtime"
CALLS_PATH = "/v1/realtime/calls"
HEARTBEAT_S = 20.0
HARD_LIMIT_FACTOR = 4  # messages up to 4x --max-message-bytes get an error event; larger close
MAX_PENDING_TEXT = 4096  # transcript held between responses (characters)
RECENT_RESPONSES = 64  # ids of ended responses a late response.cancel may name
# semantic_vad with pause heads: the silence after which webrtcvad still ends the user's speech
# when the pause heads have not (OpenAI's eagerness: low waits up to 8 s, high 2 s).
SEMANTIC_MAX_SILENCE_S = {"low": 8.0, "medium": 4.0, "auto": 4.0, "high": 2.0}


@dataclass
class RealtimeCounters:
    """Server-wide counts since start, in /api/stats under "realtime"."""
    connections: int = 0
    calls: int = 0  # WebRTC
    refused_full: int = 0
    refused_per_client: int = 0
    bad_requests: int = 0  # bad sampling parameters, beta clients, bad offers
    bad_events: int = 0  # client events (or session fields) answered with an error event
    too_big: int = 0
    settings_not_in_effect: int = 0  # accepted settings the model cannot honour, once a session
    responses: int = 0
    requested_responses: int = 0  # by response.create
    empty_responses: int = 0  # requested, ended without an utterance (none in time, or cancelled)
    cancelled_responses: int = 0
    muted_frames: int = 0  # agent frames withheld after a cancel or truncation
    unheard_input_ms: int = 0  # audio appended while the conversation could not open
    client_items: int = 0  # conversation.item.create
    truncated_items: int = 0  # conversation.item.truncate (a barge-in, as frameworks send it)
    deleted_items: int = 0
    forgotten_items: int = 0  # the oldest items of a session beyond its item limits
    input_transcripts: int = 0  # user items whose transcription was completed
    unplaced_words: int = 0  # the user's words that fell in no user item (not sent)
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
        self.items = ConversationItems()
        self.conv = None
        self.finished = False
        self._lock = asyncio.Lock()
        self._reservation = ExitStack()
        self._pump: asyncio.Task | None = None
        self._refused_prompt = None  # the (voice, text) an open failed with, not retried
        self._conversation_id = new_id("conv")
        self._noted: set[str] = set()  # params logged as not in effect
        # user side
        self._vad: TurnTaking | None = None
        self._vad_rate = 0
        self._input_s = 0.0  # seconds of audio appended so far
        self._seen = 0  # VAD segments reported
        self._speaking = False
        self._user_item: str | None = None
        self._uncommitted = 0.0  # seconds appended since the last commit
        transcriber = self.agent.engine.transcriber
        self._transcripts = InputTranscripts(transcriber.bundle.delay_s) if transcriber else None
        self._pauses = PauseDetector() if transcriber and transcriber.bundle.pause_heads else None
        # agent side
        self._utterances = Utterances(endpoint.rule)
        self._encoder = AudioEncoder(self.config.output_format)
        self.response: Response | None = None
        self._pending_text = ""
        self._ended: deque[str] = deque(maxlen=RECENT_RESPONSES)
        self._expiry: asyncio.TimerHandle | None = None
        self._expiring: set[asyncio.Task] = set()

    @property
    def transcribing(self) -> bool:
        """User transcripts are in effect: asked for, and a transcriber is loaded."""
        return self.config.transcription is not None and self._transcripts is not None

    # -- events out ------------------------------------------------------------------------------
    async def emit(self, *events: dict) -> None:
        """Send in order; every producer builds its events before awaiting, so order is kept."""
        if not events:  # most agent frames (silence between responses) have none
            return
        async with self._lock:
            for event in events:
                event.setdefault("event_id", new_id("event"))
                await self._send(event)

    async def start(self) -> None:
        await self.emit({"type": "session.created",
                         "session": self.config.to_json(self.transcribing)})

    def _note(self, param: str, why: str) -> None:
        """A setting accepted but not in effect: logged once per session."""
        if param not in self._noted:
            self._noted.add(param)
            self.endpoint.counters.settings_not_in_effect += 1
            log.info("realtime session %s: %s accepted, not in effect: %s", self.config.id,
                     param, why)

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
            await self.emit(self._error(e, event_id))
            if isinstance(e, Fatal):
                await self.finish()

    def _error(self, e: ProtocolError, event_id) -> dict:
        self.endpoint.counters.bad_events += 1
        self.endpoint.metrics.websocket_error("bad_event")
        return error_event(e.code, e.message, event_id, e.param)

    async def _session_update(self, event: dict) -> None:
        errors = await self.configure(event.get("session"))
        await self.emit(*(self._error(e, event.get("event_id")) for e in errors),
                        {"type": "session.updated",
                         "session": self.config.to_json(self.transcribing)})

    async def configure(self, session) -> list[ProtocolError]:
        """Apply a `session.update`'s `session` field by field: what is valid applies or is
        accepted as not in effect (logged once); returns an error per malformed field."""
        update = self.config.updated(session, semantic_vad=self._pauses is not None)
        new, old, ignore = update.config, self.config, update.ignore
        if new.instructions and not self.agent.voices():
            ignore("session.instructions", "this checkpoint has no persona training: it cannot "
                                           "take instructions")
            new.instructions = None
        if self.conv is not None:
            for name, param in (("voice", "session.audio.output.voice"),
                                ("instructions", "session.instructions")):
                if getattr(new, name) != getattr(old, name):
                    ignore(param, "fixed once the conversation has started (at the first "
                                  "audio): the agent was prefilled with it")
                    setattr(new, name, getattr(old, name))
        else:
            if new.voice != old.voice:
                try:
                    new.voice = self._voice_in_effect(new.voice, ignore)
                except ProtocolError as e:
                    update.errors.append(e)
                    new.voice = old.voice
        if new.transcription is not None and self._transcripts is None:
            ignore("session.audio.input.transcription", "no speech-to-text model is loaded")
        if new.turn_detection != old.turn_detection:
            await self._reset_vad()
        if new.output_format != old.output_format:
            self._encoder = AudioEncoder(new.output_format)
        self.config = new
        for param, why in update.ignored:
            self._note(param, why)
        return update.errors

    def _voice_in_effect(self, name: str | None, ignore) -> str | None:
        """A voice of the checkpoint ("NATF0" names "NATF0.pt"); OpenAI's own voices are accepted
        and leave the checkpoint's; other names are a mistake."""
        param = "session.audio.output.voice"
        voices = self.agent.voices()
        if name is None:
            return None
        for candidate in (name, f"{name}.pt"):
            if candidate in voices:
                return candidate
        if name in BUILTIN_VOICES:
            ignore(param, f"{name!r} is one of OpenAI's voices: the checkpoint speaks with its "
                          "own voice")
            return None
        known = ", ".join(voices) if voices else "none: this checkpoint has one voice"
        raise ProtocolError("invalid_value", f"unknown voice {name!r}; available: {known}", param)

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

    def _text_prompt(self) -> str | None:
        """The instructions, then the system/developer text items added so far (persona
        checkpoints; elsewhere neither is in effect)."""
        texts = [self.config.instructions] + [
            item_text(item) for item in self.items.items()
            if item.get("type") == "message" and item.get("role") in ("system", "developer")]
        return "\n".join(t for t in texts if t) if self.agent.voices() else None

    def _open(self) -> bool:
        """Open the engine conversation with the session's prompts. False (reported once per
        prompt) if the persona cannot be used; raises Fatal if the server is full."""
        voice, text = self.config.voice, self._text_prompt()
        if self._refused_prompt == (voice, text):
            return False
        prompts = {}
        if voice is not None:
            prompts["voice_prompt"] = voice
        if text:
            prompts["text_prompt"] = text
        try:
            self.conv = self.agent.open(self.sampling, **prompts)
        except AgentFull:
            raise Fatal("server_full", f"server full: all {self.agent.max_conversations} "
                        "conversations are in use, try again later") from None
        except ValueError as e:  # PersonaError: a prompt the checkpoint cannot take
            self._refused_prompt = (voice, text)
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
        item, previous = user_audio_item(item_id), self.items.last_id
        self._insert(item)
        return user_item_events(item, previous)

    async def _clear(self, event: dict) -> None:
        self._uncommitted = 0.0  # what the model heard stays heard
        await self.emit({"type": "input_audio_buffer.cleared"})

    # -- conversation items ----------------------------------------------------------------------
    def _insert(self, item: dict, previous_item_id=None, speech: Response | None = None
                ) -> str | None:
        before = self.items.forgotten
        previous = self.items.insert(item, previous_item_id, speech)
        self.endpoint.counters.forgotten_items += self.items.forgotten - before
        return previous

    async def _create_item(self, event: dict) -> None:
        item = client_item(event.get("item"))
        after = event.get("previous_item_id")
        if after is not None and not isinstance(after, str):
            raise ProtocolError("invalid_type", "previous_item_id must be an item id",
                                "previous_item_id")
        previous = self._insert(item, after)
        self.endpoint.counters.client_items += 1
        joins_prompt = (self.conv is None and item["type"] == "message" and item.get("role") in
                        ("system", "developer") and bool(self.agent.voices()))
        if not joins_prompt:
            self._note("conversation.item.create", "the model hears only the audio stream: "
                       "items are kept in the conversation, unheard (on persona checkpoints, "
                       "system/developer text added before the first audio joins the text "
                       "prompt)")
        await self.emit({"type": "conversation.item.added", "item": item,
                         "previous_item_id": previous},
                        {"type": "conversation.item.done", "item": item,
                         "previous_item_id": previous})

    def _item_id(self, event: dict, code: str) -> str:
        item_id = event.get("item_id")
        if not isinstance(item_id, str) or item_id not in self.items:
            raise ProtocolError(code, f"there is no item {item_id!r} in the conversation",
                                "item_id")
        return item_id

    async def _truncate_item(self, event: dict) -> None:
        item_id = self._item_id(event, "item_truncate_invalid_item_id")
        speech = self.items.speech(item_id)
        if speech is None:
            raise ProtocolError("invalid_value", "only the agent's audio items can be truncated",
                                "item_id")
        if event.get("content_index", 0) != 0:
            raise ProtocolError("invalid_value", "an agent item has one content part, index 0",
                                "content_index")
        end_ms = event.get("audio_end_ms")
        if not (is_int(end_ms) and end_ms >= 0):
            raise ProtocolError("invalid_value", "audio_end_ms must be a whole number of "
                                "milliseconds, 0 or more", "audio_end_ms")
        events = self._cancel_response() if speech is self.response else []
        kept = speech.truncate(end_ms)
        self.endpoint.counters.truncated_items += 1
        self.items.update(speech.item())
        await self.emit(*events, {"type": "conversation.item.truncated", "item_id": item_id,
                                  "content_index": 0, "audio_end_ms": kept})

    async def _delete_item(self, event: dict) -> None:
        item_id = self._item_id(event, "item_delete_invalid_item_id")
        speaking = self.response is not None and self.items.speech(item_id) is self.response
        events = self._cancel_response() if speaking else []
        self.items.remove(item_id)
        self.endpoint.counters.deleted_items += 1
        await self.emit(*events, {"type": "conversation.item.deleted", "item_id": item_id})

    async def _retrieve_item(self, event: dict) -> None:
        item_id = self._item_id(event, "item_retrieve_invalid_item_id")
        await self.emit({"type": "conversation.item.retrieved", "item": self.items.get(item_id)})

    # -- responses asked for ---------------------------------------------------------------------
    async def _create_response(self, event: dict) -> None:
        params = event.get("response") or {}
        if not isinstance(params, dict):
            raise ProtocolError("invalid_type", "response must be an object", "response")
        metadata = params.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise ProtocolError("invalid_type", "metadata must be an object", "response.metadata")
        for key, value in params.items():
            if value is not None and key not in ("metadata", "conversation") and not (
                    key == "output_modalities" and value == ["audio"]):
                self._note(f"response.{key}", "the agent's utterances follow the conversation; "
                           "they cannot be steered per response")
        # The agent has one stream: a response asked for while another is open takes over from
        # it (an utterance in progress goes on in the new one; an empty one ends empty).
        events = self._response_end("completed") if self.response is not None else []
        self.endpoint.counters.requested_responses += 1
        events += self._new_response(metadata).created_events()
        if self._utterances.open:
            events += self._start_item()
        else:
            self._expiry = asyncio.get_running_loop().call_later(
                self.endpoint.rule.response_wait_s, self._expire, self.response)
        await self.emit(*events)

    def _expire(self, response: Response) -> None:
        """The agent did not speak within the wait: the response it was asked for ends empty."""
        self._expiry = None
        if self.response is response and not response.started and not self.finished:
            task = asyncio.create_task(self._emit_quietly(self._response_end("completed")))
            self._expiring.add(task)
            task.add_done_callback(self._expiring.discard)

    async def _emit_quietly(self, events: list[dict]) -> None:
        with suppress(ConnectionError):
            await self.emit(*events)

    async def _cancel(self, event: dict) -> None:
        wanted = event.get("response_id")
        if self.response is not None and wanted in (None, self.response.id):
            self.endpoint.counters.cancelled_responses += 1
            await self.emit(*self._cancel_response())
        elif wanted is not None and wanted not in self._ended:
            raise ProtocolError("response_cancel_not_active", "Cancellation failed: there is no "
                                f"response with id {wanted!r}", "response_id")
        # Else the response ended already (the agent's own silence ends it whenever it comes):
        # there is nothing left to cancel.

    async def _clear_output(self, event: dict) -> None:
        events = self._cancel_response() if self.response is not None else []
        await self.emit(*events, {"type": "output_audio_buffer.cleared"})

    _HANDLERS = {
        "session.update": _session_update,
        "input_audio_buffer.append": _append,
        "input_audio_buffer.commit": _commit,
        "input_audio_buffer.clear": _clear,
        "response.cancel": _cancel,
        "response.create": _create_response,
        "conversation.item.create": _create_item,
        "conversation.item.delete": _delete_item,
        "conversation.item.retrieve": _retrieve_item,
        "conversation.item.truncate": _truncate_item,
        "output_audio_buffer.clear": _clear_output,
    }

    # -- the user's speech -----------------------------------------------------------------------
    async def _detect_speech(self, pcm: np.ndarray, rate: int, t: float) -> None:
        td = self.config.turn_detection
        if td is None:
            return
        silence_s, padding_s = vad_timing(td)
        if self._semantic:
            silence_s = SEMANTIC_MAX_SILENCE_S.get(td.get("eagerness"), 4.0)
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
                start_ms = int(max(0.0, start - padding_s) * 1000)
                events.append({"type": "input_audio_buffer.speech_started",
                               "audio_start_ms": start_ms, "item_id": self._user_item})
                if self._transcripts is not None:
                    self._transcripts.started(self._user_item, start_ms / 1000)
            if self._seen >= len(track.closed):
                break
            events += self._speech_stopped(end)
        await self.emit(*events)

    def _speech_stopped(self, end_s: float) -> list[dict]:
        self._seen += 1
        self._speaking, item, self._user_item = False, self._user_item, None
        end_ms = int(end_s * 1000)
        events = [{"type": "input_audio_buffer.speech_stopped", "audio_end_ms": end_ms,
                   "item_id": item}, *self._commit_events(item)]
        if self._transcripts is not None:
            events += self._transcribed(self._transcripts.stopped(item, end_ms / 1000))
        return events

    @property
    def _semantic(self) -> bool:
        """semantic_vad served by the transcriber's pause heads."""
        td = self.config.turn_detection
        return self._pauses is not None and td is not None and td["type"] == "semantic_vad"

    def _semantic_turn_end(self, event: AudioOut) -> list[dict]:
        """The pause heads ended the user's turn: the speech in progress stops where webrtcvad
        last heard it, and the next speech opens a new item."""
        t = event.step / FRAME_RATE
        if self._pauses is None or not (self._pauses.update(event.pause, t) and self._speaking
                                        and self._semantic and self._vad is not None):
            return []
        segment = self._vad.user.cut()
        return self._speech_stopped(segment[1] if segment else t)

    def _transcribed(self, events: list[dict]) -> list[dict]:
        """Input transcription events, if the session asked for them; a completed transcript
        also goes into its user item (conversation.item.retrieve shows it)."""
        if not self.transcribing:
            return []
        for event in events:
            if event["type"].endswith(".completed"):
                self.endpoint.counters.input_transcripts += 1
                if event["item_id"] in self.items:
                    self.items.update(user_audio_item(event["item_id"], event["transcript"]))
        return events

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
            elif isinstance(event, UserWord) and self._transcripts is not None:
                unplaced = self._transcripts.unplaced_words
                await self.emit(*self._transcribed(self._transcripts.word(event.text, event.start)))
                self.endpoint.counters.unplaced_words += self._transcripts.unplaced_words - unplaced
            elif isinstance(event, ErrorOut):
                reason = self.endpoint.tracker.ended_by_server(conv)
                if reason:
                    self.endpoint.counters.ended_by_limits += 1
                else:
                    self.endpoint.counters.engine_errors += 1
                code = reason or "server_error"
                events = self._response_end("failed", {"type": "failed", "error": {
                    "type": "server_error", "code": code, "message": event.message}}) \
                    if self.response is not None else []
                await self.emit(*events, error_event(code, event.message, kind="server_error"))
                await self.finish()
        if conv.translation_done:  # the session ends with it
            await self.emit(*(self._response_end("completed") if self.response else []))
            await self.finish()

    async def _on_audio(self, event: AudioOut) -> None:
        if self._transcripts is not None:
            user = self._semantic_turn_end(event) if event.pause is not None else []
            user += self._transcribed(self._transcripts.tick((event.step + 1) / FRAME_RATE))
            await self.emit(*user)
        action, frames = self._utterances.feed(event.pcm)
        if action == "muted":
            self.endpoint.counters.muted_frames += 1
        if self.audio_out is not None:  # WebRTC: the track carries everything but muted audio
            self.audio_out(np.zeros_like(event.pcm) if action == "muted" else event.pcm,
                           event.t_in)
        events = []
        if action == "start":
            if self.response is None:  # the agent speaks by itself
                events += self._new_response(None).created_events()
            events += self._start_item()
        elif action == "end":
            events += self._response_end("completed")
        if action in ("start", "audio"):
            for pcm in frames:
                self.response.audio_ms += len(pcm) * 1000 / SAMPLE_RATE
                if self.audio_out is None:
                    events.append(self.response.part("response.output_audio.delta",
                                                     delta=self._encoder.encode(pcm)))
        await self.emit(*events)
        if events and action in ("start", "audio") and self.audio_out is None:
            self.endpoint.latency_ms.append((time.monotonic() - event.t_in) * 1000)

    async def _on_text(self, text: str) -> None:
        if self._utterances.muted:
            return
        if self.response is None or not self.response.started:
            # Said before the utterance's audio: it opens the next item's transcript.
            self._pending_text = (self._pending_text + text)[-MAX_PENDING_TEXT:]
            return
        await self.emit(self.response.say(text))

    def _new_response(self, metadata: dict | None) -> Response:
        self.endpoint.counters.responses += 1
        self.response = Response(self._conversation_id, self.config,
                                 webrtc=self.audio_out is not None, metadata=metadata)
        return self.response

    def _start_item(self) -> list[dict]:
        """The open response's utterance begins: its item joins the conversation."""
        response = self.response
        self._cancel_expiry()
        events = response.start_events(self.items.last_id)
        self._insert(response.item(), speech=response)
        if self._pending_text:
            events.append(response.say(self._pending_text))
            self._pending_text = ""
        return events

    def _cancel_response(self) -> list[dict]:
        """End the open response as the client asked; the rest of its utterance is muted."""
        if self.response.started:
            self._utterances.cancel()
        return self._response_end("cancelled", {"type": "cancelled",
                                                "reason": "client_cancelled"})

    def _response_end(self, status: str, details: dict | None = None) -> list[dict]:
        response, self.response = self.response, None
        self._cancel_expiry()
        self._ended.append(response.id)
        events = response.end_events(status, details)
        if response.started:
            self.items.update(response.item())
        else:
            self.endpoint.counters.empty_responses += 1
        return events

    def _cancel_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    # -- end -------------------------------------------------------------------------------------
    async def finish(self) -> None:
        """End the session from the server's side (fatal error, limit, engine error)."""
        if not self.finished:
            self.finished = True
            await self._close()

    async def close(self, reason: str | None = None) -> None:
        """Release everything; the transport has ended."""
        self.finished = True
        self._cancel_expiry()
        for task in list(self._expiring):
            task.cancel()
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

    def admission_refusal(self, request: web.Request) -> web.Response | None:
        """The HTTP answer refusing this client a session now, before any upgrade (a client
        whose socket opened and then closed would reconnect at once, in a loop); None if it may
        start one."""
        if "realtime=v1" in request.headers.get("OpenAI-Beta", ""):
            self.counters.bad_requests += 1
            self.metrics.refused("bad_input")
            return _refused(400, "this server speaks the GA Realtime protocol, not the beta "
                                 "(drop the 'OpenAI-Beta: realtime=v1' header)", "unsupported")
        client = request.remote or "unknown"
        if over_client_limit(self.policy, self.tracker, client):
            self.counters.refused_per_client += 1
            self.metrics.refused("per_client")
            limit = self.policy.max_per_client
            log.info("realtime session refused: %s", too_many_message(client, limit))
            return refuse_per_client(client, limit, code="rate_limit_exceeded")
        if self.agent.active + self._pending >= self.agent.max_conversations:
            self.counters.refused_full += 1
            self.metrics.refused("full")
            log.info("realtime session refused: server full")
            return refuse_full(self.agent)
        return None

    # -- websocket -------------------------------------------------------------------------------
    async def handle_ws(self, request: web.Request) -> web.StreamResponse:
        self.counters.connections += 1
        try:
            sampling = sampling_from_params(request.query, self.agent.sampling_defaults,
                                            strings=True)
        except ValueError as e:
            self.counters.bad_requests += 1
            self.metrics.refused("bad_input")
            return _refused(400, str(e), "invalid_value")
        refused = self.admission_refusal(request)
        if refused is not None:
            return refused
        limit = self.policy.max_message_bytes
        ws = web.WebSocketResponse(max_msg_size=HARD_LIMIT_FACTOR * limit + 1, autoclose=False,
                                   heartbeat=HEARTBEAT_S, protocols=("realtime",))

        async def close() -> None:
            await ws.close()

        # The slot is held from the admission on, with no await in between.
        session = RealtimeSession(self, request.remote or "unknown", sampling, _ws_sender(ws),
                                  close)
        session._reservation.enter_context(self.tracker.reserve(session.client))
        session._reservation.callback(self._unpend)
        self._pending += 1
        reason = None
        try:
            await ws.prepare(request)
            self._sockets.add(ws)
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


def _refused(status: int, message: str, code: str, **extra) -> web.Response:
    log.info("realtime session refused: %s", message)
    return refusal(status, message, code=code, **extra)


def setup_routes(app: web.Application, agent, policy, tracker, metrics,
                 rule: UtteranceRule | None = None) -> RealtimeEndpoint:
    """Add GET /v1/realtime; streams/realtime/call.py adds the WebRTC route to the endpoint."""
    endpoint = RealtimeEndpoint(agent, policy, tracker, metrics, rule)
    app.router.add_get(WS_PATH, endpoint.handle_ws)

    async def close_all(_app) -> None:
        await endpoint.close_all()

    app.on_shutdown.append(close_all)
    return endpoint

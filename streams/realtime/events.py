"""The OpenAI Realtime protocol's pieces that do not touch the network: the session
configuration and its validation, event shapes, audio codecs, and how the agent's continuous
output stream is cut into responses. Used by streams/realtime/session.py.

Field names and values follow the GA protocol as the official `openai` Python SDK types it
(openai/types/realtime/).
"""
from __future__ import annotations

import audioop  # G.711; Python >= 3.13 gets it from the audioop-lts package
import base64
import binascii
import dataclasses
import json
import math
import secrets
from dataclasses import dataclass, field

import numpy as np
import soxr

from duplex_agent.agent.config import SAMPLE_RATE

# Audio formats: the Realtime name -> (sample rate, G.711 decoder, G.711 encoder).
FORMATS = {
    "audio/pcm": (SAMPLE_RATE, None, None),  # 16-bit little-endian PCM, 24 kHz mono
    "audio/pcmu": (8000, audioop.ulaw2lin, audioop.lin2ulaw),
    "audio/pcma": (8000, audioop.alaw2lin, audioop.lin2alaw),
}
# What the VAD runs as: webrtcvad with server_vad's timing. It creates responses by itself (the
# agent speaks when it decides to) and does not cancel them when the user speaks (the model
# itself decides whether to stop; `response.cancel` or `conversation.item.truncate` stops it).
DEFAULT_TURN_DETECTION = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                          "silence_duration_ms": 500, "idle_timeout_ms": None,
                          "create_response": True, "interrupt_response": False}
# OpenAI's built-in voices: accepted on any checkpoint, not in effect (the checkpoint's own voice
# speaks). Other names must be voices of the checkpoint.
BUILTIN_VOICES = frozenset({"alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer",
                            "verse", "marin", "cedar"})
# Session fields a client may send back as it received them: read-only, nothing to apply.
_READ_ONLY_FIELDS = ("id", "object", "expires_at")


class ProtocolError(Exception):
    """A client event the server cannot act on; becomes an `error` event, the session goes on."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def error_event(code: str, message: str, event_id: str | None = None, param: str | None = None,
                kind: str = "invalid_request_error") -> dict:
    return {"type": "error", "event_id": new_id("event"),
            "error": {"type": kind, "code": code, "message": message, "param": param,
                      "event_id": event_id}}


# -- session configuration -------------------------------------------------------------------------

@dataclass
class SessionConfig:
    """The session's settings as they are in effect: what `session.created`/`.updated` report.
    `instructions` and `voice` become the conversation's text and voice prompts (persona
    checkpoints), fixed once the engine conversation is open; `transcription` is what the client
    asked for, in effect only where a transcriber is loaded."""
    id: str
    model: str
    input_format: str = "audio/pcm"
    output_format: str = "audio/pcm"
    turn_detection: dict | None = field(default_factory=lambda: dict(DEFAULT_TURN_DETECTION))
    instructions: str | None = None
    voice: str | None = None
    transcription: dict | None = None  # audio.input.transcription: the user's words (any model)

    def to_json(self, transcribing: bool = False) -> dict:
        return {
            "type": "realtime", "object": "realtime.session", "id": self.id, "model": self.model,
            "output_modalities": ["audio"], "instructions": self.instructions or "",
            "audio": {
                "input": {"format": format_json(self.input_format),
                          "transcription": self.transcription if transcribing else None,
                          "noise_reduction": None, "turn_detection": self.turn_detection},
                "output": {"format": format_json(self.output_format), "voice": self.voice,
                           "speed": 1.0},
            },
            "tools": [], "tool_choice": "auto", "max_output_tokens": "inf", "tracing": None,
            "truncation": "auto", "include": None, "prompt": None,
        }

    def updated(self, session, semantic_vad: bool = False) -> "SessionUpdate":
        """This configuration with a `session.update`'s `session` applied field by field: each
        valid field applies (`instructions`, `voice` and `transcription` as asked: the session
        decides what of them is in effect), a malformed one is left out with its error, and one
        that a full-duplex model cannot honour is accepted and listed in `ignored`.
        `semantic_vad`: a transcriber's pause heads can serve semantic_vad as asked."""
        if not isinstance(session, dict):
            raise ProtocolError("invalid_type", "session must be an object", "session")
        update = SessionUpdate(dataclasses.replace(
            self, turn_detection=_copy(self.turn_detection)), semantic_vad=semantic_vad)
        for key, value in session.items():
            param = f"session.{key}"
            try:
                if key == "audio":
                    _apply_audio(update, value)
                else:
                    self._apply_field(update, key, value, param)
            except ProtocolError as e:
                update.errors.append(e)
        return update

    def _apply_field(self, update: "SessionUpdate", key: str, value, param: str) -> None:
        new, ignore = update.config, update.ignore
        if key == "type":
            _require(value in (None, "realtime"), "invalid_value", "only 'realtime' sessions are "
                     "served (this server has no transcription sessions)", param)
        elif key == "model":
            _require(value is None or isinstance(value, str), "invalid_type",
                     "model must be a string", param)
            if value not in (None, self.model):
                ignore(param, f"every model name is served by the loaded checkpoint "
                              f"{self.model!r}")
        elif key == "output_modalities":
            _require(isinstance(value, list) and value and set(value) <= {"audio", "text"},
                     "invalid_value", "output_modalities must be ['audio'] or ['text']", param)
            if value != ["audio"]:
                ignore(param, "a speech-to-speech model always answers in audio, with its "
                              "transcript")
        elif key == "instructions":
            _require(value is None or isinstance(value, str), "invalid_type",
                     "instructions must be a string", param)
            new.instructions = value or None
        elif key == "tools":
            _require(_list_of(value, dict), "invalid_type", "tools must be a list of tool objects",
                     param)
            if value:
                ignore(param, "the model speaks and listens; it calls no tools")
        elif key == "tool_choice":
            _require(value in (None, "auto", "none", "required") or isinstance(value, dict)
                     and isinstance(value.get("type"), str), "invalid_value",
                     "tool_choice must be 'auto', 'none', 'required' or a tool object", param)
            if value not in (None, "auto", "none"):
                ignore(param, "the model calls no tools")
        elif key == "max_output_tokens":
            _require(value in (None, "inf") or is_int(value) and 1 <= value <= 4096,
                     "invalid_value", "max_output_tokens must be an integer in [1, 4096] or "
                     "'inf'", param)
            if value not in (None, "inf"):
                ignore(param, "an utterance ends when the model falls silent")
        elif key == "tracing":
            _require(value in (None, "auto") or isinstance(value, dict), "invalid_value",
                     "tracing must be null, 'auto' or an object", param)
            if value is not None:
                ignore(param, "this server keeps no traces")
        elif key == "truncation":
            _require(value in ("auto", "disabled") or isinstance(value, dict), "invalid_value",
                     "truncation must be 'auto', 'disabled' or an object", param)
            if value != "auto":
                ignore(param, "the engine keeps the conversation's latest context window")
        elif key == "include":
            _require(_list_of(value, str), "invalid_type", "include must be a list of strings",
                     param)
            if value:
                ignore(param, "there are no transcription log-probabilities to include")
        elif key in ("prompt", "reasoning"):
            _require(value is None or isinstance(value, dict), "invalid_type",
                     f"{key} must be an object", param)
            if value is not None:
                ignore(param, "stored prompts are not available: instructions set the persona"
                       if key == "prompt" else "the model does not reason in text")
        elif key not in _READ_ONLY_FIELDS:
            raise ProtocolError("unknown_parameter", f"unknown session field {key!r}", param)


@dataclass
class SessionUpdate:
    """What `SessionConfig.updated` made of a `session.update`: the new configuration, an error
    per malformed field (not applied), and (param, why) for each field accepted but not in
    effect."""
    config: SessionConfig
    errors: list[ProtocolError] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    semantic_vad: bool = False  # pause heads serve semantic_vad (agent/turns.py)

    def ignore(self, param: str, why: str) -> None:
        self.ignored.append((param, why))


def _require(ok, code: str, message: str, param: str) -> None:
    if not ok:
        raise ProtocolError(code, message, param)


def is_int(value) -> bool:
    """A JSON integer (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _list_of(value, kind: type) -> bool:
    """Null, or a list whose every element is a `kind`."""
    return value is None or isinstance(value, list) and all(isinstance(v, kind) for v in value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _copy(d):
    return dict(d) if isinstance(d, dict) else d


def _apply_audio(update: SessionUpdate, audio) -> None:
    _require(isinstance(audio, dict), "invalid_type", "audio must be an object", "session.audio")
    new, ignore = update.config, update.ignore
    for side, fields in audio.items():
        try:
            _require(side in ("input", "output"), "unknown_parameter",
                     f"unknown field audio.{side}", f"session.audio.{side}")
            _require(fields is None or isinstance(fields, dict), "invalid_type",
                     f"audio.{side} must be an object", f"session.audio.{side}")
        except ProtocolError as e:
            update.errors.append(e)
            continue
        for key, value in (fields or {}).items():
            param = f"session.audio.{side}.{key}"
            try:
                if key == "format":
                    kind = parse_format(value, param)
                    if side == "input":
                        new.input_format = kind
                    else:
                        new.output_format = kind
                elif (side, key) == ("input", "turn_detection"):
                    new.turn_detection = parse_turn_detection(value, param, ignore,
                                                              update.semantic_vad)
                elif (side, key) == ("input", "transcription"):
                    _require(value is None or isinstance(value, dict), "invalid_type",
                             "transcription must be null or an object", param)
                    new.transcription = dict(value) if value is not None else None
                elif (side, key) == ("input", "noise_reduction"):
                    _require(value is None or isinstance(value, dict) and value.get("type") in (
                        "near_field", "far_field"), "invalid_value", "noise_reduction must be "
                        "null or {'type': 'near_field' | 'far_field'}", param)
                    if value is not None:
                        ignore(param, "the model hears the audio as it comes")
                elif (side, key) == ("output", "voice"):
                    if isinstance(value, dict):
                        value = value.get("id")
                    _require(value is None or isinstance(value, str), "invalid_type",
                             "voice must be a name", param)
                    new.voice = value
                elif (side, key) == ("output", "speed"):
                    _require(value is None or _is_number(value) and 0.25 <= value <= 1.5,
                             "invalid_value", "speed must be a number in [0.25, 1.5]", param)
                    if value not in (None, 1, 1.0):
                        ignore(param, "the agent speaks at its own speed")
                else:
                    raise ProtocolError("unknown_parameter", f"unknown field audio.{side}.{key}",
                                        param)
            except ProtocolError as e:
                update.errors.append(e)


def parse_format(value, param: str) -> str:
    kind = value.get("type") if isinstance(value, dict) else value  # the beta's bare strings too
    kind = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu",
            "g711_alaw": "audio/pcma"}.get(kind, kind)
    if kind not in FORMATS:
        raise ProtocolError("invalid_value", f"unsupported audio format {value!r}: use "
                            "{'type': 'audio/pcm', 'rate': 24000}, {'type': 'audio/pcmu'} or "
                            "{'type': 'audio/pcma'}", param)
    rate = value.get("rate") if isinstance(value, dict) else None
    if kind == "audio/pcm" and rate not in (None, SAMPLE_RATE):
        raise ProtocolError("invalid_value", f"audio/pcm is 24000 Hz only, not {rate!r}", param)
    return kind


def format_json(kind: str) -> dict:
    return {"type": kind, "rate": FORMATS[kind][0]}


def parse_turn_detection(value, param: str, ignore, semantic: bool = False) -> dict | None:
    """The VAD in effect for a `turn_detection` setting (null: none). server_vad's
    `silence_duration_ms` and `prefix_padding_ms` drive it; semantic_vad is served by a
    transcriber's pause heads where `semantic` (its `eagerness` sets how long webrtcvad still
    waits), else it runs as server_vad with its default timing. `ignore(param, why)` hears of each
    setting not in effect."""
    if value is None:
        return None
    _require(isinstance(value, dict) and value.get("type") in ("server_vad", "semantic_vad"),
             "invalid_value", "turn_detection must be null or an object with type 'server_vad' "
             "or 'semantic_vad'", param)
    known = set(DEFAULT_TURN_DETECTION) if value["type"] == "server_vad" else {
        "type", "eagerness", "create_response", "interrupt_response"}
    for key, v in value.items():
        sub = f"{param}.{key}"
        _require(key in known, "unknown_parameter", f"unknown turn_detection field {key!r}", sub)
        if key in ("prefix_padding_ms", "silence_duration_ms"):
            _require(is_int(v) and 0 <= v <= 10_000, "invalid_value",
                     f"{key} must be an integer in [0, 10000]", sub)
        elif key == "threshold":
            _require(_is_number(v) and 0 <= v <= 1, "invalid_value",
                     "threshold must be a number in [0, 1]", sub)
        elif key == "idle_timeout_ms":
            _require(v is None or is_int(v) and v >= 0, "invalid_value",
                     "idle_timeout_ms must be null or a whole number of milliseconds", sub)
        elif key in ("create_response", "interrupt_response"):
            _require(isinstance(v, bool), "invalid_type", f"{key} must be true or false", sub)
        elif key == "eagerness":
            _require(v in ("low", "medium", "high", "auto"), "invalid_value",
                     "eagerness must be 'low', 'medium', 'high' or 'auto'", sub)
    in_effect = dict(DEFAULT_TURN_DETECTION)
    if value["type"] == "semantic_vad" and semantic:
        in_effect.update(type="semantic_vad", eagerness=value.get("eagerness", "auto"))
    elif value["type"] == "semantic_vad":
        ignore(f"{param}.type", "semantic_vad runs as server_vad with its default timing (no "
                                "transcriber with pause heads is loaded)")
    else:
        for key in ("prefix_padding_ms", "silence_duration_ms"):
            in_effect[key] = value.get(key, in_effect[key])
        if value.get("threshold", in_effect["threshold"]) != in_effect["threshold"]:
            ignore(f"{param}.threshold", "the VAD (webrtcvad) takes no threshold")
        if value.get("idle_timeout_ms") is not None:
            ignore(f"{param}.idle_timeout_ms", "the agent speaks when it decides to")
    if value.get("create_response") is False:
        ignore(f"{param}.create_response", "the agent speaks when it decides to")
    if value.get("interrupt_response", True):
        ignore(f"{param}.interrupt_response", "the model decides itself whether to stop when "
               "the user speaks; response.cancel or conversation.item.truncate stops it")
    return in_effect


def vad_timing(turn_detection: dict) -> tuple[float, float]:
    """(silence that ends speech, padding before its start), in seconds, of a turn_detection in
    effect (`parse_turn_detection`'s, or the default): it always holds both, semantic_vad
    server_vad's defaults."""
    return (turn_detection["silence_duration_ms"] / 1000,
            turn_detection["prefix_padding_ms"] / 1000)


# -- audio -----------------------------------------------------------------------------------------

def decode_audio(payload, kind: str) -> tuple[np.ndarray, int]:
    """A base64 `input_audio_buffer.append` payload (or a phone call's `media` payload, as
    "audio/pcmu") -> (int16 samples, rate)."""
    if not isinstance(payload, str):
        raise ProtocolError("invalid_type", "audio must be a base64 string", "audio")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("invalid_value", "audio is not valid base64", "audio") from None
    rate, decoder, _ = FORMATS[kind]
    if decoder is not None:
        raw = decoder(raw, 2)
    elif len(raw) % 2:
        raise ProtocolError("invalid_value", "audio/pcm must be 16-bit samples: an even number "
                            "of bytes", "audio")
    return np.frombuffer(raw, dtype="<i2"), rate


class AudioEncoder:
    """The agent's 24 kHz float32 frames -> audio in an output format: `encode` gives base64
    deltas, `encode_bytes` the bytes (a phone call's μ-law, streams/phone/twilio.py). G.711 is
    resampled to 8 kHz with libsoxr, keeping its filter state across frames. Low quality (plenty
    for G.711's telephone band): its stream holds back about 20 ms, "HQ" about 55 ms."""

    def __init__(self, kind: str):
        self.kind = kind
        rate, _, self._encode = FORMATS[kind]
        self._resampler = None if rate == SAMPLE_RATE else soxr.ResampleStream(
            SAMPLE_RATE, rate, 1, dtype="float32", quality="LQ")

    def encode_bytes(self, pcm: np.ndarray) -> bytes:
        """One frame in the output format, as bytes (16-bit PCM, or G.711 at 8 kHz)."""
        if self._resampler is not None:
            pcm = self._resampler.resample_chunk(pcm)
        raw = (np.clip(pcm, -1.0, 1.0) * 32767).astype("<i2").tobytes()
        return self._encode(raw, 2) if self._encode is not None else raw

    def encode(self, pcm: np.ndarray) -> str:
        """One frame as a base64 delta."""
        return base64.b64encode(self.encode_bytes(pcm)).decode("ascii")


def level_dbfs(pcm: np.ndarray) -> float:
    return 10 * math.log10(float(np.mean(np.square(pcm, dtype=np.float64))) + 1e-12)


# -- the agent's stream as responses ---------------------------------------------------------------

@dataclass(frozen=True)
class UtteranceRule:
    """An agent utterance starts at a frame louder than `silence_dbfs` and ends after
    `silence_frames` frames (80 ms each) at or below it. A response that `response.create` asked
    for takes the agent's next utterance if it starts within `response_wait_s`, else it
    completes empty."""
    silence_dbfs: float = -45.0
    silence_frames: int = 5  # 400 ms
    response_wait_s: float = 5.0


class Utterances:
    """Cuts the agent's frames into utterances. `feed` returns what to do with one frame:

        ("start", [frame])        a new utterance begins with this frame
        ("audio", [frames...])    frames of the open utterance (a pause's frames are held back
                                  until speech resumes, and sent then)
        ("end", [])               the open utterance ended (its trailing silence is not sent)
        ("muted", [])             dropped: the client cancelled this utterance
        (None, [])                nothing: silence between utterances, or a held pause frame

    `cancel()` ends the open utterance now; its remaining frames are muted until the model's own
    silence (`silence_frames` quiet frames) ends it.
    """

    def __init__(self, rule: UtteranceRule):
        self.rule = rule
        self.open = False
        self.muted = False
        self._held: list[np.ndarray] = []
        self._quiet = 0

    def feed(self, pcm: np.ndarray) -> tuple[str | None, list[np.ndarray]]:
        voiced = level_dbfs(pcm) > self.rule.silence_dbfs
        self._quiet = 0 if voiced else self._quiet + 1
        if self.muted:
            if self._quiet >= self.rule.silence_frames:
                self.muted = False
            return "muted", []
        if not self.open:
            if not voiced:
                return None, []
            self.open = True
            return "start", [pcm]
        if voiced:
            frames, self._held = self._held + [pcm], []
            return "audio", frames
        if self._quiet >= self.rule.silence_frames:
            self.open, self._held = False, []
            return "end", []
        self._held.append(pcm)
        return None, []

    def cancel(self) -> None:
        if self.open:
            self.open, self.muted, self._held = False, True, []


# -- the conversation's items ----------------------------------------------------------------------

MAX_ITEMS = 1000  # items kept per session; the oldest beyond are forgotten (counted)
MAX_ITEM_BYTES = 4 << 20  # and at most this much of them, as JSON


def message_item(item_id: str, role: str, content: list, status: str = "completed") -> dict:
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": role,
            "status": status, "content": content}


def user_audio_item(item_id: str, transcript: str | None = None) -> dict:
    """A user item of streamed audio: no audio in it (the model heard it as it came), and its
    transcript where a transcriber made one."""
    return message_item(item_id, "user", [{"type": "input_audio", "transcript": transcript}])


def client_item(item, param: str = "item") -> dict:
    """A `conversation.item.create`'s item, checked and completed (an id, `object`, `status`), as
    the conversation keeps it: a message with `input_text`/`input_audio`/`output_text` parts, or
    a function call or its output. Audio payloads are not kept: the model does not hear items."""
    _require(isinstance(item, dict), "invalid_type", "item must be an object", param)
    kind, item_id = item.get("type", "message"), item.get("id")
    _require(item_id is None or isinstance(item_id, str) and 0 < len(item_id) <= 64,
             "invalid_value", "item.id must be a string of at most 64 characters", f"{param}.id")
    out = {**item, "id": item_id or new_id("item"), "object": "realtime.item", "type": kind,
           "status": "completed"}
    if kind in ("function_call", "function_call_output"):
        return out
    _require(kind == "message", "invalid_value", "item.type must be 'message', 'function_call' "
             "or 'function_call_output'", f"{param}.type")
    _require(item.get("role") in ("system", "developer", "user", "assistant"), "invalid_value",
             "item.role must be 'system', 'developer', 'user' or 'assistant'", f"{param}.role")
    content = item.get("content")
    _require(isinstance(content, list) and all(isinstance(c, dict) for c in content),
             "invalid_type", "item.content must be a list of content parts", f"{param}.content")
    parts = []
    for k, part in enumerate(content):
        where = f"{param}.content[{k}]"
        _require(part.get("type") in ("input_text", "input_audio", "input_image", "output_text",
                                      "output_audio", "text", "audio"), "invalid_value",
                 f"unknown content type {part.get('type')!r}", f"{where}.type")
        if part["type"] in ("input_text", "output_text", "text"):
            _require(isinstance(part.get("text"), str), "invalid_type", "text must be a string",
                     f"{where}.text")
        parts.append({k: v for k, v in part.items() if k != "audio"})
    return {**out, "content": parts}


def item_text(item: dict) -> str:
    """The text parts of a message item, joined."""
    return "\n".join(part["text"] for part in item.get("content") or ()
                     if isinstance(part.get("text"), str) and part["text"].strip())


@dataclass
class _Entry:
    item: dict
    size: int
    speech: "Response | None"  # an agent item's audio and timed transcript


class ConversationItems:
    """The session's conversation: its items in order, at most MAX_ITEMS and MAX_ITEM_BYTES of
    them (the oldest beyond are forgotten). An agent item keeps its Response, which knows how
    much audio was sent and when each piece of its transcript was said (for truncation)."""

    def __init__(self):
        self._order: list[str] = []
        self._entries: dict[str, _Entry] = {}
        self._bytes = 0
        self.forgotten = 0

    def __contains__(self, item_id) -> bool:
        return item_id in self._entries

    @property
    def last_id(self) -> str | None:
        return self._order[-1] if self._order else None

    def items(self) -> list[dict]:
        return [self._entries[i].item for i in self._order]

    def insert(self, item: dict, previous_item_id: str | None = None,
               speech: "Response | None" = None) -> str | None:
        """Add `item` after `previous_item_id` ("root": first; None: last); returns the id of
        the item now before it."""
        if item["id"] in self._entries:
            raise ProtocolError("item_create_duplicate_item_id", f"an item with id "
                                f"{item['id']!r} is already in the conversation", "item.id")
        if previous_item_id is None:
            at = len(self._order)
        elif previous_item_id == "root":
            at = 0
        elif previous_item_id in self._entries:
            at = self._order.index(previous_item_id) + 1
        else:
            raise ProtocolError("invalid_value", f"previous_item_id {previous_item_id!r} is not "
                                "in the conversation", "previous_item_id")
        self._order.insert(at, item["id"])
        self._entries[item["id"]] = _Entry(item, 0, speech)
        self.update(item)
        self._forget_oldest(keep=item["id"])
        return self._order[at - 1] if at else None

    def update(self, item: dict) -> None:
        """`item` (one of ours, by id) changed: keep it and its new size."""
        entry = self._entries.get(item["id"])
        if entry is not None:
            entry.item = item
            size = len(json.dumps(item))
            self._bytes += size - entry.size
            entry.size = size

    def get(self, item_id) -> dict | None:
        entry = self._entries.get(item_id)
        return entry.item if entry else None

    def speech(self, item_id) -> "Response | None":
        entry = self._entries.get(item_id)
        return entry.speech if entry else None

    def remove(self, item_id) -> None:
        entry = self._entries.pop(item_id)
        self._order.remove(item_id)
        self._bytes -= entry.size

    def _forget_oldest(self, keep: str) -> None:
        while len(self._order) > MAX_ITEMS or self._bytes > MAX_ITEM_BYTES:
            oldest = next((i for i in self._order if i != keep), None)
            if oldest is None:
                return
            self.remove(oldest)
            self.forgotten += 1


# -- responses -------------------------------------------------------------------------------------

def user_item_events(item: dict, previous: str | None) -> list[dict]:
    """A commit of the user's audio: the buffer's event and the user item it makes."""
    return [{"type": "input_audio_buffer.committed", "item_id": item["id"],
             "previous_item_id": previous},
            {"type": "conversation.item.added", "item": item, "previous_item_id": previous},
            {"type": "conversation.item.done", "item": item, "previous_item_id": previous}]


@dataclass
class Response:
    """One Realtime response: an agent utterance as one assistant message item with one audio
    content part. An utterance the agent starts by itself creates its response at its first
    frame; `response.create` creates one at once (with its `metadata`), whose item then starts
    with the agent's next utterance (`start_events`), or never. `webrtc`: the audio goes on the
    media track, with output_audio_buffer events."""
    conversation_id: str
    config: SessionConfig
    webrtc: bool
    metadata: dict | None = None
    id: str = field(default_factory=lambda: new_id("resp"))
    item_id: str = field(default_factory=lambda: new_id("item"))
    started: bool = False  # the item is out: the response holds an utterance
    previous_item: str | None = None
    audio_ms: float = 0.0  # of the utterance, sent (less what a truncation cut)
    pieces: list[tuple[float, str]] = field(default_factory=list)  # (audio_ms when said, text)
    status: str = "in_progress"

    @property
    def transcript(self) -> str:
        return "".join(text for _, text in self.pieces)

    def part(self, kind: str, **fields) -> dict:
        return {"type": kind, "response_id": self.id, "item_id": self.item_id, "output_index": 0,
                "content_index": 0, **fields}

    def _json(self, output: list, details: dict | None = None) -> dict:
        return {"object": "realtime.response", "id": self.id, "status": self.status,
                "status_details": details, "output": output,
                "conversation_id": self.conversation_id, "output_modalities": ["audio"],
                "audio": {"output": {"format": format_json(self.config.output_format),
                                     "voice": self.config.voice}},
                "max_output_tokens": "inf", "metadata": self.metadata, "usage": None}

    def item(self) -> dict:
        """The agent's message item as it stands."""
        done = self.status != "in_progress"
        status = "in_progress" if not done else (
            "completed" if self.status == "completed" else "incomplete")
        content = [{"type": "output_audio", "transcript": self.transcript}] if done else []
        return message_item(self.item_id, "assistant", content, status)

    def created_events(self) -> list[dict]:
        return [{"type": "response.created", "response": self._json([])}]

    def start_events(self, previous_item: str | None) -> list[dict]:
        """The utterance begins: its item, placed after `previous_item`."""
        self.started, self.previous_item = True, previous_item
        item = self.item()
        events = [{"type": "response.output_item.added", "response_id": self.id,
                   "output_index": 0, "item": item},
                  {"type": "conversation.item.added", "item": item,
                   "previous_item_id": previous_item},
                  self.part("response.content_part.added",
                            part={"type": "audio", "transcript": ""})]
        if self.webrtc:
            events.append({"type": "output_audio_buffer.started", "response_id": self.id})
        return events

    def say(self, text: str) -> dict:
        self.pieces.append((self.audio_ms, text))
        return self.part("response.output_audio_transcript.delta", delta=text)

    def end_events(self, status: str, details: dict | None = None) -> list[dict]:
        """status: completed, cancelled or failed, with the protocol's `status_details`."""
        self.status = status
        if not self.started:  # requested, and the agent did not speak in time
            return [{"type": "response.done", "response": self._json([], details)}]
        transcript, item = self.transcript, self.item()
        events = [self.part("response.output_audio.done"),
                  self.part("response.output_audio_transcript.done", transcript=transcript),
                  self.part("response.content_part.done",
                            part={"type": "audio", "transcript": transcript}),
                  {"type": "response.output_item.done", "response_id": self.id, "output_index": 0,
                   "item": item},
                  {"type": "conversation.item.done", "item": item,
                   "previous_item_id": self.previous_item},
                  {"type": "response.done", "response": self._json([item], details)}]
        if self.webrtc:
            events.append({"type": "output_audio_buffer.stopped", "response_id": self.id})
        return events

    def truncate(self, audio_end_ms: int) -> int:
        """Keep the first `audio_end_ms` of the utterance (at most what was sent) and what was
        said by then; returns the audio kept, in ms."""
        kept = min(audio_end_ms, int(self.audio_ms))
        self.audio_ms = float(kept)
        self.pieces = [(t, text) for t, text in self.pieces if t <= kept]
        return kept

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
DEFAULT_TURN_DETECTION = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                          "silence_duration_ms": 500, "idle_timeout_ms": None,
                          "create_response": True, "interrupt_response": True}
# Session fields a full-duplex model takes as given but that change nothing (reported back).
_PASSIVE_FIELDS = ("tracing", "truncation", "max_output_tokens", "tool_choice", "include")


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
    """What `session.update` can set. `instructions` and `voice` become the conversation's text
    and voice prompts, fixed once the engine conversation is open."""
    id: str
    model: str
    input_format: str = "audio/pcm"
    output_format: str = "audio/pcm"
    turn_detection: dict | None = field(default_factory=lambda: dict(DEFAULT_TURN_DETECTION))
    instructions: str | None = None
    voice: str | None = None
    transcription: dict | None = None  # audio.input.transcription: the user's words (any model)
    passive: dict = field(default_factory=lambda: {
        "tracing": None, "truncation": "auto", "max_output_tokens": "inf", "tool_choice": "auto",
        "include": None})

    def to_json(self) -> dict:
        return {
            "type": "realtime", "object": "realtime.session", "id": self.id, "model": self.model,
            "output_modalities": ["audio"], "instructions": self.instructions or "",
            "audio": {
                "input": {"format": format_json(self.input_format),
                          "transcription": self.transcription,
                          "noise_reduction": None, "turn_detection": self.turn_detection},
                "output": {"format": format_json(self.output_format), "voice": self.voice,
                           "speed": 1.0},
            },
            "tools": [], "prompt": None, **self.passive,
        }

    def updated(self, session) -> "SessionConfig":
        """This configuration with a `session.update`'s `session` applied; raises ProtocolError
        and changes nothing if any part of it is invalid or beyond a full-duplex model."""
        if not isinstance(session, dict):
            raise ProtocolError("invalid_value", "session must be an object", "session")
        new = dataclasses.replace(self, passive=dict(self.passive),
                                  turn_detection=_copy(self.turn_detection))
        for key, value in session.items():
            param = f"session.{key}"
            if key == "type":
                if value != "realtime":
                    raise ProtocolError("invalid_value", "only 'realtime' sessions are served "
                                        "(this server has no transcription sessions)", param)
            elif key == "model":
                if value not in (None, self.model):
                    raise ProtocolError("invalid_value", f"this server serves the model "
                                        f"{self.model!r}, not {value!r}", param)
            elif key == "output_modalities":
                if value not in (None, ["audio"]):
                    raise ProtocolError("unsupported", "a speech-to-speech model always answers "
                                        "in audio (with its transcript): output_modalities must "
                                        "be ['audio']", param)
            elif key == "instructions":
                if value is not None and not isinstance(value, str):
                    raise ProtocolError("invalid_type", "instructions must be a string", param)
                new.instructions = value or None
            elif key == "audio":
                _apply_audio(new, value)
            elif key in ("tools", "prompt"):
                if value not in (None, []):
                    raise ProtocolError("unsupported", f"{key} are not supported: the model "
                                        "speaks and listens, it does not call tools", param)
            elif key in _PASSIVE_FIELDS:
                new.passive[key] = value
            else:
                raise ProtocolError("unknown_parameter", f"unknown session field {key!r}", param)
        return new


def _copy(d):
    return dict(d) if isinstance(d, dict) else d


def _apply_audio(new: SessionConfig, audio) -> None:
    if not isinstance(audio, dict):
        raise ProtocolError("invalid_type", "audio must be an object", "session.audio")
    for side in audio:
        if side not in ("input", "output"):
            raise ProtocolError("unknown_parameter", f"unknown field audio.{side}",
                                f"session.audio.{side}")
    inp, out = audio.get("input") or {}, audio.get("output") or {}
    for key, value in inp.items():
        param = f"session.audio.input.{key}"
        if key == "format":
            new.input_format = parse_format(value, param)
        elif key == "turn_detection":
            new.turn_detection = parse_turn_detection(value, param)
        elif key == "transcription":
            if value is not None and not isinstance(value, dict):
                raise ProtocolError("invalid_type", "transcription must be an object or null",
                                    param)
            new.transcription = dict(value) if value is not None else None
        elif key == "noise_reduction":
            if value is not None:
                raise ProtocolError("unsupported", "input noise_reduction is not available: the "
                                    "model hears the audio as it is", param)
        else:
            raise ProtocolError("unknown_parameter", f"unknown field audio.input.{key}", param)
    for key, value in out.items():
        param = f"session.audio.output.{key}"
        if key == "format":
            new.output_format = parse_format(value, param)
        elif key == "voice":
            if isinstance(value, dict):
                value = value.get("id")
            if value is not None and not isinstance(value, str):
                raise ProtocolError("invalid_type", "voice must be a name", param)
            new.voice = value
        elif key == "speed":
            if value not in (None, 1, 1.0):
                raise ProtocolError("unsupported", "the agent speaks at its own speed: "
                                    "speed must be 1.0", param)
        else:
            raise ProtocolError("unknown_parameter", f"unknown field audio.output.{key}", param)


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


def parse_turn_detection(value, param: str) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("server_vad", "semantic_vad"):
        raise ProtocolError("invalid_value", "turn_detection must be null or an object with type "
                            "'server_vad' or 'semantic_vad'", param)
    merged = dict(DEFAULT_TURN_DETECTION) if value["type"] == "server_vad" else {
        "type": "semantic_vad", "eagerness": "auto", "create_response": True,
        "interrupt_response": True}
    for key, v in value.items():
        if key not in merged:
            raise ProtocolError("unknown_parameter", f"unknown turn_detection field {key!r}",
                                f"{param}.{key}")
        if key in ("prefix_padding_ms", "silence_duration_ms") and not (
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10_000):
            raise ProtocolError("invalid_value", f"{key} must be an integer in [0, 10000]",
                                f"{param}.{key}")
        merged[key] = v
    return merged


def vad_timing(turn_detection: dict) -> tuple[float, float]:
    """(silence that ends speech, padding before its start), in seconds. semantic_vad has no
    such settings: it gets server_vad's defaults."""
    return (turn_detection.get("silence_duration_ms", 500) / 1000,
            turn_detection.get("prefix_padding_ms", 300) / 1000)


# -- audio -----------------------------------------------------------------------------------------

def decode_audio(payload, kind: str) -> tuple[np.ndarray, int]:
    """A base64 `input_audio_buffer.append` payload -> (int16 samples, rate)."""
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
    """The agent's 24 kHz float32 frames -> base64 deltas in the session's output format; G.711
    is resampled to 8 kHz with libsoxr, keeping its filter state across frames. Low quality (plenty
    for G.711's telephone band): its stream holds back about 20 ms, "HQ" about 55 ms."""

    def __init__(self, kind: str):
        self.kind = kind
        rate, _, self._encode = FORMATS[kind]
        self._resampler = None if rate == SAMPLE_RATE else soxr.ResampleStream(
            SAMPLE_RATE, rate, 1, dtype="float32", quality="LQ")

    def encode(self, pcm: np.ndarray) -> str:
        if self._resampler is not None:
            pcm = self._resampler.resample_chunk(pcm)
        raw = (np.clip(pcm, -1.0, 1.0) * 32767).astype("<i2").tobytes()
        if self._encode is not None:
            raw = self._encode(raw, 2)
        return base64.b64encode(raw).decode("ascii")


def level_dbfs(pcm: np.ndarray) -> float:
    return 10 * math.log10(float(np.mean(np.square(pcm, dtype=np.float64))) + 1e-12)


# -- the agent's stream as responses ---------------------------------------------------------------

@dataclass(frozen=True)
class UtteranceRule:
    """An agent utterance starts at a frame louder than `silence_dbfs` and ends after
    `silence_frames` frames (80 ms each) at or below it."""
    silence_dbfs: float = -45.0
    silence_frames: int = 5  # 400 ms


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


# -- event shapes ----------------------------------------------------------------------------------

def user_item_events(item_id: str, previous: str | None) -> list[dict]:
    """A commit of the user's audio: the buffer's event and the user item it makes (no audio or
    transcript in it: the model heard the audio as it came)."""
    item = {"id": item_id, "object": "realtime.item", "type": "message", "role": "user",
            "status": "completed", "content": [{"type": "input_audio", "transcript": None}]}
    return [{"type": "input_audio_buffer.committed", "item_id": item_id,
             "previous_item_id": previous},
            {"type": "conversation.item.added", "item": item, "previous_item_id": previous},
            {"type": "conversation.item.done", "item": item, "previous_item_id": previous}]


@dataclass
class Response:
    """One agent utterance as a Realtime response: one assistant message item with one audio
    content part. `webrtc`: the audio goes on the media track, with output_audio_buffer events."""
    conversation_id: str
    previous_item: str | None
    config: SessionConfig
    webrtc: bool
    id: str = field(default_factory=lambda: new_id("resp"))
    item_id: str = field(default_factory=lambda: new_id("item"))
    transcript: list[str] = field(default_factory=list)

    def part(self, kind: str, **fields) -> dict:
        return {"type": kind, "response_id": self.id, "item_id": self.item_id, "output_index": 0,
                "content_index": 0, **fields}

    def _json(self, status: str, output: list, details: dict | None = None) -> dict:
        return {"object": "realtime.response", "id": self.id, "status": status,
                "status_details": details, "output": output,
                "conversation_id": self.conversation_id, "output_modalities": ["audio"],
                "audio": {"output": {"format": format_json(self.config.output_format),
                                     "voice": self.config.voice}},
                "max_output_tokens": "inf", "metadata": None, "usage": None}

    def _item(self, status: str, transcript: str | None) -> dict:
        content = [] if transcript is None else [{"type": "output_audio",
                                                  "transcript": transcript}]
        return {"id": self.item_id, "object": "realtime.item", "type": "message",
                "role": "assistant", "status": status, "content": content}

    def start_events(self) -> list[dict]:
        item = self._item("in_progress", None)
        events = [{"type": "response.created", "response": self._json("in_progress", [])},
                  {"type": "response.output_item.added", "response_id": self.id,
                   "output_index": 0, "item": item},
                  {"type": "conversation.item.added", "item": item,
                   "previous_item_id": self.previous_item},
                  self.part("response.content_part.added",
                            part={"type": "audio", "transcript": ""})]
        if self.webrtc:
            events.append({"type": "output_audio_buffer.started", "response_id": self.id})
        return events

    def say(self, text: str) -> dict:
        self.transcript.append(text)
        return self.part("response.output_audio_transcript.delta", delta=text)

    def end_events(self, status: str, reason: str | None = None) -> list[dict]:
        """status: completed, cancelled (reason client_cancelled) or failed."""
        transcript = "".join(self.transcript)
        item = self._item("completed" if status == "completed" else "incomplete", transcript)
        details = {"type": status, "reason": reason} if status != "completed" else None
        events = [self.part("response.output_audio.done"),
                  self.part("response.output_audio_transcript.done", transcript=transcript),
                  self.part("response.content_part.done",
                            part={"type": "audio", "transcript": transcript}),
                  {"type": "response.output_item.done", "response_id": self.id, "output_index": 0,
                   "item": item},
                  {"type": "conversation.item.done", "item": item,
                   "previous_item_id": self.previous_item},
                  {"type": "response.done", "response": self._json(status, [item], details)}]
        if self.webrtc:
            events.append({"type": "output_audio_buffer.stopped", "response_id": self.id})
        return events

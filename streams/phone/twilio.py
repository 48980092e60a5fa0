"""Twilio Media Streams: one phone call's websocket (`<Connect><Stream>`, bidirectional) bridged
to one engine conversation.

Twilio sends JSON text frames: `connected`, then `start` (the call's `streamSid`, `callSid`,
`mediaFormat` audio/x-mulaw 8000 Hz mono, our `customParameters`), then a `media` every 20 ms
(160 bytes of base64 μ-law), `dtmf` for a key pressed, `mark` echoing ours once the audio sent
before it has played, and `stop`. We send `media` (the agent's voice, μ-law 8 kHz, 20 ms per
message), `mark`, and `clear` (Twilio drops the audio it holds and echoes the pending marks).

- The conversation was opened by the call's webhook (streams/phone/webhook.py); `start` must name
  the same call. The caller's μ-law is decoded by audioop (`decode_audio`, as the Realtime API's
  audio/pcmu) and resampled to 24 kHz by libsoxr.
- The agent's 80 ms frames are resampled to 8 kHz (libsoxr) and μ-law encoded (audioop) by the
  Realtime API's audio/pcmu `AudioEncoder` (streams/realtime/events.py), and sent as 20 ms
  `media`, paced in real time (`Playout`): Twilio then holds little, so what the caller
  hears stays close to what the model says now. A mark every half second measures when the caller
  has heard it (our send -> Twilio's echo: the playback lag).
- Both resamplers are libsoxr's "LQ" streams, the lowest quality that still filters (its
  "QQ" leaves a 3 kHz tone's image at -11 dB): they hold back about 37 ms in, 25 ms out, where
  "HQ" holds 50 ms in, in 60 ms bursts.
- When the agent's audio piles up beyond `MAX_QUEUED_MS` (a stall of the event loop or the
  engine, then a burst), the oldest is cut and Twilio gets a `clear`: the caller hears the agent's
  present rather than its past. Cut audio is counted.
- `dtmf` becomes `Conversation.press_key` (a DtmfIn event for the Python API) and the stats.
- Bad frames (not JSON, bad base64, media before `start`, a second `start`, unknown events) are
  counted and skipped; the call goes on. Audio the model never hears is counted in ms.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import soxr
from aiohttp import WSCloseCode, WSMsgType, web

from duplex_agent.agent.api import AudioOut, ConversationClosed, ErrorOut, percentile
from duplex_agent.agent.config import SAMPLE_RATE
from duplex_agent.streams.realtime.events import AudioEncoder, ProtocolError, decode_audio

log = logging.getLogger(__name__)

PHONE_FORMAT = "audio/pcmu"  # G.711 μ-law, in streams/realtime/events.py's names
PHONE_RATE = 8000
CHUNK_BYTES = 160  # 20 ms of μ-law at 8 kHz: one `media` message each way
CHUNK_S = CHUNK_BYTES / PHONE_RATE
MEDIA_FORMAT = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
MARK_EVERY_CHUNKS = 25  # a mark every 500 ms of the agent's audio
MAX_PENDING_MARKS = 64  # marks Twilio has not echoed (it echoes all of them; this bounds a peer that does not)
MAX_QUEUED_MS = 120  # queued agent audio: a frame (80 ms) and 40 ms of jitter; beyond it the oldest is cut
DTMF_HISTORY = 32  # keys shown per call in /api/stats
HEARTBEAT_S = 20.0


@dataclass
class CallStats:
    """One call's figures, in /api/stats under phone.calls while it lasts."""
    call_sid: str
    conversation: str
    stream_sid: str | None = None
    media_in: int = 0  # caller `media` messages decoded and heard by the model
    heard_ms: float = 0.0
    unheard_ms: float = 0.0  # caller audio the model never got (before `start`, after the end)
    lost_chunks: int = 0  # gaps in Twilio's `chunk` numbers: audio Twilio never sent us
    bad_messages: int = 0  # not JSON, bad base64, events out of order, unknown events
    media_out: int = 0
    marks_sent: int = 0
    marks_echoed: int = 0
    playback_lag_ms: deque = field(default_factory=lambda: deque(maxlen=200))
    latency_ms: deque = field(default_factory=lambda: deque(maxlen=500))  # frame in -> its first chunk sent
    cut_ms: float = 0.0
    clears: int = 0
    underruns: int = 0  # the agent's audio ran dry: the caller heard a gap
    dtmf: str = ""

    def as_dict(self) -> dict:
        lag, latency = sorted(self.playback_lag_ms), sorted(self.latency_ms)
        return {"call_sid": self.call_sid, "stream_sid": self.stream_sid,
                "conversation": self.conversation, "media_in": self.media_in,
                "heard_ms": round(self.heard_ms), "unheard_ms": round(self.unheard_ms),
                "lost_chunks": self.lost_chunks, "bad_messages": self.bad_messages,
                "media_out": self.media_out, "marks_sent": self.marks_sent,
                "marks_echoed": self.marks_echoed,
                "playback_lag_ms": {"count": len(lag), "last": self.last_lag_ms,
                                    "p50": percentile(lag, 0.5),
                                    "max": round(lag[-1], 2) if lag else None},
                "latency_ms": {"count": len(latency), "p50": percentile(latency, 0.5),
                               "p99": percentile(latency, 0.99)},
                "cut_ms": round(self.cut_ms), "clears": self.clears, "underruns": self.underruns,
                "dtmf": self.dtmf}

    @property
    def last_lag_ms(self) -> float | None:
        return round(self.playback_lag_ms[-1], 2) if self.playback_lag_ms else None


class Playout:
    """The agent's voice for one call: 24 kHz frames in (`feed`), 20 ms μ-law `media` messages
    out through `send`, paced in real time by `run`, with a `mark` every MARK_EVERY_CHUNKS and a
    `clear` when queued audio is cut (one for a burst). `on_cut(seconds)` hears of each cut,
    `on_clear()` of each clear sent, `on_sent(ms)` of each frame's latency (input complete ->
    its first chunk sent)."""

    def __init__(self, stream_sid: str, send, stats: CallStats, on_cut=None, on_clear=None,
                 on_sent=None, max_queued_ms: int = MAX_QUEUED_MS):
        self.stream_sid, self._send, self.stats = stream_sid, send, stats
        self._on_cut, self._on_clear, self._on_sent = on_cut, on_clear, on_sent
        self._max_chunks = max(1, max_queued_ms * PHONE_RATE // 1000 // CHUNK_BYTES)
        self._encoder = AudioEncoder(PHONE_FORMAT)  # 24 -> 8 kHz (libsoxr "LQ"), μ-law
        self._partial = b""
        self._chunks: deque[tuple[bytes, float | None]] = deque()  # (μ-law, t_in of a frame's start)
        self._ready = asyncio.Event()
        self._clear_due = False  # audio was cut: Twilio must drop what it holds too
        self.pending_marks: dict[str, float] = {}  # name -> when sent (time.monotonic())
        self._marks = 0

    def feed(self, pcm: np.ndarray, t_in: float | None = None) -> None:
        """Queue one agent frame (float32, 24 kHz); `t_in` tags its first chunk for the latency."""
        raw = self._encoder.encode_bytes(pcm)
        tag_at = len(self._partial)  # where this frame's audio starts in the next chunk
        data = self._partial + raw
        n = len(data) // CHUNK_BYTES
        for i in range(n):
            tagged = i * CHUNK_BYTES <= tag_at < (i + 1) * CHUNK_BYTES and len(raw)
            self._chunks.append((data[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES],
                                 t_in if tagged else None))
        self._partial = data[n * CHUNK_BYTES:]
        excess = len(self._chunks) - self._max_chunks
        if excess > 0:
            for _ in range(excess):
                self._chunks.popleft()
            self.stats.cut_ms += excess * CHUNK_S * 1000
            # Marks sent before the clear come back at once: not a measure of playback.
            self.pending_marks.clear()
            self._clear_due = True
            if self._on_cut is not None:
                self._on_cut(excess * CHUNK_S)
        if self._chunks:
            self._ready.set()

    async def run(self) -> None:
        """Send the queued audio at 20 ms a message until cancelled, on an absolute clock: a late
        wake-up, or audio a little late, catches up without drift. Audio later than one message
        is a gap the caller hears (an underrun): the clock restarts with it."""
        loop = asyncio.get_running_loop()
        due = None
        while True:
            if not self._chunks:
                self._ready.clear()
                await self._ready.wait()
                now = loop.time()
                if due is None or now - due > CHUNK_S:
                    self.stats.underruns += due is not None
                    due = now
            elif due is None:
                due = loop.time()
            else:
                await asyncio.sleep(max(0.0, due - loop.time()))
            if self._clear_due:
                self._clear_due = False
                await self._send({"event": "clear", "streamSid": self.stream_sid})
                self.stats.clears += 1
                if self._on_clear is not None:
                    self._on_clear()
            if not self._chunks:  # cut while we slept (never all of it: see feed)
                continue
            chunk, t_in = self._chunks.popleft()
            await self._send({"event": "media", "streamSid": self.stream_sid,
                              "media": {"payload": base64.b64encode(chunk).decode("ascii")}})
            self.stats.media_out += 1
            if t_in is not None:
                ms = (time.monotonic() - t_in) * 1000
                self.stats.latency_ms.append(ms)
                if self._on_sent is not None:
                    self._on_sent(ms)
            if self.stats.media_out % MARK_EVERY_CHUNKS == 0:
                await self._mark()
            due += CHUNK_S

    async def _mark(self) -> None:
        self._marks += 1
        name = f"m{self._marks}"
        if len(self.pending_marks) >= MAX_PENDING_MARKS:
            self.pending_marks.pop(next(iter(self.pending_marks)))
        self.pending_marks[name] = time.monotonic()
        self.stats.marks_sent += 1
        await self._send({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})

    def echoed(self, name) -> float | None:
        """Twilio's echo of our mark `name`: the playback lag in seconds, or None for a mark we
        do not wait for (cleared, or not ours)."""
        sent = self.pending_marks.pop(name, None) if isinstance(name, str) else None
        if sent is None:
            return None
        lag = time.monotonic() - sent
        self.stats.marks_echoed += 1
        self.stats.playback_lag_ms.append(lag * 1000)
        return lag


class TwilioCall:
    """One media stream websocket, bound to the conversation its webhook opened. `endpoint` is
    the PhoneEndpoint (streams/phone/webhook.py): counters, tracker, metrics."""

    def __init__(self, endpoint, pending, ws: web.WebSocketResponse):
        self.endpoint, self.ws = endpoint, ws
        self.conv, self.call_sid = pending.conv, pending.call_sid
        self.stats = CallStats(self.call_sid, self.conv.id)
        self.playout: Playout | None = None
        self._tasks: list[asyncio.Task] = []
        self._last_chunk: int | None = None
        self._upsampler = soxr.ResampleStream(PHONE_RATE, SAMPLE_RATE, 1, dtype="float32",
                                              quality="LQ")

    async def run(self) -> str | None:
        """Until `stop`, a close or the conversation's end; returns the end reason to record
        ("bad_input" when the stream broke the call's binding), else None."""
        reason = None
        try:
            self._tasks.append(asyncio.create_task(self._forward()))
            reason = await self._receive()
        except ConnectionError:
            pass  # Twilio went away
        finally:
            self.conv.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        return reason

    async def send(self, message: dict) -> None:
        """To Twilio; the playout's task is the only sender."""
        await self.ws.send_str(json.dumps(message))

    # -- from Twilio -----------------------------------------------------------------------------
    async def _receive(self) -> str | None:
        async for msg in self.ws:
            if msg.type == WSMsgType.ERROR:
                too_big = getattr(msg.data, "code", None) == WSCloseCode.MESSAGE_TOO_BIG
                self.endpoint.websocket_error("too_big" if too_big else "protocol")
                return "too_big" if too_big else "protocol"
            if msg.type != WSMsgType.TEXT:
                self._bad("not a text frame")
                continue
            try:
                event = json.loads(msg.data)
            except ValueError:
                self._bad("not JSON")
                continue
            if not isinstance(event, dict):
                self._bad("not a JSON object")
                continue
            kind = event.get("event")
            if kind == "media":
                self._on_media(event)
            elif kind == "start":
                error = await self._on_start(event)
                if error:
                    log.info("phone call %s refused: %s", self.call_sid, error)
                    await self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=error.encode()[:120])
                    return "bad_input"
            elif kind == "mark":
                self._on_mark(event)
            elif kind == "dtmf":
                self._on_dtmf(event)
            elif kind == "stop":
                return None
            elif kind == "connected":
                pass
            else:
                self.endpoint.count("unknown_events")
                self.endpoint.websocket_error("ignored")
                self.stats.bad_messages += 1
            if self.conv.closed:  # ended by a limit or the engine: _forward closes the socket
                break
        return None

    def _bad(self, what: str, counter: str = "bad_messages", kind: str = "bad_event") -> None:
        self.endpoint.count(counter)
        self.endpoint.websocket_error(kind)
        self.stats.bad_messages += 1
        log.debug("phone call %s: %s", self.call_sid, what)

    async def _on_start(self, event: dict) -> str | None:
        if self.playout is not None:
            self._bad("a second start", "repeated_starts")
            return None
        start = event.get("start")
        if not isinstance(start, dict):
            return "start without its 'start' object"
        if start.get("callSid") != self.call_sid:
            return f"this stream belongs to call {self.call_sid}, not {start.get('callSid')!r}"
        fmt = start.get("mediaFormat") or {}
        if (fmt.get("encoding"), fmt.get("sampleRate"), fmt.get("channels")) != tuple(
                MEDIA_FORMAT.values()):
            return f"unsupported media format {fmt!r}: expected {MEDIA_FORMAT}"
        stream_sid = event.get("streamSid") or start.get("streamSid")
        if not isinstance(stream_sid, str) or not stream_sid:
            return "start without a streamSid"
        self.stats.stream_sid = stream_sid
        self.playout = Playout(stream_sid, self.send, self.stats, on_cut=self.endpoint.cut,
                               on_clear=self.endpoint.cleared, on_sent=self.endpoint.frame_sent)
        self._tasks.append(asyncio.create_task(self.playout.run()))
        return None

    def _on_media(self, event: dict) -> None:
        media = event.get("media")
        try:  # μ-law: a sample per byte
            pcm, _ = decode_audio(media.get("payload") if isinstance(media, dict) else None,
                                  PHONE_FORMAT)
        except ProtocolError:
            self._bad("media without base64 audio", "bad_media", "bad_audio")
            return
        if media.get("track", "inbound") != "inbound":
            self.endpoint.count("other_tracks")  # <Start><Stream> of both tracks: not the caller
            return
        ms = len(pcm) * 1000 / PHONE_RATE
        if self.playout is None or self.conv.closed:
            self._bad("media before start", "media_before_start")
            self._unheard(ms)
            return
        if len(pcm) != CHUNK_BYTES:
            self.endpoint.count("odd_media")  # still μ-law, byte for byte: heard all the same
        self._count_gap(media.get("chunk"))
        try:
            self.conv.push(self._upsampler.resample_chunk(pcm.astype(np.float32) / 32768),
                           SAMPLE_RATE)
        except ConversationClosed:
            self._unheard(ms)
            return
        self.stats.media_in += 1
        self.stats.heard_ms += ms

    def _unheard(self, ms: float) -> None:
        self.stats.unheard_ms += ms
        self.endpoint.count("unheard_ms", ms)

    def _count_gap(self, chunk) -> None:
        try:
            number = int(chunk)
        except (TypeError, ValueError):
            return
        if self._last_chunk is not None and number > self._last_chunk + 1:
            gap = number - self._last_chunk - 1
            self.stats.lost_chunks += gap
            self.endpoint.count("lost_chunks", gap)
        self._last_chunk = number if self._last_chunk is None else max(number, self._last_chunk)

    def _on_mark(self, event: dict) -> None:
        mark = event.get("mark")
        lag = self.playout.echoed(mark.get("name")) if self.playout and isinstance(mark, dict) else None
        if lag is None:
            self.endpoint.count("stray_marks")  # a cleared mark's echo, or not ours
        else:
            self.endpoint.playback_lag(lag)

    def _on_dtmf(self, event: dict) -> None:
        dtmf = event.get("dtmf")
        digit = dtmf.get("digit") if isinstance(dtmf, dict) else None
        try:
            self.conv.press_key(digit)
        except ConversationClosed:
            return
        except ValueError:
            self._bad(f"dtmf digit {digit!r}")
            return
        self.stats.dtmf = (self.stats.dtmf + digit)[-DTMF_HISTORY:]
        self.endpoint.dtmf()

    # -- to Twilio -------------------------------------------------------------------------------
    async def _forward(self) -> None:
        """The agent's audio to the playout; on the conversation's end (a limit, an engine
        error), close the socket: Twilio goes on to the TwiML after <Connect>, hanging up."""
        try:
            async for event in self.conv.events():
                if isinstance(event, AudioOut):
                    if self.playout is not None:
                        self.playout.feed(event.pcm, event.t_in)
                elif isinstance(event, ErrorOut):
                    self.endpoint.ended_by_server(self.conv, event.message)
            await self.ws.close()
        except ConnectionError:
            pass

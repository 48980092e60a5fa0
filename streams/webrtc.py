"""WebRTC transport: a browser holds a conversation with the agent over one RTCPeerConnection.

    POST /offer  {"sdp": ..., "type": "offer", optional sampling fields}  ->
                 {"sdp": ..., "type": "answer", "conversation", "translates"}

Per connection (`PeerSession`):
- the browser's microphone track comes in (Opus decoded by aiortc to 48 kHz s16, usually stereo);
  each frame is mixed to mono and pushed into the conversation, which resamples to 24 kHz itself;
- the agent's voice goes out on `AgentVoiceTrack`: `AudioOut` frames resampled 24 -> 48 kHz into a
  small jitter buffer, read as 20 ms frames paced in real time;
- a data channel opened by the browser (label "events") carries JSON to the page:
  {"type": "text", "text", "start", "end"} (the agent's), {"type": "user_word", "text", "start",
  "end"} (the user's, with a transcriber), {"type": "stats", ...} every 0.5 s,
  {"type": "error", "message"}, and, on a translating agent (Hibiki-Zero), {"type": "end"} once
  the translation is complete; from the page, {"type": "end_of_input"} says the speech to
  translate is over.

Optional sampling fields in the offer: text_temperature, text_topk, audio_temperature, audio_topk,
seed; and a persona: voice_prompt (a name from GET /api/voices) and text_prompt (the role), strings.
Malformed offers and personas the agent cannot serve get HTTP 400 JSON (an unknown voice's lists
the available ones, also as "voices"), a full agent HTTP 503 JSON.
"""
from __future__ import annotations

import asyncio
import fractions
import json
import logging
import time
from collections import deque

import numpy as np
import soxr
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from duplex_agent.agent.api import (AgentFull, AudioOut, ConversationClosed, ErrorOut, TextOut,
                                    UserWord, percentile)
from duplex_agent.agent.config import SAMPLE_RATE, sampling_from_params
from duplex_agent.checkpoints.personaplex import PersonaError
from duplex_agent.streams.security import refusal

log = logging.getLogger(__name__)

OUT_RATE = 48_000  # WebRTC's native Opus rate: no resampling in the browser
OUT_FRAME = OUT_RATE // 50  # 20 ms
STATS_INTERVAL_S = 0.5
CONNECT_TIMEOUT_S = 10.0  # a peer that never completes ICE must not hold a conversation slot

# Jitter buffer. The agent delivers 80 ms chunks; after an underrun, playback resumes behind a
# margin of silence that grows with each underrun (like the reference web client's buffer), so
# tick jitter stops causing gaps. Beyond MAX_BUFFER_MS the oldest audio is dropped, keeping latency
# bounded when the engine delivers a burst after a stall.
START_MARGIN_MS = 40
MARGIN_STEP_MS = 20
MAX_MARGIN_MS = 100
MAX_BUFFER_MS = 200


def _ms(samples: int) -> int:
    return samples * 1000 // OUT_RATE


class AgentVoiceTrack(MediaStreamTrack):
    """The agent's voice as 20 ms, 48 kHz s16 mono frames in real time; silence when starved."""

    kind = "audio"

    def __init__(self):
        super().__init__()
        self._resampler = soxr.ResampleStream(SAMPLE_RATE, OUT_RATE, 1, dtype="float32", quality="HQ")
        self._chunks: deque[list] = deque()  # [samples float32 @ 48 kHz, t_in or None, read offset]
        self._buffered = 0  # samples
        self._playing = False  # False until the first audio, and again after each underrun
        self._margin_ms = START_MARGIN_MS
        self._start: float | None = None
        self._pts = 0
        self.underruns = 0
        self.dropped_ms = 0
        self.latency_ms: deque[float] = deque(maxlen=50)  # input frame complete -> its audio sent

    def feed(self, pcm: np.ndarray, t_in: float | None = None) -> None:
        """Queue one agent frame (float32 at 24 kHz); `t_in` tags it for the latency figure."""
        out = self._resampler.resample_chunk(pcm)
        if not len(out):
            return
        if not self._playing:
            # Start or resume behind a margin of silence so the next chunk has time to arrive.
            margin = OUT_RATE * self._margin_ms // 1000
            self._chunks.append([np.zeros(margin, np.float32), None, 0])
            self._buffered += margin
            self._playing = True
        self._chunks.append([out, t_in, 0])
        self._buffered += len(out)
        excess = self._buffered - OUT_RATE * MAX_BUFFER_MS // 1000
        if excess > 0:
            self._discard(excess)
            self.dropped_ms += _ms(excess)

    def _discard(self, n: int) -> None:
        while n > 0 and self._chunks:
            head = self._chunks[0]
            take = min(n, len(head[0]) - head[2])
            head[2] += take
            n -= take
            self._buffered -= take
            if head[2] == len(head[0]):
                self._chunks.popleft()

    def _read(self, now: float) -> np.ndarray:
        out = np.zeros(OUT_FRAME, np.float32)
        filled = 0
        while filled < OUT_FRAME and self._chunks:
            head = self._chunks[0]
            samples, t_in, offset = head
            if offset == 0 and t_in is not None:
                self.latency_ms.append((now - t_in) * 1000)
            take = min(OUT_FRAME - filled, len(samples) - offset)
            out[filled:filled + take] = samples[offset:offset + take]
            filled += take
            head[2] += take
            self._buffered -= take
            if head[2] == len(samples):
                self._chunks.popleft()
        if self._playing and filled < OUT_FRAME:  # ran dry: a gap the listener hears
            self._playing = False
            self.underruns += 1
            self._margin_ms = min(MAX_MARGIN_MS, self._margin_ms + MARGIN_STEP_MS)
        return out

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._pts += OUT_FRAME
            await asyncio.sleep(self._start + self._pts / OUT_RATE - time.monotonic())
        pcm = self._read(time.monotonic())
        frame = AudioFrame.from_ndarray(
            (np.clip(pcm, -1.0, 1.0) * 32767).astype(np.int16).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = OUT_RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, OUT_RATE)
        return frame

    def stats(self) -> dict:
        return {"server_frame_ms": percentile(sorted(self.latency_ms), 0.5, digits=1),
                "playout_buffer_ms": _ms(self._buffered),
                "underruns": self.underruns, "dropped_output_ms": self.dropped_ms}


def frame_to_mono(frame: AudioFrame) -> np.ndarray:
    """A decoded audio frame (packed or planar, s16 or float) as mono float32 samples."""
    a = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if frame.format.is_planar:
        a = a.reshape(channels, -1).T
    else:
        a = a.reshape(-1, channels)
    if a.dtype == np.int16:
        a = a.astype(np.float32) / 32768.0
    return a.astype(np.float32, copy=False).mean(axis=1)


class DataChannelOutbox:
    """JSON messages for a peer's data channel. Those produced before the channel opens wait for
    it, up to `limit`; beyond that they are dropped and counted in `dropped`."""

    def __init__(self, limit: int):
        self.channel = None
        self.limit = limit
        self.dropped = 0
        self._pending: list[str] = []

    def attach(self, channel) -> None:
        self.channel = channel
        for text in self._pending:
            channel.send(text)
        self._pending.clear()

    def send(self, message: dict) -> None:
        text = json.dumps(message)
        if self.channel is None:
            if len(self._pending) < self.limit:
                self._pending.append(text)
            else:
                self.dropped += 1
        elif self.channel.readyState == "open":
            self.channel.send(text)


class PeerSession:
    """One browser: its peer connection, conversation, outgoing track and data channel."""

    def __init__(self, conv, on_closed):
        self.conv = conv
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.voice = AgentVoiceTrack()
        self.outbox = DataChannelOutbox(limit=100)
        self._on_closed = on_closed
        self._tasks: list[asyncio.Task] = []
        self._mic_started = False
        self._connected = False
        self._closed = False

        self.pc.on("connectionstatechange", self._on_connection_state)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("track", self._on_track)

    async def answer(self, offer: RTCSessionDescription) -> RTCSessionDescription:
        """Negotiate; raises ValueError (and the like) for offers aiortc cannot accept."""
        await self.pc.setRemoteDescription(offer)
        if not any(t.kind == "audio" for t in self.pc.getTransceivers()):
            raise ValueError("the offer has no audio track")
        self.pc.addTrack(self.voice)  # rides on the browser's audio transceiver: sendrecv
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        self._spawn(self._pump_events())
        self._spawn(self._send_stats())
        self._spawn(self._watch_connect())
        return self.pc.localDescription

    def _spawn(self, coro) -> None:
        self._tasks.append(asyncio.create_task(coro))

    # -- peer connection events ------------------------------------------------------------------
    async def _on_connection_state(self) -> None:
        log.info("%s: connection %s", self.conv.id, self.pc.connectionState)
        if self.pc.connectionState == "connected":
            self._connected = True
        elif self.pc.connectionState in ("failed", "closed"):
            await self.close()

    def _on_datachannel(self, channel) -> None:
        if self.outbox.channel is not None:
            return
        channel.on("close", lambda: self._spawn(self.close()))
        channel.on("message", self._on_message)
        self.outbox.attach(channel)

    def _on_message(self, message) -> None:
        """{"type": "end_of_input"} from a translating agent's page; anything else is ignored."""
        try:
            kind = json.loads(message).get("type") if isinstance(message, str) else None
        except (ValueError, AttributeError):
            return
        if kind == "end_of_input" and self.conv.agent.translates and not self.conv.closed:
            self.conv.end_input()

    def _on_track(self, track) -> None:
        if track.kind == "audio" and not self._mic_started:
            self._mic_started = True
            self._spawn(self._consume_mic(track))

    # -- loops -----------------------------------------------------------------------------------
    async def _consume_mic(self, track) -> None:
        try:
            while True:
                frame = await track.recv()
                self.conv.push(frame_to_mono(frame), rate=frame.sample_rate)
        except (MediaStreamError, ConversationClosed):  # the browser's track or the conversation ended
            pass
        except Exception:
            log.exception("%s: bad audio from the browser", self.conv.id)
            self.send({"type": "error", "message": "The server could not use the microphone audio."})
        await self.close()

    async def _pump_events(self) -> None:
        async for event in self.conv.events():
            if isinstance(event, AudioOut):
                self.voice.feed(event.pcm, event.t_in)
            elif isinstance(event, TextOut):
                self.send({"type": "text", "text": event.text, "start": event.start, "end": event.end})
            elif isinstance(event, UserWord):
                self.send({"type": "user_word", "text": event.text, "start": event.start,
                           "end": event.end})
            elif isinstance(event, ErrorOut):
                self.send({"type": "error", "message": event.message})
                await asyncio.sleep(0.5)  # closing aborts the data channel: let the message go first
        if self.conv.translation_done:
            self.send({"type": "end"})
            await asyncio.sleep(0.5)  # the message, and the voice's last buffered audio
        await self.close()  # the conversation ended (engine error, translation done, shutdown)

    async def _send_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            if self.outbox.channel is not None:
                self.send({"type": "stats", **self.conv.report(), **self.voice.stats(),
                           "dropped_messages": self.outbox.dropped})

    async def _watch_connect(self) -> None:
        await asyncio.sleep(CONNECT_TIMEOUT_S)
        if not self._connected:
            log.info("%s: peer never connected; closing", self.conv.id)
            await self.close()

    def send(self, message: dict) -> None:
        self.outbox.send(message)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.conv.close()
        self.voice.stop()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        await self.pc.close()
        self._on_closed(self)


def _bad_request(message: str) -> web.Response:
    return refusal(400, message)


def setup_routes(app: web.Application, agent) -> None:
    """Add POST /offer to `app`; its peer connections close when the app shuts down."""
    sessions: set[PeerSession] = set()

    async def offer(request: web.Request) -> web.Response:
        try:
            params = await request.json()
        except ValueError:  # not JSON, or not UTF-8
            return _bad_request("the request body must be JSON: {\"sdp\": ..., \"type\": \"offer\"}")
        if not isinstance(params, dict) or not isinstance(params.get("sdp"), str) or not params["sdp"].strip():
            return _bad_request("the request must have an \"sdp\" string with the browser's offer")
        if params.get("type", "offer") != "offer":
            return _bad_request(f"\"type\" must be \"offer\", got {params.get('type')!r}")
        try:
            sampling = sampling_from_params(params, agent.sampling_defaults, strings=False)
        except ValueError as e:
            return _bad_request(str(e))

        persona = {}
        for name in ("voice_prompt", "text_prompt"):
            value = params.get(name)
            if value is not None and not isinstance(value, str):
                return _bad_request(f"\"{name}\" must be a string, got {value!r:.80}")
            persona[name] = value or None
        try:
            conv = agent.open(sampling, **persona)
        except PersonaError as e:
            return refusal(400, str(e), voices=agent.voices())
        except AgentFull:
            from duplex_agent.streams.security import refuse_full
            return refuse_full(agent)

        session = PeerSession(conv, sessions.discard)
        sessions.add(session)
        try:
            answer = await session.answer(RTCSessionDescription(sdp=params["sdp"], type="offer"))
        except Exception as e:  # anything aiortc raises here comes from the client's SDP
            log.info("rejected offer: %s: %s", type(e).__name__, e)
            await session.close()
            return _bad_request(f"could not negotiate the offer: {e or type(e).__name__}")
        log.info("%s: WebRTC session from %s", conv.id, request.remote)
        request["conversation"] = conv  # for the per-client limit (streams/security.py)
        return web.json_response({"sdp": answer.sdp, "type": answer.type, "conversation": conv.id,
                                  "translates": agent.translates})

    async def close_all(_app) -> None:
        await asyncio.gather(*(s.close() for s in list(sessions)))

    app.router.add_post("/offer", offer)
    app.on_shutdown.append(close_all)

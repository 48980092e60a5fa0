"""The Realtime API over WebRTC: `POST /v1/realtime/calls`.

The body is the caller's SDP offer, either raw (`Content-Type: application/sdp`, as browsers
send it) or `multipart/form-data` with an `sdp` part and a `session` part (JSON), as the `openai`
SDK's `client.realtime.calls.create(sdp=..., session=...)` sends it. The answer is `201` with
`Content-Type: application/sdp` and `Location: /v1/realtime/calls/{call_id}`.

The conversation opens here, with the offer's session (instructions, voice). The user's audio
comes on the offer's audio track and the agent's goes back on it (Opus, 48 kHz, paced by
streams/webrtc.py's AgentVoiceTrack); the Realtime events flow as JSON on the `oai-events` data
channel the caller opens: the same events as on the websocket, except that audio is on the track,
so there are no `response.output_audio.delta` events and `input_audio_buffer.append` is refused,
and responses add `output_audio_buffer.started`/`stopped`. Bad offers get 400, a full server 503.
"""
from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from duplex_agent.streams.realtime.session import CALLS_PATH, Fatal, RealtimeSession
from duplex_agent.streams.realtime.events import ProtocolError, error_event, new_id
from duplex_agent.streams.security import refusal, refuse_full
from duplex_agent.streams.webrtc import (CONNECT_TIMEOUT_S, AgentVoiceTrack, DataChannelOutbox,
                                         frame_to_mono)

log = logging.getLogger(__name__)

EVENTS_LABEL = "oai-events"
MAX_PENDING_EVENTS = 1000  # produced before the data channel opened


class RealtimeCall:
    """One WebRTC call: peer connection, voice track, `oai-events` channel, Realtime session."""

    def __init__(self, endpoint, client: str, sampling):
        self.endpoint = endpoint
        self.id = new_id("rtc")
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.voice = AgentVoiceTrack()
        self.session = RealtimeSession(endpoint, client, sampling, self._send, self.close,
                                       audio_out=self.voice.feed)
        self.outbox = DataChannelOutbox(limit=MAX_PENDING_EVENTS)
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._connected = False
        self._closed = False
        self.pc.on("connectionstatechange", self._on_connection_state)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("track", self._on_track)

    async def answer(self, sdp: str) -> str:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        if not any(t.kind == "audio" for t in self.pc.getTransceivers()):
            raise ValueError("the offer has no audio track")
        self.pc.addTrack(self.voice)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        self._spawn(self._handle_events())
        self._spawn(self._watch_connect())
        await self.session.start()  # session.created, delivered when the channel opens
        return self.pc.localDescription.sdp

    def _spawn(self, coro) -> None:
        self._tasks.append(asyncio.create_task(coro))

    async def _on_connection_state(self) -> None:
        if self.pc.connectionState == "connected":
            self._connected = True
        elif self.pc.connectionState in ("failed", "closed"):
            await self.close()

    def _on_datachannel(self, channel) -> None:
        if channel.label != EVENTS_LABEL or self.outbox.channel is not None:
            return
        channel.on("message", self._inbox.put_nowait)
        channel.on("close", lambda: self._spawn(self.close()))
        self.outbox.attach(channel)

    def _on_track(self, track) -> None:
        if track.kind == "audio":
            self._spawn(self._consume_mic(track))

    async def _consume_mic(self, track) -> None:
        try:
            while True:
                frame = await track.recv()
                await self.session.add_input(frame_to_mono(frame), frame.sample_rate)
        except MediaStreamError:
            pass
        await self.close()

    async def _handle_events(self) -> None:
        """Client events in the order they came."""
        limit = self.endpoint.policy.max_message_bytes
        while not self.session.finished:
            message = await self._inbox.get()
            if not isinstance(message, str) or len(message) > limit:
                self.endpoint.counters.bad_events += 1
                await self.session.emit(error_event(
                    "invalid_event", f"events are JSON text messages of at most {limit} bytes"))
                continue
            await self.session.handle(message)

    async def _watch_connect(self) -> None:
        await asyncio.sleep(CONNECT_TIMEOUT_S)
        if not self._connected:
            log.info("realtime call %s: peer never connected; closing", self.id)
            await self.close()

    async def _send(self, event: dict) -> None:
        self.outbox.send(event)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.session.finished and self.outbox.channel is not None:
            await asyncio.sleep(0.2)  # the server ended it: let the error event go first
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        await self.session.close()
        self.voice.stop()
        await self.pc.close()
        self.endpoint._calls.discard(self)


async def _read_offer(request: web.Request) -> tuple[str, dict | None]:
    """(SDP, session or None) from a raw or multipart body; ValueError with a message."""
    if request.content_type == "application/sdp":
        return await request.text(), None
    if request.content_type != "multipart/form-data":
        raise ValueError("send the SDP offer as application/sdp, or multipart/form-data with "
                         "an 'sdp' part and an optional 'session' part (JSON)")
    parts = {}
    reader = await request.multipart()
    async for part in reader:
        parts[part.name] = await part.text()
    if "sdp" not in parts:
        raise ValueError("the multipart body has no 'sdp' part")
    session = json.loads(parts["session"]) if parts.get("session") else None
    return parts["sdp"], session


def add_call_route(app: web.Application, endpoint) -> None:
    from duplex_agent.agent.config import sampling_from_params

    async def create_call(request: web.Request) -> web.Response:
        endpoint.counters.calls += 1
        try:
            sdp, session = await _read_offer(request)
            sampling = sampling_from_params(request.query, endpoint.agent.sampling_defaults,
                                            strings=True)
        except ValueError as e:  # includes bad JSON and bad sampling parameters
            endpoint.counters.bad_requests += 1
            return refusal(400, str(e))
        if not sdp.strip():
            endpoint.counters.bad_requests += 1
            return refusal(400, "the SDP offer is empty")
        call = RealtimeCall(endpoint, request.remote or "unknown", sampling)
        try:
            if session is not None:
                errors = await call.session.configure(session)
                if errors:  # a malformed offer: nothing is set up yet
                    raise errors[0]
            call.session._open()
        except Fatal:
            endpoint.counters.refused_full += 1
            await call.close()
            return refuse_full(endpoint.agent)
        except ProtocolError as e:
            endpoint.counters.bad_requests += 1
            await call.close()
            return refusal(400, e.message, param=e.param, code=e.code)
        endpoint._calls.add(call)
        try:
            answer = await call.answer(sdp)
        except Exception as e:  # anything aiortc raises here comes from the caller's SDP
            endpoint.counters.bad_requests += 1
            await call.close()
            return refusal(400, f"could not negotiate the offer: {e or type(e).__name__}")
        return web.Response(status=201, body=answer.encode(), content_type="application/sdp",
                            headers={"Location": f"{CALLS_PATH}/{call.id}"})

    app.router.add_post(CALLS_PATH, create_call)

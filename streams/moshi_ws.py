"""Moshi's websocket protocol on `GET /api/chat`: one conversation per connection.

The wire format is the one of kyutai-labs/moshi's server and web client. Every message is binary;
its first byte is the kind:

    0x00 handshake  server -> client, exactly b"\\x00", once the conversation is open
    0x01 audio      both ways, Ogg/Opus pages, 24 kHz mono
    0x02 text       server -> client, one UTF-8 piece of the agent's inner monologue
    0x05 error      server -> client, UTF-8 message; the server then closes the socket

    0x03 control    client -> server, one byte: 0x01 ("endTurn") tells a translating agent
                    (Hibiki-Zero) that the speech is over: it finishes translating, then the
                    server closes the socket

Other kinds (other controls, ping 0x06, anything unknown) and text frames are ignored and counted.
A full server, a client over its per-address limit or a bad query parameter gets a 0x05 error
instead of the handshake. Audio that is not Ogg/Opus ends the conversation with a 0x05 error; a
message over the size limit closes the socket with code 1009. When the server ends a conversation
(idle, maximum length, engine error: see streams/security.py) the client gets a 0x05 with the
reason. Authentication and Origin checks happen before the upgrade (streams/security.py).

Sampling comes from the URL query the moshi web client sends: `text_temperature`, `text_topk`,
`audio_temperature`, `audio_topk`, and `audio_seed` (else `text_seed`), since the engine keeps
one random stream per conversation. A persona comes from PersonaPlex's parameters, so its web
client works unchanged: `voice_prompt`, a name from GET /api/voices (never a path), and
`text_prompt`, the role (URL-decoded); that client always sends both, and an empty value means
none. An unknown voice, a prompt too long for the context window, or a persona asked of a
checkpoint without persona training gets a 0x05 error (an unknown voice's lists the available
ones). Other parameters are ignored.

Opus decoding and encoding run on the event loop (about 0.2 ms per 80 ms frame); all model work
stays on the engine thread. Output frames are sent as soon as they are produced, unpaced.
"""
from __future__ import annotations

import asyncio
import logging
import weakref
from contextlib import suppress
from dataclasses import dataclass

import sphn
from aiohttp import WSCloseCode, WSMsgType, web

from duplex_agent.agent.api import AgentFull, AudioOut, ConversationClosed, ErrorOut, TextOut
from duplex_agent.agent.config import SAMPLE_RATE, sampling_from_params
from duplex_agent.checkpoints.personaplex import PersonaError
from duplex_agent.streams.security import (ConversationTracker, Policy, over_client_limit,
                                           too_many_message)

log = logging.getLogger(__name__)

KIND_HANDSHAKE = b"\x00"
KIND_AUDIO = b"\x01"
KIND_TEXT = b"\x02"
KIND_CONTROL = b"\x03"
KIND_ERROR = b"\x05"
CONTROL_END_TURN = 0x01

HEARTBEAT_S = 20.0  # ping the client; a peer that stops answering is dropped and its slot freed


@dataclass
class ChatCounters:
    """Server-wide counts since start, reported by /api/stats."""
    connections: int = 0
    refused_full: int = 0
    refused_per_client: int = 0
    bad_requests: int = 0  # invalid query parameters, personas the agent cannot serve
    bad_audio: int = 0  # 0x01 payloads that are not Ogg/Opus
    too_big: int = 0  # messages over the size limit
    protocol_errors: int = 0  # broken websocket frames
    ignored_messages: int = 0  # text frames, empty messages, kinds other than 0x01
    engine_errors: int = 0
    ended_by_limits: int = 0  # idle or too long


class MoshiChat:
    """The `/api/chat` handler of one server, with its counters and open sockets."""

    def __init__(self, agent, policy: Policy, tracker: ConversationTracker, metrics):
        self.agent, self.policy, self.tracker, self.metrics = agent, policy, tracker, metrics
        self.counters = ChatCounters()
        self._sockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()

    def _count(self, field: str, refused: str | None = None, ws_error: str | None = None) -> None:
        """One event, counted both for /api/stats (`field`) and for /metrics (its label)."""
        setattr(self.counters, field, getattr(self.counters, field) + 1)
        if refused:
            self.metrics.refused(refused)
        if ws_error:
            self.metrics.websocket_error(ws_error)

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        # autoclose=False: on the client's close we free the conversation slot first and only then
        # answer the close, so a client that reconnects right away finds its slot free.
        # aiohttp refuses messages of max_msg_size bytes or more; the policy's limit is inclusive.
        ws = web.WebSocketResponse(max_msg_size=self.policy.max_message_bytes + 1, autoclose=False,
                                   heartbeat=HEARTBEAT_S)
        await ws.prepare(request)
        self.counters.connections += 1
        client = request.remote or "unknown"
        try:
            sampling = sampling_from_params(request.query, self.agent.sampling_defaults,
                                            strings=True)
        except ValueError as e:
            self._count("bad_requests", refused="bad_input")
            return await _fail(ws, str(e))
        if over_client_limit(self.policy, self.tracker, client):
            self._count("refused_per_client", refused="per_client")
            return await _fail(ws, too_many_message(client, self.policy.max_per_client))
        try:
            conv = self.agent.open(sampling, voice_prompt=request.query.get("voice_prompt") or None,
                                   text_prompt=request.query.get("text_prompt") or None)
        except AgentFull:
            self._count("refused_full", refused="full")
            return await _fail(ws, f"server full: all {self.agent.max_conversations} conversations "
                                   "are in use, try again later")
        except PersonaError as e:
            self._count("bad_requests", refused="bad_input")
            return await _fail(ws, str(e))
        self.tracker.claim(conv, client, "websocket")
        self._sockets.add(ws)
        sender, reason, error = None, None, None
        try:
            await ws.send_bytes(KIND_HANDSHAKE)
            sender = asyncio.create_task(self._send(ws, conv))
            reason, error = await self._receive(ws, conv)
        except ConnectionError:
            pass  # the client went away
        finally:
            conv.close()
            if sender is not None:
                sender.cancel()
                await asyncio.wait([sender])
            self.tracker.finish(conv, reason)
        if error:
            return await _fail(ws, error)
        await ws.close()
        return ws

    async def _receive(self, ws: web.WebSocketResponse, conv) -> tuple[str | None, str | None]:
        """Feed the client's audio to the conversation until the socket closes. Returns why it
        ended when the client broke the protocol (None otherwise), and the error to send it."""
        reader = sphn.OpusStreamReader(SAMPLE_RATE)
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:  # aiohttp has already closed the socket
                too_big = getattr(msg.data, "code", None) == WSCloseCode.MESSAGE_TOO_BIG
                kind = "too_big" if too_big else "protocol"
                self._count("too_big" if too_big else "protocol_errors", ws_error=kind)
                log.info("conversation %s: websocket error: %s", conv.id, msg.data)
                return kind, None
            data = msg.data
            if (msg.type == WSMsgType.BINARY and data[:2] == KIND_CONTROL + bytes([CONTROL_END_TURN])
                    and self.agent.translates):
                if not conv.closed:
                    conv.end_input()
                continue
            if msg.type != WSMsgType.BINARY or not data or data[:1] != KIND_AUDIO:
                self._count("ignored_messages", ws_error="ignored")
                continue
            try:
                pcm = reader.append_bytes(data[1:])
            except Exception as e:  # sphn raises ValueError for anything it cannot parse or decode
                self._count("bad_audio", ws_error="bad_audio")
                return "bad_input", ("invalid audio message: expected Ogg/Opus pages, 24 kHz mono "
                                     f"({e})")
            if len(pcm):
                try:
                    conv.push(pcm, SAMPLE_RATE)
                except ConversationClosed:  # the engine or a limit ended it; _send reports why
                    break
        return None, None

    async def _send(self, ws: web.WebSocketResponse, conv) -> None:
        """Forward the agent's audio and text as they come; close the socket when the conversation
        ends on the server's side."""
        writer = sphn.OpusStreamWriter(SAMPLE_RATE)
        try:
            async for event in conv.events():
                if isinstance(event, AudioOut):
                    pages = writer.append_pcm(event.pcm)
                    if pages:
                        await ws.send_bytes(KIND_AUDIO + pages)
                elif isinstance(event, TextOut):
                    await ws.send_bytes(KIND_TEXT + event.text.encode())
                elif isinstance(event, ErrorOut):
                    if self.tracker.ended_by_server(conv):
                        self.counters.ended_by_limits += 1
                    else:
                        self.counters.engine_errors += 1
                    await ws.send_bytes(KIND_ERROR + event.message.encode())
            await ws.close()
        except ConnectionError:
            pass  # the client went away; the receiving side sees the close

    async def close_all(self) -> None:
        """Close every open socket (server shutdown); their handlers then free their slots."""
        await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
                               for ws in list(self._sockets)), return_exceptions=True)


async def _fail(ws: web.WebSocketResponse, message: str) -> web.WebSocketResponse:
    log.info("websocket error: %s", message)
    with suppress(ConnectionError):
        await ws.send_bytes(KIND_ERROR + message.encode())
    await ws.close()
    return ws

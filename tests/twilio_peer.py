"""Twilio's end of a phone call, for the tests of streams/phone/: its signed webhook (the
`twilio` library signs it) and a media-stream peer that speaks Twilio's documented messages.

The server under test believes it is reached at PUBLIC_URL (its --public-url), as behind a proxy:
webhooks are signed for that URL, and `local` turns the TwiML's wss:// stream URL into the local
port's, as the proxy would forward it.
"""
from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from urllib.parse import urlsplit

import aiohttp
from twilio.request_validator import RequestValidator

from duplex_agent.streams.phone.twilio import CHUNK_BYTES

TWILIO_TOKEN = "twilio-test-auth-token"
PUBLIC_URL = "https://phone.example.test"


def webhook_form(call_sid: str, caller: str = "+15551230001") -> dict:
    """The form Twilio POSTs when the number is called (a subset of its parameters)."""
    return {"CallSid": call_sid, "AccountSid": "AC" + "1" * 32, "From": caller,
            "To": "+15559870000", "CallStatus": "ringing", "Direction": "inbound",
            "ApiVersion": "2010-04-01"}


async def call_webhook(session, server: str, call_sid: str, query: str = "",
                       token: str = TWILIO_TOKEN, signed_url: str | None = None,
                       signature: str | None = None) -> tuple[int, str]:
    form = webhook_form(call_sid)
    if signature is None:
        signature = RequestValidator(token).compute_signature(
            signed_url or f"{PUBLIC_URL}/twilio/voice{query}", form)
    async with session.post(f"{server}/twilio/voice{query}", data=form,
                            headers={"X-Twilio-Signature": signature}) as r:
        return r.status, await r.text()


def local(stream_url: str, server: str) -> str:
    """The TwiML's wss:// URL on the public host, as the proxy forwards it to our port."""
    parts = urlsplit(stream_url)
    assert (parts.scheme, parts.netloc) == ("wss", urlsplit(PUBLIC_URL).netloc)
    return server.replace("http", "ws", 1) + parts.path


def new_call_sid() -> str:
    return "CA" + secrets.token_hex(16)


class TwilioPeer:
    """Twilio's end of a bidirectional media stream, from its documented messages."""

    def __init__(self, ws, call_sid: str):
        self.ws, self.call_sid = ws, call_sid
        self.stream_sid = "MZ" + secrets.token_hex(16)
        self.received: list[tuple[float, dict]] = []
        self.echoed: list[str] = []
        self.sent_bytes = 0  # μ-law sent in media messages
        self._sequence = self._chunk = 0
        self._play_end = 0.0
        self._marks: list[tuple[str, asyncio.TimerHandle]] = []
        self._task = asyncio.create_task(self._receive())

    async def send(self, message: dict) -> None:
        self._sequence += 1
        await self.ws.send_str(json.dumps({**message, "sequenceNumber": str(self._sequence),
                                           "streamSid": self.stream_sid}))

    async def start(self, call_sid: str | None = None, media_format: dict | None = None) -> None:
        await self.ws.send_str(json.dumps({"event": "connected", "protocol": "Call",
                                           "version": "1.0.0"}))
        await self.send({"event": "start", "start": {
            "accountSid": "AC" + "1" * 32, "streamSid": self.stream_sid,
            "callSid": call_sid or self.call_sid, "tracks": ["inbound"], "customParameters": {},
            "mediaFormat": media_format or {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                            "channels": 1}}})

    async def media(self, payload: bytes | str) -> None:
        self._chunk += 1
        if isinstance(payload, bytes):
            self.sent_bytes += len(payload)
            payload = base64.b64encode(payload).decode()
        await self.send({"event": "media", "media": {"track": "inbound", "chunk": str(self._chunk),
                                                     "timestamp": str(20 * self._chunk),
                                                     "payload": payload}})

    async def speak(self, ulaw: bytes, burst_chunks: int = 0, keys: dict[int, str] = {}) -> None:
        """20 ms chunks every 20 ms on an absolute clock (the first `burst_chunks` at once);
        `keys`: a DTMF digit sent after chunk i."""
        t0 = time.monotonic()
        for i in range(len(ulaw) // CHUNK_BYTES):
            await asyncio.sleep(max(0.0, t0 + max(0, i - burst_chunks) * 0.02 - time.monotonic()))
            await self.media(ulaw[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES])
            if i in keys:
                await self.send({"event": "dtmf", "dtmf": {"track": "inbound_track",
                                                           "digit": keys[i]}})

    async def stop(self) -> None:
        await self.send({"event": "stop", "stop": {"accountSid": "AC" + "1" * 32,
                                                   "callSid": self.call_sid}})

    async def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        async for msg in self.ws:
            assert msg.type == aiohttp.WSMsgType.TEXT
            event, now = json.loads(msg.data), loop.time()
            self.received.append((now, event))
            if event["event"] == "media":
                played = len(base64.b64decode(event["media"]["payload"])) / 8000
                self._play_end = max(self._play_end, now) + played
            elif event["event"] == "mark":
                name = event["mark"]["name"]
                self._marks.append((name, loop.call_at(self._play_end, self._echo, name)))
            elif event["event"] == "clear":
                self._play_end = now
                for name, handle in self._marks:
                    if handle.when() > now:
                        handle.cancel()
                        self._echo(name)

    def _echo(self, name: str) -> None:
        self.echoed.append(name)
        asyncio.ensure_future(self.send({"event": "mark", "mark": {"name": name}}))

    def events(self, kind: str) -> list[dict]:
        return [e for _, e in self.received if e["event"] == kind]

    @property
    def closed(self) -> bool:
        return self._task.done()

    async def wait_closed(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(asyncio.shield(self._task), timeout)

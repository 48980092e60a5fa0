"""A Moshi websocket-protocol test client (Ogg/Opus with sphn, as the moshi web client speaks
it) that records everything the server sends; shared by the tests of `serve`."""
from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np
import sphn

from duplex_agent.agent.config import FRAME_SIZE, SAMPLE_RATE

FRAME_S = FRAME_SIZE / SAMPLE_RATE


class Client:
    """A moshi-protocol client: sends Ogg/Opus, records everything the server sends."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.writer = sphn.OpusStreamWriter(SAMPLE_RATE)
        self.reader = sphn.OpusStreamReader(SAMPLE_RATE)
        self.messages: list[bytes] = []
        self.pcm: list[np.ndarray] = []
        self.text: list[str] = []
        self.errors: list[str] = []
        self.non_binary = 0
        self._task = asyncio.create_task(self._receive())

    @classmethod
    async def connect(cls, session, url: str, **query) -> "Client":
        return cls(await session.ws_connect(f"{url}/api/chat", params=query))

    async def _receive(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                self.non_binary += 1
                continue
            self.messages.append(msg.data)
            kind, payload = msg.data[0], msg.data[1:]
            if kind == 1:
                self.pcm.append(self.reader.append_bytes(payload))
            elif kind == 2:
                self.text.append(payload.decode())
            elif kind == 5:
                self.errors.append(payload.decode())

    @property
    def kinds(self) -> list[int]:
        return [m[0] for m in self.messages]

    @property
    def samples(self) -> int:
        return sum(len(p) for p in self.pcm)

    @property
    def closed(self) -> bool:
        return self._task.done()

    async def send_audio(self, pcm: np.ndarray, pace: bool = True) -> None:
        """80 ms Opus packets, one per message; paced in real time unless told otherwise."""
        for i in range(0, len(pcm), FRAME_SIZE):
            await self.ws.send_bytes(b"\x01" + self.writer.append_pcm(pcm[i:i + FRAME_SIZE]))
            if pace:
                await asyncio.sleep(FRAME_S)

    async def wait_for(self, condition, timeout: float = 10.0) -> bool:
        """Wait until condition() holds, the socket closes or the time is up; returns condition()."""
        deadline = time.monotonic() + timeout
        while not condition() and not self.closed and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return bool(condition())

    async def wait_closed(self, timeout: float = 5.0) -> None:
        await asyncio.wait_for(asyncio.shield(self._task), timeout)

    async def close(self) -> None:
        await self.ws.close()
        await self._task

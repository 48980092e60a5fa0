"""LiveKit Agents' OpenAI realtime plugin, unmodified and with every RealtimeModel default,
against the server at URL: run with .venv-clients' python by tests/test_realtime_frameworks.py.

    livekit_agent.py URL TOKEN TURN1.wav TURN2.wav

The RealtimeSession is set up as AgentSession sets one up (instructions, a chat context with a
system and a user message, no tools). Then the user's first turn (24 kHz 16-bit mono WAVs, in
real time), generate_reply(), and the second turn over the agent's speech, with the barge-in
AgentSession makes: interrupt(), then truncate() at the audio received. Prints one JSON line:
what arrived, the session's `error` events and the server's.
"""
import asyncio
import json
import sys
import time
import wave
from collections import Counter

from livekit import rtc
from livekit.agents import llm
from livekit.plugins import openai

CHUNK_S = 0.02


class Listener:
    """What the session reports: errors, the server's events, the agent's audio per message."""

    def __init__(self, session):
        self.errors: list[str] = []
        self.server_events: Counter = Counter()
        self.user_turns = 0
        self.audio_ms = 0
        self.message: list | None = None  # [message_id, ms of its audio received]
        self.heard = asyncio.Event()
        self.speech_started = asyncio.Event()
        self._readers: set[asyncio.Task] = set()
        session.on("error", lambda ev: self.errors.append(repr(ev.error)))
        session.on("openai_server_event_received", self._on_server_event)
        session.on("input_speech_started", self._on_speech_started)
        session.on("generation_created", self._on_generation)

    def _on_server_event(self, event: dict) -> None:
        self.server_events[event["type"]] += 1
        if event["type"] == "error":
            self.errors.append(json.dumps(event["error"]))

    def _on_speech_started(self, _event) -> None:
        self.user_turns += 1
        self.speech_started.set()

    def _on_generation(self, generation: llm.GenerationCreatedEvent) -> None:
        reader = asyncio.create_task(self._read(generation))
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)

    async def _read(self, generation: llm.GenerationCreatedEvent) -> None:
        async for message in generation.message_stream:
            self.message = [message.message_id, 0]
            async for frame in message.audio_stream:
                ms = frame.samples_per_channel * 1000 // frame.sample_rate
                self.audio_ms += ms
                self.message[1] += ms
                self.heard.set()


def read_pcm(path: str) -> bytes:
    with wave.open(path, "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        return w.readframes(w.getnframes())


async def speak(session, pcm: bytes) -> None:
    """20 ms frames on an absolute real-time schedule, as a room's audio track delivers them."""
    n, t0 = int(24000 * CHUNK_S), time.monotonic()
    for i, k in enumerate(range(0, len(pcm), 2 * n)):
        await asyncio.sleep(max(0.0, t0 + i * CHUNK_S - time.monotonic()))
        chunk = pcm[k:k + 2 * n]
        session.push_audio(rtc.AudioFrame(chunk, 24000, 1, len(chunk) // 2))


async def main(url: str, token: str, turn1: str, turn2: str) -> dict:
    model = openai.realtime.RealtimeModel(base_url=f"{url}/v1", api_key=token)
    session = model.session()
    listener = Listener(session)
    await session.update_instructions("You are a helpful assistant.")
    chat_ctx = llm.ChatContext()
    chat_ctx.add_message(role="system", content="Answer in one sentence.")
    chat_ctx.add_message(role="user", content="Hello!")
    await session.update_chat_ctx(chat_ctx)  # waits for the server's conversation.item.added
    await session.update_tools([])
    silence = bytes(int(24000 * 0.5) * 2)
    await speak(session, read_pcm(turn1) + silence)
    async with asyncio.timeout(15):
        reply = await session.generate_reply()
    async with asyncio.timeout(30):
        await listener.heard.wait()
    listener.speech_started.clear()
    second = asyncio.create_task(speak(session, read_pcm(turn2) + silence))
    async with asyncio.timeout(30):
        await listener.speech_started.wait()
    session.interrupt()
    message_id, played_ms = listener.message
    session.truncate(message_id=message_id, modalities=["audio"], audio_end_ms=played_ms)
    await second
    context = [(item.role, item.text_content) for item in session.chat_ctx.items
               if item.type == "message"]
    await session.aclose()
    await model.aclose()
    return {"agent_audio_ms": listener.audio_ms, "errors": listener.errors,
            "user_turns": listener.user_turns, "reply_user_initiated": reply.user_initiated,
            "truncated_at_ms": played_ms,
            "server_events": dict(listener.server_events), "context": context}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:5]))), flush=True)

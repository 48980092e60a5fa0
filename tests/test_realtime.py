"""The OpenAI Realtime API (`/v1/realtime`, `/v1/realtime/calls`) end to end on 127.0.0.1, with the
official `openai` SDK, unmodified, as the client.

The tiny-random model talks noise; its output is reproducible from a seed (the URL's `seed=`,
as on /api/chat), so a reference run of the same conversation through the Python API tells
exactly which frames the server must send as which responses. The silence threshold that cuts
responses is chosen from that reference output (its median frame level), so there are several.
"""
import asyncio
import audioop
import base64
import contextlib
import dataclasses
import json
import time

import aiohttp
import numpy as np
import pytest
import soxr
import webrtcvad

from duplex_agent.agent.api import Agent, AudioOut, TextOut
from duplex_agent.agent.config import FRAME_SIZE, SAMPLE_RATE
from duplex_agent.streams.realtime.events import (AudioEncoder, UtteranceRule, decode_audio,
                                                  level_dbfs)
from duplex_agent.streams.security import Policy
from tests import helpers
from tests.helpers import agent_fixture, espeak, needs_espeak

openai = pytest.importorskip("openai")

CAPACITY = 3
TOKEN = "secret-token"
SEED = 7
CHUNK_S = 0.02
SILENCE_FRAMES = 2
MAX_MESSAGE = 64 << 10
pytestmark = needs_espeak


agent = agent_fixture(conversations=CAPACITY)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    """An espeak-ng sentence, 24 kHz, as 16-bit samples (what pcm16 carries), whole frames."""
    pcm = espeak("Hello, who are you? Tell me about the weather.", "en",
                 tmp_path_factory.mktemp("speech") / "s.wav", SAMPLE_RATE)
    silence = np.zeros(SAMPLE_RATE // 4, np.float32)
    pcm = np.concatenate([silence, pcm, silence, silence, silence])  # speech_stopped after 500 ms
    pcm = np.pad(pcm, (0, -len(pcm) % FRAME_SIZE))
    return (np.clip(pcm, -1, 1) * 32767).astype(np.int16)


@pytest.fixture(scope="module")
def reference(agent, speech):
    """The agent's frames and text pieces for `speech` with seed SEED, through the Python API."""
    async def run():
        conv = agent.open(dataclasses.replace(agent.sampling_defaults, seed=SEED))
        await conv.send(speech.astype(np.float32) / 32768.0)
        frames, text = [], []
        async for event in conv.events():
            if isinstance(event, AudioOut):
                frames.append(event.pcm)
                if len(frames) == len(speech) // FRAME_SIZE:
                    break
            elif isinstance(event, TextOut):
                text.append((event.step, event.text))
        conv.close()
        return frames, text
    return asyncio.run(run())


@pytest.fixture(scope="module")
def rule(reference) -> UtteranceRule:
    frames, _ = reference
    return UtteranceRule(float(np.median([level_dbfs(f) for f in frames])), SILENCE_FRAMES)


def expected_responses(frames, text, rule):
    """[(first frame, last voiced frame, transcript)] of the completed utterances, computed
    independently of the server: a response opens at a frame above the threshold and ends after
    SILENCE_FRAMES quiet frames; text said between responses opens the next one."""
    voiced = [level_dbfs(f) > rule.silence_dbfs for f in frames]
    out, start, last, quiet = [], None, None, 0
    for k, v in enumerate(voiced):
        quiet = 0 if v else quiet + 1
        if start is None and v:
            start = last = k
        elif start is not None and v:
            last = k
        elif start is not None and quiet >= SILENCE_FRAMES:
            out.append((start, last, k))
            start = None
    responses, said_from = [], 0
    for start, last, end in out:  # text of step s comes after the audio of step s
        responses.append((start, last, "".join(t for s, t in text if said_from <= s < end)))
        said_from = end
    return responses


def vad_speech_span(pcm16: np.ndarray) -> tuple[float, float]:
    """First and last voiced 30 ms frame of the recording by webrtcvad (mode 3), in seconds."""
    pcm = soxr.resample(pcm16.astype(np.float32) / 32768, SAMPLE_RATE, 16_000)
    pcm = (np.clip(pcm, -1, 1) * 32767).astype(np.int16)
    vad, n = webrtcvad.Vad(3), 480
    voiced = [i for i in range(len(pcm) // n)
              if vad.is_speech(pcm[i * n:(i + 1) * n].tobytes(), 16_000)]
    return voiced[0] * 0.03, (voiced[-1] + 1) * 0.03


@contextlib.asynccontextmanager
async def serving(agent, rule, tmp_path):
    """`serve`'s app on a free port of 127.0.0.1; yields its base URL."""
    policy = Policy(auth_token=TOKEN, max_message_bytes=MAX_MESSAGE)
    async with helpers.serving(agent, static_dir=tmp_path, policy=policy,
                               utterance_rule=rule) as url:
        yield url
    assert agent.active == 0


@pytest.fixture
async def server(agent, rule, tmp_path):
    async with serving(agent, rule, tmp_path) as url:
        yield url


def sdk(url: str, token: str = TOKEN):
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0)


async def stream(send, pcm: np.ndarray, rate: int, encode) -> None:
    """20 ms appends in real time, on an absolute schedule."""
    n, t0 = int(rate * CHUNK_S), time.monotonic()
    for i, k in enumerate(range(0, len(pcm), n)):
        await asyncio.sleep(max(0.0, t0 + i * CHUNK_S - time.monotonic()))
        await send(base64.b64encode(encode(pcm[k:k + n])).decode())


class Receiver:
    """Reads every event of a connection in the background: a client that stopped reading would
    stall the server's sends to it (TCP backpressure), its close included."""

    def __init__(self, conn):
        self.events: list = []
        self._new = asyncio.Event()
        self._task = asyncio.create_task(self._run(conn))

    async def _run(self, conn) -> None:
        async for event in conn:
            self.events.append(event)
            self._new.set()

    async def until(self, condition, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition(self.events):
                self._new.clear()
                await self._new.wait()

    def stop(self) -> None:
        self._task.cancel()


# -- the SDK over the websocket --------------------------------------------------------------------

async def test_sdk_conversation(server, speech, reference, rule):
    """The SDK updates the session, streams the recording in 20 ms appends in real time, and gets
    the speech events where webrtcvad puts them and the agent's utterances as responses: exactly
    the reference's frames and text."""
    frames, text = reference
    expected = expected_responses(frames, text, rule)
    assert len(expected) >= 2, "the threshold should cut the reference into several responses"
    async with sdk(server).realtime.connect(model="tiny-random",
                                            extra_query={"seed": str(SEED)}) as conn:
        await conn.session.update(session={
            "type": "realtime", "instructions": None,
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                "turn_detection": {"type": "server_vad", "prefix_padding_ms": 0,
                                                   "silence_duration_ms": 500}},
                      "output": {"format": {"type": "audio/pcm", "rate": 24000}}}})
        # Audio right after the update, before session.updated arrives: events are taken in order.
        def done(ev) -> bool:  # every expected response, and the user's item
            return sum(e.type == "response.done" for e in ev) >= len(expected) and any(
                e.type == "conversation.item.done" and e.item.role == "user" for e in ev)
        rx = Receiver(conn)
        await stream(lambda a: conn.input_audio_buffer.append(audio=a), speech, SAMPLE_RATE,
                     lambda x: x.astype("<i2").tobytes())
        await rx.until(done, 15)
        rx.stop()
        events = rx.events
    types = [e.type for e in events]
    assert types[0] == "session.created" and "session.updated" in types
    assert "error" not in types, [e for e in events if e.type == "error"]
    updated = next(e for e in events if e.type == "session.updated")
    assert updated.session.audio.input.turn_detection.silence_duration_ms == 500
    assert updated.session.audio.output.format.type == "audio/pcm"

    # The user's speech, by webrtcvad on the same recording.
    vad_start, vad_end = vad_speech_span(speech)
    started = [e for e in events if e.type == "input_audio_buffer.speech_started"]
    stopped = [e for e in events if e.type == "input_audio_buffer.speech_stopped"]
    assert started and stopped
    assert abs(started[0].audio_start_ms / 1000 - vad_start) <= 0.1
    assert abs(stopped[-1].audio_end_ms / 1000 - vad_end) <= 0.1
    assert [e.item_id for e in started[:len(stopped)]] == [e.item_id for e in stopped]
    committed = [e.item_id for e in events if e.type == "input_audio_buffer.committed"]
    assert committed == [e.item_id for e in stopped]

    # The agent's responses: lifecycle order, audio = the reference frames, transcript = its text.
    order = ["response.created", "response.output_item.added", "conversation.item.added",
             "response.content_part.added", "response.output_audio.done",
             "response.output_audio_transcript.done", "response.content_part.done",
             "response.output_item.done", "conversation.item.done", "response.done"]
    created = [e.response.id for e in events if e.type == "response.created"]
    assert len(created) >= len(expected)
    for rid, (start, last, transcript) in zip(created, expected):
        mine = [e for e in events if getattr(e, "response_id", None) == rid
                or getattr(getattr(e, "response", None), "id", None) == rid]
        kinds = [e.type for e in mine]
        assert [k for k in kinds if k in order] == [k for k in order if not k.startswith("conv")]
        first_delta = kinds.index("response.output_audio.delta")
        assert kinds.index("response.content_part.added") < first_delta
        assert max(i for i, k in enumerate(kinds) if k.endswith(".delta")) < kinds.index(
            "response.output_audio.done")
        audio = b"".join(base64.b64decode(e.delta) for e in mine
                         if e.type == "response.output_audio.delta")
        pcm = np.frombuffer(audio, "<i2").astype(np.float32) / 32767
        want = np.concatenate(frames[start:last + 1])
        assert len(pcm) == len(want) and np.abs(pcm - want).max() < 2e-4
        said = "".join(e.delta for e in mine if e.type == "response.output_audio_transcript.delta")
        assert said == transcript
        (said_done,) = [e for e in mine if e.type == "response.output_audio_transcript.done"]
        assert said_done.transcript == said
        final = next(e for e in mine if e.type == "response.done").response
        assert final.status == "completed" and final.output[0].content[0].transcript == said
    # No audio between responses: every delta belongs to a response that was open.
    open_ = set()
    for e in events:
        if e.type == "response.created":
            open_.add(e.response.id)
        elif e.type == "response.done":
            open_.discard(e.response.id)
        elif e.type == "response.output_audio.delta":
            assert e.response_id in open_


async def test_cancel_mutes_the_rest_of_the_utterance(server, speech, reference, rule):
    async with sdk(server).realtime.connect(model="tiny-random",
                                            extra_query={"seed": str(SEED)}) as conn:
        rx, events = Receiver(conn), None
        sender = asyncio.create_task(stream(
            lambda a: conn.input_audio_buffer.append(audio=a), speech, SAMPLE_RATE,
            lambda x: x.astype("<i2").tobytes()))
        await rx.until(lambda ev: any(e.type == "response.output_audio.delta" for e in ev))
        rid = next(e.response_id for e in rx.events if e.type == "response.output_audio.delta")
        await conn.response.cancel(response_id=rid)
        await rx.until(lambda ev: any(
            e.type == "response.done" and e.response.status == "cancelled" for e in ev))
        before = len(rx.events)
        # Over already: nothing to do, no error (the agent's own silence may end a response
        # while the client's cancel is on its way). A response that never was is an error.
        await conn.response.cancel(response_id=rid, event_id="late")
        await conn.response.cancel(response_id="resp_nope", event_id="unknown")
        await rx.until(lambda ev: any(e.type == "error" for e in ev[before:]))
        sender.cancel()
        rx.stop()
        events = rx.events
    done = next(e for e in events if e.type == "response.done")
    assert done.response.id == rid and done.response.status == "cancelled"
    assert done.response.status_details.reason == "client_cancelled"
    cut = events.index(done)
    assert not any(getattr(e, "response_id", None) == rid for e in events[cut + 1:])
    errors = [e.error for e in events[before:] if e.type == "error"]
    assert [(e.code, e.event_id) for e in errors] == [("response_cancel_not_active", "unknown")]


async def test_g711_round_trip(server, speech):
    """μ-law in and out at 8 kHz: the server hears the speech (its VAD finds it where webrtcvad
    does) and answers in 80 ms μ-law deltas."""
    pcm8k = soxr.resample(speech.astype(np.float32) / 32768, SAMPLE_RATE, 8000)
    ulaw = audioop.lin2ulaw((np.clip(pcm8k, -1, 1) * 32767).astype("<i2").tobytes(), 2)
    async with sdk(server).realtime.connect(model="tiny-random") as conn:
        await conn.session.update(session={"type": "realtime", "audio": {
            "input": {"format": {"type": "audio/pcmu"},
                      "turn_detection": {"type": "server_vad", "prefix_padding_ms": 0}},
            "output": {"format": {"type": "audio/pcmu"}}}})
        rx = Receiver(conn)
        await stream(lambda a: conn.input_audio_buffer.append(audio=a),
                     np.frombuffer(ulaw, np.uint8), 8000, lambda x: x.tobytes())
        await rx.until(lambda ev: any(e.type == "input_audio_buffer.speech_stopped" for e in ev)
                       and any(e.type == "response.output_audio.delta" for e in ev))
        rx.stop()
        events = rx.events
    updated = next(e for e in events if e.type == "session.updated")
    assert updated.session.audio.output.format.type == "audio/pcmu"
    vad_start, _ = vad_speech_span(speech)
    started = next(e for e in events if e.type == "input_audio_buffer.speech_started")
    assert abs(started.audio_start_ms / 1000 - vad_start) <= 0.1
    deltas = [base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta"]
    sizes = [len(d) for d in deltas]  # 80 ms at 8 kHz is 640 bytes; the resampler works in blocks
    assert abs(sum(sizes) - 640 * len(sizes)) < 640
    out = np.frombuffer(audioop.ulaw2lin(b"".join(deltas), 2), "<i2")
    assert np.abs(out).max() > 1000  # the agent's (noisy) voice, not silence


async def test_items_and_requested_responses(agent, rule, tmp_path, speech):
    """Items are kept and answered (added/done, retrieved, deleted, truncated at an audio time
    with their transcript); response.create is answered at once with its metadata, and the
    response completes empty when the agent does not speak in time, or holds its next
    utterance."""
    def of(kind, **match):
        return [e for e in rx.events if e.type == kind and all(
            getattr(e, k, None) == v for k, v in match.items())]

    async with serving(agent, dataclasses.replace(rule, response_wait_s=1.0), tmp_path) as url:
        async with sdk(url).realtime.connect(model="gpt-realtime") as conn:
            rx = Receiver(conn)
            await conn.conversation.item.create(item={
                "id": "u1", "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "Hi there."}]})
            await conn.conversation.item.create(previous_item_id="root", item={
                "id": "s1", "type": "message", "role": "system",
                "content": [{"type": "input_text", "text": "Be brief."}]})
            await conn.conversation.item.retrieve(item_id="u1")
            await conn.conversation.item.delete(item_id="s1")
            # No audio yet, so the agent is silent: the response asked for completes empty.
            await conn.response.create(response={"metadata": {"turn": "1"}})
            await rx.until(lambda ev: any(e.type == "response.done" for e in ev))
            assert [(e.item.id, e.previous_item_id) for e in of("conversation.item.added")] == [
                ("u1", None), ("s1", None)]
            (retrieved,) = of("conversation.item.retrieved")
            assert retrieved.item.content[0].text == "Hi there."
            assert [e.item_id for e in of("conversation.item.deleted")] == ["s1"]
            (created,), (done,) = of("response.created"), of("response.done")
            assert created.response.metadata == {"turn": "1"} == done.response.metadata
            assert done.response.id == created.response.id and done.response.output == []
            assert done.response.status == "completed"

            sender = asyncio.create_task(stream(
                lambda a: conn.input_audio_buffer.append(audio=a), speech, SAMPLE_RATE,
                lambda x: x.astype("<i2").tobytes()))
            await rx.until(lambda ev: any(e.type == "response.output_audio.delta" for e in ev))
            # A requested response holds the agent's current or next utterance; on a busy machine
            # the one that was playing may end, and no next one start, within response_wait_s:
            # then it completes empty, and the request is made again.
            for attempt in range(2, 8):
                turn = {"turn": str(attempt)}
                await conn.response.create(response={"metadata": turn})
                await rx.until(lambda ev: any(
                    e.type == "response.created" and e.response.metadata == turn for e in ev))
                rid = next(e.response.id for e in of("response.created")
                           if e.response.metadata == turn)
                await rx.until(lambda ev: any(e.type in ("response.output_audio.delta", "response.done")
                                              and getattr(e, "response_id", None) == rid
                                              or e.type == "response.done" and e.response.id == rid
                                              for e in ev))
                if of("response.output_audio.delta", response_id=rid):
                    break
            (added,) = of("response.output_item.added", response_id=rid)
            item_id = added.item.id
            sent_ms = sum(len(base64.b64decode(e.delta)) for e in of(
                "response.output_audio.delta", response_id=rid)) // 48  # 24 kHz pcm16
            await conn.conversation.item.truncate(item_id=item_id, content_index=0,
                                                  audio_end_ms=sent_ms // 2)
            await rx.until(lambda ev: any(e.type == "conversation.item.truncated" for e in ev))
            await conn.conversation.item.retrieve(item_id=item_id)
            await rx.until(lambda ev: any(e.type == "conversation.item.retrieved"
                                          and e.item.id == item_id for e in ev))
            sender.cancel()
            rx.stop()
    # What was said by the truncation point, by the deltas' order: text of a frame follows its
    # audio.
    at_ms, said = 0, []
    for e in rx.events:
        if getattr(e, "response_id", None) != rid:
            continue
        if e.type == "response.output_audio.delta":
            at_ms += len(base64.b64decode(e.delta)) // 48
        elif e.type == "response.output_audio_transcript.delta":
            said.append((at_ms, e.delta))
    (truncated,) = of("conversation.item.truncated")
    assert truncated.item_id == item_id and truncated.audio_end_ms == sent_ms // 2
    retrieved = of("conversation.item.retrieved")[-1].item
    assert retrieved.content[0].transcript == "".join(
        text for t, text in said if t <= sent_ms // 2)
    (done,) = [e for e in of("response.done") if e.response.id == rid]
    assert done.response.metadata == turn
    # Truncated while it spoke, the response is cancelled (and the rest of the utterance muted).
    assert done.response.status in ("cancelled", "completed")
    assert {e.item_id for e in rx.events if getattr(e, "response_id", None) == rid
            and e.type == "response.output_audio.delta"} == {item_id}


@pytest.mark.parametrize("kind,decode", [("audio/pcmu", audioop.ulaw2lin),
                                         ("audio/pcma", audioop.alaw2lin)])
def test_g711_codecs(kind, decode):
    """Encoder and decoder against the stdlib's G.711 and libsoxr: a 440 Hz tone survives."""
    t = np.arange(3 * FRAME_SIZE) / SAMPLE_RATE
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    encoder = AudioEncoder(kind)
    coded = b"".join(base64.b64decode(encoder.encode(tone[i:i + FRAME_SIZE]))
                     for i in range(0, len(tone), FRAME_SIZE))
    assert len(tone) // 3 - 640 < len(coded) <= len(tone) // 3  # 8 kHz, a byte a sample
    out = np.frombuffer(decode(coded, 2), "<i2").astype(np.float32) / 32768
    want = soxr.resample(tone, SAMPLE_RATE, 8000)
    settled = slice(400, len(want) - 400)  # past the resampler's start-up delay
    lag = int(np.argmax(np.correlate(out[settled], want[settled][100:-100]))) - 100
    assert abs(lag) <= 40
    back, rate = decode_audio(base64.b64encode(coded).decode(), kind)
    assert rate == 8000 and np.array_equal(back, np.frombuffer(decode(coded, 2), "<i2"))


# -- bad input, refusals ---------------------------------------------------------------------------

async def raw_connect(session, url: str, token: str = TOKEN, **query):
    ws = await session.ws_connect(f"{url}/v1/realtime", params=query or None,
                                  headers={"Authorization": f"Bearer {token}"})
    return ws


async def next_event(ws, kind: str | None = None, timeout: float = 5.0) -> dict:
    while True:
        msg = await ws.receive(timeout=timeout)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        event = json.loads(msg.data)
        if kind is None or event["type"] == kind:
            return event


async def test_bad_events_get_errors_and_the_session_goes_on(server, session, speech):
    """Malformed events and values get an error naming the offending event_id; the session goes
    on. A session.update still applies its valid fields."""
    ws = await raw_connect(session, server)
    assert (await next_event(ws))["type"] == "session.created"
    chunk = base64.b64encode(speech[:480].tobytes()).decode()
    bad = [
        ({"type": "no.such.event", "event_id": "e1"}, "invalid_event"),
        ({"type": "input_audio_buffer.append", "event_id": "e2", "audio": "***not base64***"},
         "invalid_value"),
        ({"type": "session.update", "event_id": "e3",
          "session": {"audio": {"input": {"format": {"type": "audio/opus"}}}}}, "invalid_value"),
        ({"type": "input_audio_buffer.append", "event_id": "e4", "audio": "A" * (MAX_MESSAGE + 4)},
         "message_too_large"),
        ({"type": "conversation.item.create", "event_id": "e5", "item": {
            "type": "message", "role": "robot", "content": []}}, "invalid_value"),
        ({"type": "response.create", "event_id": "e6", "response": "now"}, "invalid_type"),
        ({"type": "session.update", "event_id": "e7", "session": {"instructions": 5}},
         "invalid_type"),
        ({"type": "input_audio_buffer.commit", "event_id": "e8"},
         "input_audio_buffer_commit_empty"),
        ({"type": "conversation.item.truncate", "event_id": "e9", "item_id": "item_nope",
          "content_index": 0, "audio_end_ms": 10}, "item_truncate_invalid_item_id"),
        ({"type": "conversation.item.retrieve", "event_id": "e10", "item_id": ["x"]},
         "item_retrieve_invalid_item_id"),
        ({"type": "response.cancel", "event_id": "e11", "response_id": "resp_nope"},
         "response_cancel_not_active"),
    ]
    for event, code in bad:
        await ws.send_str(json.dumps(event))
        error = await next_event(ws)
        assert error["type"] == "error", error
        assert error["error"]["code"] == code and error["error"]["event_id"] == event["event_id"]
        assert error["error"]["message"]
        if event["type"] == "session.update":  # the rest of the update applies
            assert (await next_event(ws))["type"] == "session.updated"
    await ws.send_str("not json at all")
    assert (await next_event(ws))["error"]["code"] == "invalid_json"
    # Still alive: a good update and audio are taken.
    await ws.send_str(json.dumps({"type": "session.update", "session": {
        "audio": {"input": {"format": {"type": "audio/pcma"}}}}}))
    assert (await next_event(ws))["type"] == "session.updated"
    await ws.send_str(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
    await ws.send_str(json.dumps({"type": "input_audio_buffer.commit", "event_id": "c1"}))
    committed = await next_event(ws)
    assert committed["type"] == "input_audio_buffer.committed", committed
    stats = await (await session.get(f"{server}/api/stats",
                                     headers={"Authorization": f"Bearer {TOKEN}"})).json()
    # The oversized event counts as too big, the message that is not JSON as a bad event.
    assert stats["realtime"]["bad_events"] == len(bad) and stats["realtime"]["too_big"] == 1
    await ws.close()


async def test_session_update_applies_field_by_field(server, session, caplog):
    """A framework's default session (LiveKit's, here, plus a malformed output format): every
    field applies or is accepted as not in effect, reported as it is in effect and logged once;
    only the malformed one gets an error, naming its param."""
    ws = await raw_connect(session, server, model="gpt-realtime")
    created = await next_event(ws)
    assert created["session"]["model"] == "tiny-random"  # whatever name the client asked for
    update = {"type": "session.update", "event_id": "u1", "session": {
        "type": "realtime", "model": "gpt-realtime", "output_modalities": ["audio"],
        "instructions": "You are a helpful assistant.", "tool_choice": "auto",
        "max_output_tokens": "inf", "tracing": None, "tools": [
            {"type": "function", "name": "lookup", "parameters": {"type": "object"}}],
        "audio": {
            "input": {"format": {"type": "audio/pcmu"}, "noise_reduction": {"type": "near_field"},
                      "transcription": {"model": "gpt-4o-mini-transcribe"},
                      "turn_detection": {"type": "semantic_vad", "eagerness": "medium",
                                         "create_response": True, "interrupt_response": True}},
            "output": {"format": {"type": "audio/opus"}, "voice": "marin", "speed": 1.2}}}}
    with caplog.at_level("INFO", logger="duplex_agent.streams.realtime.session"):
        for _ in range(2):
            await ws.send_str(json.dumps(update))
            error = await next_event(ws)
            assert error["type"] == "error" and error["error"]["event_id"] == "u1"
            assert error["error"]["param"] == "session.audio.output.format"
            updated = (await next_event(ws))["session"]
    notes = [r.getMessage() for r in caplog.records if "not in effect" in r.getMessage()]
    ignored = {"session.model", "session.instructions", "session.tools",
               "session.audio.input.noise_reduction",
               "session.audio.input.transcription", "session.audio.input.turn_detection.type",
               "session.audio.input.turn_detection.interrupt_response",
               "session.audio.output.voice", "session.audio.output.speed"}
    assert sorted(n.split()[3] for n in notes) == sorted(ignored)  # once each, though sent twice
    audio = updated["audio"]
    assert audio["input"]["format"]["type"] == "audio/pcmu"  # applied
    assert audio["output"]["format"]["type"] == "audio/pcm"  # unchanged: the bad value
    assert audio["input"]["transcription"] is None and audio["input"]["noise_reduction"] is None
    assert audio["input"]["turn_detection"]["type"] == "server_vad"
    assert audio["input"]["turn_detection"]["interrupt_response"] is False
    assert audio["output"]["voice"] is None and audio["output"]["speed"] == 1.0
    assert updated["instructions"] == "" and updated["tools"] == []
    assert updated["model"] == "tiny-random"
    await ws.close()


async def test_refusals(server, session, agent):
    from websockets.exceptions import InvalidStatus
    with pytest.raises(InvalidStatus) as refused:
        async with sdk(server, token="wrong").realtime.connect(model="tiny-random"):
            pass
    assert refused.value.response.status_code == 401

    # Browsers cannot set headers: OpenAI's clients pass the key as a websocket subprotocol.
    ws = await session.ws_connect(f"{server}/v1/realtime", protocols=(
        "realtime", f"openai-insecure-api-key.{TOKEN}"))
    assert ws.protocol == "realtime" and (await next_event(ws))["type"] == "session.created"
    await ws.close()

    # Refused before the upgrade, with an HTTP status: bad sampling parameters ...
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await raw_connect(session, server, seed="seven")
    assert refused.value.status == 400

    calls = f"{server}/v1/realtime/calls"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with session.post(calls, data="v=0", headers={"Content-Type": "application/sdp"}) as r:
        assert r.status == 401
    async with session.post(calls, data="v=0\r\n", headers={**auth,
                                                           "Content-Type": "application/sdp"}) as r:
        assert r.status == 400 and "offer" in (await r.json())["error"]
    async with session.post(calls, data="v=0", headers={**auth, "Content-Type": "text/plain"}) as r:
        assert r.status == 400 and "application/sdp" in (await r.json())["error"]
    assert agent.active == 0

    held = [agent.open() for _ in range(CAPACITY)]  # every slot taken
    try:
        with pytest.raises(InvalidStatus) as refused:  # ... and a full server
            async with sdk(server).realtime.connect(model="tiny-random"):
                pass
        assert refused.value.response.status_code == 503
        async with session.post(calls, data="v=0\r\n", headers={
                **auth, "Content-Type": "application/sdp"}) as r:
            assert r.status == 503 and "full" in (await r.json())["error"]
    finally:
        for conv in held:
            conv.close()


# -- sharing the engine ----------------------------------------------------------------------------

async def test_realtime_and_moshi_clients_share_ticks(server, speech, agent):
    """One engine serves both protocols: their conversations step in the same ticks."""
    from duplex_agent.streams.loadtest import MoshiClient
    agent._driver.batch_sizes.clear()
    async with aiohttp.ClientSession() as http:
        moshi = await MoshiClient.connect(http, server.replace("http", "ws") + "/api/chat",
                                          token=TOKEN)
        async with sdk(server).realtime.connect(model="tiny-random") as conn:
            rx = Receiver(conn)

            async def moshi_side():
                t0 = time.monotonic()
                for i in range(0, len(speech), FRAME_SIZE):
                    await asyncio.sleep(max(0.0, t0 + i / SAMPLE_RATE - time.monotonic()))
                    await moshi.send_frame(speech[i:i + FRAME_SIZE].astype(np.float32) / 32768)

            async def realtime_side():
                # Real-time clients at unrelated phases may well never meet in a tick; one
                # second sent at once (inside the input backlog) is queued across several of
                # the Moshi client's frames, so ticks must take both.
                await asyncio.sleep(0.2)
                burst, n = speech[:SAMPLE_RATE], int(SAMPLE_RATE * CHUNK_S)
                for k in range(0, len(burst), n):
                    await conn.input_audio_buffer.append(
                        audio=base64.b64encode(burst[k:k + n].astype("<i2").tobytes()).decode())
            await asyncio.gather(moshi_side(), realtime_side())
            await moshi.wait_for_outputs(10)
            rx.stop()
        await moshi.close()
    assert max(agent._driver.batch_sizes) >= 2
    assert moshi.result.received_frames > 0 and not moshi.result.errors
    assert any(e.type == "response.output_audio.delta" for e in rx.events)


# -- WebRTC ----------------------------------------------------------------------------------------

async def test_webrtc_call(server, speech, agent):
    """An aiortc peer calls through the SDK's `realtime.calls.create` (multipart with a session):
    the answer comes back, the agent's audio arrives on the track and the events on `oai-events`."""
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import AudioStreamTrack, MediaStreamError
    from av import AudioFrame

    class Speech(AudioStreamTrack):
        """The recording in AudioStreamTrack's 20 ms frames (8 kHz, paced by it), then silence."""
        def __init__(self):
            super().__init__()
            self.pcm = soxr.resample(speech.astype(np.float32) / 32768, SAMPLE_RATE, 8000)
            self.at = 0

        async def recv(self):
            frame = await super().recv()  # silence with the right timing
            chunk = self.pcm[self.at:self.at + frame.samples]
            self.at += frame.samples
            if len(chunk) == frame.samples:
                out = AudioFrame.from_ndarray((chunk * 32767).astype(np.int16).reshape(1, -1),
                                              format="s16", layout="mono")
                out.sample_rate, out.pts, out.time_base = 8000, frame.pts, frame.time_base
                return out
            return frame

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(Speech())
    messages = []
    channel = pc.createDataChannel("oai-events")
    channel.on("message", lambda m: messages.append(json.loads(m)))
    received = []

    @pc.on("track")
    def on_track(track):
        async def read():
            try:
                while True:
                    received.append((await track.recv()).to_ndarray())
            except MediaStreamError:  # the call ended
                pass
        asyncio.ensure_future(read())

    await pc.setLocalDescription(await pc.createOffer())
    answer = await sdk(server).realtime.calls.create(
        sdp=pc.localDescription.sdp, session={"type": "realtime", "model": "tiny-random"})
    await pc.setRemoteDescription(RTCSessionDescription(answer.text, "answer"))
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (
                any(m["type"] == "input_audio_buffer.speech_stopped" for m in messages)
                and any(m["type"] == "response.done" for m in messages)):
            await asyncio.sleep(0.05)
        types = [m["type"] for m in messages]
        assert types[0] == "session.created", types
        assert "input_audio_buffer.speech_started" in types
        assert "response.created" in types and "output_audio_buffer.started" in types
        assert "response.output_audio.delta" not in types  # the audio is on the track
        assert sum(len(a.reshape(-1)) for a in received) > 0
        assert np.abs(np.concatenate([a.reshape(-1) for a in received])).max() > 0
        # Audio over the data channel is refused: it belongs on the track.
        messages.clear()
        channel.send(json.dumps({"type": "input_audio_buffer.append", "event_id": "x",
                                 "audio": ""}))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(m["type"] == "error" for m in messages):
            await asyncio.sleep(0.05)
        error = next(m for m in messages if m["type"] == "error")
        assert error["error"]["event_id"] == "x"
    finally:
        await pc.close()
    deadline = time.monotonic() + 10
    while agent.active and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def test_time_limits(agent, tmp_path):
    """Idle before the first audio, and the maximum length after it: an error event, then the
    socket closes and the slot is free."""
    policy = Policy(auth_token=TOKEN, idle_timeout_s=0.4, max_conversation_s=0.8)
    async with helpers.serving(agent, static_dir=tmp_path, policy=policy) as url:
        async with aiohttp.ClientSession() as http:
            ws = await raw_connect(http, url)
            assert (await next_event(ws))["type"] == "session.created"
            error = await next_event(ws)  # no audio at all
            assert error["type"] == "error" and error["error"]["code"] == "idle_timeout"
            assert (await ws.receive()).type == aiohttp.WSMsgType.CLOSE

            ws = await raw_connect(http, url)
            chunk = base64.b64encode(bytes(960)).decode()  # 20 ms of silence

            async def keep_sending():  # audio keeps coming: only the length limit can end it
                while True:
                    await ws.send_str(json.dumps({"type": "input_audio_buffer.append",
                                                  "audio": chunk}))
                    await asyncio.sleep(CHUNK_S)
            sender = asyncio.create_task(keep_sending())
            try:
                error = await next_event(ws, "error")
            finally:
                sender.cancel()
            assert error["error"]["code"] == "max_length", error
            assert (await ws.receive()).type == aiohttp.WSMsgType.CLOSE
        for _ in range(100):
            if not agent.active:
                break
            await asyncio.sleep(0.02)
        assert agent.active == 0


async def test_persona_from_session(tmp_path):
    """instructions, audio.output.voice and the system text items added before the first audio
    become the conversation's text and voice prompts when it opens; OpenAI's voice names are
    accepted and leave the checkpoint's, unknown ones are errors; later changes are reported as
    not in effect."""
    persona = Agent.load("tiny-random-personaplex", device="cpu", max_conversations=1)
    try:
        async with helpers.serving(persona, static_dir=tmp_path) as url, openai.AsyncOpenAI(
                base_url=f"{url}/v1", api_key="-", max_retries=0
        ).realtime.connect(model="tiny-random-personaplex") as conn:
            assert (await conn.recv()).type == "session.created"
            await conn.session.update(session={"type": "realtime", "audio": {
                "output": {"voice": "NATX9"}}}, event_id="bad-voice")
            error = await conn.recv()
            assert error.type == "error" and error.error.event_id == "bad-voice"
            assert "NATF0.pt" in error.error.message  # the available voices are listed
            assert (await conn.recv()).type == "session.updated"
            await conn.session.update(session={"type": "realtime", "audio": {
                "output": {"voice": "alloy"}}})
            updated = await conn.recv()
            assert updated.type == "session.updated" and updated.session.audio.output.voice is None
            await conn.session.update(session={"type": "realtime", "instructions": "You are a "
                                               "patient teacher.", "audio": {"output": {
                                                   "voice": "NATM1"}}})
            updated = await conn.recv()
            assert updated.type == "session.updated"
            assert updated.session.audio.output.voice == "NATM1.pt"
            frame = base64.b64encode(bytes(3840)).decode()
            await conn.input_audio_buffer.append(audio=frame, event_id="too-long")
            error = await conn.recv()  # the tiny model's context cannot hold this prompt
            assert error.type == "error" and error.error.event_id == "too-long"
            assert "prompt" in error.error.message and not persona.conversations()
            await conn.session.update(session={"type": "realtime", "instructions": "Teach."})
            assert (await conn.recv()).type == "session.updated"
            await conn.conversation.item.create(item={
                "type": "message", "role": "system",
                "content": [{"type": "input_text", "text": "Kind."}]})
            assert (await conn.recv()).type == "conversation.item.added"
            assert (await conn.recv()).type == "conversation.item.done"
            await conn.input_audio_buffer.append(audio=frame)  # opens the conversation
            await conn.session.update(session={"type": "realtime", "instructions": "Be rude.",
                                               "audio": {"output": {"voice": "NATF0"}}})
            updated = await conn.recv()
            assert updated.type == "session.updated", updated
            assert updated.session.instructions == "Teach."
            assert updated.session.audio.output.voice == "NATM1.pt"
            (conv,) = persona.conversations()
            assert conv.voice_prompt == "NATM1.pt" and conv.text_prompt == "Teach.\nKind."
    finally:
        persona.close()


async def test_loadtest_speaks_realtime(server, speech):
    """`loadtest --protocol realtime`: two clients, their deltas counted, the server's latency
    read back."""
    from duplex_agent.streams.loadtest import format_report, run_load
    pcm = speech[:15 * FRAME_SIZE].astype(np.float32) / 32768
    report = await run_load(server.replace("http", "ws") + "/v1/realtime", 2, 1.2, pcm,
                            token=TOKEN, drain_s=5, protocol="realtime")
    assert report["failed_conversations"] == 0, report["errors"]
    assert report["sent_frames"] == 2 * 15 and report["received_frames"] > 0
    assert report["server_stats"]["realtime"]["delta_latency_ms"]["count"] > 0
    assert "delta out" in format_report(report)

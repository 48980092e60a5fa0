"""The `serve` command end to end on 127.0.0.1: Moshi's websocket protocol, concurrency and
refusal, the stats and static routes, and the command itself.

A real server (aiohttp AppRunner, ephemeral port) fronts one tiny-random agent with three
conversation slots. Clients speak Ogg/Opus with sphn, as the moshi web client does.
"""
import asyncio
import json
import signal
import sys

import aiohttp
import numpy as np
import pytest

from duplex_agent.agent.config import FRAME_SIZE, SAMPLE_RATE
from duplex_agent.streams.security import refuse_full
from duplex_agent.streams.server import create_app
from tests.helpers import agent_fixture, espeak_frames, serving, start_serve
from tests.moshi_client import Client

CAPACITY = 3


agent = agent_fixture(conversations=CAPACITY)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    """3 s of real speech: 24 kHz mono float32, a whole number of frames."""
    return espeak_frames("Hello, who are you? Tell me about the weather in Paris today, please.",
                         "en", tmp_path_factory.mktemp("speech") / "speech.wav",
                         3 * SAMPLE_RATE // FRAME_SIZE)


@pytest.fixture
async def server(agent, tmp_path):
    """Base URL of a live server whose static folder is the (empty) tmp_path. On teardown, every
    conversation slot must have been freed."""
    async with serving(agent, static_dir=tmp_path) as url:
        yield url
    assert agent.active == 0


async def get_stats(session, url: str) -> dict:
    async with session.get(f"{url}/api/stats") as r:
        assert r.status == 200 and r.content_type == "application/json"
        return await r.json()


# -- one conversation ------------------------------------------------------------------------------

async def test_conversation_streams_audio_and_text(server, session, speech):
    client = await Client.connect(session, server)
    assert await client.wait_for(lambda: client.messages)
    assert client.messages[0] == b"\x00"  # the handshake comes first and is exactly one byte

    await client.send_audio(speech)  # 3 s in real time
    # One output frame per input frame (the first is the model's one-step lag, as silence).
    await client.wait_for(lambda: client.samples >= len(speech), timeout=5)
    assert abs(client.samples - len(speech)) <= 2 * FRAME_SIZE
    assert client.text  # the tiny model always talks
    assert set(client.kinds) == {0, 1, 2} and client.kinds.count(0) == 1
    assert not client.errors and not client.non_binary
    assert np.abs(np.concatenate(client.pcm)).max() > 0.0

    stats = await get_stats(session, server)
    assert stats["active"] == 1 and stats["capacity"] == CAPACITY
    assert stats["engine"]["checkpoint"] == "tiny-random" and stats["engine"]["device"] == "cpu"
    assert stats["engine"]["kv_cache"] == "float32"
    # On CPU every kernel runs its torch reference, and the stats say so kernel by kernel.
    assert stats["engine"]["kernels"] == {k: {"path": "torch"} for k in (
        "decode_attention", "rms_norm", "silu_gate", "embedding", "sampling")}
    assert stats["engine"]["cuda_graphs"] is False
    (conv,) = stats["conversations"]
    assert conv["frames_in"] == len(speech) // FRAME_SIZE and conv["dropped_input_frames"] == 0
    assert stats["engine"]["ticks"] > 0 and stats["engine"]["tick_ms_p50"] > 0
    await client.close()


async def test_query_parameters_set_sampling(server, session, speech):
    """Seeded conversations repeat exactly; audio_seed wins over text_seed; zero temperatures
    are greedy whatever the seed."""
    async def converse(**query) -> tuple[list[str], np.ndarray]:
        client = await Client.connect(session, server, **query)
        await client.send_audio(speech[:12 * FRAME_SIZE], pace=False)  # within the 2 s backlog
        assert await client.wait_for(lambda: client.samples >= 12 * FRAME_SIZE)
        await client.close()
        assert client.kinds[0] == 0 and not client.errors
        return client.text, np.concatenate(client.pcm)

    sampled = dict(text_temperature="0.9", text_topk="50", audio_temperature="0.9", audio_topk="100")
    text, pcm = await converse(**sampled, audio_seed="123")
    text_b, pcm_b = await converse(**sampled, text_seed="999", audio_seed="123")
    assert text == text_b and np.array_equal(pcm, pcm_b)
    text_c, pcm_c = await converse(**sampled, audio_seed="124")
    assert (text, pcm.tobytes()) != (text_c, pcm_c.tobytes())

    greedy = dict(text_temperature="0", audio_temperature="0")
    text_1, pcm_1 = await converse(**greedy, audio_seed="1")
    text_2, pcm_2 = await converse(**greedy, audio_seed="2")
    assert text_1 == text_2 and np.array_equal(pcm_1, pcm_2)


# -- protocol errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("query", [
    {"text_temperature": "abc"}, {"audio_temperature": "nan"}, {"text_temperature": "-1"},
    {"text_topk": "2.5"}, {"audio_seed": "-3"},
])
async def test_bad_query_parameter_is_an_error(server, session, agent, query):
    client = await Client.connect(session, server, **query)
    await client.wait_closed()
    assert client.kinds == [5]  # no handshake
    (name,) = query
    assert name in client.errors[0]
    assert agent.active == 0


async def test_garbage_audio_is_an_error(server, session, agent):
    client = await Client.connect(session, server)
    assert await client.wait_for(lambda: client.messages)
    await client.ws.send_bytes(b"\x01" + b"this is not an Ogg stream. " * 10)
    await client.wait_closed()
    assert client.kinds[0] == 0 and client.kinds[-1] == 5
    assert "invalid audio" in client.errors[0]
    assert agent.active == 0
    assert (await get_stats(session, server))["websocket"]["bad_audio"] == 1


async def test_unknown_messages_are_ignored(server, session, speech):
    client = await Client.connect(session, server)
    await client.ws.send_bytes(b"\x42hello")  # unknown kind
    await client.ws.send_bytes(b"\x03\x00")  # control: unused in full-duplex streaming
    await client.ws.send_bytes(b"")
    await client.ws.send_str("a text frame")
    await client.send_audio(speech[:5 * FRAME_SIZE], pace=False)
    assert await client.wait_for(lambda: client.samples >= 5 * FRAME_SIZE)
    assert not client.errors and not client.closed
    assert (await get_stats(session, server))["websocket"]["ignored_messages"] == 4
    await client.close()


async def test_oversized_message_closes_the_socket(server, session, agent):
    client = await Client.connect(session, server)
    await client.ws.send_bytes(b"\x01" + bytes(2 << 20))
    await client.wait_closed()
    assert client.ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    assert agent.active == 0


async def test_engine_failure_is_reported(server, session, agent, speech, monkeypatch):
    def broken_tick(frames, owners=None):
        raise RuntimeError("simulated failure")
    monkeypatch.setattr(agent.engine, "tick", broken_tick)
    client = await Client.connect(session, server)
    await client.send_audio(speech[:2 * FRAME_SIZE], pace=False)
    await client.wait_closed()
    assert client.kinds == [0, 5] and "internal error" in client.errors[0]
    assert agent.active == 0


# -- concurrency -----------------------------------------------------------------------------------

async def test_concurrent_conversations_and_refusal(server, session, agent, speech):
    clients = [await Client.connect(session, server) for _ in range(CAPACITY)]
    for client in clients:
        assert await client.wait_for(lambda: client.messages)
        assert client.messages[0] == b"\x00"

    extra = await Client.connect(session, server)  # one too many: refused at once
    await extra.wait_closed()
    assert extra.kinds == [5] and "full" in extra.errors[0]
    assert (await get_stats(session, server))["active"] == CAPACITY

    sent = speech[:25 * FRAME_SIZE]  # 2 s each, all at once
    await asyncio.gather(*(c.send_audio(sent) for c in clients))
    for client in clients:
        await client.wait_for(lambda: client.samples >= len(sent), timeout=5)
        assert abs(client.samples - len(sent)) <= 2 * FRAME_SIZE and client.text
    assert max(agent._driver.batch_sizes) >= 2  # the conversations shared engine ticks

    await clients[0].close()  # its slot is free by the time the close is acknowledged
    late = await Client.connect(session, server)
    assert await late.wait_for(lambda: late.messages)
    assert late.messages[0] == b"\x00"
    for client in clients[1:] + [late]:
        await client.close()


def test_refuse_full_is_503_json(agent):
    response = refuse_full(agent)
    assert response.status == 503
    body = json.loads(response.body)
    assert body["capacity"] == CAPACITY and "full" in body["error"]


# -- HTTP routes and the command -------------------------------------------------------------------

async def test_index_and_static_files(server, session, tmp_path):
    async with session.get(f"{server}/") as r:
        assert r.status == 404 and "index.html" in await r.text()
    (tmp_path / "index.html").write_text("<!doctype html><title>duplex</title>")
    (tmp_path / "app.js").write_text("console.log('hi')")
    async with session.get(f"{server}/") as r:
        assert r.status == 200 and "<title>duplex</title>" in await r.text()
    async with session.get(f"{server}/app.js") as r:
        assert r.status == 200 and "console.log" in await r.text()
    async with session.get(f"{server}/api/stats") as r:  # routes win over files
        assert r.status == 200


def test_app_without_webrtc_module(agent, monkeypatch, caplog):
    import duplex_agent.streams as streams
    monkeypatch.delattr(streams, "webrtc", raising=False)
    monkeypatch.setitem(sys.modules, "duplex_agent.streams.webrtc", None)  # as if streams/webrtc.py were absent
    app = create_app(agent)
    paths = {r.resource.canonical for r in app.router.routes()}
    assert {"/", "/api/chat", "/api/stats"} <= paths and "/offer" not in paths
    assert "WebRTC" in caplog.text


async def test_serve_command(session):
    proc, url, output = await start_serve("--checkpoint", "tiny-random", "--port", "0",
                                          "--device", "cpu", "--max-sessions", "2")
    try:
        assert b"(2 conversations max; tiny-random on cpu" in output
        client = await Client.connect(session, url)
        assert await client.wait_for(lambda: client.messages)
        stats = await get_stats(session, url)
        assert stats["active"] == 1 and stats["capacity"] == 2
        # Ctrl+C with a conversation open: the socket is closed for the client, the server exits 0.
        proc.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, (output + rest).decode()
        await client.wait_closed()
        assert client.ws.close_code == aiohttp.WSCloseCode.GOING_AWAY
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_settle_heap_sets_what_is_alive_aside_from_full_collections():
    """`serve`, `local` and the cluster replicas call it once the model is loaded."""
    import gc

    from duplex_agent.streams.server import settle_heap
    alive = [[i] for i in range(20_000)]  # tracked containers, like a loaded library's
    assert any(o is alive for o in gc.get_objects())
    frozen = settle_heap()
    assert frozen >= len(alive)
    assert not any(o is alive for o in gc.get_objects())  # a full collection no longer walks them

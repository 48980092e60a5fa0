"""Phone calls (streams/phone/) end to end on 127.0.0.1: Twilio's signed webhook, the TwiML, and
the media stream, with a test peer that speaks Twilio's documented messages.

The server believes it is reached at https://phone.example.test (its --public-url), as behind a
proxy: the webhook is signed for that URL, and the peer opens the TwiML's wss:// stream on the
local port instead, as the proxy would forward it. The `twilio` library only signs the webhooks;
the TwiML is read with ElementTree. The peer plays the agent's audio on a real-time clock and
echoes each mark once the audio before it has played, as Twilio does.
"""
from __future__ import annotations

import asyncio
import audioop
import base64
import secrets
import socket
import time
import xml.etree.ElementTree as ElementTree

import aiohttp
import numpy as np
import pytest
import soxr
from aiohttp import web
from twilio.request_validator import RequestValidator

from duplex_agent.agent.api import Agent, DtmfIn
from duplex_agent.agent.config import FRAME_SIZE, SAMPLE_RATE
from duplex_agent.streams.loadtest import MoshiClient, scrape_metrics
from duplex_agent.streams.phone.twilio import CHUNK_BYTES, MAX_QUEUED_MS, CallStats, Playout
from duplex_agent.streams.phone.webhook import BUSY_MESSAGE, PhoneSettings
from duplex_agent.streams.server import create_app
from tests.helpers import agent_fixture, espeak_frames
from tests.twilio_peer import (PUBLIC_URL, TWILIO_TOKEN, TwilioPeer, call_webhook, local, new_call_sid,
                               webhook_form)

CAPACITY = 3
CONNECT_TIMEOUT_S = 3.0
FRAME_S = FRAME_SIZE / SAMPLE_RATE


agent = agent_fixture(conversations=CAPACITY)


@pytest.fixture(scope="module")
def speech24(tmp_path_factory) -> np.ndarray:
    """2 s of espeak-ng speech at 24 kHz, whole frames."""
    return espeak_frames("Hello, I would like to book a table for two tonight.", "en",
                         tmp_path_factory.mktemp("speech") / "s.wav", 25)


@pytest.fixture(scope="module")
def caller(speech24) -> bytes:
    """The same speech as a phone carries it: μ-law, 8 kHz, a whole number of 20 ms chunks."""
    pcm = soxr.resample(speech24, SAMPLE_RATE, 8000)
    ulaw = audioop.lin2ulaw((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes(), 2)
    return ulaw[:len(ulaw) // CHUNK_BYTES * CHUNK_BYTES]


async def serving(agent, public_url: str | None = None, **settings):
    """`agent` served with a phone line on a free local port; returns (runner, base URL)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    phone = PhoneSettings(TWILIO_TOKEN, public_url or url, **settings)
    runner = web.AppRunner(create_app(agent, phone=phone))
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner, url


@pytest.fixture
async def server(agent):
    runner, url = await serving(agent, PUBLIC_URL, connect_timeout_s=CONNECT_TIMEOUT_S)
    yield url
    await runner.cleanup()
    assert agent.active == 0


# -- Twilio's side (tests/twilio_peer.py) ---------------------------------------------------------

async def open_call(session, server: str, call_sid: str | None = None) -> TwilioPeer:
    call_sid = call_sid or new_call_sid()
    status, body = await call_webhook(session, server, call_sid)
    assert status == 200, body
    stream = ElementTree.fromstring(body).find("Connect/Stream")
    ws = await session.ws_connect(local(stream.get("url"), server))
    return TwilioPeer(ws, call_sid)


async def get_stats(session, server: str) -> dict:
    async with session.get(f"{server}/api/stats") as r:
        assert r.status == 200
        return await r.json()


async def wait_until(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return bool(condition())


# -- a call ----------------------------------------------------------------------------------------

async def test_a_call_beside_a_moshi_client(server, session, agent, caller, speech24):
    """Signed webhook -> TwiML -> media stream; the agent's μ-law comes back in 20 ms messages for
    the call's streamSid, marks are echoed and the lag reported, keys reach the conversation, and
    `stop` frees the slot, while a Moshi websocket client talks in the same engine ticks."""
    call_sid = new_call_sid()
    status, body = await call_webhook(session, server, call_sid)
    assert status == 200
    twiml = ElementTree.fromstring(body)
    assert [e.tag for e in twiml] == ["Connect"]
    stream = twiml.find("Connect/Stream")
    assert stream.get("url").startswith("wss://phone.example.test/twilio/stream/")
    assert stream.findall("Parameter") == []  # tiny-random has no persona
    agent._driver.batch_sizes.clear()
    moshi = await MoshiClient.connect(session, server.replace("http", "ws", 1) + "/api/chat")
    peer = TwilioPeer(await session.ws_connect(local(stream.get("url"), server)), call_sid)
    await peer.start()

    async def moshi_side():
        t0 = time.monotonic()
        for k in range(0, len(speech24), FRAME_SIZE):
            await asyncio.sleep(max(0.0, t0 + k / SAMPLE_RATE - time.monotonic()))
            await moshi.send_frame(speech24[k:k + FRAME_SIZE])

    # The call's first second comes at once (a network hiccup): queued in its backlog, its
    # frames are stepped across several of the Moshi client's, so ticks must take both.
    await asyncio.gather(moshi_side(), peer.speak(caller, burst_chunks=50, keys={30: "4", 60: "#"}))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the line carries silence until a mark (not cleared by
        stats = await get_stats(session, server)  # a cut of the burst's answer) is echoed
        (call,) = stats["phone"]["calls"]
        if call["marks_echoed"]:
            break
        await peer.speak(b"\xff" * 4 * CHUNK_BYTES)
    frames = peer.sent_bytes // (4 * CHUNK_BYTES)
    # The last answers are sent and the last chunks heard: until the counts checked below are
    # reached, or a generous deadline passes (the assertions then say what fell short).
    deadline = time.monotonic() + 10
    while True:
        stats = await get_stats(session, server)
        (call,) = stats["phone"]["calls"]
        conv = next((c for c in stats["conversations"] if c["id"] == call["conversation"]), None)
        if (call["media_out"] + call["cut_ms"] // 20 >= 4 * (frames - 2)
                and call["media_in"] == peer.sent_bytes // CHUNK_BYTES
                and conv is not None and conv["frames_in"] >= frames - 1) \
                or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    # Every answer was sent or cut (the resamplers hold back about one frame).
    assert call["media_out"] + call["cut_ms"] // 20 >= 4 * (frames - 2)
    assert call["call_sid"] == call_sid and call["stream_sid"] == peer.stream_sid
    # Every byte the caller sent was heard; nothing before start, nothing lost.
    assert call["heard_ms"] == peer.sent_bytes / 8 and call["unheard_ms"] == 0
    assert call["media_in"] == peer.sent_bytes // CHUNK_BYTES and call["lost_chunks"] == 0
    conv = next(c for c in stats["conversations"] if c["id"] == call["conversation"])
    assert conv["frames_in"] >= frames - 1 and conv["dropped_input_frames"] == 0
    assert call["dtmf"] == "4#" and conv["dtmf_digits"] == 2
    assert call["marks_echoed"] >= 1 and call["playback_lag_ms"]["count"] == call["marks_echoed"]
    # A mark comes back only once the 20 ms before it has played at the peer.
    assert call["playback_lag_ms"]["p50"] >= 20
    assert stats["phone"]["playback_lag_ms"]["count"] >= call["marks_echoed"]
    metrics = await scrape_metrics(session, server.replace("http", "ws", 1))
    assert metrics[f'duplex_phone_call_playback_lag_seconds{{call_sid="{call_sid}"}}'] > 0
    assert metrics["duplex_phone_playback_lag_seconds_count"] >= call["marks_echoed"]
    assert metrics["duplex_phone_dtmf_digits_total"] == 2

    await peer.stop()
    await peer.wait_closed()  # the server hangs up after `stop`
    assert await wait_until(lambda: agent.active == 1)  # the Moshi client's is left
    assert (await get_stats(session, server))["phone"]["calls"] == []
    await moshi.close()

    # What came back: media, marks (and clears after a cut), all for this stream.
    kinds = {e["event"] for _, e in peer.received}
    assert kinds <= {"media", "mark", "clear"} and "mark" in kinds
    assert {e["streamSid"] for _, e in peer.received} == {peer.stream_sid}
    payloads = [base64.b64decode(e["media"]["payload"]) for e in peer.events("media")]
    assert {len(p) for p in payloads} == {CHUNK_BYTES}  # 20 ms each
    pcm = np.frombuffer(audioop.ulaw2lin(b"".join(payloads), 2), "<i2")
    assert np.abs(pcm).max() > 0  # the tiny model's noise, not silence
    marks = [e["mark"]["name"] for e in peer.events("mark")]
    assert len(set(marks)) == len(marks) and set(peer.echoed) <= set(marks)
    # Cut audio (the burst's answer piling up) and clears go together.
    counters = (await get_stats(session, server))["phone"]
    assert counters["clears"] == len(peer.events("clear"))
    assert (counters["cut_ms"] > 0) == (counters["clears"] > 0)
    assert max(agent._driver.batch_sizes) >= 2
    assert moshi.result.received_frames > 0 and not moshi.result.errors


# -- refusals --------------------------------------------------------------------------------------

async def test_webhook_signature_credential_and_capacity(server, session, agent, caller):
    sid = new_call_sid()
    # Signed with another token, signed for the local address rather than the public URL, unsigned.
    assert (await call_webhook(session, server, sid, token="not-the-token"))[0] == 403
    assert (await call_webhook(session, server, sid,
                               signed_url=f"{server}/twilio/voice"))[0] == 403
    assert (await call_webhook(session, server, sid, signature=""))[0] == 403
    # The signature covers the query string: a persona added on the way is not signed.
    form = webhook_form(sid)
    signature = RequestValidator(TWILIO_TOKEN).compute_signature(f"{PUBLIC_URL}/twilio/voice", form)
    async with session.post(f"{server}/twilio/voice?text_prompt=x", data=form,
                            headers={"X-Twilio-Signature": signature}) as r:
        assert r.status == 403
    assert agent.active == 0

    status, body = await call_webhook(session, server, sid)
    url = local(ElementTree.fromstring(body).find("Connect/Stream").get("url"), server)
    for wrong in (url.rsplit("/", 1)[0] + "/" + secrets.token_urlsafe(24),
                  url.rsplit("/", 1)[0]):  # another credential, none at all
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(wrong)
        assert refused.value.status in (403, 404)
    peer = TwilioPeer(await session.ws_connect(url), sid)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:  # the credential is used up
        await session.ws_connect(url)
    assert refused.value.status == 403
    await peer.start()
    await peer.speak(caller[:10 * CHUNK_BYTES])
    assert await wait_until(lambda: peer.events("media"))
    await peer.stop()
    await peer.wait_closed()

    # A stream whose start names another call is closed, its slot freed.
    other = await open_call(session, server)
    await other.start(call_sid=new_call_sid())
    await other.wait_closed()
    assert other.ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
    assert await wait_until(lambda: agent.active == 0)

    # A full server says so at once: a <Say> and <Hangup/>, no conversation opened.
    held = [agent.open() for _ in range(CAPACITY)]
    try:
        status, body = await call_webhook(session, server, new_call_sid())
        assert status == 200
        twiml = ElementTree.fromstring(body)
        assert [e.tag for e in twiml] == ["Say", "Hangup"] and twiml[0].text == BUSY_MESSAGE
        assert agent.active == CAPACITY
    finally:
        for conv in held:
            conv.close()

    # A call whose stream never comes frees its slot.
    assert (await call_webhook(session, server, new_call_sid()))[0] == 200
    assert agent.active == 1
    assert await wait_until(lambda: agent.active == 0, CONNECT_TIMEOUT_S + 10)
    phone = (await get_stats(session, server))["phone"]
    assert phone["bad_signatures"] == 4 and phone["bad_credentials"] == 2
    assert phone["refused_full"] == 1 and phone["streams_never_opened"] == 1
    metrics = await scrape_metrics(session, server.replace("http", "ws", 1))
    assert metrics['duplex_refusals_total{reason="auth"}'] == 6
    assert metrics['duplex_refusals_total{reason="full"}'] == 1


async def test_malformed_frames_are_counted_and_the_call_goes_on(server, session, agent, caller,
                                                                speech24):
    """Bad frames are counted and skipped; the call and another conversation go on."""
    moshi = await MoshiClient.connect(session, server.replace("http", "ws", 1) + "/api/chat")
    peer = await open_call(session, server)
    await peer.media(caller[:CHUNK_BYTES])  # before start: unheard, counted
    await peer.start()
    await peer.media("@@not base64@@")
    await peer.media(caller[:100])  # odd sizes: still μ-law, byte for byte
    await peer.media(caller[:321])
    await peer.send({"event": "stream.unknown", "whatever": 1})
    await peer.ws.send_str("not json")
    await peer.ws.send_bytes(b"\x00\x01")
    await peer.ws.send_str("[1, 2]")
    await peer.start()  # a second start
    await peer.send({"event": "dtmf", "dtmf": {"digit": "x"}})
    await peer.send({"event": "mark", "mark": {"name": "never-sent"}})
    t0 = time.monotonic()
    for k in range(0, 10 * FRAME_SIZE, FRAME_SIZE):  # the other conversation talks meanwhile
        await moshi.send_frame(speech24[k:k + FRAME_SIZE])
        await peer.speak(caller[k // 3:(k + FRAME_SIZE) // 3])
        await asyncio.sleep(max(0.0, t0 + (k + FRAME_SIZE) / SAMPLE_RATE - time.monotonic()))
    assert await wait_until(lambda: len(peer.events("media")) >= 20)
    assert not peer.closed and agent.active == 2

    (call,) = (await get_stats(session, server))["phone"]["calls"]
    assert call["unheard_ms"] == 20 and call["heard_ms"] == round((100 + 321 + 10 * 640) / 8)
    assert call["bad_messages"] == 8
    phone = (await get_stats(session, server))["phone"]
    assert {k: phone[k] for k in ("media_before_start", "bad_media", "odd_media", "unknown_events",
                                  "bad_messages", "repeated_starts", "stray_marks",
                                  "unheard_ms")} == {
        "media_before_start": 1, "bad_media": 1, "odd_media": 2, "unknown_events": 1,
        "bad_messages": 4, "repeated_starts": 1, "stray_marks": 1, "unheard_ms": 20}
    await peer.stop()
    await peer.wait_closed()
    assert await wait_until(lambda: agent.active == 1)
    await moshi.wait_for_outputs(5)
    await moshi.close()
    assert moshi.result.received_frames >= 9 and not moshi.result.errors

    # A stream in another format ends cleanly, at its start.
    peer = await open_call(session, server)
    await peer.start(media_format={"encoding": "audio/x-l16", "sampleRate": 16000, "channels": 1})
    await peer.wait_closed()
    assert peer.ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
    assert await wait_until(lambda: agent.active == 0)


# -- pieces ----------------------------------------------------------------------------------------

async def test_playout_paces_marks_and_cuts():
    """20 ms messages on an absolute clock; a mark every 25; audio piling up past MAX_QUEUED_MS
    is cut (oldest first) and a `clear` sent before what is left."""
    loop = asyncio.get_running_loop()
    sent: list[tuple[float, dict]] = []

    async def send(message: dict) -> None:
        sent.append((loop.time(), message))

    stats = CallStats("CA1", "c1")
    playout = Playout("MZ1", send, stats)
    task = asyncio.create_task(playout.run())
    tone = (0.3 * np.sin(np.arange(FRAME_SIZE) * 2 * np.pi * 440 / SAMPLE_RATE)).astype(np.float32)
    try:
        playout.feed(tone, time.monotonic())
        await asyncio.sleep(0.01)  # the first message has gone
        playout.feed(tone, time.monotonic())
        assert await wait_until(lambda: len(sent) >= 7, 5)  # 160 ms, less the resampler's 25
        await asyncio.sleep(0.1)
        assert len(sent) == 7 and {m["event"] for _, m in sent} == {"media"}
        times = [t for t, _ in sent]
        assert all(t - times[0] >= i * 0.02 - 1e-6 for i, t in enumerate(times))
        assert stats.latency_ms and stats.cut_ms == 0 and stats.clears == 0

        sent.clear()
        for _ in range(6):  # 480 ms at once
            playout.feed(tone)
        kept = MAX_QUEUED_MS // 20
        assert len(playout._chunks) == kept
        assert stats.cut_ms >= (22 - kept) * 20  # 480 ms, less the resampler's share
        assert await wait_until(lambda: len([m for _, m in sent if m["event"] == "media"]) == kept, 5)
        assert sent[0][1] == {"event": "clear", "streamSid": "MZ1"} and stats.clears == 1
        for _ in range(60):  # in real time now: the 25th message is followed by a mark
            if stats.marks_sent:
                break
            playout.feed(tone)
            await asyncio.sleep(FRAME_S)
        assert stats.marks_sent > 0
        assert stats.clears == 1
        (mark,) = [m for _, m in sent if m["event"] == "mark"]
        assert playout.echoed(mark["mark"]["name"]) > 0 and playout.echoed("m999") is None
        assert stats.marks_echoed == 1
    finally:
        task.cancel()


async def test_keys_reach_the_python_api(agent):
    conv = agent.open()
    try:
        conv.push(np.zeros(SAMPLE_RATE // 2, np.float32))
        conv.press_key("7")
        with pytest.raises(ValueError):
            conv.press_key("x")
        event = None
        while not isinstance(event, DtmfIn):
            event = await asyncio.wait_for(conv.recv(), 5)
        assert event == DtmfIn("7", 0.5) and conv.stats.dtmf_digits == 1
    finally:
        conv.close()


async def test_persona_from_the_webhook_url_or_the_defaults(session):
    """voice_prompt / text_prompt in the (signed) webhook URL, else serve's --phone-voice and
    --phone-role, open the conversation and ride along as the Stream's <Parameter>s."""
    persona = Agent.load("tiny-random-personaplex", device="cpu", max_conversations=2)
    runner, url = await serving(persona, PUBLIC_URL, voice="NATF2.pt", role="Help.")
    try:
        status, body = await call_webhook(session, url, new_call_sid(),
                                          query="?voice_prompt=NATM1.pt&text_prompt=Teach.")
        stream = ElementTree.fromstring(body).find("Connect/Stream")
        assert {p.get("name"): p.get("value") for p in stream.findall("Parameter")} == {
            "voice_prompt": "NATM1.pt", "text_prompt": "Teach."}
        status, body = await call_webhook(session, url, new_call_sid())
        stream = ElementTree.fromstring(body).find("Connect/Stream")
        assert {p.get("name"): p.get("value") for p in stream.findall("Parameter")} == {
            "voice_prompt": "NATF2.pt", "text_prompt": "Help."}
        assert sorted((c.voice_prompt, c.text_prompt) for c in persona.conversations()) == [
            ("NATF2.pt", "Help."), ("NATM1.pt", "Teach.")]
        for conv in persona.conversations():
            conv.close()
        status, body = await call_webhook(session, url, new_call_sid(), query="?voice_prompt=nobody")
        assert [e.tag for e in ElementTree.fromstring(body)] == ["Say", "Hangup"]
        assert not persona.conversations()
    finally:
        await runner.cleanup()
        persona.close()


async def test_loadtest_places_phone_calls(agent, speech24):
    """`loadtest --protocol twilio`: two calls, their audio matched frame by frame, the
    server's playback lag read back."""
    from duplex_agent.streams.loadtest import format_report, run_load
    runner, url = await serving(agent)
    try:
        report = await run_load(f"{url}/twilio/voice", 2, 1.2, speech24[:15 * FRAME_SIZE],
                                drain_s=5, protocol="twilio", twilio_auth_token=TWILIO_TOKEN)
    finally:
        await runner.cleanup()
    assert report["failed_conversations"] == 0, report["errors"]
    assert report["sent_frames"] == 2 * 15 and report["received_frames"] >= 2 * 14
    assert report["latency_ms"]["count"] >= 2 * 14
    assert report["server_stats"]["phone"]["streams"] == 2
    assert "playback lag" in format_report(report)

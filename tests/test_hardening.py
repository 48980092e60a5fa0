"""The server's admission rules, limits, TLS and metrics, end to end on 127.0.0.1.

Each test starts its own server (aiohttp AppRunner, ephemeral port) with the policy it checks, in
front of one shared tiny-random agent with two conversation slots. Clients are the load tool's
Moshi-protocol client (streams/loadtest.py) and plain aiohttp requests. Time limits are set to
fractions of a second so the whole file runs in well under a minute.
"""
from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import ssl
import time

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from duplex_agent.agent.api import AudioOut, ErrorOut
from duplex_agent.agent.config import FRAME_SIZE, SAMPLE_RATE
from duplex_agent.streams.loadtest import ClientResult, MoshiClient, scrape_metrics
from tests.helpers import agent_fixture, start_serve
from duplex_agent.streams.security import Policy, RedactingAccessLogger
from duplex_agent.streams.server import create_app

CAPACITY = 2
FRAME_S = FRAME_SIZE / SAMPLE_RATE
TOKEN = "s3cret-token"


agent = agent_fixture(conversations=CAPACITY)


@pytest.fixture
async def start_server(agent, tmp_path):
    """start(policy, ssl_context) -> base URL of a new live server. On teardown every server stops
    and every conversation slot must be free again."""
    runners = []

    async def start(policy: Policy | None = None, ssl_context=None, profile_stages=None) -> str:
        runner = web.AppRunner(create_app(agent, static_dir=tmp_path, policy=policy,
                                          profile_stages=profile_stages))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
        runners.append(runner)
        return f"{'https' if ssl_context else 'http'}://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()
    assert agent.active == 0


def chat_url(base: str) -> str:
    return base.replace("http", "ws", 1) + "/api/chat"


def tone(frames: int) -> list[np.ndarray]:
    t = np.arange(frames * FRAME_SIZE) / SAMPLE_RATE
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return [pcm[i:i + FRAME_SIZE] for i in range(0, len(pcm), FRAME_SIZE)]


async def connect(session, base: str, **kwargs) -> MoshiClient:
    return await MoshiClient.connect(session, chat_url(base), ClientResult(0), **kwargs)


async def converse(client: MoshiClient, frames: int = 3) -> None:
    """Send `frames` frames at once and wait for their outputs."""
    for frame in tone(frames):
        await client.send_frame(frame)
    await client.wait_for_outputs(10)
    assert client.result.received_frames == frames, client.result


async def metric(session, base: str, name: str, token: str | None = None) -> float:
    samples = await scrape_metrics(session, chat_url(base), token)
    assert samples is not None, "/metrics did not answer"
    return samples.get(name, 0.0)


def refusals(reason: str) -> str:
    return f'duplex_refusals_total{{reason="{reason}"}}'


async def post_offer(session, base: str, body, headers=None) -> tuple[int, dict]:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"Content-Type": "application/json", **(headers or {})}
    async with session.post(f"{base}/offer", data=data, headers=headers) as r:
        return r.status, await r.json()


async def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return bool(condition())


# -- capacity --------------------------------------------------------------------------------------

async def test_full_server_refuses_clearly(start_server, session, agent):
    base = await start_server()
    held = [await connect(session, base) for _ in range(CAPACITY)]
    with pytest.raises(ConnectionError, match="server full"):
        await connect(session, base)  # a 0x05 message instead of the handshake
    status, reply = await post_offer(session, base, {"sdp": "v=0", "type": "offer"})
    assert status == 503 and "full" in reply["error"]
    assert await metric(session, base, refusals("full")) == 1 + 1
    for client in held:
        await converse(client, 2)  # the conversations already open are unaffected
        await client.close()


# -- authentication and origin ---------------------------------------------------------------------

async def test_auth_token(start_server, session):
    base = await start_server(Policy(auth_token=TOKEN))
    for kwargs in ({}, {"token": "wrong"}, {"token": TOKEN[:-1]}):
        with pytest.raises(ConnectionError, match="HTTP 401"):
            await connect(session, base, **kwargs)
    by_header = await connect(session, base, token=TOKEN)  # Authorization: Bearer
    await converse(by_header)
    await by_header.close()
    # ?token= as browsers must send it (their WebSocket cannot set headers)
    by_query = await MoshiClient.connect(session, f"{chat_url(base)}?token={TOKEN}")
    await converse(by_query)
    await by_query.close()

    for path in ("/api/stats", "/metrics"):
        async with session.get(base + path) as r:
            assert r.status == 401 and "token" in (await r.json())["error"]
        async with session.get(f"{base}{path}?token={TOKEN}") as r:
            assert r.status == 200
    async with session.get(base + "/") as r:  # static files stay public
        assert r.status == 404
    status, reply = await post_offer(session, base, {"sdp": "v=0", "type": "offer"})
    assert status == 401 and reply["error"]
    status, reply = await post_offer(session, base, {"type": "offer"},
                                     {"Authorization": f"Bearer {TOKEN}"})
    assert status == 400  # past the token check: the offer itself is what is wrong
    refused = await metric(session, base, refusals("auth"), TOKEN)
    assert refused == 3 + 2 + 1


async def test_allowed_origins(start_server, session):
    base = await start_server(Policy(allowed_origins=frozenset({"https://app.example.com/"})))
    for origin in ("https://evil.example.com", "http://app.example.com", "null"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await session.ws_connect(chat_url(base), headers={"Origin": origin})
        assert e.value.status == 403
    # listed (any case), the server's own page, a program (no Origin)
    for headers in ({"Origin": "https://APP.example.com"}, {"Origin": base}, {}):
        ws = await session.ws_connect(chat_url(base), headers=headers)
        assert (await ws.receive_bytes(timeout=10)) == b"\x00"
        await ws.close()
    status, reply = await post_offer(session, base, {"sdp": "v=0"},
                                     {"Origin": "https://evil.example.com"})
    assert status == 403 and "evil" in reply["error"]
    assert await metric(session, base, refusals("origin")) == 3 + 1


# -- sizes -----------------------------------------------------------------------------------------

async def test_offer_body_limit(start_server, session):
    base = await start_server(Policy(max_offer_bytes=2000))
    big = {"sdp": "v=0\r\n" + "a=x\r\n" * 600, "type": "offer"}
    status, reply = await post_offer(session, base, big)
    assert status == 413 and reply["limit"] == 2000

    async def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(10):
            yield b" " * 500
    async with session.post(f"{base}/offer", data=chunks()) as r:
        assert r.status == 413 and "larger than" in (await r.json())["error"]
    status, _ = await post_offer(session, base, {"sdp": "v=0", "type": "offer"})
    assert status == 400  # under the limit: on to the offer's own checks
    assert await metric(session, base, refusals("size")) == 2
    assert await metric(session, base, refusals("bad_input")) == 1


async def test_websocket_message_limit(start_server, session, agent):
    base = await start_server(Policy(max_message_bytes=4096))
    client = await connect(session, base)
    await converse(client, 2)
    await client.ws.send_bytes(b"\x42" + bytes(4095))  # 4096 bytes: the largest allowed (ignored)
    await converse_more(client, 1)
    await client.ws.send_bytes(b"\x42" + bytes(4096))
    await asyncio.wait_for(client._task, 5)
    assert client.ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    assert await wait_until(lambda: agent.active == 0)
    assert await metric(session, base, 'duplex_websocket_errors_total{kind="too_big"}') == 1
    assert await metric(session, base, 'duplex_conversations_ended_total{reason="too_big"}') == 1


# -- per-client limit ------------------------------------------------------------------------------

async def test_per_client_limit(start_server, session, agent):
    base = await start_server(Policy(max_per_client=1))
    first = await connect(session, base)
    with pytest.raises(ConnectionError, match="too many conversations from 127.0.0.1"):
        await connect(session, base)
    status, reply = await post_offer(session, base, {"sdp": "v=0", "type": "offer"})
    assert status == 429 and reply["limit"] == 1
    assert agent.active == 1  # neither refusal took a slot
    await first.close()
    again = await connect(session, base)  # the address's conversation ended: room again
    await converse(again)
    await again.close()
    assert await metric(session, base, refusals("per_client")) == 1 + 1


# -- time limits -----------------------------------------------------------------------------------

async def test_idle_conversation_is_closed(start_server, session, agent):
    base = await start_server(Policy(idle_timeout_s=0.6))
    idle, busy = await connect(session, base), await connect(session, base)
    await converse(idle, 2)
    t0 = time.monotonic()
    for frame in tone(25):  # the busy one keeps talking for 2 s; the idle one stops
        await busy.send_frame(frame)
        await asyncio.sleep(FRAME_S)
        if idle.closed:
            break
    assert await wait_until(lambda: idle.closed, 3)
    assert time.monotonic() - t0 > 0.5  # not before its timeout (that it fires is waited for above)
    assert "0.6 s without audio" in idle.result.errors[0]
    assert not busy.closed
    await busy.close()
    assert await wait_until(lambda: agent.active == 0)
    assert await metric(session, base, 'duplex_conversations_ended_total{reason="idle"}') == 1


async def test_maximum_conversation_length(start_server, session, agent):
    base = await start_server(Policy(max_conversation_s=1.0))
    client = await connect(session, base)
    t0 = time.monotonic()
    for frame in tone(40):  # 3.2 s of talking, more than allowed
        if client.closed:
            break
        await client.send_frame(frame)
        await asyncio.sleep(FRAME_S)
    assert await wait_until(lambda: client.closed, 3)
    assert time.monotonic() - t0 > 0.9  # not before its limit
    assert "maximum length of 1 s" in client.result.errors[0]
    assert client.result.received_frames > 5  # it was served until then
    assert await wait_until(lambda: agent.active == 0)
    assert await metric(session, base, 'duplex_conversations_ended_total{reason="max_length"}') == 1


async def test_limits_apply_to_webrtc(start_server, session, agent, monkeypatch):
    """A WebRTC conversation counts for its client address and is ended at the maximum length
    with an error on its data channel, like a websocket one."""
    import aioice.ice
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import AudioStreamTrack
    # aioice leaves 127.0.0.1 out of its host candidates; this machine may have nothing else.
    monkeypatch.setattr(aioice.ice, "get_host_addresses",
                        lambda use_ipv4=True, use_ipv6=False: ["127.0.0.1"])
    base = await start_server(Policy(max_per_client=1, max_conversation_s=1.5))

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(AudioStreamTrack())  # silence in real time
    messages = []
    pc.createDataChannel("events").on("message", lambda m: messages.append(json.loads(m)))
    await pc.setLocalDescription(await pc.createOffer())
    try:
        offer = {"sdp": pc.localDescription.sdp, "type": "offer"}
        status, answer = await post_offer(session, base, offer)
        assert status == 200, answer
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        with pytest.raises(ConnectionError, match="too many conversations"):
            await connect(session, base)
        errors = lambda: [m["message"] for m in messages if m["type"] == "error"]  # noqa: E731
        assert await wait_until(lambda: errors(), 6), messages
        assert "maximum length of 1.5 s" in errors()[0]
        assert await wait_until(lambda: agent.active == 0)
    finally:
        await pc.close()
    assert await metric(session, base, 'duplex_conversations_ended_total{reason="max_length"}') == 1
    assert await metric(session, base, refusals("per_client")) == 1


# -- TLS -------------------------------------------------------------------------------------------

def self_signed_certificate(directory) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and localhost, signed by its own key; (cert, key) PEM paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "duplex test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


async def test_tls_round_trip(start_server, session, tmp_path):
    from duplex_agent.streams.security import tls_context
    cert, key = self_signed_certificate(tmp_path)
    base = await start_server(ssl_context=tls_context(cert, key))
    assert base.startswith("https://")
    trusting = ssl.create_default_context(cafile=cert)
    async with session.get(f"{base}/api/stats", ssl=trusting) as r:
        assert r.status == 200 and (await r.json())["capacity"] == CAPACITY
    client = await connect(session, base, ssl=trusting)  # wss://
    await converse(client)
    await client.close()
    with pytest.raises(aiohttp.ClientConnectorCertificateError):  # an unknown CA is refused
        await session.get(f"{base}/api/stats")
    with pytest.raises(ValueError, match="cannot use the TLS certificate"):
        tls_context(cert, str(tmp_path / "missing.pem"))


# -- hostile pace ----------------------------------------------------------------------------------

async def test_client_faster_than_real_time(start_server, session, agent):
    """60 frames at once: the backlog (25 frames) overflows, the drops are counted, and the
    conversation goes on."""
    base = await start_server()
    client = await connect(session, base)
    for frame in tone(60):
        await client.send_frame(frame)
    await asyncio.sleep(0.5)
    [conv] = agent.conversations()
    assert conv.stats.dropped_input_frames > 0
    assert await wait_until(
        lambda: client.result.received_frames >= 60 - conv.stats.dropped_input_frames)
    received = client.result.received_frames
    await converse_more(client, 3)
    assert client.result.received_frames == received + 3 and not client.result.errors
    dropped = await metric(session, base, "duplex_dropped_input_frames_total")
    assert dropped == conv.stats.dropped_input_frames
    await client.close()


async def converse_more(client: MoshiClient, frames: int) -> None:
    before = client.result.received_frames
    for frame in tone(frames):
        await client.send_frame(frame)
        await asyncio.sleep(FRAME_S)
    assert await wait_until(lambda: client.result.received_frames >= before + frames)


# -- metrics and logs ------------------------------------------------------------------------------

async def test_metrics_follow_a_conversation(start_server, session, agent, caplog):
    caplog.set_level(logging.INFO, logger="duplex_agent.streams.security")
    base = await start_server()
    async with session.get(f"{base}/metrics") as r:
        assert r.status == 200 and r.content_type == "text/plain"
        text = await r.text()
    for name in ("duplex_conversations_active", "duplex_conversations_capacity",
                 "duplex_tick_seconds_bucket", "duplex_tick_stage_seconds_bucket",
                 "duplex_frame_latency_seconds_bucket", "duplex_late_frames_total",
                 "duplex_skipped_frames_total", "duplex_dropped_input_frames_total",
                 "duplex_dropped_output_frames_total", "duplex_ticks_total", "duplex_ticks_failed_total",
                 'duplex_refusals_total{reason="per_client"}',
                 'duplex_websocket_errors_total{kind="bad_audio"}',
                 'duplex_conversations_ended_total{reason="idle"}',
                 "duplex_response_latency_seconds_bucket", "duplex_barge_in_reaction_seconds_bucket",
                 "duplex_overlap_seconds_total"):
        assert name in text, name
    assert await metric(session, base, "duplex_conversations_capacity") == CAPACITY

    client = await connect(session, base)
    assert await metric(session, base, "duplex_conversations_active") == 1
    await converse(client, 10)
    await client.ws.send_bytes(b"\x42ignored")
    await client.close()
    assert await wait_until(lambda: agent.active == 0)
    samples = await scrape_metrics(session, chat_url(base))
    assert samples["duplex_conversations_opened_total"] == 1
    assert samples['duplex_conversations_ended_total{reason="closed"}'] == 1
    assert samples["duplex_tick_seconds_count"] >= 10 and samples["duplex_tick_seconds_sum"] > 0
    assert samples['duplex_tick_stage_seconds_count{stage="lm"}'] >= 10  # profiled on CPU
    assert samples["duplex_frame_latency_seconds_count"] >= 10
    assert samples['duplex_websocket_errors_total{kind="ignored"}'] == 1
    assert samples["duplex_conversations_active"] == 0

    with pytest.raises(ConnectionError, match="text_temperature"):
        await connect(session, base, text_temperature="hot")
    assert await metric(session, base, refusals("bad_input")) == 1

    opened = [r.getMessage() for r in caplog.records if " opened: " in r.getMessage()]
    ended = [r.getMessage() for r in caplog.records if " ended (closed)" in r.getMessage()]
    assert opened and "websocket from 127.0.0.1" in opened[0]
    assert ended and "10 frames in, 10 out, dropped 0 in / 0 out" in ended[0], ended
    conv_id = opened[0].split()[1]
    assert ended[0].startswith(f"conversation {conv_id} ended")


async def test_stage_profiling_can_be_off(start_server, session):
    """As on CUDA by default: whole ticks are timed, stages are not (no device syncs)."""
    base = await start_server(profile_stages=False)
    client = await connect(session, base)
    await converse(client, 3)
    await client.close()
    samples = await scrape_metrics(session, chat_url(base))
    assert samples["duplex_tick_seconds_count"] >= 3
    assert not any(name.startswith("duplex_tick_stage_seconds") for name in samples)


def test_access_log_hides_the_token(caplog):
    from aiohttp.test_utils import make_mocked_request
    logger = logging.getLogger("test.access")
    caplog.set_level(logging.INFO, logger="test.access")
    request = make_mocked_request("GET", f"/api/chat?text_topk=5&token={TOKEN}&x=1")
    RedactingAccessLogger(logger, "").log(request, web.Response(status=101), 0.25)
    assert TOKEN not in caplog.text and "token=***&x=1" in caplog.text


def test_serve_flags(monkeypatch):
    from duplex_agent.cli import build_parser
    from duplex_agent.streams.server import policy_from_args
    monkeypatch.setenv("AGENT_AUTH_TOKEN", "from-env")
    args = build_parser().parse_args([
        "serve", "--allowed-origins", "https://a.example, https://b.example:8443",
        "--max-message-bytes", "4096", "--max-offer-bytes", "1000", "--max-per-client", "2",
        "--idle-timeout", "0", "--max-conversation-s", "90"])
    policy = policy_from_args(args)
    assert policy.auth_token == "from-env"
    assert policy.allowed_origins == {"https://a.example", "https://b.example:8443"}
    assert (policy.max_message_bytes, policy.max_offer_bytes, policy.max_per_client) == (4096, 1000, 2)
    assert policy.idle_timeout_s is None and policy.max_conversation_s == 90
    assert build_parser().parse_args(["serve", "--auth-token", "t"]).auth_token == "t"
    monkeypatch.delenv("AGENT_AUTH_TOKEN")
    defaults = policy_from_args(build_parser().parse_args(["serve"]))
    assert defaults == Policy() and defaults.auth_token is None and args.host == "127.0.0.1"
    for bad in (["--allowed-origins", "example.com"], ["--idle-timeout", "-1"],
                ["--max-per-client", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", *bad])


# -- races -----------------------------------------------------------------------------------------

async def test_conversation_closing_mid_tick_spares_the_others(agent, monkeypatch):
    """A client that hangs up while its frame is on the way to the engine (found by test_fuzz):
    only its row is skipped; the conversations sharing the tick go on."""
    keep, leave = agent.open(), agent.open()
    tick = agent.engine.tick

    def tick_after_hang_up(frames, owners=None):
        if leave.slot in frames and not leave.closed:
            leave.close()  # between the driver taking the frame and the engine using it
        return tick(frames, owners)
    monkeypatch.setattr(agent.engine, "tick", tick_after_hang_up)

    async def next_audio():
        while True:
            event = await keep.recv()
            assert event is not None and not isinstance(event, ErrorOut), (event, keep.error)
            if isinstance(event, AudioOut):
                return event
    try:
        frame = tone(1)[0]
        for _ in range(3):
            keep.push(frame)
            if not leave.closed:
                leave.push(frame)
            await asyncio.wait_for(next_audio(), 10)
        assert leave.closed and not keep.closed and keep.error is None
        assert keep.stats.frames_out == 3
    finally:
        keep.close()
        leave.close()


# -- the command -----------------------------------------------------------------------------------

async def test_serve_command_with_tls_and_token(session, tmp_path):
    """`serve --ssl-cert --ssl-key --auth-token --idle-timeout` end to end in its own process."""
    import re
    import sys
    from pathlib import Path
    cert, key = self_signed_certificate(tmp_path)
    repo = Path(__file__).resolve().parents[1]
    bad = await asyncio.create_subprocess_exec(
        sys.executable, str(repo / "run_agent.py"), "serve", "--checkpoint", "tiny-random",
        "--ssl-cert", cert, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(bad.communicate(), 60)
    assert bad.returncode == 2 and b"--ssl-key" in output

    proc, base, _ = await start_serve(
        "--checkpoint", "tiny-random", "--device", "cpu", "--port", "0", "--max-sessions", "1",
        "--ssl-cert", cert, "--ssl-key", key, "--auth-token", TOKEN, "--idle-timeout", "30",
        scheme="https")
    try:
        trusting = ssl.create_default_context(cafile=cert)
        with pytest.raises(ConnectionError, match="HTTP 401"):
            await connect(session, base, ssl=trusting)
        client = await MoshiClient.connect(session, f"{chat_url(base)}?token={TOKEN}", ssl=trusting)
        await converse(client)
        await client.close()
        samples = await scrape_metrics(session, chat_url(base), TOKEN, trusting)
        assert samples[refusals("auth")] == 1 and samples["duplex_conversations_opened_total"] == 1
    finally:
        proc.terminate()
        rest, _ = await asyncio.wait_for(proc.communicate(), 30)
    log = (output + rest).decode()
    assert proc.returncode == 0, log
    assert TOKEN not in log and '"GET /api/chat?token=***"' in log  # the access log hides it
    assert re.search(r"conversation c\d+ ended \(closed\): websocket from 127\.0\.0\.1, [\d.]+ s, "
                     r"3 frames in, 3 out, dropped 0 in / 0 out", log), log

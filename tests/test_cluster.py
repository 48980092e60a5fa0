"""`run_agent.py cluster` end to end: a local Ray cluster (2 CPUs), two tiny-random engine
replicas of two slots each, behind the gateway on 127.0.0.1.

The cluster starts once for the module, in its own process, as a user would run it; the last test
stops it with Ctrl+C and checks that no process of it is left. Clients are the load tool's Moshi
client (Ogg/Opus over the websocket) and aiortc.
"""
from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time

import aiohttp
import numpy as np
import psutil
import pytest

from duplex_agent.agent.config import FRAME_SIZE, SAMPLE_RATE
from duplex_agent.streams.loadtest import ClientResult, MoshiClient
from tests.helpers import ROOT, espeak_frames
from tests.twilio_peer import PUBLIC_URL, TWILIO_TOKEN, TwilioPeer, call_webhook, local, new_call_sid

pytest.importorskip("ray.serve")

REPLICAS, SLOTS = 2, 2
FRAME_S = FRAME_SIZE / SAMPLE_RATE
GREEDY = {"text_temperature": "0", "audio_temperature": "0"}
TOKEN = "cluster-test-token"


class Cluster:
    """The `cluster` command in a child process; its output is drained by a thread."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "run_agent.py"), "cluster", "--checkpoint", "tiny-random",
             "--device", "cpu", "--num-cpus", "2", "--replicas", str(REPLICAS), "--max-sessions",
             str(SLOTS), "--threads", "1", "--port", "0", "--media-host", "127.0.0.1",
             "--auth-token", TOKEN, "--twilio-auth-token", TWILIO_TOKEN,
             "--public-url", PUBLIC_URL],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.url: str | None = None
        self._banner = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._banner.wait(240) or self.url is None:
            self.proc.kill()
            raise AssertionError("the cluster did not start:\n" + self.output)
        # Every process of the cluster, to check that none outlives it.
        self.processes = [psutil.Process(self.proc.pid),
                          *psutil.Process(self.proc.pid).children(recursive=True)]

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            match = re.search(r"cluster serving on (http://127\.0\.0\.1:\d+)", line)
            if match:
                self.url = match.group(1)
                self._banner.set()
        self._banner.set()  # exited early

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def chat(self) -> str:
        return self.url.replace("http", "ws", 1) + "/api/chat"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster()
    yield cluster
    cluster.stop()


@pytest.fixture
async def session():
    """A client session that sends the cluster's token with every request."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"},
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    """2 s of espeak-ng speech, 24 kHz, whole frames."""
    return espeak_frames("Hello, who are you? Tell me about the weather.", "en",
                         tmp_path_factory.mktemp("speech") / "s.wav", 25)


async def stats(session, cluster) -> dict:
    async with session.get(f"{cluster.url}/api/stats") as r:
        assert r.status == 200
        return await r.json()


async def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not await condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return bool(await condition())


def slots_used(s: dict) -> dict[str, int]:
    return {r["id"]: r["slots_used"] for r in s["replicas"] if r["state"] == "running"}


class Recorder(MoshiClient):
    """The load tool's client, also keeping the text and decoded audio it receives."""

    def __init__(self, ws, result):
        import sphn
        self.text: list[str] = []
        self.pcm: list[np.ndarray] = []
        self._decoder = sphn.OpusStreamReader(SAMPLE_RATE)
        super().__init__(ws, result)

    async def _receive(self) -> None:
        original = self.ws

        class Tap:  # what MoshiClient._receive iterates: the same messages, copied on the way
            def __getattr__(_, name):
                return getattr(original, name)

            async def __aiter__(_):
                async for msg in original:
                    if msg.type == aiohttp.WSMsgType.BINARY and msg.data[:1] == b"\x02":
                        self.text.append(msg.data[1:].decode())
                    elif msg.type == aiohttp.WSMsgType.BINARY and msg.data[:1] == b"\x01":
                        self.pcm.append(self._decoder.append_bytes(msg.data[1:]))
                    yield msg

        self.ws = Tap()
        try:
            await super()._receive()
        finally:
            self.ws = original


async def open_conversations(session, cluster, n: int, **query) -> list[Recorder]:
    return [await Recorder.connect(session, cluster.chat, ClientResult(i), **query)
            for i in range(n)]


async def talk(clients: list[Recorder], speech: np.ndarray, frames: int, on_frame=None) -> None:
    """Send `frames` frames to every client in real time, then wait for the outputs due."""
    t0 = time.monotonic()
    for i in range(frames):
        await asyncio.sleep(max(0.0, t0 + i * FRAME_S - time.monotonic()))
        if on_frame is not None:
            await on_frame(i)
        for client in clients:
            if not client.closed:
                await client.send_frame(speech[i * FRAME_SIZE:(i + 1) * FRAME_SIZE])
    await asyncio.gather(*(c.wait_for_outputs(20) for c in clients))


# -- placement and refusal -------------------------------------------------------------------------

async def test_conversations_spread_over_replicas_and_the_fifth_is_refused(cluster, session,
                                                                           speech):
    clients = await open_conversations(session, cluster, REPLICAS * SLOTS)
    try:
        s = await stats(session, cluster)
        assert s["capacity"] == REPLICAS * SLOTS and s["active"] == REPLICAS * SLOTS
        assert sorted(slots_used(s).values()) == [SLOTS] * REPLICAS, s["replicas"]
        assert all(r["slots_free"] == 0 for r in s["replicas"])

        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match="server full: all 4 conversations"):
            await MoshiClient.connect(session, cluster.chat, ClientResult(9))
        refused_in = time.monotonic() - t0
        async with session.post(f"{cluster.url}/offer", json={"sdp": "v=0", "type": "offer"}) as r:
            assert r.status == 503 and (await r.json())["capacity"] == REPLICAS * SLOTS
        # A Realtime client is refused before the upgrade, as serve refuses it.
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{cluster.url}/v1/realtime",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        assert refused.value.status == 503

        await talk(clients, speech, 5)  # all four are served
        for client in clients:
            assert client.result.received_frames == 5 and not client.result.errors
        s = await stats(session, cluster)
        assert {c["replica"] for c in s["conversations"]} == set(slots_used(s))
        assert s["websocket"]["refused_full"] >= 1
        async with session.get(f"{cluster.url}/metrics") as r:
            metrics = await r.text()
        assert re.search(r'^duplex_refusals_total\{reason="full"\} [1-9]', metrics, re.M)
        assert re.search(r"^duplex_conversations_active 4\.0$", metrics, re.M), metrics
        assert re.search(r"^duplex_cluster_replicas_running 2\.0$", metrics, re.M)
    finally:
        for client in clients:
            await client.close()
    assert refused_in < 5.0  # not queued behind the admission timeout (5 s)
    assert await wait_until(lambda: _idle(session, cluster), 10)


async def _idle(session, cluster) -> bool:
    """No conversation on any replica, and every hold released."""
    s = await stats(session, cluster)
    return s["active"] == 0 and s["gateway"]["held"] == 0


async def test_the_gateway_applies_the_token(cluster):
    async with aiohttp.ClientSession() as anonymous:
        with pytest.raises(ConnectionError, match="HTTP 401"):
            await MoshiClient.connect(anonymous, cluster.chat, ClientResult(0))
        async with anonymous.get(f"{cluster.url}/api/stats") as r:
            assert r.status == 401
        async with anonymous.get(f"{cluster.url}/metrics?token={TOKEN}") as r:
            assert r.status == 200
        async with anonymous.get(f"{cluster.url}/") as r:  # the page is public
            assert r.status == 200 and "<html" in (await r.text()).lower()
        async with anonymous.get(f"{cluster.url}/api/voices?token={TOKEN}") as r:
            assert r.status == 200 and (await r.json())["voices"] == []


# -- WebRTC ----------------------------------------------------------------------------------------

async def test_webrtc_media_goes_to_its_replica(cluster, session, monkeypatch):
    import aioice.ice
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import AudioStreamTrack
    monkeypatch.setattr(aioice.ice, "get_host_addresses",
                        lambda use_ipv4=True, use_ipv6=False: ["127.0.0.1"])
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(AudioStreamTrack())  # silence in real time
    received = []
    pc.on("track", lambda track: asyncio.ensure_future(_read(track, received)))
    messages = []
    pc.createDataChannel("events").on("message", lambda m: messages.append(json.loads(m)))
    await pc.setLocalDescription(await pc.createOffer())
    try:
        async with session.post(f"{cluster.url}/offer", json={
                "sdp": pc.localDescription.sdp, "type": "offer"}) as r:
            answer = await r.json()
            assert r.status == 200, answer
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        gateway_port = int(cluster.url.rsplit(":", 1)[1])
        media_ports = {int(m) for m in re.findall(r"a=candidate:\S+ \d \S+ \d+ \S+ (\d+)",
                                                  answer["sdp"])}
        assert media_ports and gateway_port not in media_ports  # the replica's own UDP ports

        async def flowing() -> bool:
            s = await stats(session, cluster)
            convs = [c for c in s["conversations"] if c["replica"] == answer["replica"]]
            return bool(convs) and convs[0]["frames_in"] >= 10 and convs[0]["frames_out"] >= 5
        assert await wait_until(flowing, 20)
        assert await wait_until(_async(lambda: len(received) >= 20), 10)  # the agent's voice
        assert any(m["type"] == "stats" for m in messages)  # the data channel is the replica's
    finally:
        await pc.close()
    assert await wait_until(lambda: _idle(session, cluster), 10)  # the hang-up frees the slot


async def _read(track, received: list) -> None:
    from aiortc.mediastreams import MediaStreamError
    try:
        while True:
            received.append(await track.recv())
    except MediaStreamError:
        pass


def _async(condition):
    async def check():
        return condition()
    return check


# -- the Realtime API -------------------------------------------------------------------------------

async def test_realtime_api_through_the_gateway(cluster, session):
    import base64

    openai = pytest.importorskip("openai")
    client = openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key=TOKEN, max_retries=0)
    async with client.realtime.connect(model="tiny-random") as conn:
        first = await asyncio.wait_for(conn.recv(), 20)
        assert first.type == "session.created"
        silence = base64.b64encode(bytes(2 * SAMPLE_RATE // 5)).decode()  # 200 ms of PCM16
        for _ in range(5):
            await conn.input_audio_buffer.append(audio=silence)

        async def served() -> bool:
            s = await stats(session, cluster)
            return s["active"] == 1 and s["conversations"][0]["frames_in"] >= 5
        assert await wait_until(served, 10)
        s = await stats(session, cluster)
        assert s["conversations"][0]["replica"] in slots_used(s)
        assert s["realtime"]["connections"] >= 1, s["realtime"]
    assert await wait_until(lambda: _idle(session, cluster), 10)


# -- phone calls -----------------------------------------------------------------------------------

async def test_phone_call_through_the_gateway(cluster, session):
    """The signed webhook is checked at the gateway and answered by a replica; the TwiML's
    single-use credential takes the media stream to that replica."""
    import xml.etree.ElementTree as ElementTree
    sid = new_call_sid()
    assert (await call_webhook(session, cluster.url, sid, token="not-the-token"))[0] == 403
    status, body = await call_webhook(session, cluster.url, sid)
    assert status == 200
    url = local(ElementTree.fromstring(body).find("Connect/Stream").get("url"), cluster.url)
    peer = TwilioPeer(await session.ws_connect(url), sid)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:  # the credential is used up
        await session.ws_connect(url)
    assert refused.value.status == 403
    await peer.start()
    await peer.speak(b"\xff" * 160 * 25)  # half a second of μ-law silence
    assert await wait_until(_async(lambda: len(peer.events("media")) >= 8), 20)
    s = await stats(session, cluster)
    (call,) = s["phone"]["calls"]
    assert call["call_sid"] == sid and call["replica"] in slots_used(s)
    assert s["phone"]["bad_signatures"] == 1
    assert {e["streamSid"] for _, e in peer.received} == {peer.stream_sid}
    await peer.stop()
    await peer.wait_closed()
    assert await wait_until(lambda: _idle(session, cluster), 10)


# -- a replica dies --------------------------------------------------------------------------------

async def test_a_dead_replica_spares_the_other_ones_conversations(cluster, session, speech):
    frames = len(speech) // FRAME_SIZE
    # Without a fault: four greedy conversations, two per replica, on the same speech.
    reference = await open_conversations(session, cluster, 4, **GREEDY)
    await talk(reference, speech, frames)
    for client in reference:
        await client.close()
        assert client.result.received_frames == frames and not client.result.errors
    expected_text = "".join(reference[0].text)
    expected_pcm = np.concatenate(reference[0].pcm)
    assert expected_text and all("".join(c.text) == expected_text for c in reference)
    assert await wait_until(lambda: _idle(session, cluster), 10)

    clients = await open_conversations(session, cluster, 4, **GREEDY)
    s = await stats(session, cluster)
    victim = next(r for r in s["replicas"] if r["state"] == "running")
    on_victim = {c["id"] for c in s["conversations"] if c["replica"] == victim["id"]}
    assert len(on_victim) == SLOTS

    async def kill_midway(i: int) -> None:
        if i == frames // 2:
            psutil.Process(victim["pid"]).kill()
    await talk(clients, speech, frames, kill_midway)

    failed = [c for c in clients if c.result.errors]
    spared = [c for c in clients if not c.result.errors]
    assert len(failed) == SLOTS and len(spared) == len(clients) - SLOTS, [
        (c.result.sent_frames, c.result.received_frames, c.result.errors) for c in clients]
    for client in failed:
        assert "replica" in client.result.errors[0] and "failed" in client.result.errors[0]
        assert client.result.received_frames < frames
    for client in spared:  # untouched: the very same text and audio as without the fault
        assert client.result.received_frames == frames, client.result

        async def whole_text(client=client) -> bool:  # a step's text follows its audio
            return "".join(client.text) == expected_text
        assert await wait_until(whole_text, 5), ("".join(client.text), expected_text)
        pcm = np.concatenate(client.pcm)
        assert np.array_equal(pcm, expected_pcm), (len(pcm), len(expected_pcm))

    # Ray restarts the replica; new conversations are placed once it runs (its slots were the
    # only free ones while the spared conversations held the others).
    newcomer = None
    deadline = time.monotonic() + 120
    while newcomer is None and time.monotonic() < deadline:
        try:
            newcomer = await Recorder.connect(session, cluster.chat, ClientResult(8))
        except ConnectionError as e:
            assert "server full" in str(e)
            await asyncio.sleep(1)
    assert newcomer is not None, "no new conversation after the replica's restart"
    await talk([newcomer], speech, 3)
    assert newcomer.result.received_frames == 3 and not newcomer.result.errors
    s = await stats(session, cluster)
    running = [r["id"] for r in s["replicas"] if r["state"] == "running"]
    assert len(running) == REPLICAS and victim["id"] not in running
    for client in spared + [newcomer]:
        await client.close()


# -- the command's end -----------------------------------------------------------------------------

def test_ctrl_c_stops_the_whole_cluster(cluster):
    assert cluster.stop() == 0, cluster.output[-3000:]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alive = [p for p in cluster.processes if p.is_running() and
                 p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            break
        time.sleep(0.5)
    assert not alive, [(p.pid, p.name()) for p in alive]


# -- pieces ----------------------------------------------------------------------------------------

def test_metrics_of_replicas_add_up():
    from prometheus_client.parser import text_string_to_metric_families

    from duplex_agent.streams.cluster.gateway import merge_metrics
    from duplex_agent.streams.metrics import Metrics
    replicas = []
    for n in (1, 2):
        m = Metrics()
        m.refused("full")
        m.dropped(n, 0)
        m.tick_seconds.observe(0.03 * n)
        replicas.append(m.render()[0].decode())
    merged = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in text_string_to_metric_families(merge_metrics(replicas, 2).decode())
              for s in f.samples}
    assert merged[("duplex_refusals_total", (("reason", "full"),))] == 2
    assert merged[("duplex_dropped_input_frames_total", ())] == 3
    assert merged[("duplex_tick_seconds_count", ())] == 2
    assert merged[("duplex_tick_seconds_bucket", (("le", "0.04"),))] == 1
    assert merged[("duplex_cluster_replicas_running", ())] == 2
    assert not any(name.endswith("_created") for name, _ in merged)


def test_torch_threads_default_and_flag(monkeypatch):
    import torch

    from duplex_agent.streams.server import set_torch_threads
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_torch_threads(None) == 1 == torch.get_num_threads()
        monkeypatch.delenv("OMP_NUM_THREADS")
        cores = len(__import__("os").sched_getaffinity(0))
        assert set_torch_threads(None) == min(cores, 4) == torch.get_num_threads()
        assert set_torch_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)

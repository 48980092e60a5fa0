"""End to end through a real browser: headless Chromium talks to the server over WebRTC.

Chromium's fake microphone plays an espeak-ng recording (looped); the tiny random model answers
with noise and random text, and the tiny random transcriber writes random words for the user. The
page must get the agent's track and both sides' words, the server must get the browser's audio at
real-time rate, and the console must stay clean. A screenshot of the
live page is saved to artifacts/browser.png. Without a browser: plain-HTTP checks of /offer (400,
503), the outgoing track's jitter buffer, and an engine failure seen by a Python WebRTC peer.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp
import aioice.ice
import numpy as np
import pytest
import soundfile

from duplex_agent.agent.config import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE
from duplex_agent.streams.webrtc import AgentVoiceTrack
from tests import helpers
from tests.helpers import agent_fixture

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
SPEECH = "Hello, this is a test of the full duplex dialogue agent. Can you hear me?"
BROWSER_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required", "--allow-loopback-in-peer-connection"]


@pytest.fixture(autouse=True)
def loopback_ice(monkeypatch):
    # aioice leaves 127.0.0.1 out of its host candidates; this machine may have nothing else.
    monkeypatch.setattr(aioice.ice, "get_host_addresses",
                        lambda use_ipv4=True, use_ipv6=False: ["127.0.0.1"])


agent = agent_fixture(conversations=2, transcriber="tiny-random-stt")
persona_agent = agent_fixture("tiny-random-personaplex", conversations=1)
translator = agent_fixture("tiny-random-hibiki-zero", conversations=1)


def serving(agent):
    """`agent` served on a free local port (yields its base URL); a browser's connections left
    open get 2 s when it stops."""
    return helpers.serving(agent, shutdown_timeout=2.0)


@pytest.fixture
async def server(agent):
    async with serving(agent) as url:
        yield url


@pytest.fixture
async def persona_server(persona_agent):
    async with serving(persona_agent) as url:
        yield url


@pytest.fixture(scope="module")
def fake_mic(tmp_path_factory) -> tuple[Path, float]:
    """espeak-ng speech as 48 kHz mono s16 with half a second of silence around it."""
    if not (Path(CHROMIUM).exists() and shutil.which("espeak-ng") and shutil.which("sox")):
        pytest.skip(f"needs {CHROMIUM}, espeak-ng and sox")
    d = tmp_path_factory.mktemp("mic")
    raw, wav = d / "speech_raw.wav", d / "speech48k.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), SPEECH], check=True)
    subprocess.run(["sox", str(raw), "-r", "48000", "-c", "1", "-b", "16", str(wav), "pad", "0.5", "0.5"],
                   check=True)
    return wav, soundfile.info(str(wav)).duration


async def post_offer(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, str) else json.dumps(body)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/offer", data=data,
                             headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.json()


# An audio offer without ICE credentials: parses, but aiortc cannot negotiate it.
NO_ICE_OFFER = ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
                "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\n"
                "a=sendrecv\r\na=rtpmap:111 opus/48000/2\r\n")


async def test_malformed_offers_get_400_json(server, agent):
    cases = [("not json", "must be JSON"),
             ({"type": "offer"}, "sdp"),
             ({"sdp": 42, "type": "offer"}, "sdp"),
             ({"sdp": "v=0", "type": "answer"}, "type"),
             ({"sdp": "v=0\r\nnonsense\r\n", "type": "offer"}, "no audio track"),
             ({"sdp": NO_ICE_OFFER, "type": "offer"}, "ICE"),
             ({"sdp": NO_ICE_OFFER, "type": "offer", "text_topk": 2.5}, "text_topk")]
    for body, words in cases:
        status, reply = await post_offer(server, body)
        assert status == 400, (body, reply)
        assert words in reply["error"], (body, reply)
    assert agent.active == 0  # a failed negotiation gives its slot back


async def test_full_server_refuses_with_503_json(server, agent):
    held = [agent.open() for _ in range(agent.max_conversations)]
    try:
        status, reply = await post_offer(server, {"sdp": "v=0", "type": "offer"})
    finally:
        for conv in held:
            conv.close()
    assert status == 503
    assert "full" in reply["error"]


async def test_voice_track_paces_buffers_and_counts():
    """The agent's outgoing track: real-time 20 ms frames, silence when starved, bounded buffer."""
    track = AgentVoiceTrack()
    chunk = (0.5 * np.sin(np.arange(FRAME_SIZE) * 2 * np.pi * 440 / SAMPLE_RATE)).astype(np.float32)

    t0 = time.monotonic()
    frames = [await track.recv() for _ in range(10)]
    assert time.monotonic() - t0 > 0.15  # 9 paced waits of 20 ms: not faster than real time
    assert all(f.sample_rate == 48_000 and f.samples == 960 and f.format.name == "s16" for f in frames)
    assert not any(f.to_ndarray().any() for f in frames)  # nothing fed yet: silence, no underrun
    assert track.underruns == 0

    track.feed(chunk, t_in=time.monotonic())
    levels = [np.abs((await track.recv()).to_ndarray()).max() for _ in range(8)]
    assert max(levels) > 10_000  # the tone came out (after the start margin)...
    assert levels[-1] == 0 and track.underruns == 1  # ...then the buffer ran dry
    assert track.stats()["server_frame_ms"] is not None

    for _ in range(10):  # a burst of 800 ms, as after an engine stall
        track.feed(chunk)
    assert track.stats()["playout_buffer_ms"] <= 200 and track.dropped_ms > 0
    track.stop()


async def test_browser_conversation(server, agent, fake_mic):
    async_playwright = pytest.importorskip("playwright.async_api").async_playwright
    wav, seconds = fake_mic
    problems = []
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=[
            *BROWSER_ARGS, f"--use-file-for-fake-audio-capture={wav}"])
        try:
            page = await browser.new_page(viewport={"width": 760, "height": 900})
            page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
            page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
            await page.goto(server)
            await page.evaluate("window.duplexVoices")
            persona_hidden = await page.is_hidden("#persona")  # tiny-random has no personas
            await page.click("#toggle")
            await page.wait_for_function("window.duplex && window.duplex.pc"
                                         " && window.duplex.pc.connectionState === 'connected'",
                                         timeout=15_000)
            [conv] = agent.conversations()
            end_input_hidden = await page.is_hidden("#end-input")  # a dialogue has no end

            # Browser audio must arrive at real-time rate: count frames over one pass of the file.
            frames0, t0 = conv.stats.frames_in, time.monotonic()
            await asyncio.sleep(seconds)
            received = conv.stats.frames_in - frames0
            expected = (time.monotonic() - t0) * FRAME_RATE

            inbound = await page.evaluate("""async () => {
                let found = null;
                (await window.duplex.pc.getStats()).forEach(s => {
                    if (s.type === 'inbound-rtp' && s.kind === 'audio') found = s;
                });
                return found && {packetsReceived: found.packetsReceived,
                                 totalSamplesReceived: found.totalSamplesReceived};
            }""")
            # The speaking lamps follow the fake mic's speech and the agent's (noisy) voice.
            await page.wait_for_selector("#lamp-user.on", timeout=10_000)
            # Agent output lags when the CPU is contended: give it time to arrive.
            await page.wait_for_selector("#lamp-agent.on", timeout=20_000)
            await page.wait_for_function(
                "document.querySelector('#transcript').textContent.trim()"
                " && document.querySelector('#m-server').textContent.endsWith('ms')", timeout=20_000)
            transcript = await page.inner_text("#transcript")
            # The user's words, as the transcriber heard the fake mic, on the same page.
            await page.wait_for_function(
                "document.querySelector('#transcript p[data-side=user] .words')"
                " && document.querySelector('#transcript p[data-side=user] .words').textContent.trim()",
                timeout=20_000)
            user_words = await page.inner_text("#transcript p[data-side=user]")
            user_sent = conv.stats.user_words
            # Turn-taking figures from the server: the user's espeak speech makes segments.
            await page.wait_for_function(
                "/turns: you [1-9]/.test(document.querySelector('#turns').textContent)",
                timeout=20_000)
            turns = await page.inner_text("#turns")
            figures = " ".join((await page.inner_text(".metrics")).split())
            print(f"\npage figures: {figures} | {await page.inner_text('#details')}")
            artifacts = ROOT / "artifacts"
            artifacts.mkdir(exist_ok=True)
            await page.screenshot(path=str(artifacts / "browser.png"), full_page=True)

            await page.click("#toggle")  # Stop: the server must end the conversation
            deadline = time.monotonic() + 10
            while agent.active and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        finally:
            await browser.close()

    assert 0.6 * expected <= received <= 1.5 * expected, (received, expected)
    assert inbound and inbound["packetsReceived"] > 0 and inbound["totalSamplesReceived"] > 0, inbound
    assert transcript.strip(), "no transcript on the page"
    assert user_words.startswith("YOU") and len(user_words.split()) >= 2, user_words
    assert user_sent >= 1
    assert persona_hidden and end_input_hidden
    assert "answers after" in turns and "overlap" in turns
    assert not problems, problems
    assert agent.active == 0, "Stop did not close the conversation"


async def test_browser_persona_reaches_the_server(persona_server, persona_agent):
    """The voice picker (filled from GET /api/voices) and the role box: the conversation the page
    opens has that voice and role, both are locked while it runs, and a role the model cannot take
    is refused with the agent's reason on the page."""
    async_playwright = pytest.importorskip("playwright.async_api").async_playwright
    if not Path(CHROMIUM).exists():
        pytest.skip(f"needs {CHROMIUM}")
    role = "You sell coffee."  # the tiny model's 50-frame context takes a short role only
    problems = []
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = await browser.new_page()
            page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
            await page.goto(persona_server)
            await page.wait_for_selector("#persona", state="visible", timeout=10_000)
            voices = await page.eval_on_selector_all("#voice option", "os => os.map(o => o.value)")

            await page.click("text=Dental clinic front desk")  # an example: too long for this model
            example = await page.input_value("#role")
            await page.click("#toggle")
            await page.wait_for_selector("#error", state="visible", timeout=15_000)
            refusal = await page.inner_text("#error")

            await page.select_option("#voice", "VARF1.pt")
            await page.fill("#role", role)
            await page.click("#toggle")
            await page.wait_for_function("window.duplex && window.duplex.pc"
                                         " && window.duplex.pc.connectionState === 'connected'",
                                         timeout=15_000)
            [conv] = persona_agent.conversations()
            opened = (conv.voice_prompt, conv.text_prompt)
            locked = await page.is_disabled("#voice") and await page.is_disabled("#role")
            await page.click("#toggle")
            deadline = time.monotonic() + 10
            while persona_agent.active and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        finally:
            await browser.close()

    assert voices == persona_agent.voices() and len(voices) == 18
    assert "Dental Clinic" in example
    assert "refused" in refusal and "at most" in refusal, refusal
    assert opened == ("VARF1.pt", role)
    assert locked
    assert not problems, problems
    assert persona_agent.active == 0


async def test_browser_translation_completes(translator, fake_mic):
    """A translating agent (Hibiki-Zero): the page offers "Done speaking"; after it the model
    finishes translating, says EOS, and the page ends the call as complete, not as an error."""
    async_playwright = pytest.importorskip("playwright.async_api").async_playwright
    wav, _ = fake_mic
    problems = []
    async with serving(translator) as url, async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=[
            *BROWSER_ARGS, f"--use-file-for-fake-audio-capture={wav}"])
        try:
            page = await browser.new_page()
            page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
            page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
            await page.goto(url)
            await page.click("#toggle")
            await page.wait_for_function("window.duplex && window.duplex.pc"
                                         " && window.duplex.pc.connectionState === 'connected'",
                                         timeout=15_000)
            await page.wait_for_selector("#end-input", state="visible", timeout=5_000)
            await asyncio.sleep(1.0)  # some speech to translate
            await page.click("#end-input")
            await page.wait_for_function(
                "document.querySelector('#status').textContent === 'Translated'", timeout=15_000)
            error_hidden = await page.is_hidden("#error")
            end_input_hidden = await page.is_hidden("#end-input")
        finally:
            await browser.close()
    assert error_hidden and end_input_hidden
    assert not problems, problems
    assert translator.active == 0


async def test_engine_failure_reaches_the_client(server, agent, monkeypatch):
    """A Python WebRTC peer stands in for the page: an engine error arrives on the data channel
    and the server hangs up, giving the slot back."""
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import AudioStreamTrack

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(AudioStreamTrack())  # silence at real-time rate
    messages = []
    pc.createDataChannel("events").on("message", lambda m: messages.append(json.loads(m)))
    await pc.setLocalDescription(await pc.createOffer())
    status, answer = await post_offer(server, {"sdp": pc.localDescription.sdp, "type": "offer"})
    assert status == 200, answer
    await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
    try:
        for _ in range(100):
            if any(m["type"] == "stats" for m in messages):
                break
            await asyncio.sleep(0.05)
        assert any(m["type"] == "stats" for m in messages), messages

        def broken_tick(frames, owners=None):
            raise RuntimeError("simulated GPU fault")
        monkeypatch.setattr(agent.engine, "tick", broken_tick)
        for _ in range(100):
            if not agent.active and pc.connectionState == "closed":
                break
            await asyncio.sleep(0.05)
        errors = [m for m in messages if m["type"] == "error"]
        assert errors and "RuntimeError" in errors[0]["message"], messages
        assert agent.active == 0
    finally:
        await pc.close()

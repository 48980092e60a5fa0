"""Personas wherever a conversation opens: Moshi's websocket with PersonaPlex's query parameters,
the WebRTC offer, GET /api/voices, /api/stats and /metrics, `--voice-prompt-dir`, and
`run_agent.py file` and `local` with `--voice-prompt` / `--text-prompt`.

A real server (aiohttp, ephemeral port) fronts the built-in `tiny-random-personaplex` (18 random
voices) and, for refusals, the persona-less `tiny-random`. The websocket client speaks Ogg/Opus
with sphn, as PersonaPlex's web client does, and builds its URL the way that client does
(URLSearchParams: spaces as '+', everything else percent-encoded). The page's voice picker is
driven by headless Chromium in tests/test_browser.py.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlencode

import aioice.ice
import numpy as np
import pytest
import soundfile
import torch
import yarl

from duplex_agent.agent.api import Agent
from duplex_agent.agent.config import FRAME_SIZE, SAMPLE_RATE
from tests.helpers import agent_fixture, espeak_frames, needs_pulse, serving
from tests.moshi_client import Client

ROOT = Path(__file__).resolve().parents[1]
VOICES = [f"{kind}{i}.pt" for kind, n in (("NATF", 4), ("NATM", 4), ("VARF", 5), ("VARM", 5))
          for i in range(n)]
# tiny-random-personaplex has a 50-frame context: a prompt may take 45 frames (voice 5, silence 12,
# the "<system> ... <system>" tags 18 tokens), so roles here are short. This one has what URL
# encoding must get right: spaces, '&', '+', '=', '?' and a non-ASCII letter.
ROLE = "Café & 1+1=2?"
# Over 80 characters in 26 tokens: with a 5-frame voice (NATF2.pt) it just fits.
LONG_ROLE = "restaurant library morning garden puzzle restaurant library morning garden puzzle"


agent = agent_fixture("tiny-random-personaplex", conversations=2)
plain_agent = agent_fixture("tiny-random", conversations=1)  # a checkpoint without persona training


@pytest.fixture
async def server(agent):
    async with serving(agent) as url:
        yield url
    assert agent.active == 0


@pytest.fixture
async def plain_server(plain_agent):
    async with serving(plain_agent) as url:
        yield url
    assert plain_agent.active == 0


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    """1 s of espeak-ng speech at 24 kHz, a whole number of frames."""
    return espeak_frames("Hello, I would like to book a cleaning.", "en-us",
                         tmp_path_factory.mktemp("speech") / "s.wav", 12)


def personaplex_query(voice: str, text: str) -> dict:
    """Every parameter PersonaPlex's web client puts in its /api/chat URL, in its order."""
    return {"text_temperature": "0.7", "text_topk": "25", "audio_temperature": "0.8",
            "audio_topk": "250", "pad_mult": "0", "text_seed": "123456", "audio_seed": "654321",
            "repetition_penalty_context": "64", "repetition_penalty": "1", "text_prompt": text,
            "voice_prompt": voice}


async def connect(session, url: str, query: dict) -> Client:
    """Open /api/chat with the query encoded exactly as a browser's URLSearchParams does."""
    raw = f"{url.replace('http', 'ws', 1)}/api/chat?{urlencode(query)}"
    return Client(await session.ws_connect(yarl.URL(raw, encoded=True)))


async def refused(client: Client) -> str:
    await client.wait_closed()
    assert client.kinds == [5], client.kinds
    return client.errors[0]


# -- GET /api/voices -------------------------------------------------------------------------------

async def test_voices_listing(server, plain_server, session):
    async with session.get(f"{server}/api/voices") as r:
        assert r.status == 200
        assert await r.json() == {"personas": True, "voices": VOICES}
    async with session.get(f"{plain_server}/api/voices") as r:
        assert r.status == 200
        assert await r.json() == {"personas": False, "voices": []}


async def test_voices_listing_takes_the_token(agent, session):
    """Behind --auth-token like /api/stats; the page passes its ?token= on."""
    from duplex_agent.streams.security import Policy
    async with serving(agent, policy=Policy(auth_token="s3cret")) as url:
        async with session.get(f"{url}/api/voices") as r:
            assert r.status == 401
        async with session.get(f"{url}/api/voices?token=s3cret") as r:
            assert r.status == 200 and (await r.json())["voices"] == VOICES


# -- Moshi's websocket with PersonaPlex's parameters -----------------------------------------------

async def test_websocket_persona_conversation(server, session, agent, speech):
    client = await connect(session, server, personaplex_query("VARM2.pt", ROLE))
    assert await client.wait_for(lambda: client.messages)
    assert client.messages[0] == b"\x00", client.errors
    [conv] = agent.conversations()  # asserted server-side: the decoded query reached the agent
    assert conv.voice_prompt == "VARM2.pt" and conv.text_prompt == ROLE

    await client.send_audio(speech, pace=False)
    assert await client.wait_for(lambda: client.samples >= len(speech), timeout=20)
    assert not client.errors and np.abs(np.concatenate(client.pcm)).max() > 0

    async with session.get(f"{server}/api/stats") as r:
        stats = await r.json()
    [entry] = stats["conversations"]
    assert entry["voice_prompt"] == "VARM2.pt" and entry["text_prompt"] == ROLE
    assert stats["prompt_cache"] == agent.engine.prompt_cache.stats()
    await client.close()


async def test_empty_parameters_mean_no_persona(server, session, agent):
    """PersonaPlex's client always sends both; empty values open a plain conversation."""
    client = await connect(session, server, personaplex_query("", ""))
    assert await client.wait_for(lambda: client.messages)
    assert client.messages[0] == b"\x00", client.errors
    [conv] = agent.conversations()
    assert conv.voice_prompt is None and conv.text_prompt is None
    await client.close()


async def test_unknown_voice_is_refused_with_the_list(server, session, agent, speech):
    """A bad voice gets a 0x05 error naming the voices; a conversation already running goes on."""
    other = await connect(session, server, personaplex_query("NATF1.pt", "You sell coffee."))
    assert await other.wait_for(lambda: other.messages) and other.messages[0] == b"\x00"
    for voice in ("NOPE.pt", "natf0.pt", "../NATF0.pt", "/etc/passwd", "voices/NATF0.pt",
                  "NATF0.pt\x00.wav"):
        error = await refused(await connect(session, server, personaplex_query(voice, "Hi.")))
        assert voice in error or repr(voice) in error, error
        assert "NATF0.pt" in error and "VARM4.pt" in error, error
    assert agent.active == 1
    await other.send_audio(speech, pace=False)
    assert await other.wait_for(lambda: other.samples >= len(speech), timeout=20)
    assert not other.errors
    await other.close()


@pytest.mark.parametrize("role", ["You answer the phone at a dental clinic.",
                                  # 10 kB of URL: past aiohttp's default 8190-byte request line
                                  "Réception dentaire. " * 400])
async def test_overlong_text_prompt_gets_the_core_error(server, session, agent, role):
    from duplex_agent.checkpoints.personaplex import PersonaError
    with pytest.raises(PersonaError) as expected:
        agent.open(voice_prompt="NATF0.pt", text_prompt=role)
    error = await refused(await connect(session, server, personaplex_query("NATF0.pt", role)))
    assert error == str(expected.value) and "at most 45" in error
    assert agent.active == 0


async def test_persona_asked_of_a_plain_checkpoint(plain_server, session, plain_agent):
    error = await refused(await connect(session, plain_server,
                                        personaplex_query("NATF0.pt", "You sell coffee.")))
    assert "persona" in error.lower(), error
    # Moshi's own client sends neither parameter: a plain conversation, as before.
    client = await Client.connect(session, plain_server)
    assert await client.wait_for(lambda: client.messages)
    assert client.messages[0] == b"\x00"
    await client.close()


# -- WebRTC offer ----------------------------------------------------------------------------------

@pytest.fixture
def loopback_ice(monkeypatch):
    # aioice leaves 127.0.0.1 out of its host candidates; this machine may have nothing else.
    monkeypatch.setattr(aioice.ice, "get_host_addresses",
                        lambda use_ipv4=True, use_ipv6=False: ["127.0.0.1"])


async def _offer(session, url: str, body: dict) -> tuple[int, dict]:
    async with session.post(f"{url}/offer", data=json.dumps(body),
                            headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.json()


async def test_webrtc_offer_carries_the_persona(server, session, agent, loopback_ice):
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import AudioStreamTrack

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(AudioStreamTrack())
    pc.createDataChannel("events")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    try:
        for body, words in (({"voice_prompt": "NOPE.pt"}, "NOPE.pt"),
                            ({"voice_prompt": "../x.pt"}, "../x.pt"),
                            ({"voice_prompt": 3}, "voice_prompt"),
                            ({"voice_prompt": "NATF0.pt", "text_prompt": ["a"]}, "text_prompt")):
            status, reply = await _offer(session, server, {"sdp": sdp, "type": "offer", **body})
            assert status == 400 and words in reply["error"], reply
            if isinstance(body["voice_prompt"], str) and "text_prompt" not in body:
                assert reply["voices"] == VOICES and "VARM4.pt" in reply["error"]
        assert agent.active == 0

        status, answer = await _offer(session, server, {
            "sdp": sdp, "type": "offer", "voice_prompt": "VARF3.pt", "text_prompt": ROLE})
        assert status == 200, answer
        [conv] = agent.conversations()
        assert conv.id == answer["conversation"]
        assert conv.voice_prompt == "VARF3.pt" and conv.text_prompt == ROLE
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
    finally:
        await pc.close()  # the server's shutdown ends the conversation (checked by the fixture)


async def test_webrtc_persona_on_a_plain_checkpoint(plain_server, session, plain_agent):
    status, reply = await _offer(session, plain_server, {"sdp": "v=0", "type": "offer",
                                                         "voice_prompt": "NATF0.pt"})
    assert status == 400 and "persona" in reply["error"].lower(), reply
    assert reply["voices"] == [] and plain_agent.active == 0


# -- /metrics --------------------------------------------------------------------------------------

async def test_stats_and_metrics_show_personas(server, session, agent, speech):
    """/api/stats: each conversation's voice and the start of its role; the prompt cache, also in
    /metrics. The same persona twice is prefilled once, then reused."""
    before = agent.engine.prompt_cache.stats()
    for _ in range(2):
        client = await connect(session, server, personaplex_query("NATF2.pt", LONG_ROLE))
        assert await client.wait_for(lambda: client.messages) and client.messages[0] == b"\x00"
        await client.send_audio(speech[:4 * FRAME_SIZE], pace=False)
        assert await client.wait_for(lambda: client.samples >= 2 * FRAME_SIZE)
        async with session.get(f"{server}/api/stats") as r:
            [entry] = (await r.json())["conversations"]
        await client.close()
    assert entry["voice_prompt"] == "NATF2.pt"
    assert len(LONG_ROLE) > 80 and entry["text_prompt"] == LONG_ROLE[:79] + "…"
    cache = agent.engine.prompt_cache.stats()
    assert cache["misses"] == before["misses"] + 1 and cache["hits"] == before["hits"] + 1
    assert cache["entries"] >= 1 and cache["bytes"] > 0

    async with session.get(f"{server}/metrics") as r:
        text = await r.text()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("duplex_prompt_cache")}
    assert values == {"duplex_prompt_cache_hits_total": cache["hits"],
                      "duplex_prompt_cache_misses_total": cache["misses"],
                      "duplex_prompt_cache_evictions_total": cache["evictions"],
                      "duplex_prompt_cache_bytes": cache["bytes"],
                      "duplex_prompt_cache_entries": cache["entries"]}


# -- run_agent.py file (in this process: a child costs 15 s of imports) ----------------------------

@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory, speech) -> Path:
    path = tmp_path_factory.mktemp("file") / "in.wav"
    soundfile.write(str(path), speech, SAMPLE_RATE)
    return path


def one_line_error(status: int, stderr: str) -> str:
    assert status == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_file_with_a_persona(speech_wav, tmp_path, capsys):
    from duplex_agent.cli import main
    out, tr = tmp_path / "out.wav", tmp_path / "out.json"
    status = main(["file", str(speech_wav), str(out), "--transcript", str(tr), "--checkpoint",
                   "tiny-random-personaplex", "--voice-prompt", "NATF0.pt", "--text-prompt",
                   "You sell coffee.", "--seed", "1", "--device", "cpu"])
    assert status == 0, capsys.readouterr().err
    audio, rate = soundfile.read(str(out), dtype="float32")
    assert rate == SAMPLE_RATE and len(audio) == len(soundfile.read(str(speech_wav))[0])
    assert np.abs(audio).max() > 0 and json.loads(tr.read_text())["pieces"]


@pytest.mark.parametrize("case", ["missing_file", "unknown_name", "malformed_pt", "not_audio",
                                  "plain_checkpoint"])
def test_file_bad_voice_is_one_line_error(case, speech_wav, tmp_path, capsys):
    from duplex_agent.cli import main
    checkpoint = "tiny-random-personaplex"
    if case == "missing_file":
        voice = tmp_path / "nope" / "voice.pt"
    elif case == "unknown_name":
        voice = "NOPE.pt"
    elif case == "malformed_pt":
        voice = tmp_path / "bad.pt"
        torch.save({"embeddings": torch.zeros(3)}, voice)
    elif case == "not_audio":
        voice = tmp_path / "voice.wav"
        voice.write_text("not audio\n" * 50)
    else:
        voice, checkpoint = "NATF0.pt", "tiny-random"
    status = main(["file", str(speech_wav), str(tmp_path / "out.wav"), "--checkpoint", checkpoint,
                   "--voice-prompt", str(voice), "--device", "cpu"])
    line = one_line_error(status, capsys.readouterr().err)
    if case == "plain_checkpoint":
        assert "persona" in line.lower()
    elif case == "missing_file":
        assert str(voice) in line and "no such file" in line
    else:
        assert Path(voice).name in line
    if case in ("missing_file", "unknown_name"):
        assert "NATF0.pt" in line and "VARM4.pt" in line
    assert not (tmp_path / "out.wav").exists()


# -- voices from a folder, and from a file ---------------------------------------------------------

async def test_voice_prompt_dir_and_voice_files(tmp_path, speech_wav, session, capsys):
    """`--voice-prompt-dir` replaces the checkpoint's voices (serve lists and serves exactly the
    folder's, a recording included); `file` takes a voice from such a folder or a file's path."""
    from duplex_agent.cli import build_parser, main
    from duplex_agent.checkpoints.tiny_random import write_tiny_voices
    presets = write_tiny_voices(tmp_path / "presets")
    voices = tmp_path / "voices"
    voices.mkdir()
    for name in ("NATF0.pt", "VARM2.pt"):
        shutil.copy(presets / name, voices / name)
    shutil.copy(speech_wav, voices / "desk.wav")  # a 1 s recording, Mimi-encoded at load

    args = build_parser().parse_args(["serve", "--voice-prompt-dir", str(voices)])
    agent = Agent.load("tiny-random-personaplex", device="cpu", max_conversations=1,
                       voice_prompt_dir=args.voice_prompt_dir)
    try:
        async with serving(agent) as url:
            async with session.get(f"{url}/api/voices") as r:
                assert await r.json() == {"personas": True,
                                          "voices": ["NATF0.pt", "VARM2.pt", "desk.wav"]}
            error = await refused(await connect(session, url, personaplex_query("NATF1.pt", "")))
            assert "NATF1.pt" in error and "desk.wav" in error
            client = await connect(session, url, personaplex_query("desk.wav", ""))
            assert await client.wait_for(lambda: client.messages)
            assert client.messages[0] == b"\x00", client.errors
            assert agent.conversations()[0].voice_prompt == "desk.wav"
            await client.close()
    finally:
        agent.close()

    for extra in (["--voice-prompt-dir", voices, "--voice-prompt", "desk.wav"],
                  ["--voice-prompt", presets / "VARF4.pt", "--text-prompt", "Hi."]):
        out = tmp_path / "out.wav"
        status = main(["file", str(speech_wav), str(out), "--checkpoint",
                       "tiny-random-personaplex", "--device", "cpu", *map(str, extra)])
        assert status == 0, capsys.readouterr().err
        assert out.stat().st_size > 0
        out.unlink()


# -- run_agent.py local ----------------------------------------------------------------------------

@needs_pulse
def test_local_with_a_persona(pulse):
    """`local` on virtual devices (a private PulseAudio): the conversation opens with the voice
    and role given ("VARM2" finds the preset VARM2.pt). Bad voices take `file`'s path, above."""
    r = subprocess.run([sys.executable, str(ROOT / "run_agent.py"), "local", "--checkpoint",
                        "tiny-random-personaplex", "--device", "cpu", "--voice-prompt", "VARM2",
                        "--text-prompt", ROLE, "--duration", "1"],
                       cwd=ROOT, env=pulse, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"persona: voice VARM2.pt, role {ROLE!r}" in r.stderr, r.stderr

"""Voice-agent frameworks, unmodified and with their defaults, against `/v1/realtime`: pipecat's
OpenAIRealtimeLLMService and LiveKit Agents' openai.realtime.RealtimeModel, pointed at the server
by base URL and key and nothing else. They live in a virtualenv of their own (.venv-clients,
built by `bash scripts/setup.sh test` from tests/clients/requirements.txt) so that their
dependencies cannot move the project's pins; each runs as a subprocess (tests/clients/) against a
server this test starts, and prints what it saw as one JSON line.

A framework's default traffic must never produce an `error` event (pipecat stops its receive
loop at most of them, LiveKit logs and reports each): both runs end with no error on either
side, and the server counts no bad event and a single connection (no reconnect).
"""
import asyncio
import json

import aiohttp
import numpy as np
import pytest
import soundfile

from duplex_agent.agent.config import SAMPLE_RATE
from duplex_agent.streams.realtime.events import UtteranceRule
from duplex_agent.streams.security import Policy
from tests.helpers import ROOT, agent_fixture, espeak, needs_espeak, serving

CLIENTS_PYTHON = ROOT / ".venv-clients" / "bin" / "python"
TOKEN = "framework-token"
# tiny-random talks noise that never falls to -45 dBFS: cutting at about its median level makes
# its stream many short responses, so that both frameworks see responses begin and end.
RULE = UtteranceRule(silence_dbfs=-19.0, silence_frames=2)
pytestmark = [needs_espeak, pytest.mark.skipif(
    not CLIENTS_PYTHON.exists(), reason="the framework clients' virtualenv is missing: "
                                        "bash scripts/setup.sh test builds .venv-clients")]


agent = agent_fixture(conversations=2)


@pytest.fixture(scope="module")
def turns(tmp_path_factory) -> tuple[str, str]:
    """Two espeak-ng sentences as 24 kHz 16-bit mono WAVs."""
    folder = tmp_path_factory.mktemp("turns")
    paths = []
    for name, text in (("one", "Hello, who are you?"),
                       ("two", "Tell me about the weather today, please.")):
        pcm = espeak(text, "en", folder / f"{name}-espeak.wav", SAMPLE_RATE)
        path = folder / f"{name}.wav"
        soundfile.write(str(path), np.clip(pcm, -1, 1), SAMPLE_RATE, subtype="PCM_16")
        paths.append(str(path))
    return paths[0], paths[1]


async def run_client(script: str, agent, turns, tmp_path) -> tuple[dict, dict]:
    """(what the client printed, the server's Realtime counters) after one run of `script`."""
    async with serving(agent, static_dir=tmp_path, policy=Policy(auth_token=TOKEN),
                       utterance_rule=RULE) as url:
        proc = await asyncio.create_subprocess_exec(
            str(CLIENTS_PYTHON), str(ROOT / "tests" / "clients" / script), url, TOKEN, *turns,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 120)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, err.decode()[-6000:]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/api/stats",
                                headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                counters = (await r.json())["realtime"]
    return json.loads(out.decode().strip().splitlines()[-1]), counters


async def test_pipecat_with_its_defaults(agent, turns, tmp_path):
    """A Pipeline with LLMContext (system and user message) and its aggregator pair around
    OpenAIRealtimeLLMService(base_url, api_key), default model name: two spoken turns, the
    second over the agent, whose barge-in truncates the agent's item. Agent audio arrives, no
    ErrorFrame, and the service's receive loop still runs at the end."""
    seen, server = await run_client("pipecat_agent.py", agent, turns, tmp_path)
    assert seen["errors"] == []
    assert seen["receive_loop_running"]
    assert seen["agent_audio_ms"] > 0 and seen["user_turns"] >= 2
    assert server["bad_events"] == 0 and server["connections"] == 1
    assert server["client_items"] >= 1  # the context's user message
    assert server["requested_responses"] >= 1 and server["truncated_items"] >= 1


async def test_livekit_agents_with_its_defaults(agent, turns, tmp_path):
    """A RealtimeSession of RealtimeModel(base_url, api_key), every other option its default,
    set up as AgentSession does (instructions, a system and a user message, no tools): two spoken
    turns, generate_reply() resolves, a barge-in interrupts and truncates. Agent audio arrives
    and no `error` event at all is received."""
    seen, server = await run_client("livekit_agent.py", agent, turns, tmp_path)
    assert seen["errors"] == [] and "error" not in seen["server_events"]
    assert seen["reply_user_initiated"]  # response.created echoed the request's metadata
    assert seen["agent_audio_ms"] > 0 and seen["user_turns"] >= 2
    assert seen["context"][:2] == [["system", "Answer in one sentence."], ["user", "Hello!"]]
    answer = "conversation.item.truncated" if seen["truncated_at_ms"] else \
        "conversation.item.deleted"
    assert seen["server_events"].get(answer) == 1
    assert server["bad_events"] == 0 and server["connections"] == 1
    assert server["client_items"] == 2 and server["requested_responses"] == 1

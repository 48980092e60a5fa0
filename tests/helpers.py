"""Small pieces several test files share: espeak-ng speech, a module's Agent, serving an agent on
a free local port, and starting `run_agent.py serve`."""
from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr

ROOT = Path(__file__).resolve().parents[1]

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is needed (bash scripts/setup.sh test installs it)")


def espeak(text: str, voice: str, path, rate: int) -> np.ndarray:
    """espeak-ng speech as float32 mono at `rate`, silence included (`path` is scratch)."""
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True)
    pcm, rate_in = soundfile.read(str(path), dtype="float32")
    return soxr.resample(pcm, rate_in, rate).astype(np.float32)


def espeak_frames(text: str, voice: str, path, frames: int) -> np.ndarray:
    """espeak-ng speech at 24 kHz, zero-padded or cut to exactly `frames` 80 ms frames; skips the
    test where espeak-ng is not installed."""
    from duplex_agent.agent.config import FRAME_SIZE, SAMPLE_RATE
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    pcm = espeak(text, voice, path, SAMPLE_RATE)
    n = frames * FRAME_SIZE
    return np.pad(pcm, (0, max(0, n - len(pcm))))[:n]


def agent_fixture(checkpoint: str = "tiny-random", conversations: int = 2, **load):
    """A module-scoped fixture: Agent.load(checkpoint, device="cpu", max_conversations=
    conversations, **load), closed after the module's last test. Assign it to the fixture's name
    (`agent = agent_fixture(...)`): pytest registers it under that attribute's name."""
    from duplex_agent.agent.api import Agent  # when the test module is imported, as its own was

    @pytest.fixture(scope="module")
    def agent():
        agent = Agent.load(checkpoint, device="cpu", max_conversations=conversations, **load)
        yield agent
        agent.close()
    return agent


@contextlib.asynccontextmanager
async def serving(agent, *, shutdown_timeout: float = 60.0, **app_options):
    """`serve`'s app (create_app(agent, **app_options)) on a free port of 127.0.0.1; yields its
    base URL and stops the server on the way out (`shutdown_timeout`: aiohttp's, for the
    connections still open then)."""
    from aiohttp import web

    from duplex_agent.streams.server import create_app
    runner = web.AppRunner(create_app(agent, **app_options), shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def start_serve(*args: str, scheme: str = "http"):
    """Start `run_agent.py serve ARGS` and wait for its banner; returns (process, base URL,
    everything it printed so far)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "run_agent.py"), "serve", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    banner = re.compile(rb"serving on (" + scheme.encode() + rb"://127\.0\.0\.1:\d+)")
    output = b""
    async with asyncio.timeout(60):
        while not (match := banner.search(output)):
            line = await proc.stdout.readline()
            assert line, f"serve exited early:\n{output.decode()}"
            output += line
    return proc, match.group(1).decode(), output


def _portaudio_present() -> bool:
    try:
        import sounddevice  # noqa: F401  (loads the system libportaudio)
    except OSError:
        return False
    return True


needs_pulse = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("pulseaudio", "pactl", "paplay", "parec", "espeak-ng"))
    or not _portaudio_present(),
    reason="needs pulseaudio, pulseaudio-utils, libportaudio2, libasound2-plugins and espeak-ng "
           "(bash scripts/setup.sh test installs them)")

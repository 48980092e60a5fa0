"""Kyutai's own command-line client, `python -m moshi.client`, unchanged, against our server.

It captures from the (virtual) microphone and plays to the (virtual) speakers through
sounddevice, sending Ogg/Opus over /api/chat and printing the text pieces it receives.
"""
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import aiohttp

from tests.helpers import ROOT, espeak, needs_pulse, start_serve

pytestmark = needs_pulse


async def stats(url):
    async with aiohttp.ClientSession() as s, s.get(f"{url}/api/stats") as r:
        return await r.json()


async def test_moshi_client_converses_with_our_server(pulse, tmp_path):
    speech = tmp_path / "speech.wav"
    espeak("Hello there, this is kyutai's own client talking to a new server.", "en-us",
           tmp_path / "raw.wav", 24_000)
    subprocess.run(["sox", str(tmp_path / "raw.wav"), str(speech), "pad", "0.5", "2"], check=True)
    server, url, _ = await start_serve("--checkpoint", "tiny-random", "--device", "cpu",
                                       "--port", "0", "--max-sessions", "2")
    port = url.rsplit(":", 1)[1]
    feeder = subprocess.Popen(["bash", "-c", f"while true; do paplay --device=micfeed {speech}; done"],
                              env=pulse)
    client = subprocess.Popen([sys.executable, "-m", "moshi.client", "--host", "127.0.0.1",
                               "--port", port], env=pulse, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        best = {}
        for _ in range(120):  # up to 30 s, usually a few
            await asyncio.sleep(0.25)
            conversations = (await stats(url))["conversations"]
            if conversations:
                best = conversations[0]
                if best["frames_in"] >= 40 and best["frames_out"] >= 40:
                    break
        assert best.get("frames_in", 0) >= 40, best  # 3.2 s of the client's microphone
        assert best["frames_out"] >= 40 and best["text_pieces"] > 0, best
        assert best["dropped_input_frames"] == 0
        # Still talking when we stop it: the server never dropped the client.
        assert (await stats(url))["active"] == 1
    finally:
        client.send_signal(signal.SIGINT)
        try:
            out, _ = client.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            client.kill()
            out, _ = client.communicate()
        feeder.kill()
        server.send_signal(signal.SIGINT)
        await server.wait()
    # The client prints the agent's text pieces as they arrive. (On Ctrl+C it closes the socket
    # while its microphone callback still sends, and reports that as a lost connection itself.)
    assert "connected!" in out, out
    printed = out.split("connected!", 1)[1].split("Warning: Interrupting")[0]
    assert len(printed.replace("[LAG]", "").split()) >= 5, out

"""Soak: eight real-time conversations for a bounded time; memory must stay flat and no frame
may be lost.

The load tool (streams/loadtest.py) drives eight websocket clients speaking espeak-ng speech,
paced in real time, against a live server on 127.0.0.1 in this process. Resident memory is
sampled twice a second; after the first third of the run (warm-up: allocator pools, codec
buffers) it must not grow by more than a few percent by the end. Every input frame must be
answered (received == sent, within the model's one-step lag), and the server must count no
dropped input or output frame.

The default is 30 s, to fit CI. For a real soak run it longer, e.g. half an hour:

    SOAK_SECONDS=1800 .venv/bin/python -m pytest -q tests/test_soak.py -s

The figures (latency percentiles, memory at each third) are printed and written to
artifacts/soak.json.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web

from duplex_agent.agent.api import Agent
from duplex_agent.streams.loadtest import format_report, load_speech, run_load
from duplex_agent.streams.server import create_app

CLIENTS = 8
SECONDS = float(os.environ.get("SOAK_SECONDS", "30"))
MAX_GROWTH = 0.03  # resident memory, end vs. end of the first third
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


def resident_bytes() -> int:
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MemorySampler(threading.Thread):
    """Resident memory every `interval_s`, as (seconds since start, bytes), until stopped."""

    def __init__(self, interval_s: float = 0.5):
        super().__init__(name="rss-sampler", daemon=True)
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self._stop_event.is_set():
            self.samples.append((time.monotonic() - t0, resident_bytes()))
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)

    def at(self, t: float, window_s: float = 2.0) -> int:
        """Median of the samples within `window_s` before time t."""
        near = sorted(rss for s, rss in self.samples if t - window_s <= s <= t) or [self.samples[0][1]]
        return near[len(near) // 2]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
async def test_soak_eight_conversations():
    agent = Agent.load("tiny-random", device="cpu", max_conversations=CLIENTS)
    runner = web.AppRunner(create_app(agent))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"ws://127.0.0.1:{runner.addresses[0][1]}/api/chat"
    sampler = MemorySampler()
    try:
        speech = load_speech()
        sampler.start()
        report = await asyncio.wait_for(run_load(url, CLIENTS, SECONDS, speech, drain_s=10),
                                        SECONDS + 60)
    finally:
        sampler.stop()
        await runner.cleanup()
        agent.close()

    duration = sampler.samples[-1][0]
    after_warmup, end = sampler.at(duration / 3), sampler.at(duration)
    growth = (end - after_warmup) / after_warmup
    report["memory"] = {"rss_mb_start": round(sampler.samples[0][1] / 2**20, 1),
                        "rss_mb_after_first_third": round(after_warmup / 2**20, 1),
                        "rss_mb_end": round(end / 2**20, 1), "growth": round(growth, 4)}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "soak.json").write_text(json.dumps(report, indent=2))
    print("\n" + format_report(report) + f"\nmemory: {report['memory']}")

    assert not report["errors"], report["errors"]
    for conv in report["conversations"]:
        assert conv["sent_frames"] >= 0.9 * SECONDS * 12.5, conv  # paced in real time, all along
        assert 0 <= conv["sent_frames"] - conv["received_frames"] <= 1, conv  # the one-step lag at most
    server = report["server"]
    assert server["dropped_input_frames"] == 0 and server["dropped_output_frames"] == 0, server
    assert growth < MAX_GROWTH, report["memory"]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
async def test_loadtest_command(tmp_path):
    """`loadtest` end to end, in its own process, with one client more than the server holds: the
    refusal is reported and the exit status is 1; the others are measured; the JSON is written."""
    import subprocess
    import sys
    wav = tmp_path / "hello.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "Hello there."], check=True, capture_output=True)
    agent = Agent.load("tiny-random", device="cpu", max_conversations=2)
    runner = web.AppRunner(create_app(agent))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"ws://127.0.0.1:{runner.addresses[0][1]}/api/chat"
    out = tmp_path / "report.json"
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "run_agent.py", "loadtest", "--url", url, "--clients", "3",
            "--duration", "2", "--wav", str(wav), "--json", str(out),
            cwd=Path(__file__).resolve().parents[1], stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        output, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await runner.cleanup()
        agent.close()
    report = json.loads(out.read_text())
    assert proc.returncode == 1 and report["failed_conversations"] == 1, output.decode()
    assert "server full" in report["errors"][0]
    measured = [c for c in report["conversations"] if not c["errors"]]
    assert len(measured) == 2 and all(c["received_frames"] == c["sent_frames"] == 25 for c in measured)
    assert report["latency_ms"]["count"] == 50 and report["latency_ms"]["p50"] > 0
    assert report["server"]["refusals"] == {"full": 1.0}
    assert b"frame latency ms: p50" in output

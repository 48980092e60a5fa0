import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# moshi's lazy torch.compile costs 20+ s on the first step; tests run eager.
os.environ.setdefault("NO_TORCH_COMPILE", "1")
# Two cores shared by the test process, its servers and Chromium: torch's spinning worker threads
# would fight each other (a tiny tick goes from ~10 ms to ~500 ms), so each process gets one.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# Without a GPU, Triton kernels can only run in its interpreter; it must be chosen before any
# module that defines kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402

# The test helper modules' assertions explain themselves as the tests' do.
pytest.register_assert_rewrite("tests.helpers", "tests.moshi_client", "tests.twilio_peer")


def pytest_collection_finish(session):
    """What the collected modules imported lives for the whole run: out of the garbage collector's
    full collections (as `serve` does after loading), whose pauses of several hundred ms on a
    busy 2-core machine would otherwise stall the live conversations that tests measure."""
    from duplex_agent.streams.server import settle_heap
    settle_heap()


@pytest.fixture
async def session():
    """An HTTP/websocket client session for tests of a live server."""
    import aiohttp
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


@pytest.fixture(scope="module")
def pulse():
    """Environment for child processes that talk to a private PulseAudio daemon."""
    runtime = tempfile.mkdtemp(prefix="pulse-test-")
    os.chmod(runtime, 0o700)
    # One torch thread: the tiny model needs no more, and on a small shared CPU torch's spinning
    # worker threads can slow a step from 10 ms to 500 ms when another process is busy.
    env = dict(os.environ, XDG_RUNTIME_DIR=runtime, NO_TORCH_COMPILE="1", OMP_NUM_THREADS="1")
    env.pop("PULSE_SERVER", None)
    subprocess.run(
        ["pulseaudio", "-D", "-n", "--exit-idle-time=-1", "--disallow-exit", "--system=false",
         "--load=module-native-protocol-unix",
         "--load=module-null-sink sink_name=speakers",
         "--load=module-null-sink sink_name=micfeed"],
        env=env, check=True, capture_output=True, timeout=30)
    try:
        for cmd in (["pactl", "set-default-sink", "speakers"],
                    ["pactl", "set-default-source", "micfeed.monitor"]):
            subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=10)
        yield env
    finally:
        subprocess.run(["pulseaudio", "--kill"], env=env, capture_output=True, timeout=10)
        shutil.rmtree(runtime, ignore_errors=True)

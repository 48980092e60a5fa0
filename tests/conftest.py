import os
import sys
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


@pytest.fixture
async def session():
    """An HTTP/websocket client session for tests of a live server."""
    import aiohttp
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session

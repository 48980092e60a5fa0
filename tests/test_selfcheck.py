"""The load-time kernel self-check (kernels/selfcheck.py, Engine.warm_up) and its fallbacks: on a
GPU compiled, on CPU in Triton's interpreter, with `auto` made to choose Triton there as it does
on a GPU. A kernel that fails to launch, one that computes wrong values, and a step graph that cannot
be captured each fall back, with a warning and the reason in /api/stats and /metrics; forced
choices (AGENT_KERNELS=triton, AGENT_CUDA_GRAPHS=1) make the same failures errors."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and the Triton interpreter is not enabled", allow_module_level=True)

from duplex_agent.agent.config import FRAME_SIZE  # noqa: E402
from duplex_agent.agent.engine import Engine, KernelCheckError  # noqa: E402
from duplex_agent.checkpoints.loader import load_checkpoint  # noqa: E402
from duplex_agent.kernels import dispatch, rms_norm, selfcheck, silu_gate  # noqa: E402

tl = triton.language
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _broken_silu_gate_kernel(gu_ptr, out_ptr, H, stride_gu, stride_out, BLOCK: tl.constexpr):
    # A kernel that cannot run: it loads through an integer, not a pointer.
    tl.store(out_ptr + tl.arange(0, BLOCK), tl.load(H + tl.arange(0, BLOCK)))


def _rms_norm_slightly_off(x, alpha, eps, add=None):
    out = rms_norm.rms_norm_ref(x, alpha, eps, add)
    if add is None:
        return out * 1.01
    return out[0], out[1] * 1.01


@pytest.fixture
def triton_here(monkeypatch):
    """`auto` picks Triton on this CPU (the interpreter), as it does on CUDA; no fallback from an
    earlier test is remembered."""
    monkeypatch.delenv("AGENT_KERNELS", raising=False)
    monkeypatch.setattr(dispatch, "triton_by_default", lambda device: True)
    dispatch.forget_fallbacks()
    yield
    dispatch.forget_fallbacks()


def _engine(max_sessions: int = 2) -> Engine:
    return Engine(load_checkpoint("tiny-random", DEVICE), max_sessions)


def _talk(engine: Engine, frames: int = 3) -> None:
    row = engine.open()
    pcm = (np.random.default_rng(0).standard_normal(FRAME_SIZE) * 0.1).astype(np.float32)
    for _ in range(frames):
        assert engine.tick({row: pcm})[row].pcm.shape == (FRAME_SIZE,)
    engine.close(row)


def test_every_kernel_passes_on_a_sound_device(triton_here):
    engine = _engine()
    [shapes] = engine.kernel_shapes()
    checks = selfcheck.check_kernels(shapes, engine.device)
    assert [c.kernel for c in checks] == list(shapes.kernels())
    assert all(c.ok for c in checks), [c.problem for c in checks if not c.ok]
    assert all(c.cases for c in checks)


def test_a_kernel_that_fails_to_launch_falls_back(triton_here, monkeypatch, caplog):
    monkeypatch.setattr(silu_gate, "_silu_gate_kernel", _broken_silu_gate_kernel)
    engine = _engine()
    with caplog.at_level(logging.WARNING):
        engine.warm_up()
    paths = engine.describe()["kernels"]
    assert paths["silu_gate"]["path"] == "torch"
    assert paths["rms_norm"] == {"path": "triton"} and paths["decode_attention"] == {"path": "triton"}
    warnings = [r.getMessage() for r in caplog.records if "silu_gate" in r.getMessage()]
    assert len(warnings) == 1 and "torch reference" in warnings[0]
    assert paths["silu_gate"]["why"] in warnings[0]
    assert not dispatch.use_triton(torch.zeros(1, device=DEVICE), "silu_gate")
    _talk(engine)  # the engine runs on, on the reference


def test_a_kernel_with_wrong_values_falls_back_saying_by_how_much(triton_here, monkeypatch, caplog):
    monkeypatch.setattr(rms_norm, "rms_norm_triton", _rms_norm_slightly_off)
    engine = _engine()
    with caplog.at_level(logging.WARNING):
        engine.warm_up()
    why = engine.describe()["kernels"]["rms_norm"]["why"]
    assert "max |diff|" in why and "allowed" in why
    assert engine.describe()["kernels"]["silu_gate"] == {"path": "triton"}
    assert any("rms_norm" in r.getMessage() and why in r.getMessage() for r in caplog.records)


def test_forced_triton_that_fails_is_an_error(triton_here, monkeypatch):
    monkeypatch.setenv("AGENT_KERNELS", "triton")
    monkeypatch.setattr(rms_norm, "rms_norm_triton", _rms_norm_slightly_off)
    engine = _engine()
    with pytest.raises(KernelCheckError, match="AGENT_KERNELS=triton, but rms_norm failed"):
        engine.warm_up()
    assert dispatch.kernel_paths(engine.device)["rms_norm"] == {"path": "triton"}  # no silent switch


def _failing_capture():
    raise RuntimeError("operation not permitted when stream is capturing")


def test_a_failing_graph_capture_runs_eagerly(monkeypatch, caplog):
    monkeypatch.delenv("AGENT_CUDA_GRAPHS", raising=False)
    engine = _engine()
    engine.lm.cuda_graph = True  # as on CUDA: the step would be captured
    monkeypatch.setattr(engine.lm, "_capture", _failing_capture)
    with caplog.at_level(logging.WARNING):
        engine.warm_up()
    described = engine.describe()
    assert described["cuda_graphs"] is False
    assert "operation not permitted" in described["cuda_graphs_why"]
    assert any("CUDA graph could not be captured" in r.getMessage() for r in caplog.records)
    _talk(engine)


def test_forced_graphs_that_fail_to_capture_are_an_error(monkeypatch):
    monkeypatch.setenv("AGENT_CUDA_GRAPHS", "1")
    engine = _engine()
    engine.lm.cuda_graph = True
    monkeypatch.setattr(engine.lm, "_capture", _failing_capture)
    with pytest.raises(RuntimeError, match="operation not permitted"):
        engine.warm_up()


async def test_stats_and_metrics_say_what_fell_back(triton_here, monkeypatch):
    pytest.importorskip("sphn")  # the serving stack (absent from a bare GPU image)
    pytest.importorskip("aiortc")
    import aiohttp

    from duplex_agent.agent.api import Agent
    from duplex_agent.streams.server import kernels_summary
    from tests.helpers import serving
    monkeypatch.setattr(silu_gate, "_silu_gate_kernel", _broken_silu_gate_kernel)
    agent = Agent.load("tiny-random", device=DEVICE, max_conversations=1)
    try:
        async with serving(agent) as base, aiohttp.ClientSession() as session:
            async with session.get(f"{base}/api/stats") as r:
                kernels = (await r.json())["engine"]["kernels"]
            async with session.get(f"{base}/metrics") as r:
                metrics = await r.text()
        assert kernels["silu_gate"]["path"] == "torch" and kernels["silu_gate"]["why"]
        assert kernels["sampling"] == {"path": "triton"}
        assert 'duplex_kernel_path{kernel="silu_gate",path="torch"} 1.0' in metrics
        assert 'duplex_kernel_path{kernel="sampling",path="triton"} 1.0' in metrics
        assert kernels_summary(kernels) == "triton (torch: silu_gate)"
    finally:
        agent.close()


def test_nothing_is_checked_where_nothing_runs_triton(monkeypatch):
    """On CPU under auto every kernel runs its reference: no check runs, none falls back."""
    monkeypatch.delenv("AGENT_KERNELS", raising=False)
    dispatch.forget_fallbacks()
    engine = Engine(load_checkpoint("tiny-random", "cpu"), 1)
    # A check that ran would now fail (KeyError, caught into a failed check) and fall back.
    monkeypatch.setattr(selfcheck, "CHECKS", {})
    selections = []
    check_kernels = selfcheck.check_kernels

    def recording_check_kernels(shapes, device, only=None):
        selections.append(only)
        return check_kernels(shapes, device, only)

    # Engine.check_kernels looks the function up on the module at call time.
    monkeypatch.setattr(selfcheck, "check_kernels", recording_check_kernels)
    engine.warm_up()
    assert selections, "warm-up did not reach the kernel self-check"
    assert all(only is not None and len(only) == 0 for only in selections), selections
    kernels = engine.describe()["kernels"]
    assert kernels["rms_norm"] == {"path": "torch"}
    assert kernels and all(path == {"path": "torch"} for path in kernels.values()), kernels

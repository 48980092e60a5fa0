"""The public async API: many conversations through one engine thread, bad input, backpressure."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from duplex_agent.agent.api import Agent, AgentFull, AudioOut, ConversationClosed, ErrorOut, TextOut
from duplex_agent.agent.config import FRAME_SIZE
from duplex_agent.checkpoints.tiny_random import synthetic_audio


@pytest.fixture(scope="module")
def agent():
    a = Agent.load("tiny-random", device="cpu", max_conversations=3)
    yield a
    a.close()


def speech(seconds, rate=24_000, seed=0):
    pcm = synthetic_audio(int(seconds * 24_000), seed=seed).numpy().reshape(-1)
    if rate == 24_000:
        return pcm
    import soxr
    return soxr.resample(pcm, 24_000, rate).astype(np.float32)


async def collect(conv, frames):
    audio, text = [], []
    async for event in conv.events():
        if isinstance(event, AudioOut):
            audio.append(event)
            if len(audio) == frames:
                break
        elif isinstance(event, TextOut):
            text.append(event)
        else:
            raise AssertionError(f"unexpected {event}")
    return audio, text


async def test_several_conversations_at_once(agent):
    convs = [agent.open() for _ in range(3)]
    assert agent.active == 3
    rng = np.random.default_rng(0)

    async def feed(conv, seed, rate):
        pcm = speech(2.0, rate, seed)
        i = 0
        while i < len(pcm):  # odd chunk sizes, as a network would deliver them
            n = int(rng.integers(100, 3000))
            conv.push(pcm[i:i + n], rate=rate)
            i += n
            await asyncio.sleep(0.01)

    rates = [24_000, 48_000, 16_000]
    results = await asyncio.gather(*[feed(c, k, r) for k, (c, r) in enumerate(zip(convs, rates))],
                                   *[collect(c, 20) for c in convs])
    for conv, (audio, text) in zip(convs, results[3:]):
        assert [a.step for a in audio] == list(range(20))
        assert all(a.pcm.shape == (FRAME_SIZE,) and a.pcm.dtype == np.float32 for a in audio)
        assert np.sqrt(np.mean(np.concatenate([a.pcm for a in audio[1:]]) ** 2)) > 1e-3
        assert text and all(0 <= t.start < t.end for t in text)
        assert conv.stats.dropped_input_frames == 0
        report = conv.report()  # turn-taking from webrtcvad on both sides, as the model heard them
        assert report["turns"]["user_segments"] >= 1 and report["turns"]["agent_segments"] >= 1
        assert report["frames_out"] >= 20
    assert max(agent._driver.batch_sizes) >= 2, "conversations shared ticks"
    for conv in convs:
        conv.close()
        while (event := await asyncio.wait_for(conv.recv(), 10)) is not None:
            assert isinstance(event, (AudioOut, TextOut))  # what was produced before the close
    assert agent.active == 0


async def test_full_agent_refuses_then_admits_after_close(agent):
    convs = [agent.open() for _ in range(3)]
    with pytest.raises(AgentFull, match="3 conversation slots"):
        agent.open()
    convs[0].close()
    again = agent.open()
    for c in convs[1:] + [again]:
        c.close()


@pytest.mark.parametrize("bad, rate, error, match", [
    (np.zeros(1920, dtype=np.int32), 24_000, TypeError, "float32 or int16"),
    (np.full(1920, np.nan, dtype=np.float32), 24_000, ValueError, "NaN"),
    (np.zeros(1920, dtype=np.float32), 5, ValueError, "sample rate"),
    (np.zeros(1920, dtype=np.float32), 44_100.5, ValueError, "sample rate"),
    (np.zeros((1920, 2), dtype=np.float32), 24_000, ValueError, "mono"),
])
async def test_bad_input_is_a_clear_error_and_the_conversation_goes_on(agent, bad, rate, error,
                                                                       match):
    conv = agent.open()
    try:
        with pytest.raises(error, match=match):
            conv.push(bad, rate=rate)
        conv.push(np.zeros(2 * FRAME_SIZE, dtype=np.int16))  # int16 is accepted
        audio, _ = await asyncio.wait_for(collect(conv, 2), 30)
        assert len(audio) == 2
    finally:
        conv.close()
    with pytest.raises(ConversationClosed):
        conv.push(np.zeros(10, dtype=np.float32))


async def test_backlog_overflow_is_counted_and_send_does_not_drop(agent):
    live = agent.open()
    pcm = speech(6.0)  # 75 frames at once: far faster than real time
    live.push(pcm)
    frames = len(pcm) // FRAME_SIZE
    assert live.stats.frames_in == frames
    assert live.stats.dropped_input_frames == frames - 25  # backlog holds 2 s
    audio, _ = await asyncio.wait_for(collect(live, 25), 60)
    assert len(audio) == 25
    live.close()

    careful = agent.open()
    reader = asyncio.create_task(collect(careful, frames))
    await careful.send(pcm)  # waits for room instead of dropping
    audio, _ = await asyncio.wait_for(reader, 120)
    assert len(audio) == frames and careful.stats.dropped_input_frames == 0
    careful.close()


async def test_a_sender_waiting_for_room_is_released_by_close(agent):
    conv = agent.open()
    sender = asyncio.create_task(conv.send(speech(20.0)))  # far more than the 2 s backlog
    while conv.backlog < 25:
        await asyncio.sleep(0.01)
    assert not sender.done()
    conv.close()
    with pytest.raises(ConversationClosed):
        await asyncio.wait_for(sender, 30)


def test_a_failing_warm_up_is_raised_by_agent_load(monkeypatch):
    from duplex_agent.agent.engine import Engine

    def broken(self):
        raise RuntimeError("simulated: no kernel image for this device")
    monkeypatch.setattr(Engine, "warm_up", broken)
    with pytest.raises(RuntimeError, match="no kernel image"):
        Agent.load("tiny-random", device="cpu", max_conversations=1)


async def test_failing_tick_ends_only_its_conversations(agent):
    victim = agent.open()
    # One frame through first: ticks run one at a time on the engine thread, so once this frame's
    # audio is back no earlier test's tick is still on its way to the patched step below.
    victim.push(np.zeros(FRAME_SIZE, dtype=np.float32))
    first, _ = await asyncio.wait_for(collect(victim, 1), 30)
    assert len(first) == 1
    original = agent.engine.lm.step
    calls = {"n": 0}

    def failing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device fault")
        return original(*args, **kwargs)

    agent.engine.lm.step = failing_step
    try:
        victim.push(np.zeros(FRAME_SIZE, dtype=np.float32))
        event = await asyncio.wait_for(victim.recv(), 30)
        assert isinstance(event, ErrorOut) and "internal error" in event.message
        assert victim.closed and agent.active == 0
        survivor = agent.open()  # the engine keeps serving
        survivor.push(np.zeros(2 * FRAME_SIZE, dtype=np.float32))
        audio, _ = await asyncio.wait_for(collect(survivor, 2), 30)
        assert len(audio) == 2
        survivor.close()
    finally:
        del agent.engine.lm.step
    assert agent._driver.failed_ticks >= 1

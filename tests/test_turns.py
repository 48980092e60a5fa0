"""Turn-taking metrics (agent/turns.py) on scripted two-speaker recordings made of espeak-ng speech.

Ground truth comes from each placed clip's own energy envelope (first and last 10 ms window above
-40 dBFS), so the tolerances only have to cover the VAD's 30 ms frame grid.
"""
from __future__ import annotations


import numpy as np
import pytest
import soundfile
import soxr

from duplex_agent.agent.turns import TurnTaking
from tests.helpers import espeak, needs_espeak

RATE = 24_000
TOL = 0.045  # 1.5 VAD frames: segment edges fall on the 30 ms frame grid

pytestmark = needs_espeak


def speech(text: str, voice: str, path) -> np.ndarray:
    """Speech at RATE with leading and trailing silence cut off."""
    pcm = espeak(text, voice, path, RATE)
    start, end = span(pcm)
    return pcm[int(start * RATE):int(end * RATE)]


def span(pcm: np.ndarray) -> tuple[float, float]:
    """(first, last) time in seconds where the 10 ms energy envelope is above -40 dBFS."""
    n = RATE // 100
    env = np.convolve(pcm.astype(np.float64) ** 2, np.ones(n) / n, mode="same")
    loud = np.flatnonzero(env > 1e-4)
    return loud[0] / RATE, (loud[-1] + 1) / RATE


def place(clip: np.ndarray, at: float, total: float) -> np.ndarray:
    out = np.zeros(int(total * RATE), dtype=np.float32)
    i = int(at * RATE)
    out[i:i + len(clip)] = clip[:len(out) - i]
    return out


def cut(clip: np.ndarray, length: float) -> np.ndarray:
    """The first `length` seconds of a clip, with a 10 ms fade-out (speech stopping mid-word)."""
    out = clip[:int(length * RATE)].copy()
    out[-RATE // 100:] *= np.linspace(1.0, 0.0, RATE // 100, dtype=np.float32)
    return out


def scripted(tmp_path, user: np.ndarray, agent: np.ndarray) -> TurnTaking:
    """Write the two tracks as one stereo WAV, read it back and feed it as a live session would:
    the user in 20 ms blocks, the agent in 80 ms frames, each with its own timestamps."""
    wav = tmp_path / "dialogue.wav"
    soundfile.write(str(wav), np.stack([user, agent], axis=1), RATE, subtype="FLOAT")
    both, rate = soundfile.read(str(wav), dtype="float32")
    assert rate == RATE
    tt = TurnTaking(rate=RATE)
    for channel, block, feed in ((both[:, 0], 480, tt.add_user), (both[:, 1], 1920, tt.add_agent)):
        for i in range(0, len(channel), block):
            feed(channel[i:i + block], i / RATE)
    return tt


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("speech")
    return {
        "question": speech("Could you tell me the weather for tomorrow", "en-us", d / "q.wav"),
        "answer": speech("Tomorrow will be sunny and warm all day long", "en-gb-x-rp+f3",
                         d / "a.wav"),
        "story": speech("Once upon a time there was a little robot who lived in a big old "
                        "house by the sea", "en-gb-x-rp+f3", d / "s.wav"),
        "stop": speech("Wait a moment please", "en-us", d / "w.wav"),
    }


def assert_segments(found, expected):
    assert len(found) == len(expected), (found, expected)
    for (s, e), (s0, e0) in zip(found, expected, strict=True):
        assert abs(s - s0) <= TOL and abs(e - e0) <= TOL, ((s, e), (s0, e0))


def test_response_latency(clips, tmp_path):
    # The question is trimmed to 1.5 s so the user speaks 0.5-2.0 s; the agent answers at 2.6 s.
    question = cut(clips["question"], 1.5)
    answer = clips["answer"][:int(1.4 * RATE)]
    user, agent = place(question, 0.5, 5.0), place(answer, 2.6, 5.0)
    truth_user, truth_agent = span(user), span(agent)
    tt = scripted(tmp_path, user, agent)

    assert_segments(tt.segments()["user"], [truth_user])
    assert_segments(tt.segments()["agent"], [truth_agent])
    expected = truth_agent[0] - truth_user[1]
    assert abs(expected - 0.6) < 0.05
    [latency] = tt.response_latencies()
    assert abs(latency - expected) <= 2 * TOL
    s = tt.summary()
    assert s["responses"] == 1 and s["response_latency_p50_s"] == s["response_latency_mean_s"]
    assert s["barge_ins"] == 0 and s["agent_interruptions"] == 0 and s["overlap_s"] == 0


def test_barge_in_reaction(clips, tmp_path):
    # The agent tells a story from 0.5 s; the user cuts in at 2.5 s and the agent stops 0.4 s later.
    user_start, reaction = 2.5, 0.4
    story = cut(clips["story"], user_start + reaction - 0.5)
    user, agent = place(clips["stop"], user_start, 5.0), place(story, 0.5, 5.0)
    truth_user, truth_agent = span(user), span(agent)
    tt = scripted(tmp_path, user, agent)

    assert_segments(tt.segments()["user"], [truth_user])
    assert_segments(tt.segments()["agent"], [truth_agent])
    [barge] = tt.barge_ins()
    assert barge["yielded"]
    assert abs(barge["reaction"] - reaction) <= 2 * TOL
    s = tt.summary()
    assert s["barge_ins"] == s["barge_ins_yielded"] == 1
    assert abs(s["barge_in_reaction_p50_s"] - reaction) <= 2 * TOL
    assert abs(s["overlap_s"] - reaction) <= 2 * TOL
    assert s["responses"] == 0  # the agent was talking when the user stopped: not an answer


def test_overlap_and_agent_interruption(clips, tmp_path):
    # The agent starts answering 0.5 s before the user has finished.
    question = clips["question"]
    user = place(question, 0.5, 5.0)
    truth_user = span(user)
    agent = place(clips["answer"][:int(1.5 * RATE)], truth_user[1] - 0.5, 5.0)
    truth_agent = span(agent)
    tt = scripted(tmp_path, user, agent)

    assert_segments(tt.segments()["user"], [truth_user])
    assert_segments(tt.segments()["agent"], [truth_agent])
    s = tt.summary()
    assert abs(s["overlap_s"] - (truth_user[1] - truth_agent[0])) <= 2 * TOL
    assert s["agent_interruptions"] == 1
    assert s["barge_ins"] == 0 and s["responses"] == 0


def test_pauses_inside_an_utterance_do_not_split_it(clips, tmp_path):
    # Two phrases 200 ms apart are one turn; 600 ms apart they are two.
    q = clips["question"][:int(0.8 * RATE)]
    for gap, segments in ((0.2, 1), (0.6, 2)):
        user = place(q, 0.5, 4.0) + place(q, 0.5 + len(q) / RATE + gap, 4.0)
        tt = scripted(tmp_path, user, np.zeros_like(user))
        assert len(tt.segments()["user"]) == segments
        assert tt.segments()["agent"] == []


def test_rates_and_timeline_gaps(clips):
    # Each side may come at its own rate; a jump ahead in the timestamps (lost audio) restarts
    # the frame clock at the new time instead of shifting everything after it.
    tt = TurnTaking()
    speech48 = soxr.resample(clips["question"], RATE, 48_000).astype(np.float32)
    tt.add_user(np.zeros(48_000, np.float32), 0.0, rate=48_000)
    tt.add_user(speech48, 3.0, rate=48_000)  # 2 s of input are missing
    [(start, end)] = tt.segments()["user"]
    assert abs(start - 3.0) <= TOL and abs(end - (3.0 + len(speech48) / 48_000)) <= TOL
    # A burst of buffered audio stamped with times already analysed is not counted twice.
    tt.add_user(speech48[:48_000], 3.2, rate=48_000)
    assert tt.segments()["user"] == [(start, end)]
    assert tt.summary()["agent_segments"] == 0

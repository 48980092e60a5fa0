"""Echo cancellation (streams/aec.py) on a simulated echo path.

The far end (the agent) is espeak-ng speech; the microphone hears it delayed, attenuated and
low-passed with a short room tail, plus the user (another voice) who speaks once alone and once
over the agent (double talk), plus a faint noise floor. The canceller sees both streams in
uneven blocks, far end first, as a live session feeds it.

* Echo return loss enhancement over echo-only stretches after the first 2 s (convergence):
  ERLE = 10 log10(P(mic) / P(output)) >= 20 dB.
* The user survives where they speak alone. AEC3 always high-passes its output and delays it by
  ~9 ms, and espeak voices carry much energy below 200 Hz, so a raw waveform correlation says
  little; the comparison is band-limited (200-4000 Hz) with the delay searched (>= 0.8), and on
  magnitude spectrograms (>= 0.8), at nearly the original level.
* In double talk the output still follows the user more than the agent's echo.
"""
from __future__ import annotations


import numpy as np
import pytest

from duplex_agent.streams.aec import EchoCanceller, PassThrough
from tests.helpers import espeak, needs_espeak

RATE = 48_000
DURATION = 12.0

pytestmark = needs_espeak


def speech(text: str, voice: str, path) -> np.ndarray:
    pcm = espeak(text, voice, path, RATE)
    loud = np.flatnonzero(np.abs(pcm) > 0.01)
    return pcm[loud[0]:loud[-1] + 1]


def place(clip: np.ndarray, at: float) -> np.ndarray:
    out = np.zeros(int(DURATION * RATE), dtype=np.float32)
    i = int(at * RATE)
    out[i:i + len(clip)] = clip[:len(out) - i]
    return out


def fft_convolve(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    n = len(x) + len(h) - 1
    size = 1 << (n - 1).bit_length()
    return np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)[:len(x)]


def echo_path(delay_s: float, gain: float = 0.5) -> np.ndarray:
    """Impulse response: a delayed direct path, a 30 ms decaying diffuse tail, a gentle low-pass."""
    rng = np.random.default_rng(0)
    d, tail = int(delay_s * RATE), int(0.03 * RATE)
    h = np.zeros(d + tail)
    h[d] = 1.0
    h[d:] += rng.standard_normal(tail) * np.exp(-np.arange(tail) / (0.006 * RATE)) * 0.25
    lowpass = np.hanning(15) / np.hanning(15).sum()
    return np.convolve(h, lowpass)[:len(h)] * gain


def activity(x: np.ndarray, threshold_db: float = -45.0) -> np.ndarray:
    n = RATE // 50
    power = np.convolve(x.astype(np.float64) ** 2, np.ones(n) / n, mode="same")
    return power > 10 ** (threshold_db / 10)


def dilate(mask: np.ndarray, seconds: float) -> np.ndarray:
    k = int(seconds * RATE)
    return np.convolve(mask.astype(float), np.ones(2 * k + 1), mode="same") > 0


def bandpass(x: np.ndarray, lo: float = 200.0, hi: float = 4000.0) -> np.ndarray:
    spectrum = np.fft.rfft(x)
    f = np.fft.rfftfreq(len(x), 1 / RATE)
    spectrum[(f < lo) | (f > hi)] = 0
    return np.fft.irfft(spectrum, len(x))


def best_lag_correlation(ref: np.ndarray, out: np.ndarray, mask: np.ndarray,
                         max_lag_s: float = 0.02) -> float:
    """Band-limited correlation of `out` with `ref` over `mask`, `out` shifted back by the lag
    (0..max_lag_s) that matches best."""
    ref, out = bandpass(ref), bandpass(out)
    size = 1 << (2 * len(ref) - 1).bit_length()
    xc = np.fft.irfft(np.fft.rfft(out, size) * np.conj(np.fft.rfft(ref * mask, size)), size)
    lag = int(np.argmax(xc[:int(max_lag_s * RATE) + 1]))
    a, b = ref[mask], np.roll(out, -lag)[mask]
    return float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)))


def spectrogram_correlation(ref: np.ndarray, out: np.ndarray, mask: np.ndarray) -> float:
    n = int(0.032 * RATE)
    window = np.hanning(n)

    def frames(x):
        return np.lib.stride_tricks.sliding_window_view(x, n)[::n // 2]
    keep = frames(mask).all(axis=1)
    a = np.abs(np.fft.rfft(frames(ref)[keep] * window, axis=1)).ravel()
    b = np.abs(np.fft.rfft(frames(out)[keep] * window, axis=1)).ravel()
    return float(np.corrcoef(a, b)[0, 1])


@pytest.fixture(scope="module")
def voices(tmp_path_factory):
    d = tmp_path_factory.mktemp("voices")
    return {
        "agent1": speech("The weather today is sunny with a light breeze from the west, and "
                         "tomorrow looks much the same.", "en-us", d / "a1.wav"),
        "agent2": speech("I can also tell you about the news, sports, or anything else.",
                         "en-us", d / "a2.wav"),
        "user1": speech("Wait, what about the weekend?", "en-gb-x-rp+f3", d / "u1.wav"),
        "user2": speech("No, stop, tell me about sports.", "en-gb-x-rp+f3", d / "u2.wav"),
    }


def scene(voices, delay_s: float) -> dict:
    far = place(voices["agent1"], 0.3) + place(voices["agent2"], 8.0)
    user = place(voices["user1"], 6.2) + place(voices["user2"], 10.0)  # alone, then double talk
    echo = fft_convolve(far, echo_path(delay_s)).astype(np.float32)
    noise = np.random.default_rng(1).standard_normal(len(far)).astype(np.float32) * 10 ** (-70 / 20)
    return {"far": far, "user": user, "echo": echo, "mic": echo + user + noise}


def run_live(canceller, far: np.ndarray, mic: np.ndarray, block: int = 700) -> np.ndarray:
    """Feed both directions in uneven blocks (not a multiple of the 10 ms frame), far end first."""
    out = []
    for i in range(0, len(mic), block):
        canceller.far_end(far[i:i + block])
        out.append(canceller.capture(mic[i:i + block]))
    out = np.concatenate(out)
    assert len(mic) - len(out) < canceller.frame  # only the last partial frame is held back
    return np.pad(out, (0, len(mic) - len(out)))


@pytest.mark.parametrize("delay_ms", [40, 120])
def test_echo_cancelled_user_kept(voices, delay_ms):
    s = scene(voices, delay_ms / 1000)
    out = run_live(EchoCanceller(RATE), s["far"], s["mic"])
    t = np.arange(len(out)) / RATE
    user_on, echo_on = activity(s["user"]), activity(s["echo"])
    echo_only = echo_on & ~dilate(user_on, 0.1) & (t > 2.0)
    user_only = user_on & ~dilate(echo_on, 0.1)
    double_talk = user_on & echo_on
    assert echo_only.sum() > 3 * RATE and user_only.sum() > RATE and double_talk.sum() > RATE

    erle = 10 * np.log10(np.mean(s["mic"][echo_only] ** 2) / np.mean(out[echo_only] ** 2))
    assert erle >= 20, f"ERLE {erle:.1f} dB"

    assert best_lag_correlation(s["user"], out, user_only) > 0.8
    assert spectrogram_correlation(s["user"], out, user_only) > 0.8
    level = 10 * np.log10(np.mean(out[user_only] ** 2) / np.mean(s["user"][user_only] ** 2))
    assert abs(level) < 2, f"user level changed by {level:.1f} dB"

    to_user = spectrogram_correlation(s["user"], out, double_talk)
    to_echo = spectrogram_correlation(s["echo"], out, double_talk)
    assert to_user > to_echo, (to_user, to_echo)


def test_pass_through_changes_nothing():
    x = np.random.default_rng(0).uniform(-0.5, 0.5, 1234).astype(np.float32)
    aec = PassThrough(RATE)
    aec.far_end(x)
    assert np.array_equal(aec.capture(x), x)

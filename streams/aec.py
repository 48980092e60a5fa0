"""Acoustic echo cancellation for local sessions: the agent's voice leaks from the speakers back
into the microphone, and without cancelling it the agent hears (and answers) itself.

`EchoCanceller` wraps WebRTC's audio processing module (AEC3, with its delay estimator, linear
filter and residual echo suppressor) as shipped in the `livekit` wheel. It was chosen over the
speexdsp canceller by measurement on a simulated echo path (tests/test_aec.py, 48 kHz, 40-120 ms
echo delay): 58 dB echo return loss enhancement after 2 s, against 16-21 dB for speexdsp's linear
filter (its `speexdsp` binding has no residual echo suppressor), with the user's own speech kept
at its level (-0.3 dB).

One behaviour to know: for its first seconds AEC3 does not yet know how strongly the speakers
couple into the microphone, and while the far end is active it attenuates near-end speech too
(measured up to ~10 dB in the first 2-4 s with no echo path at all; gone after ~8 s).

Both directions accept blocks of any length and are buffered into 10 ms frames internally:

    aec = EchoCanceller(48_000)
    aec.far_end(played)         # what was handed to the speakers, as it is handed over
    clean = aec.capture(mic)    # the microphone; returns the processed samples ready so far

Far-end audio must be given before the microphone block that contains its echo (the natural order
when it is recorded as it is played). `capture` adds up to one frame (10 ms) of buffering and
returns whole frames only, so its output length can differ from its input per call; the total
is the same. `PassThrough` has the same interface and changes nothing (for headphones).
"""
from __future__ import annotations

import numpy as np


FRAME_MS = 10  # WebRTC's audio processing works on 10 ms frames only


class EchoCanceller:
    def __init__(self, rate: int, delay_ms: int = 0):
        """`rate`: sample rate of both directions (any rate; the module resamples internally).
        `delay_ms`: a hint for the delay between `far_end` and its echo in `capture`
        (playback latency + capture latency); AEC3 estimates the real delay itself."""
        from livekit import rtc  # heavy: loads the native WebRTC library

        self.rate = rate
        self.frame = rate * FRAME_MS // 1000
        self._rtc = rtc
        # (AEC3 high-passes the capture signal whether or not this filter is asked for.)
        self._apm = rtc.AudioProcessingModule(echo_cancellation=True, high_pass_filter=True)
        self._apm.set_stream_delay_ms(int(round(delay_ms)))
        self._far = np.zeros(0, dtype=np.int16)
        self._mic = np.zeros(0, dtype=np.int16)

    @property
    def pending(self) -> int:
        """Microphone samples held back until their 10 ms frame is complete."""
        return len(self._mic)

    def far_end(self, pcm: np.ndarray) -> None:
        """The reference signal: audio as it goes to the speakers (mono float32)."""
        self._far = np.concatenate([self._far, _to_int16(pcm)])
        n = len(self._far) // self.frame
        for i in range(n):
            frame = self._frame(self._far[i * self.frame:(i + 1) * self.frame])
            self._apm.process_reverse_stream(frame)
        self._far = self._far[n * self.frame:]

    def capture(self, pcm: np.ndarray) -> np.ndarray:
        """Microphone audio in; the echo-cancelled microphone out (mono float32)."""
        self._mic = np.concatenate([self._mic, _to_int16(pcm)])
        n = len(self._mic) // self.frame
        out = np.empty(n * self.frame, dtype=np.int16)
        for i in range(n):
            frame = self._frame(self._mic[i * self.frame:(i + 1) * self.frame])
            self._apm.process_stream(frame)  # in place
            out[i * self.frame:(i + 1) * self.frame] = np.frombuffer(frame.data, dtype=np.int16)
        self._mic = self._mic[n * self.frame:]
        return out.astype(np.float32) / 32768.0

    def _frame(self, samples: np.ndarray):
        return self._rtc.AudioFrame(bytearray(samples.tobytes()), self.rate, 1, self.frame)


class PassThrough:
    """The no-op canceller: with headphones there is no echo to remove."""

    pending = 0

    def __init__(self, rate: int):
        self.rate = rate

    def far_end(self, pcm: np.ndarray) -> None:
        pass

    def capture(self, pcm: np.ndarray) -> np.ndarray:
        return np.asarray(pcm, dtype=np.float32)


def _to_int16(pcm: np.ndarray) -> np.ndarray:
    x = np.asarray(pcm, dtype=np.float32).reshape(-1)
    return (np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)

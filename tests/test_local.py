"""`run_agent.py local` end to end on virtual audio devices.

A private PulseAudio daemon (user mode, its own XDG_RUNTIME_DIR) provides two null sinks:
`speakers`, where the session plays (its monitor is recorded with parec), and `micfeed`, whose
monitor is the session's microphone; `paplay` plays espeak-ng speech into it. PortAudio reaches
PulseAudio through the ALSA `pulse` plugin (libasound2-plugins).
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr

ROOT = Path(__file__).resolve().parents[1]
SENTENCE = "Hello agent, can you hear me over the virtual microphone?"

from tests.helpers import needs_pulse  # noqa: E402  (the `pulse` fixture is in conftest)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> tuple[Path, np.ndarray, int]:
    path = tmp_path_factory.mktemp("speech") / "user.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), SENTENCE], check=True)
    pcm, rate = soundfile.read(str(path), dtype="float32")
    return path, pcm, rate


class Session:
    """`run_agent.py local` as a child process, its output read as it comes."""

    def __init__(self, env: dict, *args):
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "run_agent.py"), "local", "--checkpoint", "tiny-random",
             "--device", "cpu", "--seed", "1", *map(str, args)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self.listening = threading.Event()
        self._readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                         for stream, lines in ((self.proc.stdout, self.out),
                                               (self.proc.stderr, self.err))]
        for r in self._readers:
            r.start()

    def _read(self, stream, lines) -> None:
        for line in stream:
            lines.append(line)
            if line.strip() == "listening":
                self.listening.set()

    def wait_listening(self, timeout: float = 60) -> None:
        assert self.listening.wait(timeout), "".join(self.err)

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        rc = self.proc.wait(timeout)
        for r in self._readers:
            r.join(5)
        return rc, "".join(self.out), "".join(self.err)


@pytest.fixture
def start(pulse):
    """Starts sessions; any still running when the test ends (it failed) is killed."""
    sessions = []

    def start(*args) -> Session:
        sessions.append(Session(pulse, *args))
        return sessions[-1]
    yield start
    for s in sessions:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def device_rates(stderr: str) -> tuple[int, int]:
    m = re.search(r"microphone '.*' (\d+) Hz, speakers '.*' (\d+) Hz", stderr)
    assert m, stderr
    return int(m.group(1)), int(m.group(2))


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


def find(clip: np.ndarray, recording: np.ndarray) -> tuple[int, float]:
    """Where `clip` best matches inside `recording` (same rate), and the waveform correlation
    there."""
    n = 1 << (len(recording) + len(clip)).bit_length()
    lags = len(recording) - len(clip) + 1
    xc = np.fft.irfft(np.fft.rfft(recording, n) * np.conj(np.fft.rfft(clip, n)), n)[:lags]
    # Normalized by each window's energy, so that a louder but different passage does not win;
    # windows far quieter than the clip cannot hold it.
    energy = np.concatenate([[0.0], np.cumsum(recording.astype(np.float64) ** 2)])
    window = energy[len(clip):len(clip) + lags] - energy[:lags]
    clip_energy = float(np.dot(clip, clip))
    loud = window > 0.01 * clip_energy
    corr = np.where(loud, xc / np.sqrt(clip_energy * np.where(loud, window, 1.0)), 0.0)
    lag = int(np.argmax(corr))
    return lag, float(corr[lag])


def spectrogram(x: np.ndarray, rate: int) -> np.ndarray:
    """Magnitudes of 32 ms windows every 5 ms, 200 Hz - 4 kHz."""
    n, hop = int(0.032 * rate), int(0.005 * rate)
    frames = np.lib.stride_tricks.sliding_window_view(x, n)[::hop] * np.hanning(n)
    f = np.fft.rfftfreq(n, 1 / rate)
    return np.abs(np.fft.rfft(frames, axis=1))[:, (f >= 200) & (f <= 4000)]


def find_speech(clip: np.ndarray, recording: np.ndarray, rate: int) -> tuple[float, float]:
    """(start in seconds, spectrogram correlation) of `clip` inside `recording`.

    Matched on magnitudes, not waveforms: the echo canceller (WebRTC AEC3) splits the signal
    into bands and high-passes it, which shifts phase differently per band but keeps the sound.
    """
    a, b = spectrogram(clip, rate), spectrogram(recording, rate)
    ea, eb = a.sum(axis=1), b.sum(axis=1)  # loudness envelopes locate it
    i = int(np.argmax(np.correlate(eb - eb.mean(), ea - ea.mean(), mode="valid")))
    corr = float(np.corrcoef(a.ravel(), b[i:i + len(a)].ravel())[0, 1])
    return i * int(0.005 * rate) / rate, corr


@needs_pulse
def test_live_session(pulse, start, speech, tmp_path):
    wav, clip, clip_rate = speech
    rec_dir = tmp_path / "rec"
    sink_rec = tmp_path / "speakers.wav"
    parec = subprocess.Popen(["parec", "-d", "speakers.monitor", "--rate=44100", "--channels=1",
                              "--format=s16le", "--file-format=wav", str(sink_rec)], env=pulse)
    try:
        t0 = time.monotonic()
        session = start("--duration", 7, "--record", rec_dir)
        session.wait_listening()
        time.sleep(0.5)  # some silence before the speech
        subprocess.run(["paplay", "-d", "micfeed", str(wav)], env=pulse, check=True, timeout=20)
        rc, out, err = session.finish()
        elapsed = time.monotonic() - t0
    finally:
        parec.send_signal(signal.SIGINT)
        parec.wait(10)

    assert rc == 0, err
    assert "local session ended: duration reached after 7" in err, err
    assert "Traceback" not in err
    assert re.search(r"0 input overflows\), \d+ output blocks \(0 output underflows\)", err), err
    assert re.search(r"turn-taking: user [1-9]\d* segments", err), err
    # The live transcript: one line of the agent's words.
    agent_lines = [line for line in out.splitlines() if line.startswith("agent: ")]
    assert agent_lines and len(agent_lines[0]) > len("agent: ") + 5, out
    in_rate, out_rate = device_rates(err)

    # The agent's voice was played (agent.wav) and reached the output sink (its monitor).
    agent, rate = soundfile.read(str(rec_dir / "agent.wav"), dtype="float32")
    # (PulseAudio stalls a new stream's first ~1.9 s, so less than 7 s is played.)
    assert rate == out_rate and 3 < len(agent) / rate <= 7.1
    assert rms(agent) > 1e-3
    heard, heard_rate = soundfile.read(str(sink_rec), dtype="float32")
    assert heard_rate == 44_100 and rms(heard) > 1e-3
    # Pieces of agent.wav are found unchanged in the sink's recording.
    corrs = []
    for start in np.linspace(0.3, 0.8, 5) * len(agent):
        piece = agent[int(start):int(start) + rate // 5]
        corrs.append(find(soxr.resample(piece, rate, heard_rate), heard)[1])
    assert np.median(corrs) > 0.99, f"the sink did not play agent.wav (corr {corrs})"

    # The microphone recording holds the speech played into the virtual mic, after silence.
    # Only its energy is checked here: in its first seconds WebRTC AEC3 does not yet know that
    # this setup has no echo path, and while the agent talks it attenuates the user by up to
    # ~10 dB (measured); test_ctrl_c_with_headphones checks the capture path for fidelity.
    user, rate = soundfile.read(str(rec_dir / "user.wav"), dtype="float32")
    assert rate == in_rate
    ref = soxr.resample(clip, clip_rate, rate).astype(np.float32)
    at, corr = find_speech(ref, user, rate)
    span = user[int(at * rate):int(at * rate) + len(ref)]
    assert len(span) > 0.9 * len(ref), "the speech was cut off"
    assert rms(span) > 0.2 * rms(ref), f"speech missing from user.wav ({rms(span):.4f})"
    assert rms(user[:max(int((at - 0.1) * rate), 0)]) < 0.05 * rms(span)
    print(f"\nlocal session: {elapsed:.1f} s wall; speech found at {at:.2f} s in user.wav "
          f"(level {20 * np.log10(rms(span) / rms(ref)):+.1f} dB, spectrogram corr {corr:.2f})"
          f"\n{err}")


@needs_pulse
def test_echo_cancellation_live(pulse, start, tmp_path):
    """The speakers are looped back into the microphone: with echo cancellation (the default)
    the agent's own voice is removed from user.wav; with --headphones it is not."""
    loop = subprocess.run(["pactl", "load-module", "module-loopback", "source=speakers.monitor",
                           "sink=micfeed", "latency_msec=40"],
                          env=pulse, check=True, capture_output=True, text=True)
    try:
        levels = {}
        for mode in ("aec", "headphones"):
            rec = tmp_path / mode
            args = ["--duration", 5, "--record", rec] + (["--headphones"] if mode != "aec" else [])
            rc, _, err = start(*args).finish()
            assert rc == 0, err
            user, rate = soundfile.read(str(rec / "user.wav"), dtype="float32")
            agent, _ = soundfile.read(str(rec / "agent.wav"), dtype="float32")
            assert rms(agent) > 1e-3
            levels[mode] = rms(user[-2 * rate:])  # after the canceller has converged
    finally:
        subprocess.run(["pactl", "unload-module", loop.stdout.strip()], env=pulse,
                       capture_output=True)
    assert levels["headphones"] > 1e-3, levels  # the echo is there without cancellation
    erle = 20 * np.log10(levels["headphones"] / max(levels["aec"], 1e-9))
    assert erle > 20, f"echo reduced by only {erle:.1f} dB ({levels})"
    print(f"\nlive echo: {levels}, reduced by {erle:.1f} dB")


@needs_pulse
def test_ctrl_c_with_headphones(pulse, start, speech, tmp_path):
    """Ctrl+C ends the session cleanly and still writes the recordings; without echo
    cancellation the microphone path delivers the speech unchanged."""
    wav, clip, clip_rate = speech
    session = start("--headphones", "--record", tmp_path)
    session.wait_listening()
    time.sleep(0.3)
    subprocess.run(["paplay", "-d", "micfeed", str(wav)], env=pulse, check=True, timeout=20)
    time.sleep(0.3)
    session.proc.send_signal(signal.SIGINT)
    rc, out, err = session.finish(timeout=30)
    assert rc == 0, err
    assert "local session ended: stopped by Ctrl+C" in err, err
    assert "echo cancellation off (--headphones)" in err
    assert "Traceback" not in err

    user, rate = soundfile.read(str(tmp_path / "user.wav"), dtype="float32")
    ref = soxr.resample(clip, clip_rate, rate).astype(np.float32)
    at, corr = find_speech(ref, user, rate)
    span = user[int(at * rate):int(at * rate) + len(ref)]
    assert corr > 0.9, f"speech not found in user.wav (spectrogram corr {corr:.2f})"
    assert len(span) == len(ref)
    assert abs(20 * np.log10(rms(span) / rms(ref))) < 1.0


@needs_pulse
def test_device_errors_and_listing(pulse):
    def run(*args):
        return subprocess.run([sys.executable, str(ROOT / "run_agent.py"), "local", *args],
                              cwd=ROOT, env=pulse, capture_output=True, text=True, timeout=60)
    r = run("--list-devices")
    assert r.returncode == 0 and "default" in r.stdout, r.stderr
    for args in (["--input-device", "99"], ["--output-device", "no such speaker"]):
        r = run("--checkpoint", "tiny-random", *args)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "device" in lines[0], r.stderr
    r = run("--checkpoint", "tiny-random", "--duration", "0")
    assert r.returncode == 2 and "--duration" in r.stderr


def test_jitter_buffer():
    from duplex_agent.streams.local import JitterBuffer

    jb = JitterBuffer(rate=1000, prebuffer_s=0.05, max_s=0.2)
    jb.write(np.ones(40, np.float32))
    assert not jb.read(10).any()  # below the prebuffer: silence, nothing consumed
    jb.write(np.arange(1, 21, dtype=np.float32))
    assert jb.read(45).tolist() == [1.0] * 40 + [1.0, 2.0, 3.0, 4.0, 5.0]
    out = jb.read(30)  # 15 left: they play, then silence, and playback waits to refill
    assert out[:15].tolist() == list(range(6, 21)) and not out[15:].any()
    assert jb.underruns == 1
    jb.write(np.arange(250, dtype=np.float32))  # more than fits: the oldest 50 are dropped
    assert jb.dropped == 50 and jb.level_s == 0.2
    assert jb.read(3).tolist() == [50.0, 51.0, 52.0]

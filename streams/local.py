"""`run_agent.py local`: talk with the agent through this machine's microphone and speakers.

    python run_agent.py local [--checkpoint C] [--input-device ID] [--output-device ID]
                              [--headphones] [--duration S] [--record DIR] [--list-devices]
                              [--voice-prompt VOICE] [--text-prompt TEXT]

Audio path (threads in brackets):

    mic [PortAudio input callback] -> queue -> [worker] echo canceller -> conv.push (any rate)
    conv.events() [asyncio] -> AudioOut 24 kHz -> resample to the speaker rate -> JitterBuffer
    JitterBuffer -> [PortAudio output callback] -> speakers, and -> queue -> [worker] far end of
                    the echo canceller, agent.wav, turn-taking

Both devices run at their own default sample rates; libsoxr converts. The echo canceller's
reference is exactly what the output callback handed to the speakers, so it sees the same
silence and dropouts the room hears. The callbacks only copy buffers: echo cancellation,
recording and turn-taking analysis run on the worker thread.
"""
from __future__ import annotations

import asyncio
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOCK_S = 0.020  # PortAudio callback block: small enough for low latency, few callbacks
STATUS_EVERY_S = 10.0


def register(subparsers) -> None:
    p = subparsers.add_parser("local", help="live conversation with this machine's microphone "
                                            "and speakers")
    from duplex_agent.agent.options import add_checkpoint_args, add_persona_args, add_sampling_args
    from duplex_agent.streams.server import add_threads_arg
    add_checkpoint_args(p)
    add_persona_args(p)
    add_sampling_args(p)
    add_threads_arg(p)
    p.add_argument("--input-device", type=_device_id, default=None, metavar="ID",
                   help="microphone: index or part of the name (see --list-devices); "
                        "default: the system default")
    p.add_argument("--output-device", type=_device_id, default=None, metavar="ID",
                   help="speakers: index or part of the name; default: the system default")
    p.add_argument("--list-devices", action="store_true", help="list audio devices and exit")
    p.add_argument("--headphones", action="store_true",
                   help="no echo cancellation (the agent's voice does not reach the microphone)")
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="stop after S seconds (default: until Ctrl+C)")
    p.add_argument("--record", metavar="DIR",
                   help="write DIR/user.wav (microphone after echo cancellation) and "
                        "DIR/agent.wav (what was played), each at its device's rate")
    p.set_defaults(func=run_local)


def _device_id(text: str):
    return int(text) if text.isdigit() else text


class UserError(Exception):
    """A problem the user can fix (device, argument); printed as one line."""


def run_local(args) -> int:
    try:
        return _run_local(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run_local(args) -> int:
    try:
        import sounddevice as sd
    except OSError as e:  # the wheel loads the system's libportaudio
        raise UserError(f"cannot load PortAudio ({e}); install it: apt-get install "
                        f"libportaudio2") from None
    if args.list_devices:
        print(sd.query_devices())
        return 0
    if args.duration is not None and not args.duration > 0:
        raise UserError(f"--duration must be a positive number of seconds, got {args.duration}")
    mic = _find_device(sd, args.input_device, "input")
    speaker = _find_device(sd, args.output_device, "output")
    record = None
    if args.record:
        record = Path(args.record)
        try:
            record.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--record {record}: cannot create the folder ({e.strerror})") from None

    from duplex_agent.agent.api import Agent
    from duplex_agent.agent.options import sampling_from_args, voice_prompt_from_args, weight_options
    from duplex_agent.streams.server import set_torch_threads, settle_heap
    set_torch_threads(args.threads)
    agent = Agent.load(args.checkpoint, args.device, max_conversations=1,
                       kv_cache=args.kv_cache, voice_prompt_dir=args.voice_prompt_dir,
                       **weight_options(args))
    settle_heap()
    try:
        sampling = sampling_from_args(args, agent.sampling_defaults)
        persona = {"voice_prompt": voice_prompt_from_args(args, agent.engine.bundle),
                   "text_prompt": args.text_prompt}
        session = LocalSession(agent, sampling, mic, speaker, echo_cancel=not args.headphones,
                               record=record, persona=persona)
        return asyncio.run(session.run(args.duration))
    finally:
        agent.close()


def _find_device(sd, wanted, kind: str) -> dict:
    """sounddevice's description of the chosen (or default) device; UserError if unusable."""
    try:
        info = sd.query_devices(wanted, kind=kind)
    except (ValueError, sd.PortAudioError) as e:
        if wanted is None:
            raise UserError(f"no default {kind} device ({e}); is an audio server running? "
                            f"See --list-devices") from None
        raise UserError(f"{kind} device {wanted!r}: {e}; see --list-devices") from None
    return dict(info)


@dataclass
class _Flags:
    """What the PortAudio callbacks saw: blocks, and the xrun flags PortAudio raised."""
    input_overflows: int = 0
    output_underflows: int = 0
    input_blocks: int = 0
    output_blocks: int = 0


class JitterBuffer:
    """Agent audio waiting for the output callback: written in 80 ms frames as the engine produces
    them, read in small blocks at the device's pace.

    Playback starts (and restarts after running dry) only once `prebuffer_s` is queued, so the
    engine's frame-sized bursts do not turn into many tiny gaps. Beyond `max_s` the oldest audio
    is dropped. Thread-safe: one writer, one reader.
    """

    def __init__(self, rate: int, prebuffer_s: float = 0.1, max_s: float = 2.0):
        self.rate = rate
        self.prebuffer = int(prebuffer_s * rate)
        self._buf = np.zeros(int(max_s * rate), dtype=np.float32)
        self._start = 0  # index of the oldest sample
        self._count = 0
        self._playing = False
        self._lock = threading.Lock()
        self.underruns = 0  # times playback ran dry and had to wait for the engine
        self.dropped = 0  # samples dropped because the buffer was full

    def write(self, pcm: np.ndarray) -> None:
        cap = len(self._buf)
        with self._lock:
            if len(pcm) > cap:
                self.dropped += len(pcm) - cap
                pcm = pcm[-cap:]
            excess = self._count + len(pcm) - cap
            if excess > 0:
                self._start = (self._start + excess) % cap
                self._count -= excess
                self.dropped += excess
            end = (self._start + self._count) % cap
            first = min(len(pcm), cap - end)
            self._buf[end:end + first] = pcm[:first]
            self._buf[:len(pcm) - first] = pcm[first:]
            self._count += len(pcm)

    def read(self, n: int) -> np.ndarray:
        """`n` samples to play: queued audio, then silence if there is not enough."""
        out = np.zeros(n, dtype=np.float32)
        cap = len(self._buf)
        with self._lock:
            if not self._playing:
                if self._count < self.prebuffer:
                    return out
                self._playing = True
            k = min(n, self._count)
            first = min(k, cap - self._start)
            out[:first] = self._buf[self._start:self._start + first]
            out[first:k] = self._buf[:k - first]
            self._start = (self._start + k) % cap
            self._count -= k
            if k < n:
                self._playing = False
                self.underruns += 1
        return out

    @property
    def level_s(self) -> float:
        with self._lock:
            return self._count / self.rate


class _Transcript:
    """Prints the agent's words as they arrive, keeping other messages on their own lines."""

    def __init__(self):
        self.mid_line = False
        self.pieces = 0

    def piece(self, text: str) -> None:
        if not self.mid_line:
            text = "agent: " + text.lstrip()
        print(text, end="", flush=True)
        self.mid_line = True
        self.pieces += 1

    def message(self, text: str) -> None:
        self.break_line()
        print(text, file=sys.stderr, flush=True)

    def break_line(self) -> None:
        if self.mid_line:
            print(flush=True)
            self.mid_line = False


class LocalSession:
    def __init__(self, agent, sampling, mic: dict, speaker: dict, echo_cancel: bool = True,
                 record: Path | None = None, persona: dict | None = None):
        self.agent, self.sampling = agent, sampling
        self.persona = persona or {}  # Agent.open's voice_prompt and text_prompt
        self.mic, self.speaker = mic, speaker
        self.in_rate = int(mic["default_samplerate"])
        self.out_rate = int(speaker["default_samplerate"])
        self.echo_cancel = echo_cancel
        self.record = record
        self.flags = _Flags()
        self.jitter = JitterBuffer(self.out_rate)
        self.transcript = _Transcript()
        self._mic_q: queue.SimpleQueue = queue.SimpleQueue()  # (pcm, t) captured blocks
        self._played_q: queue.SimpleQueue = queue.SimpleQueue()  # (pcm, t) played blocks
        self._t0 = 0.0
        self._in_latency = self._out_latency = 0.0
        self._heard = threading.Event()  # first microphone block arrived
        self._failure: str | None = None  # why the session had to stop, if it failed
        self._stop_reason = "duration reached"

    # -- PortAudio callbacks: copy and timestamp only ---------------------------------------------
    def _on_input(self, indata, frames, time_info, status) -> None:
        if status.input_overflow:
            self.flags.input_overflows += 1
        self.flags.input_blocks += 1
        # Conversation time of the block's first sample as it reached the microphone.
        t = time.monotonic() - self._t0 - frames / self.in_rate - self._in_latency
        self._mic_q.put((indata[:, 0].copy(), t))

    def _on_output(self, outdata, frames, time_info, status) -> None:
        if status.output_underflow:
            self.flags.output_underflows += 1
        self.flags.output_blocks += 1
        pcm = self.jitter.read(frames)
        outdata[:, 0] = pcm
        self._played_q.put((pcm, time.monotonic() - self._t0 + self._out_latency))

    # -- worker thread: echo cancellation, input to the model, recording, turn-taking ------------
    def _worker(self, conv, aec, turns, wavs, stop: threading.Event) -> None:
        import soxr

        from duplex_agent.agent.api import ConversationClosed

        # The canceller runs at the microphone rate; its reference must too.
        to_in = None if self.in_rate == self.out_rate else soxr.ResampleStream(
            self.out_rate, self.in_rate, 1, dtype="float32", quality="HQ")
        try:
            while True:
                stopping = stop.is_set()  # set once the streams have stopped: drain, then end
                try:
                    item = self._mic_q.get(timeout=0.05)
                except queue.Empty:
                    item = None
                # Everything played so far goes to the canceller before the microphone audio
                # that may contain its echo.
                while True:
                    try:
                        played, t = self._played_q.get_nowait()
                    except queue.Empty:
                        break
                    aec.far_end(to_in.resample_chunk(played) if to_in else played)
                    turns.add_agent(played, t, rate=self.out_rate)
                    if wavs:
                        wavs["agent"].write(played)
                if item is None:
                    if stopping:
                        return
                    continue
                pcm, t = item
                t -= aec.pending / self.in_rate  # the canceller still holds that much older audio
                clean = aec.capture(pcm)
                if not len(clean):
                    continue
                self._heard.set()
                conv.push(clean, rate=self.in_rate)
                turns.add_user(clean, t, rate=self.in_rate)
                if wavs:
                    wavs["user"].write(clean)
        except ConversationClosed:
            self._failure = conv.error or "the conversation was closed"
        except Exception as e:  # keep the session's shutdown path; report it at the end
            self._failure = f"audio worker failed: {type(e).__name__}: {e}"

    # -- model output -----------------------------------------------------------------------------
    async def _consume(self, conv, stop: asyncio.Event) -> None:
        import soxr

        from duplex_agent.agent.api import AudioOut, ErrorOut, TextOut
        from duplex_agent.agent.config import SAMPLE_RATE

        to_out = None if self.out_rate == SAMPLE_RATE else soxr.ResampleStream(
            SAMPLE_RATE, self.out_rate, 1, dtype="float32", quality="HQ")
        async for event in conv.events():
            if isinstance(event, AudioOut):
                self.jitter.write(to_out.resample_chunk(event.pcm) if to_out else event.pcm)
            elif isinstance(event, TextOut):
                self.transcript.piece(event.text)
            elif isinstance(event, ErrorOut):
                self._failure = event.message
                stop.set()

    # -- session ----------------------------------------------------------------------------------
    async def run(self, duration: float | None) -> int:
        import sounddevice as sd
        import soundfile

        from duplex_agent.agent.turns import TurnTaking
        from duplex_agent.streams.aec import EchoCanceller, PassThrough

        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal():
            self._stop_reason = "stopped by Ctrl+C"
            stop.set()
            loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl+C interrupts for real
        loop.add_signal_handler(signal.SIGINT, on_signal)

        conv = self.agent.open(self.sampling, **self.persona)
        turns = TurnTaking()
        wavs = None
        if self.record:
            wavs = {"user": soundfile.SoundFile(str(self.record / "user.wav"), "w", self.in_rate,
                                                1, "PCM_16"),
                    "agent": soundfile.SoundFile(str(self.record / "agent.wav"), "w",
                                                 self.out_rate, 1, "PCM_16")}
        streams = []
        worker_stop = threading.Event()
        worker = None
        consumer = asyncio.create_task(self._consume(conv, stop))
        try:
            for kind, cls, device, rate, callback in (
                    ("microphone", sd.InputStream, self.mic, self.in_rate, self._on_input),
                    ("speakers", sd.OutputStream, self.speaker, self.out_rate, self._on_output)):
                try:
                    streams.append(cls(device=device["index"], samplerate=rate, channels=1,
                                       dtype="float32", latency="low",
                                       blocksize=int(rate * BLOCK_S), callback=callback))
                except sd.PortAudioError as e:
                    raise UserError(f"cannot open the {kind} '{device['name']}' at {rate} Hz: "
                                    f"{e}") from None
            self._in_latency, self._out_latency = streams[0].latency, streams[1].latency
            delay_ms = 1000 * (self._in_latency + self._out_latency)
            aec = (EchoCanceller(self.in_rate, delay_ms=delay_ms) if self.echo_cancel
                   else PassThrough(self.in_rate))
            worker = threading.Thread(target=self._worker, name="local-audio", daemon=True,
                                      args=(conv, aec, turns, wavs, worker_stop))
            self._t0 = time.monotonic()
            worker.start()
            for s in streams:
                s.start()
            self.transcript.message(
                f"local: microphone '{self.mic['name']}' {self.in_rate} Hz, speakers "
                f"'{self.speaker['name']}' {self.out_rate} Hz, echo cancellation "
                f"{'on' if self.echo_cancel else 'off (--headphones)'}; Ctrl+C to stop")
            if conv.voice_prompt or conv.text_prompt:
                self.transcript.message(f"persona: voice {conv.voice_prompt or '-'}, role "
                                        f"{conv.text_prompt!r}")
            await self._wait(stop, duration, conv)
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            for s in streams:
                s.stop()
                s.close()
            worker_stop.set()
            if worker is not None:
                await asyncio.to_thread(worker.join)
            conv.close()
            await consumer
            if wavs:
                for w in wavs.values():
                    w.close()
        elapsed = time.monotonic() - self._t0
        self.transcript.break_line()
        why = f"error: {self._failure}" if self._failure else self._stop_reason
        self._report(why, elapsed, conv, turns)
        return 1 if self._failure else 0

    async def _wait(self, stop: asyncio.Event, duration: float | None, conv) -> None:
        """Until Ctrl+C, the duration, or an error; prints a status line now and then."""
        end = None if duration is None else self._t0 + duration
        next_status = self._t0 + STATUS_EVERY_S
        announced = False
        while not stop.is_set() and not self._failure:
            now = time.monotonic()
            if end is not None and now >= end:
                return
            if not announced and self._heard.is_set():
                self.transcript.message("listening")
                announced = True
            if now >= next_status:
                self.transcript.message(self._status(now - self._t0, conv))
                next_status += STATUS_EVERY_S
            timeout = 0.05 if end is None else max(0.0, min(0.05, end - now))
            try:
                await asyncio.wait_for(stop.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def _status(self, elapsed: float, conv) -> str:
        st = conv.stats
        return (f"[{elapsed:5.0f} s] frames in {st.frames_in} out {st.frames_out}, "
                f"playback buffer {1000 * self.jitter.level_s:.0f} ms, "
                f"input overflows {self.flags.input_overflows}, "
                f"output underflows {self.flags.output_underflows}")

    def _report(self, why: str, elapsed: float, conv, turns) -> None:
        f, st = self.flags, conv.stats.as_dict()
        lines = [
            f"local session ended: {why} after {elapsed:.1f} s",
            f"  audio: {f.input_blocks} input blocks ({f.input_overflows} input overflows), "
            f"{f.output_blocks} output blocks ({f.output_underflows} output underflows); "
            f"playback ran dry {self.jitter.underruns} times, "
            f"dropped {self.jitter.dropped / self.out_rate:.2f} s",
            f"  conversation: {st['frames_in']} frames in, {st['frames_out']} out, "
            f"{st['dropped_input_frames']} input frames dropped, "
            f"{self.transcript.pieces} text pieces, frame latency p50 "
            f"{st['frame_latency_ms_p50']} ms, p99 {st['frame_latency_ms_p99']} ms",
            "  turn-taking: " + _turns_line(turns.summary()),
        ]
        if self.record:
            lines.append(f"  recorded {self.record / 'user.wav'} ({self.in_rate} Hz) and "
                         f"{self.record / 'agent.wav'} ({self.out_rate} Hz)")
        print("\n".join(lines), file=sys.stderr, flush=True)


def _turns_line(t: dict) -> str:
    def sec(v):
        return "-" if v is None else f"{v:.2f} s"
    return (f"user {t['user_segments']} segments ({t['user_speech_s']:.1f} s), "
            f"agent {t['agent_segments']} segments ({t['agent_speech_s']:.1f} s); "
            f"{t['responses']} responses (latency p50 {sec(t['response_latency_p50_s'])}, "
            f"mean {sec(t['response_latency_mean_s'])}); "
            f"{t['barge_ins']} barge-ins ({t['barge_ins_yielded']} yielded, reaction p50 "
            f"{sec(t['barge_in_reaction_p50_s'])}); "
            f"{t['agent_interruptions']} agent interruptions; overlap {t['overlap_s']:.2f} s")

"""Public API: load an agent once, hold many conversations with it.

    agent = Agent.load("tiny-random", max_conversations=8)  # transcriber="tiny-random-stt"
    conv = agent.open()                       # raises AgentFull when every slot is taken
    conv.push(pcm, rate=48_000)               # any length, any rate: a live source
    async for event in conv.events():         # AudioOut / TextOut as the agent speaks,
        ...                                   # UserWord as the user's words are heard
    conv.close(); agent.close()

A translating agent (Hibiki-Zero) translates what is pushed; `conv.end_input()` says the speech
is over, and the conversation ends by itself once the translation is complete.

All model work runs on the engine's own thread (see `agent/driver.py`); these methods only move
buffers and never block the asyncio event loop on the GPU.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from duplex_agent.agent.config import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE, SamplingConfig
from duplex_agent.agent.engine import EngineFull
from duplex_agent.agent.events import AudioOut, DtmfIn, ErrorOut, TextOut, UserWord  # noqa: F401 (re-exported)
from duplex_agent.agent.turns import TurnTaking

# Live input may run at most this far ahead of the engine before the oldest audio is dropped.
DEFAULT_MAX_BACKLOG_FRAMES = 25  # 2 s
DEFAULT_MAX_OUTPUT_FRAMES = 250  # 20 s of unread output
DTMF_DIGITS = frozenset("0123456789*#ABCD")


class AgentFull(EngineFull):
    """No free conversation slot."""


class ConversationClosed(Exception):
    pass


@dataclass
class ConversationStats:
    frames_in: int = 0
    frames_out: int = 0
    dropped_input_frames: int = 0  # input backlog overflow (client faster than real time)
    dropped_output_frames: int = 0  # consumer did not read its events in time
    text_pieces: int = 0
    dtmf_digits: int = 0  # phone keys pressed (press_key)
    user_words: int = 0  # the transcriber's words for this conversation
    frame_latency_ms: deque = field(default_factory=lambda: deque(maxlen=500))  # input complete -> output ready

    def as_dict(self) -> dict:
        lat = sorted(self.frame_latency_ms)
        return {"frames_in": self.frames_in, "frames_out": self.frames_out,
                "dropped_input_frames": self.dropped_input_frames,
                "dropped_output_frames": self.dropped_output_frames,
                "text_pieces": self.text_pieces, "user_words": self.user_words,
                "dtmf_digits": self.dtmf_digits,
                "frame_latency_ms_p50": percentile(lat, 0.5),
                "frame_latency_ms_p99": percentile(lat, 0.99)}


def percentile(ordered: list[float], q: float, digits: int = 2) -> float | None:
    """The q-quantile of an ascending list (nearest rank below), rounded; None if empty."""
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], digits)


_ids = itertools.count(1)


class Conversation:
    """One full-duplex conversation. Create with `Agent.open()`."""

    def __init__(self, agent: "Agent", slot: int, loop: asyncio.AbstractEventLoop | None,
                 max_backlog: int, max_output: int):
        self.id = f"c{next(_ids)}"
        self.agent, self.slot = agent, slot
        self.voice_prompt: str | None = None  # the persona's voice name (set by Agent.open)
        self.text_prompt: str | None = None  # the persona's text prompt
        self._owner = agent.engine.slots[slot]  # the engine's Slot: frames are tagged with it
        self.stats = ConversationStats()
        self.closed = False
        self.error: str | None = None
        self._loop = loop
        self._lock = threading.Lock()
        self._partial = np.zeros(0, dtype=np.float32)
        # (frame, time it was complete, whether the input ended before it)
        self._frames: deque[tuple[np.ndarray, float, bool]] = deque()
        self.input_ended = False
        self._silence_feeder: asyncio.Task | None = None
        self._max_backlog = max_backlog
        self._events: asyncio.Queue | None = asyncio.Queue(max_output) if loop else None
        self._room: asyncio.Event | None = asyncio.Event() if loop else None  # backlog shrank
        self._resamplers: dict[int, object] = {}
        # Turn-taking on the conversation's own clock (frame index x 80 ms), both sides as the
        # model heard and spoke them; updated on the event loop, off the engine thread.
        self.turns = TurnTaking(SAMPLE_RATE)

    def report(self) -> dict:
        """Counters, latency and turn-taking figures, JSON-ready."""
        return {**self.stats.as_dict(), "turns": self.turns.summary()}

    # -- input -----------------------------------------------------------------------------------
    def push(self, pcm: np.ndarray, rate: int = SAMPLE_RATE) -> None:
        """Hand in audio as it arrives: mono float32 (or int16) samples in [-1, 1], any length.
        If the engine falls behind, the oldest frames beyond the backlog are dropped and counted."""
        if self.closed:
            raise ConversationClosed(f"conversation {self.id} is closed")
        pcm = _validate_pcm(pcm, rate)
        if self.input_ended:  # the translation is being completed: later speech is not heard
            return
        if rate != SAMPLE_RATE:
            pcm = self._resample(pcm, rate)
        now = time.monotonic()
        with self._lock:
            buf = np.concatenate([self._partial, pcm]) if len(self._partial) else pcm
            n = len(buf) // FRAME_SIZE
            for i in range(n):
                self._frames.append((buf[i * FRAME_SIZE:(i + 1) * FRAME_SIZE].copy(), now, False))
            self._partial = buf[n * FRAME_SIZE:].copy()
            self.stats.frames_in += n
            while len(self._frames) > self._max_backlog:
                self._frames.popleft()
                self.stats.dropped_input_frames += 1
        if n:
            self.agent._driver.wake()

    async def send(self, pcm: np.ndarray, rate: int = SAMPLE_RATE) -> None:
        """Like `push`, but waits for room in the backlog instead of dropping: for sources faster
        than real time (files) that must not lose audio."""
        assert self._room is not None, "open() the conversation inside an event loop to send()"
        pcm = _validate_pcm(pcm, rate)
        chunk = max(1, FRAME_SIZE * rate // SAMPLE_RATE)  # about one frame at the input rate
        for i in range(0, len(pcm), chunk):
            while self.backlog >= self._max_backlog and not self.closed:
                # Set on this loop after every tick that took one of our frames, and on close.
                self._room.clear()
                await self._room.wait()
            self.push(pcm[i:i + chunk], rate)

    def press_key(self, digit: str) -> None:
        """A phone keypad key (DTMF) the caller pressed: counted, and handed to whoever reads
        `events()` as a DtmfIn in order with the agent's output. The model hears only the audio."""
        if self.closed:
            raise ConversationClosed(f"conversation {self.id} is closed")
        if digit not in DTMF_DIGITS:
            raise ValueError(f"a DTMF key is one of 0-9 * # A-D, got {digit!r}")
        with self._lock:
            heard_s = (self.stats.frames_in * FRAME_SIZE + len(self._partial)) / SAMPLE_RATE
        self.stats.dtmf_digits += 1
        if self._events is not None:
            # Through the loop, as the engine thread's events come, so the order is kept.
            self._loop.call_soon_threadsafe(self._deliver, DtmfIn(digit, heard_s))

    def flush(self) -> None:
        """End of input: queue the resamplers' tails and the last partial frame, zero-padded, so
        the agent answers every sample that was pushed."""
        tails = [stream.resample_chunk(np.zeros(0, np.float32), last=True)
                 for stream in self._resamplers.values()]
        self._resamplers.clear()
        with self._lock:
            rest = np.concatenate([self._partial, *tails]) if tails else self._partial
            self._partial = np.zeros(0, dtype=np.float32)
        if len(rest):
            padded = np.zeros(-(-len(rest) // FRAME_SIZE) * FRAME_SIZE, dtype=np.float32)
            padded[:len(rest)] = rest
            self.push(padded)

    def end_input(self) -> None:
        """A translating agent's source speech is over (its `translates` is True): what was pushed
        is translated to the end, the model is told, and the conversation then hears silence,
        one frame every 80 ms, until the translation is complete; then it ends by itself (its
        events end). Audio pushed after this is ignored. Call on the conversation's event loop."""
        if self.closed:
            raise ConversationClosed(f"conversation {self.id} is closed")
        if not self.agent.translates:
            raise ValueError("end_input() is for translating agents (Hibiki-Zero); a dialogue "
                             "has no end of input")
        assert self._loop is not None, "open() the conversation inside an event loop to end_input()"
        if self.input_ended:
            return
        self.flush()
        self.input_ended = True
        self._silence_feeder = self._loop.create_task(self._feed_silence())

    async def _feed_silence(self) -> None:
        """The frames after the end of the input, paced in real time: the first carries the
        end-of-input marker (the engine puts it there), all are silence to the model."""
        silence = np.zeros(FRAME_SIZE, dtype=np.float32)
        ends_input = True
        next_at = time.monotonic()
        while not self.closed:
            with self._lock:
                if ends_input or len(self._frames) < self._max_backlog:  # an engine behind
                    self._frames.append((silence, time.monotonic(), ends_input))  # gets no more
            ends_input = False
            self.agent._driver.wake()
            next_at += FRAME_SIZE / SAMPLE_RATE
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    def _resample(self, pcm: np.ndarray, rate: int) -> np.ndarray:
        import soxr
        stream = self._resamplers.get(rate)
        if stream is None:  # streaming resampler: keeps its filter state across pushes
            stream = self._resamplers[rate] = soxr.ResampleStream(rate, SAMPLE_RATE, 1,
                                                                  dtype="float32", quality="HQ")
        return stream.resample_chunk(pcm)

    def _take_frame(self) -> tuple[np.ndarray, float, bool] | None:
        with self._lock:
            return self._frames.popleft() if self._frames else None

    @property
    def translation_done(self) -> bool:
        """`end_input()` was called and no error (the engine's, a limit's) ended the conversation:
        once its events are over, the translation is complete."""
        return self.input_ended and self.error is None

    @property
    def backlog(self) -> int:
        with self._lock:
            return len(self._frames)

    # -- output ----------------------------------------------------------------------------------
    async def events(self):
        """Async iterator over AudioOut / TextOut / UserWord, DtmfIn for keys pressed
        (`press_key`), and a final ErrorOut if the engine failed."""
        while True:
            event = await self.recv()
            if event is None:
                return
            yield event

    async def recv(self):
        """The next event, or None once the conversation is closed and drained."""
        assert self._events is not None, "open() the conversation inside an event loop for events"
        if self.closed and self._events.empty():
            return None
        return await self._events.get()

    def _on_tick(self, user_pcm: np.ndarray, events: list) -> None:  # on the event loop
        self._room.set()
        audio = events[0]
        t = audio.step / FRAME_RATE
        self.turns.add_user(user_pcm, t)
        self.turns.add_agent(audio.pcm, t)
        if audio.pause is not None:
            self.turns.add_pause(audio.pause, t)
        for event in events:
            self._deliver(event)

    def _deliver_final(self, final: list) -> None:  # on the event loop
        self._room.set()  # a sender waiting for room sees the conversation closed
        for event in final:
            self._deliver(event)

    def _deliver(self, event) -> None:  # on the event loop
        q = self._events
        if q is None:
            return
        if q.full():
            q.get_nowait()
            self.stats.dropped_output_frames += 1
        q.put_nowait(event)

    # -- end -------------------------------------------------------------------------------------
    def close(self) -> None:
        self.end(None)

    def end(self, error: str | None) -> None:
        """Close, telling the consumer why with a final ErrorOut when `error` is given. The state
        changes first so that whoever reads the final events sees a closed conversation."""
        if self.closed:
            return
        self.closed = True
        self.error = error
        self.agent._release(self)
        final = ([ErrorOut(error)] if error else []) + [None]
        if self._events is not None and self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._deliver_final, final)
            except RuntimeError:  # the loop closed in between
                pass


def _validate_pcm(pcm, rate) -> np.ndarray:
    if not isinstance(rate, (int, np.integer)) or not (8000 <= rate <= 192_000):
        raise ValueError(f"sample rate must be an integer in [8000, 192000] Hz, got {rate!r}")
    a = np.asarray(pcm)
    if a.dtype == np.int16:
        a = a.astype(np.float32) / 32768.0
    elif a.dtype not in (np.float32, np.float64):
        raise TypeError(f"audio must be float32 or int16 samples, got dtype {a.dtype}")
    if a.ndim == 2 and 1 in a.shape:
        a = a.reshape(-1)
    if a.ndim != 1:
        raise ValueError(f"audio must be mono (1-D), got shape {a.shape}")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise ValueError("audio contains NaN or infinite samples")
    return np.clip(a, -1.0, 1.0)


class Agent:
    """A loaded model and its engine thread, shared by all conversations."""

    def __init__(self, engine, max_backlog: int = DEFAULT_MAX_BACKLOG_FRAMES,
                 max_output: int = DEFAULT_MAX_OUTPUT_FRAMES):
        from duplex_agent.agent.driver import EngineDriver
        self.engine = engine
        self.max_conversations = engine.max_sessions
        self._max_backlog, self._max_output = max_backlog, max_output
        self._conversations: dict[int, Conversation] = {}
        self._lock = threading.Lock()
        self._driver = EngineDriver(self)
        self._driver.start()
        self._driver.ready.wait()  # the engine's warm-up, so the first conversation waits for none
        if self._driver.startup_error is not None:
            raise self._driver.startup_error

    @classmethod
    def load(cls, checkpoint: str = "kyutai/moshiko-pytorch-bf16", device=None,
             max_conversations: int = 8, kv_cache: str = "auto", quantize: str | None = None,
             lora: str | None = None, voice_prompt_dir: str | None = None,
             transcriber: str | None = None, **kwargs) -> "Agent":
        """`kv_cache`: "auto" (the weights' dtype) or "fp8" (half the memory per conversation).
        `quantize="int8"`: int8 linear weights; `lora`: a LoRA adapter file fused at load;
        `voice_prompt_dir`: a folder of voices replacing a persona checkpoint's own;
        `transcriber`: a Kyutai STT checkpoint (a name such as "stt-1b-en_fr-candle", a folder
        or a repo id) whose UserWord events carry the user's words."""
        from duplex_agent.agent.engine import KV_CACHE_DTYPES, Engine
        from duplex_agent.checkpoints.loader import load_checkpoint
        if kv_cache not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache={kv_cache!r}: expected one of {', '.join(KV_CACHE_DTYPES)}")
        engine = Engine(load_checkpoint(checkpoint, device, quantize=quantize, lora=lora,
                                        voice_prompt_dir=voice_prompt_dir,
                                        transcriber=transcriber),
                        max_conversations,
                        kv_dtype=KV_CACHE_DTYPES[kv_cache])
        return cls(engine, **kwargs)

    @property
    def sampling_defaults(self) -> SamplingConfig:
        return self.engine.bundle.sampling

    @property
    def translates(self) -> bool:
        """A speech translation model (Hibiki-Zero): conversations translate the user's speech,
        and `Conversation.end_input()` completes a translation."""
        return self.engine.translates

    def open(self, sampling: SamplingConfig | None = None, *, voice_prompt=None,
             text_prompt: str | None = None) -> Conversation:
        """Start a conversation. Call from the event loop that will consume its events.

        A persona checkpoint (PersonaPlex) takes a `voice_prompt` (a name from `voices()`, or a
        loaded `VoicePrompt`) and a `text_prompt` (the role, e.g. "You are a helpful teacher."):
        the conversation starts after them, as the reference's prompt phase leaves it. Raises
        AgentFull, or PersonaError (unknown voice, prompt too long for the context window, a
        persona asked of a checkpoint without persona training) before any slot is taken."""
        from duplex_agent.agent.persona import persona_prompt
        prompt = persona_prompt(self.engine.bundle, voice_prompt, text_prompt)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            try:
                slot = self.engine.open(sampling, prompt)
            except EngineFull as e:
                raise AgentFull(str(e)) from None
            conv = Conversation(self, slot, loop, self._max_backlog, self._max_output)
            conv.voice_prompt = prompt.voice if prompt is not None else None
            conv.text_prompt = text_prompt
            self._conversations[slot] = conv
        return conv

    def voices(self) -> list[str]:
        """Voice names `open(voice_prompt=...)` takes; [] for a checkpoint without personas."""
        personas = self.engine.bundle.personas
        return personas.voices() if personas is not None else []

    def _release(self, conv: Conversation) -> None:
        with self._lock:
            if self._conversations.get(conv.slot) is conv:
                del self._conversations[conv.slot]
                self.engine.close(conv.slot)

    def conversations(self) -> list[Conversation]:
        with self._lock:
            return list(self._conversations.values())

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._conversations)

    def close(self) -> None:
        for conv in self.conversations():
            conv.close()
        self._driver.stop()

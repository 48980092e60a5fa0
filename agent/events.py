"""What a conversation emits: the agent's audio, its text, the user's words (with a transcriber),
the keys a phone caller pressed, and a final error. Shared by the public API and the engine
thread."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class AudioOut:
    pcm: np.ndarray  # [1920] float32 at 24 kHz
    step: int  # frame index in this conversation
    t_in: float  # time.monotonic() when the input frame that produced it was complete
    # With a transcriber that has pause heads: the probability that the user says nothing in the
    # next 2 s, from the user's audio up to this frame (Kyutai's semantic VAD; see agent/turns.py).
    pause: float | None = None


@dataclass
class TextOut:
    text: str
    step: int
    start: float  # seconds from the conversation's start
    end: float


@dataclass
class ErrorOut:
    message: str


@dataclass
class DtmfIn:
    """A key the caller pressed on a phone keypad (DTMF), in the event stream where it came."""
    digit: str  # one of 0-9 * # A-D
    t: float  # seconds of the caller's audio the conversation had received by then


@dataclass
class UserWord:
    """A word the user said, as the transcriber heard it (`--transcriber`). Words come out in
    order, up to a second plus the transcriber's delay after they were said."""
    text: str
    start: float  # seconds from the conversation's start
    end: float
    step: int  # the frame whose tick completed it


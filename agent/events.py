"""What a conversation emits: the agent's audio, its text, a final error, and the keys a phone
caller pressed. Shared by the public API and the engine thread."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class AudioOut:
    pcm: np.ndarray  # [1920] float32 at 24 kHz
    step: int  # frame index in this conversation
    t_in: float  # time.monotonic() when the input frame that produced it was complete


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

"""What a conversation emits: the agent's audio, its text, and a final error. Shared by the
public API and the engine thread."""
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

"""Reading and writing audio files; resampling by libsoxr, never by hand."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile
import soxr


class AudioInputError(Exception):
    """Input audio that cannot be used. The message is one line for the user."""


def resample(pcm: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    if rate_in == rate_out:
        return pcm.astype(np.float32, copy=False)
    return soxr.resample(pcm, rate_in, rate_out, quality="HQ").astype(np.float32, copy=False)


def read_mono(path: str | Path, rate: int) -> np.ndarray:
    """Any format libsndfile reads, any rate and channel count -> mono float32 at `rate`."""
    path = Path(path)
    if not path.exists():
        raise AudioInputError(f"{path}: no such file")
    if path.is_dir():
        raise AudioInputError(f"{path}: is a directory, not an audio file")
    try:
        pcm, rate_in = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioInputError(f"{path}: not a readable audio file ({_first_line(e)})") from None
    if pcm.shape[0] == 0:
        raise AudioInputError(f"{path}: contains no audio (0 samples)")
    mono = pcm.mean(axis=1)
    if not np.isfinite(mono).all():
        raise AudioInputError(f"{path}: contains NaN or infinite samples")
    return resample(mono, rate_in, rate)


def write_wav(path: str | Path, pcm: np.ndarray, rate: int) -> None:
    soundfile.write(str(path), np.clip(pcm, -1.0, 1.0), rate, subtype="PCM_16")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__

"""Offline conversation: feed a recording frame by frame, as if live, and collect the agent's side
(and, with a transcriber, the user's words).

Each 80 ms input frame is stepped once (the plain streaming loop; moshi's `run_inference.py`
instead feeds the first frame twice and its server drops it). The agent's first output frame is
silence, because the model lags its input by one step. After the last frame the transcriber hears
its delay's worth of silence, as Kyutai's reference ends a file, so the last words come out.

A translating checkpoint (Hibiki-Zero) translates the recording instead, as its `generate` does:
the recording, then the end-of-input marker and silence until the model's EOS; the output is the
translation up to the EOS, as long as it takes (`translate`).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from duplex_agent.agent.config import (FRAME_RATE, FRAME_SIZE, SAMPLE_RATE, TEXT_EOS_ID,
                                       SamplingConfig)
from duplex_agent.agent.engine import FLUSH_LIMIT_FRAMES, Engine
from duplex_agent.agent.persona import Prompt
from duplex_agent.agent.transcriber import Word
from duplex_agent.agent.audio_file import AudioInputError, read_mono, write_wav

log = logging.getLogger(__name__)


@dataclass
class Transcript:
    pieces: list[dict] = field(default_factory=list)
    user: list[Word] | None = None  # the user's words, with a transcriber

    def add(self, text: str, step: int) -> None:
        self.pieces.append({"text": text, "start": round(step / FRAME_RATE, 3),
                            "end": round((step + 1) / FRAME_RATE, 3)})

    @property
    def text(self) -> str:
        return "".join(p["text"] for p in self.pieces).strip()

    def to_json(self) -> dict:
        out = {"text": self.text, "pieces": self.pieces}
        if self.user is not None:
            out["user"] = {"text": " ".join(w.text for w in self.user),
                           "words": [w.to_json() for w in self.user]}
        return out


def converse(engine: Engine, pcm: np.ndarray, sampling: SamplingConfig | None = None,
             on_piece=None, prompt: Prompt | None = None) -> tuple[np.ndarray, Transcript]:
    """Run one conversation over `pcm` (mono float32, 24 kHz), starting from a persona's `prompt`
    if given (agent/persona.py). Returns the agent's audio, the same length as the input, and the
    transcript (the user's words too when the engine has a transcriber)."""
    n = len(pcm)
    frames = -(-n // FRAME_SIZE)
    padded = np.zeros(frames * FRAME_SIZE, dtype=np.float32)
    padded[:n] = pcm
    row = engine.open(sampling, prompt)
    out = np.zeros_like(padded)
    transcript = Transcript(user=[] if engine.transcriber is not None else None)
    try:
        for i in range(frames):
            res = engine.tick({row: padded[i * FRAME_SIZE:(i + 1) * FRAME_SIZE]})[row]
            out[i * FRAME_SIZE:(i + 1) * FRAME_SIZE] = res.pcm
            _collect(res, transcript, on_piece, -1)
            if transcript.user is not None:
                transcript.user += res.words
        if transcript.user is not None:
            transcript.user += engine.flush_words(row)
    finally:
        engine.close(row)
    return out[:n], transcript


def translate(engine: Engine, pcm: np.ndarray, sampling: SamplingConfig | None = None,
              on_piece=None) -> tuple[np.ndarray, Transcript]:
    """Translate `pcm` (mono float32, 24 kHz) with a translating engine, as Hibiki-Zero's
    `generate` does: the end-of-input marker goes at frame ceil(seconds x 12.5), silence follows
    until the model says EOS. Returns the translation's audio (up to the EOS) and transcript.
    A model that never says EOS is cut after its last text, as `generate` cuts it."""
    frames = math.ceil(len(pcm) / SAMPLE_RATE * FRAME_RATE)  # `generate`'s own expression
    padded = np.zeros(frames * FRAME_SIZE, dtype=np.float32)
    padded[:len(pcm)] = pcm[:len(padded)]
    row = engine.open(sampling)
    audio, transcript, last_text = [], Transcript(), -1
    try:
        for i in range(frames):
            res = engine.tick({row: padded[i * FRAME_SIZE:(i + 1) * FRAME_SIZE]})[row]
            audio.append(res.pcm)
            last_text = _collect(res, transcript, on_piece, last_text)
        engine.end_input(row)
        silence = np.zeros(FRAME_SIZE, dtype=np.float32)
        while not (res := engine.tick({row: silence})[row]).end:
            audio.append(res.pcm)
            last_text = _collect(res, transcript, on_piece, last_text)
    finally:
        engine.close(row)
    if res.text_id != TEXT_EOS_ID:
        log.warning("the model did not end its translation with EOS within %d s of silence: "
                    "cut after its last word", FLUSH_LIMIT_FRAMES * FRAME_SIZE // SAMPLE_RATE)
        audio = audio[:last_text + 1]
    out = np.concatenate(audio) if audio else np.zeros(0, dtype=np.float32)
    return out, transcript


def _collect(res, transcript: Transcript, on_piece, last_text: int) -> int:
    """Add a frame's text to the transcript; returns the index of the last frame with text."""
    if res.text is None:
        return last_text
    transcript.add(res.text, res.step)
    if on_piece is not None:
        on_piece(res.text)
    return res.step


def run_file(engine: Engine, pcm: np.ndarray, out_path: str | Path,
             transcript_path: str | Path | None = None, sampling: SamplingConfig | None = None,
             on_piece=None, prompt: Prompt | None = None) -> Transcript:
    """Answer `pcm` (mono float32, 24 kHz, e.g. from `read_mono`), or translate it with a
    translating checkpoint, and write the results."""
    if engine.translates:
        if prompt is not None:
            raise ValueError("a translation model takes no persona prompt")
        audio, transcript = translate(engine, pcm, sampling, on_piece)
    else:
        audio, transcript = converse(engine, pcm, sampling, on_piece, prompt)
    write_wav(out_path, audio, SAMPLE_RATE)
    if transcript_path is not None:
        Path(transcript_path).write_text(  # UTF-8 as is: a Japanese transcript stays readable
            json.dumps(transcript.to_json(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return transcript


def register(sub) -> None:
    """The `file` command."""
    from duplex_agent.agent.options import add_checkpoint_args, add_persona_args, add_sampling_args
    f = sub.add_parser("file", help="offline conversation: the agent answers a recording (a "
                       "translation checkpoint such as hibiki-zero translates it)")
    f.set_defaults(func=run_file_command)
    f.add_argument("input", help="input audio (WAV or anything libsndfile reads; any rate/channels)")
    f.add_argument("output", help="output WAV: the agent's voice (or the translation), 24 kHz mono")
    f.add_argument("--transcript", help="write the agent's transcript as JSON here (with "
                   "--transcriber, the user's words too)")
    add_checkpoint_args(f)
    add_persona_args(f)
    add_sampling_args(f)


def run_file_command(args) -> int:
    import sys
    import time

    from duplex_agent.agent.engine import KV_CACHE_DTYPES
    from duplex_agent.agent.options import sampling_from_args, voice_prompt_from_args, weight_options
    from duplex_agent.agent.persona import persona_prompt
    from duplex_agent.checkpoints.loader import load_checkpoint

    pcm = read_mono(args.input, SAMPLE_RATE)  # fail on bad input before loading a 15 GB model
    for out in (args.output, args.transcript):
        if out and not Path(out).parent.resolve().is_dir():
            raise AudioInputError(f"{out}: the folder {Path(out).parent} does not exist")
    bundle = load_checkpoint(args.checkpoint, args.device, voice_prompt_dir=args.voice_prompt_dir,
                             **weight_options(args))
    prompt = persona_prompt(bundle, voice_prompt_from_args(args, bundle), args.text_prompt)
    engine = Engine(bundle, max_sessions=1, kv_dtype=KV_CACHE_DTYPES[args.kv_cache])
    engine.warm_up()  # as Agent.load and the benchmark do: the kernel self-check, graph capture
    t0 = time.perf_counter()
    transcript = run_file(engine, pcm, args.output, args.transcript, sampling_from_args(args, bundle.sampling),
                          on_piece=lambda s: print(s, end="", flush=True), prompt=prompt)
    print()
    n = len(transcript.pieces)
    heard = f", {len(transcript.user)} user words" if transcript.user is not None else ""
    print(f"wrote {args.output} ({time.perf_counter() - t0:.1f} s, {n} text pieces{heard})",
          file=sys.stderr)
    return 0

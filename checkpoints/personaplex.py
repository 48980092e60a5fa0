"""NVIDIA PersonaPlex: its checkpoint layout and its voice prompts.

PersonaPlex (Hub `nvidia/personaplex-7b-v1`) is moshiko's architecture trained to take a persona:
a voice prompt and a text prompt that the engine prefills before the conversation. Two things
differ from a Kyutai checkpoint:

* Its depformer has 16 steps on disk: steps 0-7 predict the agent's 8 codebooks, steps 8-15 the
  user's. The depformer is causal over its steps, so running steps 0-7 alone gives exactly the
  agent's tokens; `agent_steps_only` keeps those weight slices (and saves their memory). The layout
  is recognised from tensor shapes, since PersonaPlex's `config.json` says nothing.
* Voices: `voices.tgz` holds presets (`NATF0.pt` ...), each the reference's pre-summed input
  embeddings of a voice recording plus a snapshot of its 4-slot token ring; an audio file works
  too and is Mimi-encoded here (`load_voice`). `Personas` lists and loads them by name.

This module imports neither the loader nor the bundle (both import it); its errors are `PersonaError`.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import re
import tarfile
import tempfile
import threading
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from duplex_agent.agent.config import FRAME_SIZE, SAMPLE_RATE, LMConfig

PERSONAPLEX_REPO = "nvidia/personaplex-7b-v1"
VOICES_ARCHIVE = "voices.tgz"
VOICES_DIR = "voices"
# The preset names PersonaPlex ships (and its web client lists): natural and varied, female and
# male speakers.
PRESET_NAMES = tuple(f"{kind}{sex}{i}.pt" for kind, count in (("NAT", 4), ("VAR", 5))
                     for sex in "FM" for i in range(count))
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus")
VOICE_SUFFIXES = (".pt",) + AUDIO_SUFFIXES
VOICE_LOUDNESS_LUFS = -24.0  # the reference normalises voice recordings to this before encoding
# The agent's and the user's filler during the prompt phase, as the reference hard-codes them: the
# real Mimi's codes of one frame of silence and of a 440 Hz sine at amplitude 0.5.
SILENCE_CODES = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)
SINE_CODES = (430, 1268, 381, 1611, 1095, 1495, 56, 472)
REAL_MIMI_CARD = 2048
# Loudness is measured over 400 ms blocks (ITU-R BS.1770); shorter audio has none.
MIN_VOICE_SECONDS = 0.4
# A voices.tgz larger than this unpacked is refused rather than filling the disk.
MAX_VOICES_BYTES = 2 << 30


class PersonaError(ValueError):
    """A voice or persona request that cannot be served. The message is for the user."""


# -- the checkpoint: 16 depformer steps on disk, 8 served ------------------------------------------

_DEPFORMER_IN = re.compile(r"^depformer_in\.(\d+)\.weight$")
_STACKED = re.compile(r"^depformer\.layers\.\d+\.self_attn\.(in_proj_weight|out_proj\.weight)(_scb)?$")
_PER_STEP = re.compile(r"^(depformer_in|linears|depformer_emb|depformer\.layers\.\d+\.gating)\.(\d+)\.")


def depformer_steps(state: dict[str, torch.Tensor]) -> int:
    """Number of depformer steps in an on-disk LM state (the `depformer_in.{i}` projections)."""
    steps = [int(m.group(1)) for k in state if (m := _DEPFORMER_IN.match(k))]
    return max(steps) + 1 if steps else 0


def is_personaplex_layout(state: dict[str, torch.Tensor], cfg: LMConfig) -> bool:
    """True when the depformer also predicts the user's codebooks (PersonaPlex's 16 steps for
    8 agent + 8 user streams), whatever `cfg.dep_q` says."""
    return cfg.n_q % 2 == 0 and depformer_steps(state) == cfg.n_q > cfg.n_q // 2


def agent_steps_only(state: dict[str, torch.Tensor],
                     cfg: LMConfig) -> tuple[dict[str, torch.Tensor], LMConfig]:
    """PersonaPlex's on-disk state and config -> the state with the agent's depformer steps only
    (the first n_q/2) and the config that serves it (dep_q = n_q/2). Exact, because step s of
    the depformer only sees steps < s. Slices are copied so the dropped steps' memory is freed."""
    agent = cfg.n_q // 2
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _PER_STEP.match(key)
        if m is not None:
            index = int(m.group(2))
            # depformer_emb.{i} embeds the token of step i for step i + 1.
            kept = agent - 1 if m.group(1) == "depformer_emb" else agent
            if index < kept:
                out[key] = value
            continue
        m = _STACKED.match(key)
        if m is not None:
            # Steps stacked along dim 0: [q; k; v] (3 x width rows) or width rows per step; a q8
            # checkpoint's row scales (`_scb`) are stacked alike.
            width = state[key.removesuffix("_scb")].shape[1]
            per_step = width * (3 if m.group(1) == "in_proj_weight" else 1)
            out[key] = value[:per_step * agent].clone()
            continue
        out[key] = value
    return out, dataclasses.replace(cfg, dep_q=agent)


# -- voice prompts -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class VoicePrompt:
    """One loaded voice, ready for the engine to prefill. Exactly one of two forms:

    * preset (`.pt`): `embeddings` [V, dim] — the reference's input embeddings of V positions,
      already summed over the 17 streams, fed to the temporal transformer as they are — and
      `ring` [num_codebooks, max_delay + 3] int64, the reference's token ring as it stands after
      them. In the reference the first step only fills position 0, so after the preset the
      stream is at offset V + 1, and ring slot `p % ring_size` holds position p's tokens.
    * audio: `codes` [F, dep_q] int64, the Mimi codes of F 80 ms frames of the recording
      (resampled to 24 kHz, normalised to -24 LUFS, the last frame zero-padded), to be forced as
      the agent's audio with text pad and the user's sine tokens.

    Tensors are on the CPU; `embeddings` keep the file's dtype.
    """
    name: str
    embeddings: torch.Tensor | None = None
    ring: torch.Tensor | None = None
    codes: torch.Tensor | None = None

    @property
    def is_preset(self) -> bool:
        return self.embeddings is not None

    @property
    def num_frames(self) -> int:
        """Positions this voice takes in the context window (V + 1 for a preset, F for audio)."""
        return self.embeddings.shape[0] + 1 if self.embeddings is not None else self.codes.shape[0]


def load_voice(path: Path, cfg: LMConfig, encoder: "VoiceEncoder") -> VoicePrompt:
    """A voice file for a model of config `cfg`: a PersonaPlex `.pt` preset, or an audio file
    (wav/flac/ogg..., any rate and channel count) encoded by `encoder`. Raises PersonaError."""
    if not path.is_file():
        raise PersonaError(f"voice prompt {path.name}: no such file")
    if path.suffix.lower() == ".pt":
        return read_voice_preset(path, cfg)
    return encode_voice_audio(path, cfg, encoder)


def read_voice_preset(path: Path, cfg: LMConfig) -> VoicePrompt:
    """A PersonaPlex `.pt` preset: {"embeddings": [V, 1, 1, dim] float, "cache": [1, 17, ring]
    int64}, checked against the model. Loaded with weights_only: a file that holds pickled Python
    objects is refused, not executed."""
    import warnings
    name = path.name
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before failing
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled objects, truncated zip, not a torch file at all, ...
        smuggled = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if smuggled:
            raise PersonaError(f"voice prompt {name}: refused, it holds Python objects "
                               f"({smuggled.group(1)}), not only tensors") from None
        raise PersonaError(f"voice prompt {name}: not a readable PersonaPlex voice preset "
                           f"({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise PersonaError(f"voice prompt {name}: expected a dict with 'embeddings' and 'cache', "
                           f"got {type(state).__name__}")
    missing = [k for k in ("embeddings", "cache") if not isinstance(state.get(k), torch.Tensor)]
    if missing:
        raise PersonaError(f"voice prompt {name}: no tensor {' or '.join(map(repr, missing))} "
                           f"(keys: {sorted(map(str, state))})")
    emb, ring = state["embeddings"], state["cache"]
    ring_size = cfg.max_delay + 3
    if emb.dim() != 4 or emb.shape[0] < 1 or tuple(emb.shape[1:]) != (1, 1, cfg.dim):
        raise PersonaError(f"voice prompt {name}: embeddings have shape {list(emb.shape)}, expected "
                           f"[V, 1, 1, {cfg.dim}] for this model (dim {cfg.dim})")
    if not emb.is_floating_point():
        raise PersonaError(f"voice prompt {name}: embeddings are {emb.dtype}, expected floats")
    if not torch.isfinite(emb).all():
        raise PersonaError(f"voice prompt {name}: embeddings hold NaN or infinite values")
    if tuple(ring.shape) != (1, cfg.num_codebooks, ring_size):
        raise PersonaError(f"voice prompt {name}: cache has shape {list(ring.shape)}, expected "
                           f"[1, {cfg.num_codebooks}, {ring_size}] (the model's "
                           f"{cfg.num_codebooks} streams, ring of {ring_size})")
    if ring.dtype != torch.int64:
        raise PersonaError(f"voice prompt {name}: cache is {ring.dtype}, expected torch.int64")
    ring = ring[0]
    # -1 is the "no input" token (a zero embedding); the initial tokens are text_card and card.
    if ring.min() < -1 or ring[0].max() > cfg.text_card or ring[1:].max() > cfg.card:
        raise PersonaError(f"voice prompt {name}: cache holds tokens outside the model's "
                           f"vocabularies (text 0..{cfg.text_card}, audio 0..{cfg.card})")
    if emb.shape[0] + 1 > cfg.context:
        raise PersonaError(f"voice prompt {name}: {emb.shape[0]} positions do not fit the "
                           f"model's context of {cfg.context}")
    return VoicePrompt(name, embeddings=emb[:, 0, 0].contiguous(), ring=ring.clone())


def encode_voice_audio(path: Path, cfg: LMConfig, encoder: "VoiceEncoder") -> VoicePrompt:
    """An audio recording -> Mimi codes [F, dep_q], as the reference prepares it: mono at 24 kHz,
    normalised to -24 LUFS, cut in 1920-sample frames (the last zero-padded), each encoded in turn
    by a Mimi in streaming mode with a fresh state."""
    pcm = read_voice_audio(path, max_seconds=cfg.context * FRAME_SIZE / SAMPLE_RATE)
    frames = -(-len(pcm) // FRAME_SIZE)
    padded = np.zeros(frames * FRAME_SIZE, dtype=np.float32)
    padded[:len(pcm)] = pcm
    codes = encoder.encode_frames(torch.from_numpy(padded).view(frames, FRAME_SIZE))
    return VoicePrompt(path.name, codes=codes[:, :cfg.dep_q].contiguous())


def read_voice_audio(path: Path, max_seconds: float | None = None) -> np.ndarray:
    """Read any soundfile-readable recording -> float32 mono 24 kHz at -24 LUFS."""
    import pyloudnorm
    import soundfile
    import soxr
    name = path.name
    try:  # the length first, so an over-long file is refused before it is read
        info = soundfile.info(str(path))
        seconds = info.frames / info.samplerate if info.samplerate > 0 else 0.0
        if seconds < MIN_VOICE_SECONDS:
            raise PersonaError(f"voice prompt {name}: {seconds:.2f} s of audio; a voice prompt "
                               f"needs at least {MIN_VOICE_SECONDS} s (a few seconds of speech "
                               "is best)")
        if max_seconds is not None and seconds > max_seconds:
            raise PersonaError(f"voice prompt {name}: {seconds:.1f} s of audio is longer than "
                               f"the model's context ({max_seconds:.0f} s)")
        pcm, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except PersonaError:
        raise
    except Exception as e:  # soundfile.LibsndfileError, RuntimeError, ...
        # libsndfile names the file's full path first; the client only gets the reason.
        reason = str(e).splitlines()[0].rsplit(": ", 1)[-1][:160]
        raise PersonaError(f"voice prompt {name}: not a readable audio file ({reason})") from None
    mono = pcm.mean(axis=1)
    if not np.isfinite(mono).all():
        raise PersonaError(f"voice prompt {name}: the audio holds NaN or infinite samples")
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE)
    loudness = pyloudnorm.Meter(SAMPLE_RATE).integrated_loudness(mono.astype(np.float64))
    if not np.isfinite(loudness):
        raise PersonaError(f"voice prompt {name}: the audio is silent")
    import warnings
    with warnings.catch_warnings():  # "possible clipped samples": the reference keeps them too
        warnings.simplefilter("ignore")
        normalised = pyloudnorm.normalize.loudness(mono.astype(np.float64), loudness,
                                                   VOICE_LOUDNESS_LUFS)
    return normalised.astype(np.float32)


class VoiceEncoder:
    """A private copy of the checkpoint's Mimi for encoding voice recordings, so that the engine's
    streaming Mimi (one state per conversation) is never touched. Made on first use."""

    def __init__(self, mimi):
        self._source = mimi
        self._mimi = None
        self._lock = threading.Lock()

    @torch.no_grad()
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [F, FRAME_SIZE] float32 -> codes [F, num_codebooks] int64 on the CPU, one
        streaming encode per frame from a fresh state (the reference encodes frame by frame)."""
        with self._lock:
            if self._mimi is None:
                # Copy the weights, not the engine's per-conversation streaming states.
                memo = {id(m._streaming_state): None for m in self._source.modules()
                        if getattr(m, "_streaming_state", None) is not None}
                self._mimi = copy.deepcopy(self._source, memo)
            mimi = self._mimi
            device = next(mimi.parameters()).device
            dtype = next(mimi.parameters()).dtype
            out = []
            with mimi.streaming(1):
                for frame in frames:
                    pcm = frame.to(device=device, dtype=dtype).view(1, 1, -1)
                    out.append(mimi.encode(pcm)[0, :, 0])
            return torch.stack(out).to("cpu", torch.int64)


# -- the voices of a checkpoint ----------------------------------------------------------------

def filler_codes(encoder: "VoiceEncoder", card: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(silence, sine) codes for the prompt phase: the reference's constants for the real Mimi
    (2048 bins); for another codec (the tiny test Mimi), its own codes of the same two frames,
    each encoded from a fresh streaming state."""
    if card == REAL_MIMI_CARD:
        return SILENCE_CODES, SINE_CODES
    t = np.arange(FRAME_SIZE) / SAMPLE_RATE
    sine = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    silence_codes, sine_codes = (
        tuple(int(c) for c in encoder.encode_frames(torch.from_numpy(frame).view(1, -1))[0, :8])
        for frame in (np.zeros(FRAME_SIZE, dtype=np.float32), sine))
    return silence_codes, sine_codes


class Personas:
    """The voices a persona-trained checkpoint can speak with: the files of one directory
    (`.pt` presets and audio recordings), listed and loaded by file name only, never by path.
    Loaded voices are kept, so each file is read (and encoded) once.

    `silence_codes` / `sine_codes` (8 ints each) are the prompt phase's agent and user filler
    frames for this checkpoint's Mimi (the reference's SILENCE_TOKENS / SINE_TOKENS)."""

    def __init__(self, cfg: LMConfig, mimi, directory: Path | None, why_none: str = ""):
        """`why_none`: shown to whoever asks for a voice when there are none (never a path)."""
        self.config = cfg
        self.directory = directory
        self.why_none = why_none
        self.encoder = VoiceEncoder(mimi)
        self.silence_codes, self.sine_codes = filler_codes(self.encoder, cfg.card)
        self._loaded: dict[str, VoicePrompt] = {}
        self._lock = threading.Lock()

    def voices(self) -> list[str]:
        if self.directory is None or not self.directory.is_dir():
            return []
        # Hidden files are skipped: partial writes, macOS's "._NATF0.pt" resource forks.
        return sorted(p.name for p in self.directory.iterdir() if not p.name.startswith(".")
                      and p.is_file() and p.suffix.lower() in VOICE_SUFFIXES)

    def preload(self) -> dict[str, str]:
        """Load every listed voice now (at start-up, off any event loop), so that `voice()` is a
        lookup afterwards. Returns {name: problem} for files that cannot be used; each raises its
        PersonaError again when asked for."""
        problems = {}
        for name in self.voices():
            try:
                self.voice(name)
            except PersonaError as e:
                problems[name] = str(e)
        return problems

    def voice(self, name: str) -> VoicePrompt:
        """The voice called `name` ("NATF0.pt"; "NATF0" finds the preset too). The first call for
        a voice not preloaded reads it (and runs Mimi for a recording): call it off the event
        loop."""
        available = self.voices()
        if not isinstance(name, str) or name not in available:
            alias = f"{name}.pt" if isinstance(name, str) else None
            if alias not in available:
                listed = ", ".join(available) if available else "none"
                raise PersonaError(f"unknown voice {str(name)[:80]!r}; available voices: {listed}"
                                   + (f" ({self.why_none})" if self.why_none and not available
                                      else ""))
            name = alias
        with self._lock:
            if name not in self._loaded:
                self._loaded[name] = load_voice(self.directory / name, self.config, self.encoder)
            return self._loaded[name]


# -- voices.tgz -----------------------------------------------------------------------------------

def checkpoint_voices(root: Path | None, get, elsewhere: str | None = None) -> Path | None:
    """A checkpoint's own voice folder: its `voices/` when it is a local directory that has one,
    else its `voices.tgz` (`get(name, required=False)` fetches a checkpoint file, from the Hub or
    the directory), else the archive `elsewhere` names ("hf://owner/repo/voices.tgz": a
    fine-tune that ships no voices of its own uses its base model's), unpacked once into the
    cache. None when there is none."""
    if root is not None and (root / VOICES_DIR).is_dir():
        return root / VOICES_DIR
    archive = get(VOICES_ARCHIVE, required=False)
    if archive is None and elsewhere is not None:
        archive = get(elsewhere)
    return extract_voices(archive) if archive is not None else None


def cache_root() -> Path:
    """Where unpacked voices live: $DUPLEX_AGENT_CACHE, else $XDG_CACHE_HOME/duplex-agent, else
    ~/.cache/duplex-agent."""
    if os.environ.get("DUPLEX_AGENT_CACHE"):
        return Path(os.environ["DUPLEX_AGENT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "duplex-agent"


def extract_voices(archive: Path, cache: Path | None = None) -> Path:
    """Unpack a voices.tgz once into the cache (keyed by its content hash) and return the
    directory holding the voice files (its `voices/` folder when it has one). Only regular files
    and folders are unpacked; absolute names, `..`, links and devices are refused."""
    digest = hashlib.sha256()
    with open(archive, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    target = (cache or cache_root()) / "voices" / digest.hexdigest()[:16]
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target.parent))
        try:
            _safe_untar(archive, staging)
            try:
                os.replace(staging, target)  # atomic: a concurrent unpacker may have won
            except OSError:
                if not target.is_dir():
                    raise
        finally:
            if staging.exists():
                import shutil
                shutil.rmtree(staging, ignore_errors=True)
    inner = target / VOICES_DIR
    return inner if inner.is_dir() else target


def _safe_untar(archive: Path, dest: Path) -> None:
    name = archive.name
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise PersonaError(f"{name}: not a readable tar archive ({e})") from None
    total = 0
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise PersonaError(f"{name}: damaged archive ({e})") from None
        for member in members:
            parts = PurePosixPath(member.name).parts
            if member.name.startswith(("/", "\\")) or ".." in parts or any("\\" in p for p in parts):
                raise PersonaError(f"{name}: refused, member {member.name!r} points outside "
                                   "the archive's folder")
            if member.isdir():
                continue
            if not member.isfile():
                raise PersonaError(f"{name}: refused, member {member.name!r} is not a regular "
                                   "file (links and devices are not unpacked)")
            total += member.size
            if total > MAX_VOICES_BYTES:
                raise PersonaError(f"{name}: refused, unpacks to more than "
                                   f"{MAX_VOICES_BYTES >> 30} GiB")
            out = dest.joinpath(*[p for p in parts if p not in ("", ".")])
            out.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            with src, open(out, "wb") as f:
                while block := src.read(1 << 20):
                    f.write(block)


__all__ = ["PersonaError", "VoicePrompt", "Personas", "VoiceEncoder", "load_voice",
           "read_voice_preset", "encode_voice_audio", "read_voice_audio", "agent_steps_only",
           "is_personaplex_layout", "depformer_steps", "checkpoint_voices", "extract_voices",
           "cache_root", "filler_codes", "PRESET_NAMES", "PERSONAPLEX_REPO", "SILENCE_CODES",
           "SINE_CODES", "VOICE_LOUDNESS_LUFS"]

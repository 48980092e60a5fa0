"""Personas (PersonaPlex): the prompt a conversation starts from; the cache of prefilled prompts.

The reference (NVIDIA/personaplex `LMGen.step_system_prompts`) steps its prompt frame by frame
before the conversation: the voice (a `.pt` preset's pre-summed input embeddings followed by a
restore of its token ring, or a recording's Mimi codes as the agent's audio with text pad and the
user's sine), 6 silence frames, the text prompt `<system> ... <system>` one token per frame, and
6 more silence frames. Every token of it is forced, so the engine computes all of it as ONE causal
pass through the temporal transformer (`MoshiLM.forward_prefill`): this module turns a voice and
a text into the input of each position (`Prompt`), exactly as the reference's token ring would
present them, and keeps the KV of prefilled prompts for the next conversation with that persona.

Positions and columns: frame f writes stream k into column f + delay_k, position p reads column p.
The reference's first step only fills column 0 (its initial tokens), so its step c runs position
c - 1; ours runs position c in the same step, one frame earlier, with identical tokens. The last
prompt position predicts the first live column: its text token and first agent codebook are
sampled (`LMGen.finish_prompt`), its delayed agent codebooks are the last silence frame's.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from duplex_agent.agent.config import FRAME_RATE, LMConfig
from duplex_agent.checkpoints.personaplex import PersonaError, VoicePrompt

# 0.5 s of silence after the voice and after the text (the reference's audio_silence_frame_cnt).
PROMPT_SILENCE_FRAMES = int(0.5 * FRAME_RATE)
# 1/CONVERSATION_SHARE of the context window is kept for the conversation and a prompt may take
# the rest, so at least that much conversation (24 s on PersonaPlex) sees the whole prompt before
# its start slides out of the window.
CONVERSATION_SHARE = 10
DEFAULT_PROMPT_CACHE_BYTES = 1 << 30  # host memory for prefilled prompts (~0.5 MB per position)


def wrap_with_system_tags(text: str) -> str:
    """The reference's wrapping: `<system> text <system>`, unless already wrapped."""
    cleaned = text.strip()
    if cleaned.startswith("<system>") and cleaned.endswith("<system>"):
        return cleaned
    return f"<system> {cleaned} <system>"


def text_prompt_tokens(tokenizer, text: str | None) -> list[int]:
    """SentencePiece ids of the wrapped text, no BOS; an empty text has no text phase."""
    return list(tokenizer.encode(wrap_with_system_tags(text))) if text else []


def max_prompt_frames(cfg: LMConfig) -> int:
    return cfg.context - cfg.context // CONVERSATION_SHARE


@dataclass(frozen=True, eq=False)
class Prompt:
    """A persona's prompt, ready to prefill: the inputs of positions 0..length-1."""
    voice: str | None
    text: str | None
    embeddings: torch.Tensor | None  # [E, dim]: a preset's inputs of positions 0..E-1
    columns: torch.Tensor  # [length - E, 17] int64: token columns of positions E..length-1
    carry: torch.Tensor  # [17]: column `length` as the prompt leaves it (-2: not yet known)
    last_agent_frame: torch.Tensor  # [8]: the agent's codes in the last prompt frame
    key: str  # digest of the checkpoint and of everything above: the prompt cache's key

    @property
    def length(self) -> int:
        e = 0 if self.embeddings is None else self.embeddings.shape[0]
        return e + self.columns.shape[0]


def persona_prompt(bundle, voice: str | VoicePrompt | None, text: str | None) -> Prompt | None:
    """The prompt for `Agent.open(voice_prompt=..., text_prompt=...)`, or None without a persona.
    Raises PersonaError (checkpoint without personas, unknown voice, prompt too long). Empty
    strings mean none, as in the reference's query parameters."""
    if voice == "":
        voice = None
    if voice is None and not text:
        return None
    if bundle.personas is None:
        raise PersonaError(f"{bundle.name} has no persona training; use a PersonaPlex checkpoint "
                           "(personaplex, or tiny-random-personaplex for smoke runs) for voice "
                           "and text prompts")
    if text is not None and not isinstance(text, str):
        raise PersonaError(f"text_prompt must be a string, got {type(text).__name__}")
    if isinstance(voice, str):
        voice = bundle.personas.voice(voice)
    elif voice is not None and not isinstance(voice, VoicePrompt):
        raise PersonaError(f"voice_prompt must be a voice name or a VoicePrompt, "
                           f"got {type(voice).__name__}")
    personas = bundle.personas
    return build_prompt(bundle.config, bundle.name, voice, text,
                        text_prompt_tokens(bundle.tokenizer, text), personas.silence_codes,
                        personas.sine_codes)


def build_prompt(cfg: LMConfig, checkpoint: str, voice: VoicePrompt | None, text: str | None,
                 text_tokens: list[int], silence: tuple[int, ...], sine: tuple[int, ...]) -> Prompt:
    """The reference's prompt frames -> the columns our positions read. `text_tokens` are the
    text's ids (`text_prompt_tokens`); `silence` and `sine` the agent's and the user's filler
    codes (the reference's SILENCE_TOKENS and SINE_TOKENS for the real Mimi)."""
    if cfg.max_delay > 1:  # `carry` holds one column: PersonaPlex's delays are 0 and 1
        raise PersonaError(f"persona prompts need acoustic delays of at most 1, "
                           f"not {cfg.max_delay}")
    pad, n = cfg.text_pad_id, cfg.dep_q
    filler = [pad, *silence[:n], *sine[:cfg.num_user_codebooks]]
    frames: list[list[int]] = []  # per frame: text, agent codes, user codes (17)
    embeddings = None
    if voice is not None and voice.is_preset:
        embeddings = voice.embeddings
        # Stand-ins for the E preset positions and the restored frame: their columns come from
        # the embeddings and the ring below.
        frames += [filler] * voice.num_frames
    elif voice is not None:
        frames += [[pad, *code.tolist(), *sine[:cfg.num_user_codebooks]] for code in voice.codes]
    silence_frames = [filler] * PROMPT_SILENCE_FRAMES
    frames += silence_frames + [[tok] + filler[1:] for tok in text_tokens] + silence_frames

    length = len(frames)
    limit = max_prompt_frames(cfg)
    if length > limit:
        voice_part = f"voice {voice.num_frames}, " if voice is not None else ""
        raise PersonaError(
            f"the persona prompt takes {length} frames ({voice_part}text {len(text_tokens)} "
            f"tokens, silence {2 * PROMPT_SILENCE_FRAMES}); this model allows at most {limit} "
            f"({limit / FRAME_RATE:.1f} s): its context of {cfg.context} frames less a tenth kept "
            "for the conversation. Use a shorter text prompt or voice")

    table = torch.tensor(frames, dtype=torch.long)
    delays = torch.tensor(cfg.delays)
    initial = torch.tensor([cfg.text_init_id] + [cfg.audio_init_id] * cfg.n_q)
    columns = torch.full((length + 1, cfg.num_codebooks), -2, dtype=torch.long)
    for k, d in enumerate(cfg.delays):
        columns[d:length + d, k] = table[:, k]
    columns = torch.where(torch.arange(length + 1).view(-1, 1) <= delays, initial, columns)
    start = 0
    if embeddings is not None:
        # After the preset the reference restores its ring: columns E..E+delay of each stream are
        # the ring's (slot = column % ring size), whatever the frames above would have written.
        start = embeddings.shape[0]
        ring = voice.ring
        for k, d in enumerate(cfg.delays):
            for c in range(start, start + d + 1):
                columns[c, k] = ring[k, c % ring.shape[1]]

    digest = hashlib.sha256(checkpoint.encode())
    if embeddings is not None:
        digest.update(embeddings.float().contiguous().numpy().tobytes())
    digest.update(columns.numpy().tobytes())
    return Prompt(voice.name if voice is not None else None, text, embeddings,
                  columns[start:length].contiguous(), columns[length].clone(),
                  table[-1, 1:1 + n].clone(), digest.hexdigest())


@dataclass(frozen=True)
class PrefilledPrompt:
    """What a prefilled prompt leaves: K/V of its positions [layers, H, length, D] each, and the
    last position's hidden state [1, dim] and text logits [1, text_card]. On the host."""
    k: torch.Tensor
    v: torch.Tensor
    h: torch.Tensor
    text_logits: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.h, self.text_logits))


@torch.no_grad()
def prefill(model, row: int, prompt: Prompt) -> PrefilledPrompt:
    """Run `prompt` into `row` of `model` (a MoshiLM with its caches set up) as one causal pass;
    returns what it left, for `LMGen.finish_prompt` and for the cache."""
    device = model.out_norm.alpha.device
    x = model.embed_columns(prompt.columns.to(device))
    if prompt.embeddings is not None:
        x = torch.cat([prompt.embeddings.to(device, x.dtype), x])
    h, text_logits = model.forward_prefill(x, row)
    k, v = model.prompt_kv(row, prompt.length)
    return PrefilledPrompt(k, v, h.cpu(), text_logits.cpu())


class PromptCache:
    """Prefilled prompts by Prompt.key, least recently used evicted beyond `budget_bytes`.
    Read and filled on the engine thread; `stats()` from anywhere."""

    def __init__(self, budget_bytes: int = DEFAULT_PROMPT_CACHE_BYTES):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, PrefilledPrompt] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, key: str) -> PrefilledPrompt | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: str, entry: PrefilledPrompt) -> None:
        size = entry.nbytes
        with self._lock:
            if key in self._entries or size > self.budget_bytes:
                return
            while self._bytes + size > self.budget_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.nbytes
                self.evictions += 1
            self._entries[key] = entry
            self._bytes += size

    def stats(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "entries": len(self._entries),
                    "bytes": self._bytes, "budget_bytes": self.budget_bytes,
                    "evictions": self.evictions}


__all__ = ["PROMPT_SILENCE_FRAMES", "CONVERSATION_SHARE", "Prompt", "PrefilledPrompt",
           "PromptCache", "build_prompt", "persona_prompt", "prefill", "text_prompt_tokens",
           "wrap_with_system_tags",
           "max_prompt_frames"]

"""Known checkpoint names. Anything else given to `--checkpoint` is a local directory or an HF repo id."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KnownCheckpoint:
    name: str
    repo: str | None  # Hugging Face repo id; None for built-in checkpoints
    layout: str  # "kyutai" (model.safetensors + Mimi + SentencePiece), "hf" (transformers), "builtin"
    description: str
    personas: bool = False  # persona-trained (PersonaPlex): voice and text prompts, voices.tgz


DEFAULT_CHECKPOINT = "kyutai/moshiko-pytorch-bf16"

KNOWN = {
    c.name: c for c in [
        KnownCheckpoint("moshiko", "kyutai/moshiko-pytorch-bf16", "kyutai",
                        "Moshi 7.7B, male voice, bf16 (the default)"),
        KnownCheckpoint("moshika", "kyutai/moshika-pytorch-bf16", "kyutai",
                        "Moshi 7.7B, female voice, bf16"),
        KnownCheckpoint("moshiko-q8", "kyutai/moshiko-pytorch-q8", "kyutai",
                        "Moshiko with int8 weights (model.q8.safetensors, 8.0 GB instead of "
                        "15.4 GB)"),
        KnownCheckpoint("moshika-q8", "kyutai/moshika-pytorch-q8", "kyutai",
                        "Moshika with int8 weights (model.q8.safetensors, 8.0 GB)"),
        KnownCheckpoint("j-moshi", "nu-dialogue/j-moshi-ext", "kyutai",
                        "J-Moshi (Nagoya University): Moshi fine-tuned for Japanese dialogue, "
                        "Japanese SentencePiece tokenizer; bf16"),
        KnownCheckpoint("hf-moshiko", "kmhf/hf-moshiko", "hf",
                        "Moshiko in Hugging Face transformers format"),
        KnownCheckpoint("hf-moshika", "kmhf/hf-moshika", "hf",
                        "Moshika in Hugging Face transformers format"),
        KnownCheckpoint("personaplex", "nvidia/personaplex-7b-v1", "kyutai",
                        "NVIDIA PersonaPlex 7B: Moshi with a persona (voice prompt + text "
                        "prompt), 18 preset voices; bf16", personas=True),
        KnownCheckpoint("tiny-random", None, "builtin",
                        "seeded random tiny model for smoke runs and tests: it speaks noise"),
        KnownCheckpoint("tiny-random-personaplex", None, "builtin",
                        "tiny-random in PersonaPlex's layout with 18 random preset voices: "
                        "persona smoke runs and tests", personas=True),
    ]
}
# Repo ids resolve to their registry entry too, so the layout is known before any download.
BY_REPO = {c.repo: c for c in KNOWN.values() if c.repo}

# `--transcriber` names: Kyutai's streaming speech-to-text models (checkpoints/stt.py).
TRANSCRIBERS = {
    c.name: c for c in [
        KnownCheckpoint("stt-1b-en_fr", "kyutai/stt-1b-en_fr", "kyutai",
                        "Kyutai STT 1B, English and French, 0.5 s delay"),
        KnownCheckpoint("stt-1b-en_fr-candle", "kyutai/stt-1b-en_fr-candle", "kyutai",
                        "stt-1b-en_fr with its 4 pause-prediction heads (semantic turn ends)"),
        KnownCheckpoint("stt-2.6b-en", "kyutai/stt-2.6b-en", "kyutai",
                        "Kyutai STT 2.6B, English, 2.5 s delay, 1 s silence prefix"),
        KnownCheckpoint("tiny-random-stt", None, "builtin",
                        "seeded random tiny transcriber with pause heads, for smoke runs and "
                        "tests: it writes random words"),
    ]
}
TRANSCRIBERS_BY_REPO = {c.repo: c for c in TRANSCRIBERS.values() if c.repo}


def lookup(spec: str) -> KnownCheckpoint | None:
    return KNOWN.get(spec) or BY_REPO.get(spec)


def lookup_transcriber(spec: str) -> KnownCheckpoint | None:
    return TRANSCRIBERS.get(spec) or TRANSCRIBERS_BY_REPO.get(spec)

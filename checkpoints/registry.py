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
    # Where the preset voices come from when the repo has no voices.tgz of its own ("hf://...").
    voices: str | None = None
    licence: str | None = None  # named in the load log
    gated: bool = False  # the Hub serves it only to accounts that accepted its licence
    model_type: str = "moshi"  # of a built-in checkpoint (a repo's comes from its config.json)


DEFAULT_CHECKPOINT = "kyutai/moshiko-pytorch-bf16"

KNOWN = {
    c.name: c for c in [
        KnownCheckpoint("moshiko", "kyutai/moshiko-pytorch-bf16", "kyutai",
                        "Moshi 7.7B, male voice, bf16 (the default)", licence="CC BY 4.0"),
        KnownCheckpoint("moshika", "kyutai/moshika-pytorch-bf16", "kyutai",
                        "Moshi 7.7B, female voice, bf16", licence="CC BY 4.0"),
        KnownCheckpoint("moshiko-q8", "kyutai/moshiko-pytorch-q8", "kyutai",
                        "Moshiko with int8 weights (model.q8.safetensors, 8.0 GB instead of "
                        "15.4 GB)", licence="CC BY 4.0"),
        KnownCheckpoint("moshika-q8", "kyutai/moshika-pytorch-q8", "kyutai",
                        "Moshika with int8 weights (model.q8.safetensors, 8.0 GB)",
                        licence="CC BY 4.0"),
        KnownCheckpoint("moshika-rl-seamless", "kyutai/moshika-rl-seamless", "kyutai",
                        "Moshika after GRPO post-training for pauses, turn-taking, backchannels "
                        "and interruptions (arXiv 2606.11167); drop-in weights, bf16",
                        licence="CC BY-NC 4.0", gated=True),
        KnownCheckpoint("j-moshi", "nu-dialogue/j-moshi-ext", "kyutai",
                        "J-Moshi (Nagoya University): Moshi fine-tuned for Japanese dialogue, "
                        "Japanese SentencePiece tokenizer; bf16"),
        KnownCheckpoint("hf-moshiko", "kmhf/hf-moshiko", "hf",
                        "Moshiko in Hugging Face transformers format"),
        KnownCheckpoint("hf-moshika", "kmhf/hf-moshika", "hf",
                        "Moshika in Hugging Face transformers format"),
        KnownCheckpoint("personaplex", "nvidia/personaplex-7b-v1", "kyutai",
                        "NVIDIA PersonaPlex 7B: Moshi with a persona (voice prompt + text "
                        "prompt), 18 preset voices; bf16", personas=True,
                        licence="NVIDIA Open Model License", gated=True),
        KnownCheckpoint("personaplex-rl-seamless", "kyutai/personaplex-rl-seamless", "kyutai",
                        "PersonaPlex after Kyutai's GRPO post-training (as moshika-rl-seamless); "
                        "PersonaPlex's personas and 18 preset voices; bf16", personas=True,
                        voices="hf://nvidia/personaplex-7b-v1/voices.tgz",
                        licence="CC BY-NC 4.0 and the NVIDIA Open Model License", gated=True),
        KnownCheckpoint("hibiki-zero", "kyutai/hibiki-zero-3b-pytorch-bf16", "kyutai",
                        "Kyutai's Hibiki-Zero 3B: simultaneous speech translation from French, "
                        "Spanish, Portuguese and German into English speech and text; bf16",
                        licence="CC BY-NC-SA 4.0"),
        KnownCheckpoint("tiny-random", None, "builtin",
                        "seeded random tiny model for smoke runs and tests: it speaks noise"),
        KnownCheckpoint("tiny-random-personaplex", None, "builtin",
                        "tiny-random in PersonaPlex's layout with 18 random preset voices: "
                        "persona smoke runs and tests", personas=True),
        KnownCheckpoint("tiny-random-hibiki-zero", None, "builtin",
                        "tiny-random in Hibiki-Zero's layout (grouped-query attention, 16 + 16 "
                        "codebooks): translation smoke runs and tests", model_type="hibiki"),
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

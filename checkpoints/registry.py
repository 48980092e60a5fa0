"""Known checkpoint names. Anything else given to `--checkpoint` is a local directory or an HF repo id."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KnownCheckpoint:
    name: str
    repo: str | None  # Hugging Face repo id; None for built-in checkpoints
    layout: str  # "kyutai" (model.safetensors + Mimi + SentencePiece), "hf" (transformers), "builtin"
    description: str


DEFAULT_CHECKPOINT = "kyutai/moshiko-pytorch-bf16"

KNOWN = {
    c.name: c for c in [
        KnownCheckpoint("moshiko", "kyutai/moshiko-pytorch-bf16", "kyutai",
                        "Moshi 7.7B, male voice, bf16 (the default)"),
        KnownCheckpoint("moshika", "kyutai/moshika-pytorch-bf16", "kyutai",
                        "Moshi 7.7B, female voice, bf16"),
        KnownCheckpoint("hf-moshiko", "kmhf/hf-moshiko", "hf",
                        "Moshiko in Hugging Face transformers format"),
        KnownCheckpoint("hf-moshika", "kmhf/hf-moshika", "hf",
                        "Moshika in Hugging Face transformers format"),
        KnownCheckpoint("tiny-random", None, "builtin",
                        "seeded random tiny model for smoke runs and tests: it speaks noise"),
    ]
}
# Repo ids resolve to their registry entry too, so the layout is known before any download.
BY_REPO = {c.repo: c for c in KNOWN.values() if c.repo}


def lookup(spec: str) -> KnownCheckpoint | None:
    return KNOWN.get(spec) or BY_REPO.get(spec)

"""`AgentBundle`: everything a running agent needs from a checkpoint. In a module of its own so
that the loader, the engine and the persona code can all name it without importing one another."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from duplex_agent.agent.config import LMConfig, SamplingConfig
from duplex_agent.agent.model import MoshiLM
from duplex_agent.checkpoints.personaplex import Personas, VoiceEncoder, VoicePrompt, load_voice
from duplex_agent.checkpoints.stt import TranscriberBundle


@dataclass
class AgentBundle:
    """Everything a running agent needs from a checkpoint."""
    name: str
    config: LMConfig
    model: MoshiLM
    mimi: torch.nn.Module  # moshi.models.compression.MimiModel
    tokenizer: object  # sentencepiece.SentencePieceProcessor
    sampling: SamplingConfig  # the checkpoint's default sampling (lm_gen_config)
    builtin: bool = False  # True for tiny-random: random weights, speaks noise
    personas: Personas | None = None  # voices of a persona-trained checkpoint (PersonaPlex)
    transcriber: TranscriberBundle | None = None  # the user's words (--transcriber)
    # moshi's model_type: "moshi" (dialogue) or "hibiki" (speech translation: the user speaks the
    # source language, the agent its translation; agent/engine.py)
    model_type: str = "moshi"

    @property
    def translates(self) -> bool:
        return self.model_type == "hibiki"


def load_voice_prompt(path: str | Path, bundle: AgentBundle) -> VoicePrompt:
    """Load a voice file for `bundle`'s model: a PersonaPlex `.pt` preset, or an audio file
    (wav/flac/ogg..., any rate and channel count). Raises PersonaError for anything unusable."""
    encoder = bundle.personas.encoder if bundle.personas is not None else VoiceEncoder(bundle.mimi)
    return load_voice(Path(path), bundle.config, encoder)

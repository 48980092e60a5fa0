"""The command-line options every command that loads an agent shares (checkpoint, weights,
persona, sampling), and how they become the arguments of `load_checkpoint` and `Agent.open`.
Here, below the command line, so the command modules of `agent/` and `streams/` can add them to
their own subparsers without importing the command line itself."""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from duplex_agent.checkpoints.registry import DEFAULT_CHECKPOINT, KNOWN, TRANSCRIBERS


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    names = ", ".join(KNOWN)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help=f"HF repo id, local directory, or a known name ({names}); "
                        f"default {DEFAULT_CHECKPOINT}")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--kv-cache", choices=["auto", "fp8"], default="auto",
                   help="KV cache dtype: auto = the weights' (bf16 on CUDA); fp8 = float8 e4m3, "
                        "half the memory per conversation (about twice the conversations), "
                        "slightly less exact")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 linear weights made at load (half the weight memory of bf16; a "
                        "q8 checkpoint such as moshiko-q8 is int8 already)")
    p.add_argument("--lora", metavar="PATH", default=None,
                   help="LoRA adapter (moshi-finetune's lora.safetensors) fused into the weights")
    add_transcriber_arg(p)


def add_transcriber_arg(p: argparse.ArgumentParser) -> None:
    names = ", ".join(TRANSCRIBERS)
    p.add_argument("--transcriber", metavar="NAME|PATH", default=None,
                   help="also transcribe the user with a Kyutai streaming STT model in the same "
                        f"engine: a known name ({names}), an HF repo id or a local directory")


def weight_options(args) -> dict:
    """--quantize / --lora / --transcriber as keyword arguments of load_checkpoint and
    Agent.load."""
    return {"quantize": args.quantize, "lora": args.lora, "transcriber": args.transcriber}


def add_persona_args(p: argparse.ArgumentParser, conversation: bool = True) -> None:
    """Persona flags, with PersonaPlex's names: --voice-prompt-dir for every command that loads a
    checkpoint; --voice-prompt and --text-prompt for those that hold one conversation."""
    p.add_argument("--voice-prompt-dir", metavar="DIR", default=None,
                   help="persona checkpoints (PersonaPlex): a folder of voices (.pt presets, "
                        "recordings) that replaces the checkpoint's own")
    if conversation:
        p.add_argument("--voice-prompt", metavar="VOICE", default=None,
                       help="persona checkpoints: the agent's voice, one the checkpoint lists "
                            "(e.g. NATF0.pt) or a .pt preset or audio file")
        p.add_argument("--text-prompt", metavar="TEXT", default=None,
                       help="persona checkpoints: the agent's role, e.g. \"You answer the phone "
                            "at a dental clinic.\"")


def voice_prompt_from_args(args, bundle):
    """--voice-prompt as `Agent.open` takes it: a name the checkpoint lists (names win), else a
    file, loaded here. Raises PersonaError."""
    from duplex_agent.checkpoints.bundle import load_voice_prompt
    from duplex_agent.checkpoints.personaplex import PersonaError
    value = args.voice_prompt
    if value is None or bundle.personas is None:  # without personas, Agent.open says why
        return value
    names = bundle.personas.voices()
    if value in names or f"{value}.pt" in names:
        return value
    if Path(value).is_file():
        return load_voice_prompt(value, bundle)
    raise PersonaError(f"--voice-prompt {value}: no such file, and not one of the checkpoint's "
                       f"voices ({', '.join(names) or 'none'})")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")


def sampling_from_args(args, defaults):
    """--seed / --greedy on top of the checkpoint's default sampling."""
    return replace(defaults, seed=args.seed, greedy=args.greedy or defaults.greedy)

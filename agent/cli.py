"""Command line: `python run_agent.py COMMAND ...`."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from duplex_agent.checkpoints.registry import DEFAULT_CHECKPOINT, KNOWN


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
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


def weight_options(args) -> dict:
    """--quantize / --lora as keyword arguments of load_checkpoint and Agent.load."""
    return {"quantize": args.quantize, "lora": args.lora}


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
    from pathlib import Path

    from duplex_agent.checkpoints.personaplex import PersonaError, load_voice_prompt
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


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_agent.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    f = sub.add_parser("file", help="offline conversation: the agent answers a recording")
    f.set_defaults(func=_cmd_file)
    f.add_argument("input", help="input audio (WAV or anything libsndfile reads; any rate/channels)")
    f.add_argument("output", help="output WAV: the agent's voice, 24 kHz mono")
    f.add_argument("--transcript", help="write the agent's transcript as JSON here")
    _add_checkpoint_args(f)
    add_persona_args(f)
    _add_sampling_args(f)
    # Other commands live beside what they run; each module adds its own subparser and sets
    # `func`, and must import heavy dependencies only inside that function.
    import importlib
    for module in COMMAND_MODULES:
        try:
            importlib.import_module(module).register(sub, _add_checkpoint_args, _add_sampling_args)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    return parser


COMMAND_MODULES = ["duplex_agent.streams.server", "duplex_agent.streams.local", "duplex_agent.streams.loadtest", "duplex_agent.agent.bench", "duplex_agent.streams.cluster"]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_TORCH_COMPILE", "1")  # moshi's lazy compile costs 20+ s per start
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    from duplex_agent.agent.engine import CapacityError
    from duplex_agent.checkpoints.loader import CheckpointError
    from duplex_agent.checkpoints.personaplex import PersonaError
    from duplex_agent.streams.audio_file import AudioInputError
    try:
        return args.func(args)
    except (CheckpointError, AudioInputError, CapacityError, PersonaError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def sampling_from_args(args, defaults):
    """--seed / --greedy on top of the checkpoint's default sampling."""
    from dataclasses import replace
    return replace(defaults, seed=args.seed, greedy=args.greedy or defaults.greedy)


def _cmd_file(args) -> int:
    from pathlib import Path

    from duplex_agent.agent.config import SAMPLE_RATE
    from duplex_agent.agent.engine import KV_CACHE_DTYPES, Engine
    from duplex_agent.agent.offline import run_file
    from duplex_agent.agent.persona import persona_prompt
    from duplex_agent.checkpoints.loader import load_checkpoint
    from duplex_agent.streams.audio_file import AudioInputError, read_mono

    pcm = read_mono(args.input, SAMPLE_RATE)  # fail on bad input before loading a 15 GB model
    for out in (args.output, args.transcript):
        if out and not Path(out).parent.resolve().is_dir():
            raise AudioInputError(f"{out}: the folder {Path(out).parent} does not exist")
    bundle = load_checkpoint(args.checkpoint, args.device, voice_prompt_dir=args.voice_prompt_dir,
                             **weight_options(args))
    prompt = persona_prompt(bundle, voice_prompt_from_args(args, bundle), args.text_prompt)
    engine = Engine(bundle, max_sessions=1, kv_dtype=KV_CACHE_DTYPES[args.kv_cache])
    t0 = time.perf_counter()
    transcript = run_file(engine, pcm, args.output, args.transcript, sampling_from_args(args, bundle.sampling),
                          on_piece=lambda s: print(s, end="", flush=True), prompt=prompt)
    print()
    n = len(transcript.pieces)
    print(f"wrote {args.output} ({time.perf_counter() - t0:.1f} s, {n} text pieces)", file=sys.stderr)
    return 0

"""Command line: `python run_agent.py COMMAND ...` (or `duplex-agent COMMAND ...` installed).

It sits above the model (`agent/`, `checkpoints/`) and the serving layer (`streams/`). Each
command lives beside what it runs: its module adds its own subparser (`register`) and sets
`func`, and imports heavy dependencies (torch, aiohttp, Ray) only inside that function, so
`--help` stays fast.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from duplex_agent.agent import bench, offline
from duplex_agent.streams import loadtest, local, server
from duplex_agent.streams.cluster import launcher as cluster

COMMANDS = (offline, server, local, loadtest, bench, cluster)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_agent.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_TORCH_COMPILE", "1")  # moshi's lazy compile costs 20+ s per start
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    from duplex_agent.agent.audio_file import AudioInputError
    from duplex_agent.agent.engine import CapacityError, KernelCheckError
    from duplex_agent.checkpoints.loader import CheckpointError
    from duplex_agent.checkpoints.personaplex import PersonaError
    try:
        return args.func(args)
    except (CheckpointError, AudioInputError, CapacityError, KernelCheckError, PersonaError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

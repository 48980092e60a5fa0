#!/usr/bin/env python3
"""Entry point: `python run_agent.py {file,serve,local,bench} ...` (see README.md)."""
import sys

from duplex_agent.cli import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Run here (with network), before a GPU device session: fetches into .whl/ the Python packages the
# device image lacks for scripts/device_bench.sh (the image has torch, triton, numpy, safetensors,
# sentencepiece, huggingface-hub, pytest, hypothesis, aiohttp, matplotlib, psutil).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl moshi==0.2.13 sphn==0.2.0 pytest-asyncio soxr soundfile cffi pycparser
ls -la .whl

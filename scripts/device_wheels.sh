#!/usr/bin/env bash
# Run here (with network) before the GPU device call: fetches into .whl/ the Python packages the
# device image lacks for scripts/device_bench.sh, as Python 3.12 x86-64 wheels, then checks what
# the call will carry. The image already has torch, triton, numpy, scipy, safetensors,
# sentencepiece, einops, huggingface-hub, pytest, hypothesis, matplotlib (the device tool's
# KINDS.md); our bench path and GPU tests import beyond it only the packages below, moshi without
# its dependencies (its torch<2.10 pin would not let the image's torch be).
# Fails loudly when the wheels pass WHEELS_BUDGET_MIB or everything the call sends (tracked and
# untracked-not-ignored files plus .whl) passes TREE_BUDGET_MIB; a device call carries 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WHEELS_BUDGET_MIB=${WHEELS_BUDGET_MIB:-8}
TREE_BUDGET_MIB=${TREE_BUDGET_MIB:-40}
PACKAGES=(
    moshi==0.2.13
    soxr==1.1.0 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12  # audio I/O and resampling
    webrtcvad-wheels==2.0.14.post1                              # turn-taking metrics (agent.api)
    pyloudnorm==0.2.0                                           # persona voice prompts
)
# Not pytest-asyncio: the GPU tests are synchronous, and a plugin built for a newer pytest than
# the image's would stop pytest from starting at all (without it, asyncio_mode is only a warning).
rm -rf .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${PACKAGES[@]}"
ls -l .whl

mib() { echo $((($1 + (1 << 20) - 1) >> 20)); }
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb -- 2>/dev/null | awk '$2 == "total" {s += $1} END {print s + 0}')
echo "wheels $(mib "$wheels") MiB (budget $WHEELS_BUDGET_MIB MiB); the call sends $(mib $((tree + wheels))) MiB" \
     "with them (budget $TREE_BUDGET_MIB MiB, limit 64 MiB)"
if ((wheels > WHEELS_BUDGET_MIB << 20)); then
    echo "FAIL: .whl is over its $WHEELS_BUDGET_MIB MiB budget: drop a package or raise the budget knowingly" >&2
    exit 1
fi
if ((tree + wheels > TREE_BUDGET_MIB << 20)); then
    echo "FAIL: the tree the device call sends is over $TREE_BUDGET_MIB MiB: ignore large untracked files" >&2
    exit 1
fi

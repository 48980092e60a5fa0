#!/usr/bin/env bash
# Run on a lent H100/H200 (device tool), from the repository root, with .whl carried:
#   bash scripts/device_bench.sh [quick]
# GPU tests first (kernels in bf16 and real shapes, CUDA graph == eager, no host sync), then the
# benchmarks whose results go to bench/results/: kernel bandwidth, the engine against moshi, the
# engine on the torch attention, without CUDA graphs, and with the float8 KV cache up to the
# number of conversations that fits. Everything lands in $OUT/results.tgz (plus the log).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/r"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NO_TORCH_COMPILE=1
log() { echo "== $(date +%T) $*"; }
{
    log "device"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, triton, moshi; print('torch', torch.__version__, 'triton', triton.__version__, 'moshi', moshi.__version__)"
    log "GPU tests"
    python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_kernels_sampling.py \
        tests/test_cuda_graphs.py tests/test_sampling.py tests/test_parity.py 2>&1 | tail -15
    log "attention kernel bandwidth (bf16 caches, then float8 caches)"
    python3 -m kernels.bench_attention "$OUT/r/attention.json"
    python3 -m kernels.bench_attention "$OUT/r/attention-fp8.json" --kv-dtype fp8
    log "sampling kernel"
    python3 -m kernels.bench_sampling "$OUT/r/sampling.json"
    if [ "${1:-}" = quick ]; then
        python3 run_agent.py bench --sessions 1,32 --steps 20 --out "$OUT/r"
    else
        log "engine vs moshi (bf16 KV, Triton kernels, CUDA graphs)"
        python3 run_agent.py bench --out "$OUT/r"
        log "engine on the torch attention"
        AGENT_KERNELS=torch python3 run_agent.py bench --no-reference --sessions 1,8,32 --out "$OUT/r"
        log "engine without CUDA graphs"
        AGENT_CUDA_GRAPHS=0 python3 run_agent.py bench --no-reference --sessions 1,8,32 --out "$OUT/r"
        log "engine with the float8 KV cache"
        python3 run_agent.py bench --no-reference --kv-cache fp8 --sessions 1,16,32,40,48,64,72 --out "$OUT/r"
    fi
    log "done"
} 2>&1 | tee "$OUT/r/log.txt"
tar czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$OUT/r"

#!/usr/bin/env bash
# Run on a lent H100/H200 (device tool), from the repository root, with .whl carried
# (scripts/device_wheels.sh fetches it). One stage per device call, each well under 10 minutes:
#   bash scripts/device_bench.sh tests     # GPU tests: bf16 kernels, real shapes, CUDA graph == eager,
#                                          # no host sync, engine isolation on CUDA; kernel microbenchmarks
#   bash scripts/device_bench.sh engine    # engine vs moshi at 1..64 conversations, empty and full context
#   bash scripts/device_bench.sh ablations # engine on torch attention, without CUDA graphs, float8 KV
#   bash scripts/device_bench.sh quick     # a smoke run of the engine benchmark
# Results and the log land in $OUT/results.tgz (the device tool brings $OUT back).
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
    case "${1:-tests}" in
    tests)
        log "GPU tests"
        python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_kernels_fused.py \
            tests/test_kernels_sampling.py tests/test_cuda_graphs.py tests/test_sampling.py \
            tests/test_parity.py 2>&1 | tail -15
        log "attention kernel bandwidth (bf16 caches, then float8 caches)"
        python3 -m duplex_agent.kernels.bench_attention "$OUT/r/attention.json"
        python3 -m duplex_agent.kernels.bench_attention "$OUT/r/attention-fp8.json" --kv-dtype fp8
        log "sampling kernel"
        python3 -m duplex_agent.kernels.bench_sampling "$OUT/r/sampling.json" ;;
    engine)
        log "engine vs moshi (bf16 KV, Triton kernels, CUDA graphs)"
        python3 run_agent.py bench --out "$OUT/r" ;;
    ablations)
        log "engine on the torch references"
        AGENT_KERNELS=torch python3 run_agent.py bench --no-reference --sessions 1,8,32 --steps 30 --out "$OUT/r"
        log "engine without CUDA graphs"
        AGENT_CUDA_GRAPHS=0 python3 run_agent.py bench --no-reference --sessions 1,8,32 --steps 30 --out "$OUT/r"
        log "engine with the float8 KV cache"
        python3 run_agent.py bench --no-reference --kv-cache fp8 --sessions 1,16,32,40,48,64,72 --out "$OUT/r" ;;
    quick)
        python3 run_agent.py bench --sessions 1,32 --steps 20 --out "$OUT/r" ;;
    *)
        echo "unknown stage $1: tests, engine, ablations or quick"; exit 2 ;;
    esac
    log "done"
} 2>&1 | tee "$OUT/r/log.txt"
tar czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$OUT/r"

#!/usr/bin/env bash
# The GPU run book's one device call (bench/results/README.md, "GPU run book"): the GPU checks and
# benchmarks in priority order, each step under its own time budget, all of them inside 9 minutes.
# After every step $OUT/results.tgz is rebuilt with each finished step's folder (result JSON/PNG,
# log, status.json), so a run cut short still brings back everything before the cut; $OUT/log.txt
# is the whole log as it goes. Two files: well inside what a device run brings back.
#
#   bash scripts/device_bench.sh               on the lent GPU, from the repository root, .whl carried
#   bash scripts/device_bench.sh plan          the steps, their budgets (s) and the total
#   bash scripts/device_bench.sh collect DIR [RESULTS]
#                                              here, afterwards: DIR/results.tgz into bench/results/
#                                              (or RESULTS), then the README tables refreshed
#   DEVICE_BENCH_DRY=1 bash scripts/device_bench.sh
#                                              the same steps on CPU, tiny shapes, GPU-only tests
#                                              skipping (tests/test_device_bench.py); budgets x3
#                                              (DEVICE_BENCH_BUDGET_SCALE): a shared CPU is slow
#   DEVICE_BENCH_STEPS=engine,fp8:90 ...       only these steps (a later call for what an earlier
#                                              one missed), a budget in seconds after a colon
set -uo pipefail
cd "$(dirname "$0")/.."

# One list, in priority order: name, budget in seconds, what the step brings back.
STEPS=(
    "setup 20 the carried wheels installed; GPU, driver and versions (env.json)"
    "tests 90 GPU correctness tests: kernels (both attention variants, float8), the self-check's fallbacks, CUDA graph == eager, no host sync, engine isolation on CUDA"
    "tune 120 decode-attention launch configurations timed at B = 1, 8, 32, 80, 160 (bf16 and float8 KV); the fastest correct ones become kernels/tuned/decode_attention-<GPU>.json, which the steps after it use"
    "engine 70 moshiko bf16, full context: our tick vs moshi's LMGen at 1, 8, 32 and the most conversations that fit; floor ratios; the self-check's time at load"
    "fp8 40 float8 KV cache at the largest batches: engine at 32, 80 and the most that fit; attention at B = 32, 64"
    "attention 25 attention kernel bandwidth at B = 1, 16, 32 x context 3000, L2 flushed; sampling kernel"
    "transcriber 40 the transcriber (stt-1b-en_fr-candle shape, random bf16) in the tick: ours vs ours+stt at 1, 16, 64, full context, if bench has --transcriber"
    "hibiki 40 Hibiki-Zero shape (GQA, 16 + 16 codebooks): tick at 1, 8, 32 and the most that fit, if bench has --model"
    "ablations 40 our engine on the torch kernels, then without CUDA graphs, at 1 and 32 conversations"
    "int8 15 int8 GEMM (python -m duplex_agent.kernels.bench_int8_gemm), if the module exists"
    "persona 30 persona prefill, 3 repeats (python -m duplex_agent.agent.bench_persona), if the module exists"
)
SKIPPED=99  # a step's exit code for "nothing to run here"

selected() {  # the steps to run, one "name budget what" a line: all, or DEVICE_BENCH_STEPS's
    local want step name budget what
    if [[ -z ${DEVICE_BENCH_STEPS:-} ]]; then
        printf '%s\n' "${STEPS[@]}"
        return
    fi
    for want in ${DEVICE_BENCH_STEPS//,/ }; do
        for step in "${STEPS[@]}"; do
            read -r name budget what <<<"$step"
            if [[ $name == "${want%%:*}" ]]; then
                [[ $want == *:* ]] && budget=${want#*:}
                echo "$name $budget $what"
                continue 2
            fi
        done
        echo "unknown step ${want%%:*} in DEVICE_BENCH_STEPS" >&2
        return 1
    done
}

plan() {
    local total=0 name budget what
    while read -r name budget what; do
        printf '%-10s %4d s  %s\n' "$name" "$budget" "$what"
        total=$((total + budget))
    done < <(selected)
    echo "total $total s"
}

collect() {  # DIR [RESULTS]: unpack a run's results.tgz, keep its results, refresh the tables
    local from=${1:?collect DIR: the folder holding results.tgz} results=${2:-bench/results}
    local tmp
    tmp=$(mktemp -d)
    tar xzf "$from/results.tgz" -C "$tmp" || return 1
    local stamp
    stamp=$(cat "$tmp/results/stamp")
    find "$tmp/results" -mindepth 2 \( -name '*.json' -o -name '*.png' \) \
        ! -name status.json ! -name env.json ! -name 'decode_attention-*.json' -exec cp {} "$results/" \;
    # The tuned launch configurations go where the kernel reads them.
    find "$tmp/results" -mindepth 2 -name 'decode_attention-*.json' -exec cp {} "${TUNED_DIR:-kernels/tuned}/" \;
    "${PYTHON:-python3}" scripts/bench_tables.py --summarize-run "$tmp/results" \
        --out "$results/device-run-$stamp.json" || return 1
    [[ ! -f $from/log.txt ]] || cp "$from/log.txt" "$results/device-run-$stamp.log"
    rm -rf "$tmp"
    "${PYTHON:-python3}" scripts/bench_tables.py --results "$results" --readme "$results/README.md"
}

selected >/dev/null || exit 2
case "${1:-run}" in
    plan) plan; exit 0 ;;
    collect) shift; collect "$@"; exit $? ;;
    run) ;;
    *) echo "usage: $0 [plan | collect DIR [RESULTS]]   (DEVICE_BENCH_DRY=1: a CPU dry run)" >&2; exit 2 ;;
esac

# ---- the run --------------------------------------------------------------------------------
OUT=${OUT:?OUT: the folder the device tool brings back}
mkdir -p "$OUT"
WORK=$(mktemp -d)
STAMP=$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$WORK/results" && echo "$STAMP" >"$WORK/results/stamp"
export PY=${PYTHON:-python3} STAMP NO_TORCH_COMPILE=1 PYTHONUNBUFFERED=1 SKIPPED
if [[ ${DEVICE_BENCH_DRY:-0} == 1 ]]; then
    # Same steps, tiny shapes on CPU: Triton kernels in its interpreter, GPU-only tests skipping.
    export DRY=1 DEV=cpu KIND=cpu-tiny TINY=--tiny TRITON_INTERPRET=1 OMP_NUM_THREADS=1
    SCALE=${DEVICE_BENCH_BUDGET_SCALE:-3}
    export SESSIONS=1,max MAX_CAP=2 FP8_SESSIONS=max FP8_CAP=2 ABLATE=1 STEPS_PER_POINT=2 REPEATS=1
    export ATT_B=--batches=1,2 ATT_FP8_B=--batches=2 ATT_CTX= PYTEST_SELECT="-k cuda"
    export STT_SESSIONS=1,2 STT_MODEL=tiny-random-stt HIBIKI_SESSIONS=1,2
    # The dry run's tuned table goes to a scratch folder, not into the package.
    export TUNE_B=--batches=1,2 TUNE_TABLE="--table-dir=$(mktemp -d)"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    SCALE=${DEVICE_BENCH_BUDGET_SCALE:-1}
    export DRY=0 DEV=cuda KIND=cuda TINY= SESSIONS=1,8,32,max MAX_CAP= FP8_SESSIONS=32,80,max FP8_CAP=
    export ABLATE=1,32 STEPS_PER_POINT=30 REPEATS=3 ATT_B=--batches=1,16,32 ATT_FP8_B=--batches=32,64
    export ATT_CTX=--contexts=3000 PYTEST_SELECT= TUNE_B=--batches=32,80,1,8,160 TUNE_TABLE=
    export STT_SESSIONS=1,16,64 STT_MODEL=stt-1b-en_fr-candle HIBIKI_SESSIONS=1,8,32,max
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}  # the carried wheels go to /tmp/site
fi

step_setup() {
    if [[ $DRY == 1 ]]; then
        echo "dry run: the carried wheels (Python 3.12, x86-64) are not installed here"
    else
        compgen -G ".whl/*.whl" >/dev/null || { echo "no .whl/*.whl: run scripts/device_wheels.sh and carry .whl"; return 1; }
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || return 1
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
    fi
    "$PY" - "$1/env.json" <<'EOF'
import json, sys
import torch
from duplex_agent.agent.bench import bench_meta
meta = bench_meta("cuda" if torch.cuda.is_available() else "cpu")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    meta.update(gpu_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
print(json.dumps(meta))
open(sys.argv[1], "w").write(json.dumps(meta, indent=1) + "\n")
EOF
}

step_tests() {
    # On CPU only the GPU-only tests are selected (-k cuda), and they skip.
    # shellcheck disable=SC2086
    "$PY" -m pytest -v --tb=short -p no:cacheprovider -rfEs --durations=15 --junitxml="$1/junit.xml" $PYTEST_SELECT \
        tests/test_cuda_graphs.py tests/test_kernels.py tests/test_kernels_fused.py \
        tests/test_kernels_sampling.py tests/test_sampling.py tests/test_parity.py tests/test_selfcheck.py
}

step_tune() {
    # shellcheck disable=SC2086
    # The table is rewritten (and copied here) after every batch: a cut-short step keeps it.
    "$PY" -m duplex_agent.kernels.tune_attention "$1/tune-attention-$KIND-$STAMP.json" --device "$DEV" \
        $TINY $TUNE_B $TUNE_TABLE --copy-to "$1"
}

engine_bench() {  # DIR [run_agent.py bench options...]: our engine on the real shape (tiny on CPU)
    local dir=$1; shift
    "$PY" run_agent.py bench --device "$DEV" --contexts full --steps "$STEPS_PER_POINT" --out "$dir" "$@"
}

step_engine() {
    engine_bench "$1" --sessions "$SESSIONS" ${MAX_CAP:+--max-cap "$MAX_CAP"}
}

step_attention() {
    # shellcheck disable=SC2086
    "$PY" -m duplex_agent.kernels.bench_attention "$1/attention-$KIND-bf16-$STAMP.json" --device "$DEV" $TINY \
        $ATT_B $ATT_CTX || return 1
    # shellcheck disable=SC2086
    "$PY" -m duplex_agent.kernels.bench_sampling "$1/sampling-$KIND-$STAMP.json" --device "$DEV" $TINY
}

step_fp8() {
    engine_bench "$1" --no-reference --kv-cache fp8 --tag fp8 --sessions "$FP8_SESSIONS" ${FP8_CAP:+--max-cap "$FP8_CAP"} \
        || return 1
    # shellcheck disable=SC2086
    "$PY" -m duplex_agent.kernels.bench_attention "$1/attention-$KIND-fp8-$STAMP.json" --device "$DEV" $TINY \
        --kv-dtype fp8 $ATT_FP8_B $ATT_CTX
}

step_ablations() {
    AGENT_KERNELS=torch engine_bench "$1" --no-reference --tag torch-kernels --sessions "$ABLATE" || return 1
    AGENT_CUDA_GRAPHS=0 engine_bench "$1" --no-reference --tag no-graphs --sessions "$ABLATE"
}

step_persona() {
    [[ -f agent/bench_persona.py ]] || { echo "agent/bench_persona.py does not exist yet"; return "$SKIPPED"; }
    # shellcheck disable=SC2086
    "$PY" -m duplex_agent.agent.bench_persona --device "$DEV" --out "$1" --repeats "$REPEATS" $TINY
}

step_int8() {
    [[ -f kernels/bench_int8_gemm.py ]] || { echo "kernels/bench_int8_gemm.py does not exist yet"; return "$SKIPPED"; }
    # shellcheck disable=SC2086
    "$PY" -m duplex_agent.kernels.bench_int8_gemm "$1/int8-gemm-$KIND-$STAMP.json" $TINY
}
step_transcriber() {
    "$PY" run_agent.py bench --help | grep -q -- --transcriber || { echo "bench has no --transcriber yet"; return "$SKIPPED"; }
    engine_bench "$1" --no-reference --sessions "$STT_SESSIONS" --transcriber "$STT_MODEL"
}

step_hibiki() {
    "$PY" run_agent.py bench --help | grep -q -- "--model" || { echo "bench has no --model yet"; return "$SKIPPED"; }
    engine_bench "$1" --no-reference --tag hibiki-zero --model hibiki-zero --sessions "$HIBIKI_SESSIONS"
}
export -f step_setup step_tests engine_bench step_engine step_attention step_fp8 step_ablations step_persona step_int8 \
    step_tune step_transcriber step_hibiki

pack() {  # every finished step so far, replacing the last archive only once the new one is whole
    tar czf "$OUT/results.tgz.part" -C "$WORK" results && mv -f "$OUT/results.tgz.part" "$OUT/results.tgz"
}

run_step() {  # INDEX NAME BUDGET: the step under `timeout` (SIGTERM 5 s before its budget, then SIGKILL)
    local index=$1 name=$2 budget=$(($3 * SCALE)) dir="$WORK/results/$2" start=$SECONDS rc status
    mkdir -p "$dir"
    echo "== $(date -u +%T) step $name (budget ${budget} s)"
    timeout -k 5 $((budget - 5)) bash -c "step_$name '$dir'" 2>&1 | tee "$dir/log.txt"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        "$SKIPPED") status=skipped ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    printf '{"index": %d, "step": "%s", "status": "%s", "rc": %d, "seconds": %d, "budget_s": %d}\n' \
        "$index" "$name" "$status" "$rc" $((SECONDS - start)) "$budget" >"$dir/status.json"
    echo "== $(date -u +%T) step $name: $status (rc $rc) after $((SECONDS - start)) s"
    pack
    [[ $status == ok || $status == skipped ]]
}

main() {
    local failed=0 index=0 name budget what chosen
    plan
    mapfile -t chosen < <(selected)  # not a loop over a pipe: the steps must not read its lines
    for step in "${chosen[@]}"; do
        read -r name budget what <<<"$step"
        run_step $((index += 1)) "$name" "$budget" || failed=$((failed + 1))
    done
    echo "== $(date -u +%T) done: $failed step(s) not ok; results in \$OUT/results.tgz"
    [[ $failed == 0 ]]
}

main 2>&1 | tee "$OUT/log.txt"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"

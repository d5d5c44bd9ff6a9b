#!/usr/bin/env bash
# One command for a short GPU lease (under 10 minutes on one H100/H200): the GPU-marked tests, the
# paper-scale benchmark (engine against the faithful authors' baseline, bf16 and float32), the
# scoring cost-model calibration, the encoding benchmark on real images (GPU only: it needs
# ../shared/data, or ASIF_DATA_ROOT), and one JSON + one markdown summary.
#
#   bash experiments/bench/gpu_check.sh [OUT_DIR]            # default OUT_DIR: $OUT, else outputs/gpu_check
#   bash experiments/bench/gpu_check.sh --dry-run [OUT_DIR]  # the same steps, tiny, on the CPU (CI)
#
# Every step runs under its own time limit, and a failed or timed-out step does not stop the
# others: the summary (gpu_check.json, gpu_check.md) says which step failed, with its log beside it.
set -u
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python}"
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT_DIR="${1:-${OUT:-outputs/gpu_check}}"
mkdir -p "$OUT_DIR"
: > "$OUT_DIR/steps.tsv"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    BENCH=(--scale custom --queries 60 --classes 5 --templates 3 --anchors 3000 --dim 16
           --ns 1000,3000 --ks 5,20 --ps 1,8 --k 20 --dic-size 1000 --memory-budget-mb 1)
    CALIBRATE=(--rows 60 --targets 15 --dim 16 --ns 1000,3000 --ks 5,20 --repeats 1
               --memory-budget-mb 1)
    # Generous: CI machines are shared; the dry run checks that the steps work, not their time.
    LIMIT_TESTS=600 LIMIT_BENCH=600 LIMIT_CALIBRATE=600
else
    DEVICE=cuda
    BENCH=(--scale paper)
    CALIBRATE=()
    # 9.5 minutes in all at worst (each step's limit); none of these was measured on a GPU yet.
    LIMIT_TESTS=45 LIMIT_BENCH=180 LIMIT_CALIBRATE=60 LIMIT_ENCODING=120
fi

step() {  # step NAME LIMIT_S COMMAND...: run, log, record exit status and seconds
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local status=$?
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >> "$OUT_DIR/steps.tsv"
    tail -n 25 "$OUT_DIR/$name.log"
    return 0
}

GPU_TESTS=$(grep -l "pytest.mark.gpu" tests/*.py)
step gpu_tests "$LIMIT_TESTS" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider $GPU_TESTS
# bf16 GEMMs (the engine's GPU default): one evaluation against the baseline, the engine's grid.
step bench_bf16 "$LIMIT_BENCH" "$PYTHON" experiments/bench/bench_engine.py "${BENCH[@]}" \
    --device "$DEVICE" --dtype bfloat16 --no-scaling --baseline-grid skip \
    --json "$OUT_DIR/bench_bf16.json"
# float32 GEMMs: predictions must equal the baseline's, also in the grid (k = --k at every n).
step bench_float32 "$LIMIT_BENCH" "$PYTHON" experiments/bench/bench_engine.py "${BENCH[@]}" \
    --device "$DEVICE" --dtype float32 --no-scaling --json "$OUT_DIR/bench_float32.json"
step calibration "$LIMIT_CALIBRATE" "$PYTHON" experiments/bench/calibrate_scoring.py \
    "${CALIBRATE[@]}" --device "$DEVICE" --json "$OUT_DIR/calibration.json"
if [ "$DRY" = 0 ]; then
    # Lite0 (packaged weights) and the paper's ViT-B/16 (random weights: timing only), today's
    # path against the pinned, prefetching loader; 0 and 8 workers beside the default (auto).
    step encoding "$LIMIT_ENCODING" "$PYTHON" experiments/bench/bench_encoding.py --device cuda \
        --vision efficientnet_lite0,vit_b16_in21k_miil --cifar 2048 --flickr 1024 \
        --captions 5000 --repeats 2 --workers 0,8 --json "$OUT_DIR/encoding.json"
fi
"$PYTHON" experiments/bench/gpu_summary.py "$OUT_DIR"
# Exit status: 0 only if every step passed.
! cut -f2 "$OUT_DIR/steps.tsv" | grep -qv '^0$'

#!/usr/bin/env bash
# The CC12M lane of run_paper.sh at small scale, offline, with the real img2dataset (in its own
# venv, created once under .venvs/): download -> completeness check -> interrupted download
# resumed -> extraction fanned out as 2 Hydra jobs (joblib), one killed with -9 and resumed ->
# evaluation -> the same evaluation from a pairs file of the same image bytes (identical numbers)
# -> the fan-out again through hydra-submitit-launcher's local mode (when installed).
# Last line: `rehearsal: OK ...`, or the script exits non-zero. About 3-5 minutes on 2 CPU cores.
#   bash experiments/table1/rehearse_offline.sh              # synthetic images
#   IMAGES=flickr8k bash experiments/table1/rehearse_offline.sh   # Flickr8k from the data root
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
IMAGES=${IMAGES:-synthetic}
ROWS=${ROWS:-120}  # "the first ROWS rows" of a TSV that has 10 more
SHARD_SIZE=50      # so 3 shards, the last one short
WORK=${REHEARSAL_DIR:-outputs/rehearsal}
STARTED=$SECONDS
rm -rf "$WORK" && mkdir -p "$WORK/source/www" && WORK=$(cd "$WORK" && pwd)
export ASIF_CACHE_DIR=$WORK/cache HYDRA_FULL_ERROR=1 WANDB_MODE=offline
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # job processes import this checkout's code
DATA_ROOT=${ASIF_DATA_ROOT:-$PWD/../shared/data}
HELP=experiments/table1/rehearsal.py
RECIPE=experiments/table1/cc12m.py
SHARDS=$WORK/data/cc12m

step() { echo "== rehearsal [$((SECONDS - STARTED)) s]: $*"; }
fail() {
    echo "rehearsal: FAILED: $*" >&2
    exit 1
}

step "serving $IMAGES images on 127.0.0.1"
"$PYTHON" "$HELP" serve --www "$WORK/source/www" --port-file "$WORK/port" &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s "$WORK/port" ] && break; sleep 0.1; done
[ -s "$WORK/port" ] || fail "the server did not start"
"$PYTHON" "$HELP" source --out "$WORK/source" --rows $((ROWS + 10)) --port "$(cat "$WORK/port")" \
    --images "$IMAGES" --data-root "$DATA_ROOT"

# The recipe's download step, as run_paper.sh runs it; only the scale differs.
download() {
    "$PYTHON" "$RECIPE" download --tsv "$WORK/source/cc12m.tsv" --rows "$ROWS" --out "$SHARDS" \
        --shard-size $SHARD_SIZE --processes 2 --threads 8 > "$WORK/download_$1.log" 2>&1 ||
        { tail -n 30 "$WORK/download_$1.log"; fail "download ($1)"; }
    tail -n 1 "$WORK/download_$1.log"
}
step "download (img2dataset $("$PYTHON" -c 'import sys; sys.path.insert(0, "experiments/table1"); import cc12m; print(cc12m.IMG2DATASET_VERSION)'), the recipe's flags)"
download first

step "a shard cut short (no _stats.json, truncated parquet): check fails, the download resumes"
rm "$SHARDS/00001_stats.json"
truncate -s 100 "$SHARDS/00001.parquet"
if "$PYTHON" "$RECIPE" check --out "$SHARDS" --rows "$ROWS" --shard-size $SHARD_SIZE \
    2> "$WORK/check.log"; then
    fail "check passed with an unfinished shard"
fi
grep -q "00001_stats.json: missing" "$WORK/check.log" || fail "check: $(cat "$WORK/check.log")"
download resumed
"$PYTHON" "$HELP" verify --source "$WORK/source" --shards "$SHARDS" --rows "$ROWS" | tee "$WORK/verify.txt"

# Extraction: the recipe's fan-out with the offline encoders at 64 px and chunks of 10 pairs.
ANCHORS=(anchors=cc12m "anchors.path=$SHARDS" "paths.data_root=$WORK/data")
SMALL=(encoder.vision.resize_size=64 encoder.vision.crop_size=64 progress=false device=cpu)
EXTRACT=("${ANCHORS[@]}" "${SMALL[@]}" extract.chunk_size=10)
fan_out() {  # $1: sweep folder name; the rest: extra overrides
    local sweep=$WORK/extract/$1
    shift
    "$PYTHON" -m asif_exp.extract -m "hydra.sweep.dir=$sweep" "${EXTRACT[@]}" extract.stage=encode \
        extract.num_shards=2 'extract.shard=range(0,2)' "$@"
}
merge() {
    "$PYTHON" -m asif_exp.extract "hydra.run.dir=$WORK/extract/merge_$1" "${EXTRACT[@]}" "${@:2}" \
        extract.stage=merge > "$WORK/extract/merge_$1.log" 2>&1 ||
        { tail -n 30 "$WORK/extract/merge_$1.log"; fail "merge ($1)"; }
}
JOBLIB=(hydra/launcher=local_gpus hydra.launcher.n_jobs=2)
step "extraction: 2 Hydra jobs (joblib); job 1 is killed with -9 after its first chunk"
mkdir -p "$WORK/extract"
fan_out killed "${JOBLIB[@]}" > "$WORK/extract/killed.log" 2>&1 &
FAN_OUT=$!
"$PYTHON" "$HELP" kill-job --log "$WORK/extract/killed/shard_1/extract.log"
if wait $FAN_OUT; then fail "the fan-out finished although job 1 was killed"; fi
step "extraction: the same command again resumes"
fan_out resumed "${JOBLIB[@]}" > "$WORK/extract/resumed.log" 2>&1 ||
    { tail -n 30 "$WORK/extract/resumed.log"; fail "resumed fan-out"; }
"$PYTHON" "$HELP" fan-out "$WORK/extract/resumed" | tee "$WORK/fan_out.txt"
grep -q '"chunks_cached": 0,' "$WORK/fan_out.txt" && fail "the resumed fan-out found no chunk cached"
merge joblib

EVALUATE=("${SMALL[@]}" benchmark=synthetic_shapes benchmark.num_samples=100 'asif.k=[5,20]'
    'asif.p=[1,8]')
evaluate() {  # $1: name; the rest: anchor overrides
    local name=$1
    shift
    "$PYTHON" -m asif_exp "hydra.run.dir=$WORK/eval/$name" "${EVALUATE[@]}" "$@" \
        > "$WORK/eval_$name.log" 2>&1 || { tail -n 30 "$WORK/eval_$name.log"; fail "evaluate $name"; }
}
step "evaluation on the extracted anchors (read from the cache, nothing encoded)"
evaluate shards "${ANCHORS[@]}"
"$PYTHON" - "$WORK/eval/shards/results.json" <<'EOF' || fail "evaluation encoded anchors again"
import json, sys
results = json.load(open(sys.argv[1]))
assert all(v for k, v in results["embeddings_from_cache"].items() if "anchor" in k), results
EOF
step "evaluation from a pairs file of the same bytes"
"$PYTHON" "$HELP" pairs-file --shards "$SHARDS" --out "$WORK/pairs"
evaluate pairs anchors=pairs_file "anchors.path=$WORK/pairs/pairs.jsonl"
"$PYTHON" "$HELP" compare "$WORK/eval/shards/results.json" "$WORK/eval/pairs/results.json" ||
    fail "the pairs file and the shards gave different numbers"

SUBMITIT="not installed, skipped"
if "$PYTHON" -c "import hydra_plugins.hydra_submitit_launcher" 2> /dev/null; then
    step "extraction again through hydra-submitit-launcher (local mode: SLURM's code path)"
    SUBMITIT_CHUNKS=(extract.chunk_size=15)  # other chunks: nothing comes from the cache
    fan_out submitit hydra/launcher=submitit_local hydra.launcher.timeout_min=10 \
        "${SUBMITIT_CHUNKS[@]}" > "$WORK/extract/submitit.log" 2>&1 ||
        { tail -n 30 "$WORK/extract/submitit.log"; fail "submitit fan-out"; }
    "$PYTHON" "$HELP" fan-out "$WORK/extract/submitit"
    merge submitit "${SUBMITIT_CHUNKS[@]}"  # replaces the merged entries
    evaluate submitit "${ANCHORS[@]}"
    "$PYTHON" "$HELP" compare "$WORK/eval/shards/results.json" "$WORK/eval/submitit/results.json" ||
        fail "the submitit fan-out gave different numbers"
    SUBMITIT="identical"
fi

SUMMARY=$("$PYTHON" - "$WORK/eval/shards/results.json" "$WORK/verify.txt" <<'EOF'
import json, sys
results = json.load(open(sys.argv[1]))
counts = json.loads(open(sys.argv[2]).read().split(":", 1)[1])
print(f"top1={results['top1']:.4f} rows={counts['rows']} downloaded={counts['downloaded']} "
      f"failed={counts['failed']} out_of_key_order={counts['out_of_key_order']}")
EOF
)
echo "rehearsal: OK $SUMMARY; killed job resumed; pairs file identical; submitit $SUBMITIT; $((SECONDS - STARTED)) s"

#!/usr/bin/env bash
# The paper's Table 1. Needs: the data below under $ASIF_DATA_ROOT, CC12M's cc12m.tsv, the Hugging
# Face hub once (ViT, DINO and sentence-T5 weights), GPUs, and `pip install -e '.[launchers]'`.
# img2dataset is installed by step 1 into its own venv (.venvs/img2dataset), not into this one.
# Each step resumes: rerun the same command after a failure. experiments/table1/README.md explains
# each step; experiments/table1/rehearse_offline.sh runs steps 1-2 and an evaluation offline.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
: "${ASIF_DATA_ROOT:?set ASIF_DATA_ROOT to the folder holding cc12m/, imagenet/, ...}"
CC12M_TSV=${CC12M_TSV:-cc12m.tsv}  # url<TAB>caption, no header (the CC12M release)
LAUNCHER=${LAUNCHER:-slurm_gpu}    # or local_gpus (joblib, one job per local GPU)
SHARDS=${SHARDS:-32}

# 1. Anchors: the first 1.6M rows of CC12M as webdataset shards of 10,000 rows (160 shards).
#    TSV -> parquet in Python, then img2dataset (it redoes unfinished shards), then a check that
#    every shard finished and the rows add up. The img2dataset flags are in cc12m.py.
"$PYTHON" experiments/table1/cc12m.py download --tsv "$CC12M_TSV" --rows 1600000 \
    --out "$ASIF_DATA_ROOT/cc12m" --shard-size 10000 --processes 16 --threads 64

# 2. Anchor embeddings for both image encoders: $SHARDS GPU jobs each, then one merge.
for VISION in vit_b16_in21k_miil dino_vits8; do
    # Failed downloads (which CC12M always has) are skipped; corrupt bytes in a shard stop the job.
    COMMON=(anchors=cc12m encoder/vision=$VISION encoder/text=sentence_t5_base extract.num_workers=8
        data.on_bad_image=skip_failed_downloads)
    "$PYTHON" -m asif_exp.extract -m hydra/launcher=$LAUNCHER "${COMMON[@]}" extract.stage=encode \
        extract.num_shards=$SHARDS "extract.shard=range(0,$SHARDS)"
    "$PYTHON" -m asif_exp.extract "${COMMON[@]}" extract.stage=merge
done

# 3. Benchmarks, under $ASIF_DATA_ROOT: imagenet/val/<wnid>/*.JPEG (torchvision layout),
#    imagenetv2-matched-frequency-format-val/<0..999>/, cifar100/cifar-100-python/,
#    pets/oxford-iiit-pet/ (torchvision's CIFAR100 and OxfordIIITPet files).
# 4. Evaluate (16 jobs: 2 encoders x 4 benchmarks x {clean, authors' options}), k = 800, p = 8.
#    A fixed sweep folder and skip_existing: a rerun only runs the jobs without a results.json.
"$PYTHON" -m asif_exp +sweep=table1_paper logger=wandb hydra/launcher=$LAUNCHER skip_existing=true \
    data.on_bad_image=skip_failed_downloads \
    hydra.sweep.dir=outputs/sweeps/table1_paper/paper
"$PYTHON" experiments/table1/build_table.py outputs/sweeps/table1_paper --k 800 --p 8 \
    --out experiments/table1/paper --title "Table 1 (CC12M, 1.6M pairs)"

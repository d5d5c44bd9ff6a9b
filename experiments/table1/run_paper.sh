#!/usr/bin/env bash
# The paper's Table 1. Needs: the data below under $ASIF_DATA_ROOT, the Hugging Face hub once (ViT,
# DINO and sentence-T5 weights), GPUs, and `pip install -e '.[launchers]' img2dataset`.
# Each step resumes: rerun the same command after a failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
: "${ASIF_DATA_ROOT:?set ASIF_DATA_ROOT to the folder holding cc12m/, imagenet/, ...}"
LAUNCHER=${LAUNCHER:-slurm_gpu}  # or local_gpus (joblib, one job per local GPU)
SHARDS=${SHARDS:-32}

# 1. Anchors: the first 1.6M rows of CC12M (cc12m.tsv from the CC12M release; it has no header).
if [ ! -d "$ASIF_DATA_ROOT/cc12m" ]; then
    { printf 'url\tcaption\n'; head -n 1600000 cc12m.tsv; } > cc12m_first_1.6M.tsv
    img2dataset --url_list cc12m_first_1.6M.tsv --input_format tsv --url_col url \
        --caption_col caption --output_format webdataset --output_folder "$ASIF_DATA_ROOT/cc12m" \
        --image_size 384 --resize_mode keep_ratio --resize_only_if_bigger True \
        --processes_count 16 --thread_count 64 --number_sample_per_shard 10000
fi

# 2. Anchor embeddings for both image encoders: $SHARDS GPU jobs each, then one merge.
for VISION in vit_b16_in21k dino_vits8; do
    COMMON=(anchors=cc12m encoder/vision=$VISION encoder/text=sentence_t5_base extract.num_workers=8)
    "$PYTHON" -m asif_exp.extract -m hydra/launcher=$LAUNCHER "${COMMON[@]}" extract.stage=encode \
        extract.num_shards=$SHARDS "extract.shard=range(0,$SHARDS)"
    "$PYTHON" -m asif_exp.extract "${COMMON[@]}" extract.stage=merge
done

# 3. Benchmarks, under $ASIF_DATA_ROOT: imagenet/val/<wnid>/*.JPEG (torchvision layout),
#    imagenetv2-matched-frequency-format-val/<0..999>/, cifar100/cifar-100-python/,
#    pets/oxford-iiit-pet/ (torchvision's CIFAR100 and OxfordIIITPet files).
# 4. Evaluate (16 jobs: 2 encoders x 4 benchmarks x {clean, authors' options}), k = 800, p = 8.
"$PYTHON" -m asif_exp +sweep=table1_paper logger=wandb hydra/launcher=$LAUNCHER
"$PYTHON" experiments/table1/build_table.py outputs/sweeps/table1_paper --k 800 --p 8 \
    --out experiments/table1/paper --title "Table 1 (CC12M, 1.6M pairs)"

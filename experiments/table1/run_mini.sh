#!/usr/bin/env bash
# Table 1 on local data, no network (about 30 min of a 2-core CPU the first time; the embedding
# cache makes reruns take about a minute). Run from anywhere; paths are the project's.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}

# 8 jobs: {Lite0, Lite2} x {CIFAR-10 2k subset, ImageNet-mini} x {val, test half}, each the whole
# (k, p) grid over coco_mini's 1,195 pairs. W&B offline: runs land in each job's folder.
WANDB_MODE=offline "$PYTHON" -m asif_exp +sweep=table1_mini logger=wandb

# 4 jobs: the Flickr8k-anchors row (train + dev, 30,000 pairs; Lite0), same benchmarks and halves.
WANDB_MODE=offline "$PYTHON" -m asif_exp +sweep=table1_mini_flickr8k logger=wandb

"$PYTHON" experiments/table1/build_table.py outputs/sweeps/table1_mini \
    outputs/sweeps/table1_mini_flickr8k \
    --out experiments/table1/mini --title "Table 1, mini-suite (coco_mini and Flickr8k anchors)"

#!/usr/bin/env bash
# Figure 4 on local data, no network: top-1 on the CIFAR-10 2k subset against n (nested prefixes of
# coco_mini's 1,195 pairs), curves over k and p, EfficientNet-Lite0 + all-MiniLM-L6-v2.
# One engine pass; the embeddings come from the cache (a few minutes to encode them the first time).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}

WANDB_MODE=offline "$PYTHON" -m asif_exp +sweep=fig4_mini logger=wandb
"$PYTHON" experiments/fig4/build_figure.py outputs/sweeps/fig4_mini --out experiments/fig4/mini

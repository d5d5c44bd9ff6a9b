#!/usr/bin/env bash
# Figure 4 on real data: Flickr8k train + dev (30,000 pairs) as anchors, n from 1,000 to 30,000,
# the paper's k and p; CIFAR-10 (10,000) and ImageNet-mini (2,300) top-1, Flickr8k test retrieval.
# One engine pass per benchmark, EfficientNet-Lite0 + all-MiniLM-L6-v2 from the embedding cache
# (the first time, encoding included, the two sweeps took 278 s and 104 s on a free 2-core CPU,
# 2026-12-07; experiments/bench/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}

"$PYTHON" -m asif_exp +sweep=fig4_flickr8k 'benchmark=cifar10,imagenet_mini'
"$PYTHON" -m asif_exp +sweep=fig4_flickr8k benchmark=flickr8k task=retrieval
"$PYTHON" experiments/fig4/build_figure.py outputs/sweeps/fig4_flickr8k \
    --out experiments/fig4/flickr8k --csv experiments/fig4/flickr8k/cells.csv \
    --metric default --metric retrieval.image_to_text.R@1 --metric retrieval.text_to_image.R@10

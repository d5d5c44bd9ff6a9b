#!/usr/bin/env bash
# Baselines against ASIF on the same anchors (Flickr8k train + dev, nested prefixes up to 30,000
# pairs; EfficientNet-Lite0 + all-MiniLM-L6-v2): zero-shot CIFAR-10 classification and Flickr8k
# test retrieval, one job per method (every n and hyper-parameter in it), then the table and
# plots. Embeddings come from the cache (ASIF_CACHE_DIR); encoding them the first time takes
# ~30 min on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}

"$PYTHON" -m asif_exp +sweep=baselines task=classification benchmark=cifar10
"$PYTHON" -m asif_exp +sweep=baselines task=retrieval benchmark=flickr8k
"$PYTHON" experiments/baselines/build.py outputs/sweeps/baselines --out experiments/baselines/flickr8k

#!/usr/bin/env bash
# The paper's Figure 4: ImageNet top-1 (val half of the authors' split) against the number of CC12M
# anchor pairs, curves over k and p. Needs the anchor embeddings of experiments/table1/run_paper.sh
# (steps 1-2) and ImageNet under $ASIF_DATA_ROOT; one engine pass per image encoder, on a GPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
LAUNCHER=${LAUNCHER:-slurm_gpu}

"$PYTHON" -m asif_exp +sweep=fig4_paper logger=wandb hydra/launcher=$LAUNCHER
"$PYTHON" experiments/fig4/build_figure.py outputs/sweeps/fig4_paper --out experiments/fig4/paper

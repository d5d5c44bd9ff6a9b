"""What storing embeddings in 16 bits (`cache_dtype=float16|bfloat16`) does to the numbers.

A 16-bit cache entry holds the float32 embeddings the encoders computed, rounded once to 16 bits,
and a run reads them back as float32 (`EmbeddingCache.get_or_compute`). This script embeds one
problem as `python -m asif_exp <overrides>` would (the pipeline, float32, from the cache when
there), rounds every embedding as each storage dtype stores it, scores the same grid through the
run's own method and task, and prints every cell's primary metric per dtype and the largest
difference to float32.

    PYTHONPATH=. python experiments/bench/bench_cache_dtype.py anchors=coco_mini \
        benchmark=cifar10 benchmark.subset=2000 'asif.n=[300,1195]' 'asif.k=[50,200]' 'asif.p=[2,8]'
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from asif_exp.data import load_anchors, load_benchmark
from asif_exp.methods.base import MethodReport, load_method
from asif_exp.options import anchor_prefixes
from asif_exp.pipeline import (
    Embedder,
    check_run_config,
    check_task_fits_benchmark,
    embed_problem,
    readable_prefixes,
    score_and_measure,
)
from asif_exp.problem import EmbeddedProblem
from asif_exp.tasks.base import load_task

CONF = Path(__file__).resolve().parents[2] / "conf"
STORAGE = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


def stored(problem: EmbeddedProblem, name: str) -> EmbeddedProblem:
    """The problem as a `cache_dtype=name` entry gives it back (other cache keys, so that no
    top-k pass of another dtype is reused)."""
    dtype = STORAGE[name]
    if dtype is None:
        return problem

    def rounded(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype).float()

    return dataclasses.replace(
        problem,
        anchor_images=rounded(problem.anchor_images),
        anchor_texts=rounded(problem.anchor_texts),
        images=rounded(problem.images),
        targets=dataclasses.replace(
            problem.targets, embeddings=rounded(problem.targets.embeddings)
        ),
        cache_keys=(*problem.cache_keys, name),
    )


def main(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, "progress=false"])
    check_run_config(cfg)
    method, task = load_method(cfg), load_task(cfg)
    anchors = load_anchors(cfg.anchors, cfg.paths.data_root)
    benchmark = load_benchmark(cfg.benchmark, cfg.paths.data_root)
    check_task_fits_benchmark(task, benchmark)
    problem = embed_problem(cfg, Embedder(cfg), anchors, benchmark)
    listed = anchor_prefixes(cfg.asif.n, len(anchors.captions))
    ns = sorted(set(readable_prefixes(listed, problem.anchor_positions).values()))
    metric = task.primary_metric
    results = {}
    for name in STORAGE:
        cells = score_and_measure(method, task, stored(problem, name), ns, MethodReport())
        results[name] = {tuple(c.params.values()): c.metrics[metric] for c in cells}
    params = list(cells[0].params)
    print(f"{metric} per cell ({', '.join(params)}), by storage dtype:")
    print(" ".join(f"{h:>18}" for h in ["cell", *STORAGE]))
    for cell in results["float32"]:
        row = [str(cell), *(f"{results[name][cell]:.4f}" for name in STORAGE)]
        print(" ".join(f"{v:>18}" for v in row))
    for name in list(STORAGE)[1:]:
        worst = max(abs(results[name][c] - v) for c, v in results["float32"].items())
        same = sum(results[name][c] == v for c, v in results["float32"].items())
        print(
            f"{name} vs float32: largest difference {100 * worst:.2f} points; "
            f"identical in {same}/{len(results['float32'])} cells"
        )


if __name__ == "__main__":
    main(sys.argv[1:])

"""Benchmark: the real Figure 4 grid (CIFAR-10's 10,000 test images against nested prefixes of
Flickr8k's 30,000 anchor pairs, every (n, k, p) cell), timed by part.

Reads the EfficientNet-Lite0 + all-MiniLM-L6-v2 embeddings from the cache (`ASIF_CACHE_DIR`,
filled by any run of `python -m asif_exp anchors=flickr8k benchmark=cifar10`); where one is
missing it says so and uses synthetic embeddings of the same shapes instead (it never encodes).
In one run it times the engine's top-k pass, its scoring of every cell, and the similarity
products alone (images x anchor images and prompts x anchor captions, the GEMMs every top-k
needs), and prints the engine's parts as ratios to those products.

    python experiments/bench/bench_real_grid.py   # embeddings from ASIF_CACHE_DIR (default .cache/)
    python experiments/bench/bench_real_grid.py --synthetic --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from asif_exp.methods.asif import AsifOptions, score_grid  # noqa: E402
from asif_exp.methods.asif.topk import matmul_f32  # noqa: E402
from asif_exp.problem import EmbeddedProblem  # noqa: E402
from asif_exp.tasks.classification import classification_metrics  # noqa: E402
from asif_exp.tasks.classification_grid import classification_problem  # noqa: E402
from asif_exp.tensors import unit_rows  # noqa: E402

# Figure 4's grid on Flickr8k anchors (conf/sweep/fig4_flickr8k.yaml).
NS = [1000, 2000, 5000, 10_000, 20_000, 30_000]
KS = [50, 100, 200, 400, 800, 1600]
PS = [1.0, 2.0, 4.0, 8.0, 16.0]
# The real problem's shapes: CIFAR-10 test, 10 classes x 18 templates, Lite0 and MiniLM widths.
SHAPES = dict(queries=10_000, anchors=30_000, classes=10, templates=18, d_image=1280, d_text=384)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--ns", default=",".join(map(str, NS)))
    parser.add_argument("--ks", default=",".join(map(str, KS)))
    parser.add_argument("--ps", default=",".join(map(str, PS)))
    parser.add_argument("--synthetic", action="store_true", help="do not look in the cache")
    parser.add_argument("--queries", type=int, default=SHAPES["queries"], help="synthetic only")
    parser.add_argument("--anchors", type=int, default=SHAPES["anchors"], help="synthetic only")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--dtype", default="auto", help="GEMM dtype: auto|float32|bfloat16")
    parser.add_argument("--memory-budget-mb", type=float, default=1024.0)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args(argv)
    args.ns = sorted({int(n) for n in args.ns.split(",")})
    args.ks = sorted({int(k) for k in args.ks.split(",")})
    args.ps = sorted({float(p) for p in args.ps.split(",")})
    return args


# ----------------------------------------------------------------------------- data


def cached_problem() -> tuple[EmbeddedProblem, torch.Tensor, str] | tuple[None, None, str]:
    """The real embeddings from the cache, or (None, None, why not). Nothing is encoded."""
    from hydra import compose, initialize_config_dir

    import asif_exp.config  # noqa: F401  (registers the schemas)
    from asif_exp.data import load_anchors, load_benchmark
    from asif_exp.embeddings import EmbeddingCache
    from asif_exp.pipeline import image_cache_identity, text_cache_identity

    overrides = ["anchors=flickr8k", "benchmark=cifar10"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    cache = EmbeddingCache(cfg.paths.cache_dir)
    anchors = load_anchors(cfg.anchors, cfg.paths.data_root)
    benchmark = load_benchmark(cfg.benchmark, cfg.paths.data_root)
    prompts, prompt_class = benchmark.prompts()
    vision, text = cfg.encoder.vision, cfg.encoder.text
    wanted = {
        "anchor images": image_cache_identity(vision, anchors.images),
        "anchor captions": text_cache_identity(text, anchors.captions),
        "CIFAR-10 images": image_cache_identity(vision, benchmark.images),
        "CIFAR-10 prompts": text_cache_identity(text, prompts),
    }
    found = {}
    for name, identity in wanted.items():
        entry = cache.load(identity)
        if entry is None:
            return None, None, f"{name} not in the cache at {cache.root}"
        found[name] = entry[0]
    kept = found["anchor images"]["kept"]
    labels = torch.tensor(benchmark.labels)[found["CIFAR-10 images"]["kept"]]
    inputs = classification_problem(
        images=found["CIFAR-10 images"]["embeddings"],
        anchor_images=found["anchor images"]["embeddings"],
        prompts=found["CIFAR-10 prompts"]["embeddings"],
        anchor_texts=found["anchor captions"]["embeddings"][kept],
        prompt_class=torch.tensor(prompt_class),
        num_classes=len(benchmark.class_names),
    )
    return inputs, labels, f"cached embeddings ({cache.root})"


def synthetic_problem(queries: int, anchors: int) -> tuple[EmbeddedProblem, torch.Tensor]:
    """Random embeddings of the real problem's shapes, with a weak class structure."""
    g = torch.Generator().manual_seed(0)
    classes, templates = SHAPES["classes"], SHAPES["templates"]
    centres = {m: torch.randn(classes, SHAPES[f"d_{m}"], generator=g) for m in ("image", "text")}

    def embed(labels: torch.Tensor, modality: str) -> torch.Tensor:
        noise = torch.randn(len(labels), centres[modality].shape[1], generator=g)
        return centres[modality][labels] + 2.0 * noise

    anchor_labels = torch.randint(0, classes, (anchors,), generator=g)
    labels = torch.randint(0, classes, (queries,), generator=g)
    prompt_class = torch.arange(classes).repeat_interleave(templates)
    inputs = classification_problem(
        images=embed(labels, "image"),
        anchor_images=embed(anchor_labels, "image"),
        prompts=embed(prompt_class, "text"),
        anchor_texts=embed(anchor_labels, "text"),
        prompt_class=prompt_class,
        num_classes=classes,
    )
    return inputs, labels


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def similarity_products_s(inputs: EmbeddedProblem, n: int, options: AsifOptions) -> float:
    """Seconds for the similarity GEMMs alone (both sides against the first n anchors), in
    row blocks of the engine's memory budget, in its dtype, on its device."""
    device = options.resolved_device()
    dtype = options.resolved_dtype(device)
    sides = [
        (inputs.images, inputs.anchor_images),
        (inputs.targets.embeddings, inputs.anchor_texts),
    ]
    sides = [(unit_rows(q).to(device, dtype), unit_rows(a[:n]).to(device, dtype)) for q, a in sides]
    synchronize(device)
    start = time.perf_counter()
    for queries, anchors in sides:
        rows = max(1, options.budget_elements // n)
        for first in range(0, queries.shape[0], rows):
            matmul_f32(queries[first : first + rows], anchors.T)
    synchronize(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = AsifOptions(
        compute_dtype=args.dtype, memory_budget_mb=args.memory_budget_mb, device=args.device
    )
    device = options.resolved_device()
    inputs = labels = None
    source = "synthetic embeddings (--synthetic)"
    if not args.synthetic:
        inputs, labels, source = cached_problem()
        if inputs is None:
            source = f"synthetic embeddings of the real shapes: {source}"
    if inputs is None:
        inputs, labels = synthetic_problem(args.queries, args.anchors)
    ns = [n for n in args.ns if n <= inputs.anchor_images.shape[0]]
    print(
        f"data: {source}\n"
        f"{inputs.images.shape[0]:,} queries, {inputs.anchor_images.shape[0]:,} anchors, "
        f"{inputs.targets.embeddings.shape[0]} prompts; grid n={ns} k={args.ks} p={args.ps}; "
        f"device {device}, {torch.get_num_threads()} threads"
    )

    report: dict = {}
    best = 0.0
    start = time.perf_counter()
    labels = labels.to(device)
    for _, scores in score_grid(inputs, ns, args.ks, args.ps, options, report, progress=False):
        best = max(best, classification_metrics(scores, labels, inputs.targets.count)["top1"])
    synchronize(device)
    wall_s = time.perf_counter() - start
    cells = len([1 for n in ns for k in args.ks if k <= n]) * len(args.ps)
    gemm_s = similarity_products_s(inputs, max(ns), options)
    numbers = {
        "source": source,
        "device": str(device),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "queries": inputs.images.shape[0],
        "anchors": max(ns),
        "prompts": inputs.targets.embeddings.shape[0],
        "cells": cells,
        "best_top1": best,
        "topk_s": report["topk_s"],
        "scoring_s": report["scoring_s"],
        "grid_wall_s": wall_s,
        "similarity_products_s": gemm_s,
    }
    print(f"cells: {cells}, best top-1 {best:.4f}")
    print(f"similarity products alone (n={max(ns):,}): {gemm_s:8.2f} s  (1.00x)")
    for name in ("topk_s", "scoring_s", "grid_wall_s"):
        print(f"{name:>36}: {numbers[name]:8.2f} s  ({numbers[name] / gemm_s:.2f}x the products)")
    print(f"{'scoring per cell':>36}: {numbers['scoring_s'] / cells:8.3f} s")
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=1))
    return numbers


if __name__ == "__main__":
    main()

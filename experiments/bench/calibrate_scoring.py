"""Time the engine's two scoring paths (dense GEMM, sparse product) at a few (n, k) and measure the
constants of its cost model (`SPARSE_MAC_COST`, `DENSE_ZERO_COST` and `DENSE_FILL_COST` of
`asif_exp.methods.asif.layouts`), in units of one multiply-add of a dense GEMM.

The model says: sparse costs rows * k * (target entries per anchor) multiply-adds times
SPARSE_MAC_COST; dense costs rows * n * targets multiply-adds, plus rows * n elements of dense
image blocks (DENSE_ZERO_COST each) and rows * k entries written into them (DENSE_FILL_COST
each). Per (n, k) this script times a cell's scoring by each path as the grid runs it (every
--ps at once; per p below) and the primitives the model counts: the GEMM, a zeroed block, the
entries written. The suggested constants are medians over the cells; the report also says in
how many cells the constants in use pick the faster path.

    python experiments/bench/calibrate_scoring.py --device cuda --json out/calibration.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from asif_exp.methods.asif import AsifOptions, streaming_topk
from asif_exp.methods.asif.layouts import (
    DENSE_FILL_COST,
    DENSE_ZERO_COST,
    SPARSE_MAC_COST,
    csr_rows,
    densify,
    row_layout,
    transposed_layout,
    use_dense,
)
from asif_exp.methods.asif.scoring import cell_scores
from asif_exp.methods.asif.topk import matmul_f32
from asif_exp.tensors import unit_rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="dense GEMM dtype (auto: the engine's)")
    parser.add_argument("--rows", type=int, default=25_000, help="images")
    parser.add_argument("--targets", type=int, default=7_000, help="prompts")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--ns", default="20000,100000,400000")
    parser.add_argument("--ks", default="100,800")
    parser.add_argument("--ps", default="1,2,4,8,16", help="p values scored together")
    parser.add_argument("--memory-budget-mb", type=float, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def best_time(run, device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def scores_of_every_p(image_layout, prompt_layout, ps, groups, options, dense) -> list:
    """One cell's scoring for every p, as the grid runs it."""
    cell = cell_scores(image_layout, prompt_layout, ps, groups, len(groups), options, dense, None)
    return list(cell)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    # Every prompt its own target (no class reduction): targets = --targets.
    options = AsifOptions(
        device=str(device),
        compute_dtype=args.dtype,
        memory_budget_mb=args.memory_budget_mb,
        template_aggregation="max",
    )
    dtype = options.resolved_dtype(device)
    ns = sorted(int(n) for n in args.ns.split(","))
    ks = sorted(int(k) for k in args.ks.split(","))
    ps = sorted(float(p) for p in args.ps.split(","))
    g = torch.Generator(device=device).manual_seed(0)

    def random_unit(rows: int) -> torch.Tensor:
        return unit_rows(torch.randn(rows, args.dim, generator=g, device=device))

    images, prompts = random_unit(args.rows), random_unit(args.targets)
    anchors_image, anchors_text = random_unit(ns[-1]), random_unit(ns[-1])
    top = dict(progress=False, to_cpu=False)
    image_top = streaming_topk(images, anchors_image, ns, max(ks), options, **top)
    prompt_top = streaming_topk(prompts, anchors_text, ns, max(ks), options, **top)
    groups = torch.arange(args.targets, device=device)
    budget = options.budget_elements

    def timed(run) -> float:
        run()  # warm-up
        return best_time(run, device, args.repeats)

    cells = []
    for n in ns:
        for k in [k for k in ks if k <= n]:
            image_layout = row_layout(image_top[n], k)
            prompt_layout = transposed_layout(prompt_top[n], k)
            cell = {"n": n, "k": k, "dense_s": None}
            for path, dense in (("dense", True), ("sparse", False)):
                if dense and n * args.targets > budget:
                    continue  # the engine never takes it: the dense target won't fit

                scoring = partial(
                    scores_of_every_p, image_layout, prompt_layout, ps, groups, options, dense
                )
                cell[f"{path}_s"] = timed(scoring) / len(ps)
            # The primitives, on one block of image rows that fits the budget.
            image_rr = image_layout.csr(ps[0], True, False)
            target_t = prompt_layout.csr(ps[0], True, True)
            block = csr_rows(image_rr, 0, max(1, min(args.rows, budget // n)))
            rows = block.shape[0]
            target_dense = densify(target_t, dtype)
            dense_block = densify(block, dtype)
            mac_s = timed(partial(matmul_f32, dense_block, target_dense)) / (
                rows * n * args.targets
            )
            zero_s = timed(partial(torch.zeros, rows, n, dtype=dtype, device=device))
            fill_s = max(0.0, timed(partial(densify, block, dtype)) - zero_s)
            triples = args.rows * k * target_t.values().numel() / n
            cell.update(
                sparse_mac_cost=cell["sparse_s"] / triples / mac_s,
                dense_zero_cost=zero_s / (rows * n) / mac_s,
                dense_fill_cost=fill_s / block.values().numel() / mac_s,
                engine_dense=use_dense(args.rows, args.targets, n, k, k, budget, device),
            )
            if cell["dense_s"] is not None:
                cell["right_choice"] = cell["engine_dense"] == (cell["dense_s"] < cell["sparse_s"])
            cells.append(cell)
            dense_s = "-" if cell["dense_s"] is None else f"{cell['dense_s']:.4f}s"
            print(
                f"n={n:>8} k={k:>4}  per p: dense {dense_s:>8}  sparse {cell['sparse_s']:.4f}s  "
                f"engine takes {'dense' if cell['engine_dense'] else 'sparse'}  costs: sparse "
                f"{cell['sparse_mac_cost']:.3g}, zero {cell['dense_zero_cost']:.3g}, "
                f"fill {cell['dense_fill_cost']:.3g}",
                flush=True,
            )
    device_type = device.type if device.type in SPARSE_MAC_COST else "cpu"
    judged = [cell["right_choice"] for cell in cells if "right_choice" in cell]
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype),
        "rows": args.rows,
        "targets": args.targets,
        "ps": ps,
        "current": {
            "sparse_mac_cost": SPARSE_MAC_COST[device_type],
            "dense_zero_cost": DENSE_ZERO_COST[device_type],
            "dense_fill_cost": DENSE_FILL_COST[device_type],
        },
        "suggested": {
            name: statistics.median(cell[name] for cell in cells) if cells else None
            for name in ("sparse_mac_cost", "dense_zero_cost", "dense_fill_cost")
        },
        "right_choices": sum(judged),
        "judged_cells": len(judged),
        "cells": cells,
    }
    for name, value in report["suggested"].items():
        print(f"{name}: current {report['current'][name]}, measured median {value:.3g}")
    print(f"the current constants pick the faster path in {sum(judged)} of {len(judged)} cells")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        staged = args.json.with_name(args.json.name + ".partial")
        staged.write_text(json.dumps(report, indent=2))
        staged.replace(args.json)
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)

"""Time the engine's two scoring paths (dense GEMM, sparse product) at a few (n, k) and derive the
cost model constant `SPARSE_MAC_COST[device type]` of `asif_exp.methods.asif`.

The cost model says: dense costs rows * n * targets multiply-adds, sparse costs
rows * k * (targets * k / n) multiply-adds times SPARSE_MAC_COST. The measured constant at one
(n, k) is (sparse seconds / sparse MACs) / (dense seconds / dense MACs); the engine's choice is
right wherever the constant it uses is on the same side of the break-even as the measured one.

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

from asif_exp.methods.asif import (
    SPARSE_MAC_COST,
    AsifOptions,
    _row_layout,
    _scores_t,
    _transposed_layout,
    streaming_topk,
    unit_rows,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="dense GEMM dtype (auto: the engine's)")
    parser.add_argument("--rows", type=int, default=25_000, help="images")
    parser.add_argument("--targets", type=int, default=7_000, help="prompts")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--ns", default="20000,100000,400000")
    parser.add_argument("--ks", default="100,800")
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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    options = AsifOptions(
        device=str(device), compute_dtype=args.dtype, memory_budget_mb=args.memory_budget_mb
    )
    dtype = options.resolved_dtype(device)
    ns = sorted(int(n) for n in args.ns.split(","))
    ks = sorted(int(k) for k in args.ks.split(","))
    g = torch.Generator(device=device).manual_seed(0)

    def random_unit(rows: int) -> torch.Tensor:
        return unit_rows(torch.randn(rows, args.dim, generator=g, device=device))

    images, prompts = random_unit(args.rows), random_unit(args.targets)
    anchors_image, anchors_text = random_unit(ns[-1]), random_unit(ns[-1])
    image_top = streaming_topk(images, anchors_image, ns, max(ks), options, progress=False)
    prompt_top = streaming_topk(prompts, anchors_text, ns, max(ks), options, progress=False)
    budget = options.budget_elements
    rows = []
    for n in ns:
        for k in [k for k in ks if k <= n]:
            image_rr = _row_layout(image_top[n], k).csr(8, True, True).to(device)
            target_t = _transposed_layout(prompt_top[n], k).csr(8, True, True).to(device)
            dense_macs = args.rows * n * args.targets
            sparse_macs = args.rows * k * (target_t.values().numel() / n)
            row = {"n": n, "k": k, "dense_macs": dense_macs, "sparse_macs": sparse_macs}
            for path, dense in (("dense", True), ("sparse", False)):
                if dense and n * args.targets > budget:
                    row[f"{path}_s"] = None  # the engine never takes it: the dense target won't fit
                    continue
                run = partial(_scores_t, image_rr, target_t, budget, dense, dtype)
                run()  # warm-up
                row[f"{path}_s"] = best_time(run, device, args.repeats)
            if row["dense_s"] and row["sparse_s"]:
                row["measured_cost"] = (row["sparse_s"] / sparse_macs) / (
                    row["dense_s"] / dense_macs
                )
            rows.append(row)
            dense_s, cost = row["dense_s"] or float("nan"), row.get("measured_cost", float("nan"))
            print(
                f"n={n:>8} k={k:>4}  dense {dense_s:8.4f}s  sparse {row['sparse_s']:8.4f}s  "
                f"cost {cost:.3g}",
                flush=True,
            )
    measured = [row["measured_cost"] for row in rows if "measured_cost" in row]
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype),
        "rows": args.rows,
        "targets": args.targets,
        "current_constant": SPARSE_MAC_COST.get(device.type),
        "suggested_constant": statistics.median(measured) if measured else None,
        "cells": rows,
    }
    print(
        f"SPARSE_MAC_COST[{device.type!r}]: current {report['current_constant']}, "
        f"measured median {report['suggested_constant']}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        staged = args.json.with_name(args.json.name + ".partial")
        staged.write_text(json.dumps(report, indent=2))
        staged.replace(args.json)
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)

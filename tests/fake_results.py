"""Tiny, hand-made results.json files (format version 1, still read) for report tests."""

from __future__ import annotations

import json
from pathlib import Path


def fake_top1(n: int, k: int, p: float, offset: float = 0.0) -> float:
    """Grows with n, peaks at k = 50 and p = 2: enough shape to check choices and curves."""
    return round(0.2 + 0.05 * (n / 400) - 0.0004 * abs(k - 50) - 0.01 * abs(p - 2) + offset, 4)


def write_results(
    root: Path,
    *,
    vision: str = "efficientnet_lite0",
    text: str = "sentence-transformers/all-MiniLM-L6-v2",
    anchors: str = "coco_mini",
    benchmark: str = "cifar10",
    split: str | None = None,
    subset: int | None = None,
    ns=(100, 200, 400),
    ks=(10, 50, 200),
    ps=(1.0, 2.0, 4.0),
    offset: float = 0.0,
    classes: int = 10,
    sweep_name: str | None = "fake",
) -> Path:
    cells = [
        {
            "n": n,
            "k": k,
            "p": p,
            "top1": fake_top1(n, k, p, offset),
            "top5": 0.6,
            "mean_per_class_recall": fake_top1(n, k, p, offset),
            "no_overlap_fraction": 0.0,
            "per_class_accuracy": [0.5] * classes,
        }
        for n in ns
        for k in ks
        for p in ps
        if k <= n
    ]
    headline = max(cells, key=lambda c: (c["n"], c["k"], c["p"]))
    results = {
        "format_version": 1,
        "options": {
            "clamp_negative": True,
            "normalize": "both",
            "template_aggregation": "mean",
            "preset": "clean",
        },
        "anchors": {"name": anchors, "pairs": max(ns), "pairs_used": max(ns), "skipped_images": []},
        "benchmark": {
            "name": benchmark,
            "images": 100,
            "images_used": 100,
            "skipped_images": [],
            "class_names": [f"class {i}" for i in range(classes)],
            "templates": ["{}"],
        },
        "encoders": {
            "vision": {"name": vision, "model_name": vision},
            "text": {"name": "st", "model_name": text},
        },
        "cells": cells,
        "config": {
            "sweep_name": sweep_name,
            "benchmark": {"authors_split": split, "subset": subset},
        },
        **{key: headline[key] for key in ("n", "k", "p", "top1", "top5", "per_class_accuracy")},
    }
    folder = root / f"{vision}-{benchmark}-{split or 'all'}-{offset}".replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder / "results.json"

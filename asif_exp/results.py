"""The results record of one job: typed, versioned, written atomically, read back the same way.

`results.json` is the source of truth: tracking, reports, explain and the notebook all read it
through `read_results`. A cell row holds the cell's parameters (the method's grid axes, e.g.
n, k, p) and the task's metrics, side by side.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asif_exp.errors import ResultsFormatError

SCHEMA_VERSION = 2
RESULTS_FILE = "results.json"


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(staging)` then rename: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Strict JSON (no NaN or Infinity, which most JSON readers refuse): a value with no number
    is null where it is written; a NaN arriving here is a bug, refused before anything is
    written."""
    try:
        text = json.dumps(payload, indent=1, default=str, allow_nan=False)
    except ValueError as error:
        raise ValueError(f"{path}: {error}: a NaN or infinity reached the writer") from None
    write_atomic(path, lambda staging: staging.write_text(text))


@dataclass
class CellResult:
    """One evaluated cell: its parameters (e.g. {"n": 200, "k": 50, "p": 2.0}) and metrics."""

    params: dict[str, Any]
    metrics: dict[str, Any]

    def row(self) -> dict:
        return {**self.params, **self.metrics}


@dataclass
class DataSummary:
    """What a job used of a dataset (anchors or benchmark)."""

    name: str
    size: int  # pairs (anchors) or images (benchmark) in the dataset
    used: int  # those that could be read and were used
    skipped_images: list = field(default_factory=list)
    details: dict = field(default_factory=dict)  # e.g. class_names and templates


@dataclass
class RunResults:
    """Everything one job produced. `headline` is the cell whose numbers go to the top level."""

    method: str
    task: str
    options: dict  # every method option that changes a number
    anchors: DataSummary
    benchmark: DataSummary
    encoders: dict
    cells: list[CellResult]
    headline: CellResult
    primary_metric: str  # the task's main metric: the sweep objective, the best-first order
    embeddings_from_cache: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)  # e.g. skipped_cells: [{n, n_used, k, reason}]
    timings: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def rows(self) -> list[dict]:
        return [cell.row() for cell in self.cells]

    def scalar_metrics(self) -> list[str]:
        """The metrics with one number per cell (lists such as per-class accuracy left out)."""
        return [k for k, v in self.headline.metrics.items() if isinstance(v, (int, float))]

    def to_dict(self) -> dict:
        """The JSON form. The v1 key names are kept (anchors.pairs_used, benchmark.class_names,
        top-level top1/...) so that existing readers and command lines keep working."""
        return {
            "schema_version": self.schema_version,
            "method": self.method,
            "task": self.task,
            "options": self.options,
            "anchors": _data_dict(self.anchors, "pairs"),
            "benchmark": _data_dict(self.benchmark, "images"),
            "encoders": self.encoders,
            "embeddings_from_cache": self.embeddings_from_cache,
            "cells": self.rows(),
            "headline_params": list(self.headline.params),
            "primary_metric": self.primary_metric,
            "notes": self.notes,
            "timings": self.timings,
            "config": self.config,
            **self.headline.row(),
        }

    def write(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())


def _data_dict(data: DataSummary, unit: str) -> dict:
    return {
        "name": data.name,
        unit: data.size,
        f"{unit}_used": data.used,
        "skipped_images": data.skipped_images,
        **data.details,
    }


def _data_summary(raw: dict, unit: str) -> DataSummary:
    known = {"name", unit, f"{unit}_used", "skipped_images"}
    return DataSummary(
        raw["name"],
        raw[unit],
        raw[f"{unit}_used"],
        raw.get("skipped_images", []),
        {key: value for key, value in raw.items() if key not in known},
    )


def results_from_dict(raw: dict, source: str = "results") -> RunResults:
    """The record from its JSON form (schema 2, or 1 as written before methods and tasks)."""
    version = raw.get("schema_version", raw.get("format_version"))
    if version not in (1, SCHEMA_VERSION):
        raise ResultsFormatError(
            f"{source}: results schema version {version!r}; this asif_exp reads "
            f"{SCHEMA_VERSION} and 1: rerun the job with this version to redo it"
        )
    try:
        if version == 1:  # before methods and tasks: ASIF classification over (n, k, p)
            params, method, task, primary = ["n", "k", "p"], "asif", "classification", "top1"
            skipped = raw.get("skipped_cells_k_gt_n", [])  # [[n, k], ...]: every p of a cell
            notes = {"skipped_cells": [{"n": n, "k": k, "reason": "k > n"} for n, k in skipped]}
        else:
            params, method, task = raw["headline_params"], raw["method"], raw["task"]
            primary, notes = raw["primary_metric"], raw["notes"]
        results = RunResults(
            method=method,
            task=task,
            options=raw["options"],
            anchors=_data_summary(raw["anchors"], "pairs"),
            benchmark=_data_summary(raw["benchmark"], "images"),
            encoders=raw["encoders"],
            cells=[_cell(row, params) for row in raw["cells"]],
            headline=_cell({key: raw[key] for key in raw["cells"][0] if key in raw}, params),
            primary_metric=primary,
            embeddings_from_cache=raw.get("embeddings_from_cache", {}),
            notes=notes,
            timings=raw.get("timings", {}),
            config=raw.get("config", {}),
        )
    except (KeyError, IndexError, TypeError, AttributeError) as error:
        raise ResultsFormatError(
            f"{source}: not a results record (missing {error}); rerun the job to redo it"
        ) from None
    if any(primary not in cell.metrics for cell in results.cells):
        raise ResultsFormatError(
            f"{source}: a cell lacks the primary metric {primary!r}; rerun the job to redo it"
        )
    return results


def _cell(row: dict, params: list[str]) -> CellResult:
    return CellResult(
        {key: row[key] for key in params},
        {key: value for key, value in row.items() if key not in params},
    )


def read_results(path: str | Path) -> RunResults:
    """One results.json, as a record; a damaged or unknown file is a one-line error."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ResultsFormatError(f"{path}: not valid JSON ({error}); rerun the job") from None
    except OSError as error:
        raise ResultsFormatError(f"{path}: cannot be read ({error.strerror})") from None
    if not isinstance(raw, dict):
        raise ResultsFormatError(f"{path}: not a results record; rerun the job")
    return results_from_dict(raw, str(path))

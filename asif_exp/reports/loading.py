"""The one loader of results files: every results.json under some folders, read through
`asif_exp.results`, as tables of cells. `load_cells`: ASIF's (n, k, p) grid cells with their
setup (Table 1, Figure 4); `load_method_cells`: every method's cells (the comparison)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd

from asif_exp.results import RunResults, read_results

SETUP = ["vision", "text", "anchors", "pairs", "benchmark", "subset", "variant"]
# Left out of comparison tables: they never rank settings (no-overlap fractions are ASIF's).
NOT_COMPARED = ("per_class_accuracy", "no_overlap_fraction")


def find_results(paths: Iterable[str | Path]) -> list[Path]:
    """Every results.json under the given folders (or the files themselves), sorted."""
    found: set[Path] = set()
    for path in map(Path, [paths] if isinstance(paths, (str, Path)) else paths):
        if path.is_file():
            found.add(path)
        elif path.is_dir():
            found.update(path.rglob("results.json"))
        else:
            raise FileNotFoundError(f"no results folder or file at {path}")
    return sorted(found)


def read_runs(paths: Iterable[str | Path]) -> Iterator[tuple[RunResults, dict]]:
    """(record, its setup columns) for every results file under `paths`; an error if none."""
    files = find_results(paths)
    if not files:
        raise ValueError(f"no results.json found under {list(map(str, paths))}")
    for file in files:
        results = read_results(file)
        yield results, setup_columns(results, file)


def variant(results: RunResults) -> str:
    options = results.options
    return (
        f"{options.get('preset', 'clean')}: clamp={options.get('clamp_negative')}, "
        f"normalize={options.get('normalize')}, templates={options.get('template_aggregation')}"
    )


def setup_columns(results: RunResults, file: Path) -> dict:
    """What a job's cells share: method, task, encoders, data, ASIF options, where it is."""
    config = results.config
    bench_cfg = config.get("benchmark", {})
    class_names = results.benchmark.details.get("class_names")
    return {
        "method": results.method,
        "task": results.task,
        "vision": results.encoders["vision"]["model_name"],
        "text": results.encoders["text"]["model_name"],
        "anchors": results.anchors.name,
        "pairs": results.anchors.used,
        "benchmark": results.benchmark.name,
        "subset": bench_cfg.get("subset") or 0,
        "split": bench_cfg.get("authors_split") or "all",
        "variant": variant(results),
        "images": results.benchmark.used,
        "classes": len(class_names) if class_names else 0,  # 0: not a labelled benchmark
        "sweep_name": config.get("sweep_name"),
        "path": str(file),
        "mtime": file.stat().st_mtime,
    }


def load_cells(paths: Iterable[str | Path]) -> pd.DataFrame:
    """One row per (n, k, p) grid cell of every results.json, with the cell's scalar metrics
    (top1, ... for classification; retrieval.* for retrieval; absent metrics are NaN); a cell
    computed twice keeps the newest. Cells of other grids (the baselines') are left out."""
    rows = []
    for results, setup in read_runs(paths):
        del setup["method"]
        metrics = results.scalar_metrics()
        for cell in results.rows():
            if "k" in cell and "p" in cell:
                grid = {key: cell[key] for key in ("n", "k", "p")}
                rows.append({**setup, **grid, **{key: cell[key] for key in metrics}})
    if not rows:
        raise ValueError(f"no (n, k, p) grid cells in the results under {list(map(str, paths))}")
    cells = pd.DataFrame(rows).sort_values("mtime")
    cells = cells.drop_duplicates(SETUP + ["split", "n", "k", "p"], keep="last")
    return cells.sort_values(SETUP + ["split", "n", "k", "p"]).reset_index(drop=True)


def load_method_cells(paths: Iterable[str | Path]) -> pd.DataFrame:
    """One row per cell of every results.json, any method and task: method, task, benchmark,
    anchors, n, the cell's other parameters (as `setting`, e.g. "k=800, p=8"), its scalar
    metrics, and the task's primary metric (`primary`). A cell computed twice keeps the newest."""
    kept = ("method", "task", "benchmark", "images", "anchors", "vision", "text")
    rows = []
    for results, setup in read_runs(paths):
        metrics = [
            m for m in results.scalar_metrics() if not any(m.endswith(x) for x in NOT_COMPARED)
        ]
        for cell in results.cells:
            others = {k: v for k, v in cell.params.items() if k not in ("n", "n_used")}
            rows.append(
                {
                    **{key: setup[key] for key in kept},
                    "n": cell.params["n"],
                    "n_used": cell.params.get("n_used", cell.params["n"]),
                    "setting": ", ".join(f"{k}={v:g}" for k, v in others.items()) or "-",
                    "primary_metric": results.primary_metric,
                    "primary": cell.metrics[results.primary_metric],
                    **{m: cell.metrics[m] for m in metrics},
                    "path": setup["path"],
                    "mtime": setup["mtime"],
                }
            )
    keys = ["task", "benchmark", "anchors", "vision", "text", "method", "n", "setting"]
    cells = pd.DataFrame(rows).sort_values("mtime").drop_duplicates(keys, keep="last")
    return cells.sort_values(keys).reset_index(drop=True)

"""The baselines against ASIF: for every task, benchmark and n, each method's best setting
(chosen on the benchmark itself), as markdown tables and one plot per task and benchmark."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from asif_exp.reports.labels import encoder_label, markdown_table

METHOD_ORDER = ("asif", "dense_rr", "ridge", "procrustes", "cca", "csa")


def best_per_method(cells: pd.DataFrame) -> pd.DataFrame:
    """For every (task, benchmark, method, n): the setting with the best primary metric (ties:
    the first setting in sorted order). Chosen on the benchmark itself: optimistic for every
    method alike."""
    group_keys = ["task", "benchmark", "anchors", "vision", "text", "method", "n"]
    ranked = cells.sort_values(group_keys + ["primary"], ascending=[True] * 7 + [False])
    best = ranked.groupby(group_keys, sort=False).head(1).copy()
    best["method_rank"] = (
        best["method"].map({m: i for i, m in enumerate(METHOD_ORDER)}).fillna(len(METHOD_ORDER))
    )
    best = best.sort_values(["task", "benchmark", "method_rank", "n"]).drop(columns="method_rank")
    return best.reset_index(drop=True)


def comparison_markdown(best: pd.DataFrame) -> str:
    """Per task: the primary metric against n (one column per method), then every metric of
    each chosen setting."""
    parts = []
    for (task, benchmark), group in best.groupby(["task", "benchmark"], sort=True):
        primary = group["primary_metric"].iloc[0]
        methods = [m for m in dict.fromkeys(group["method"])]
        wide = group.pivot(index="n", columns="method", values="primary")[methods]
        wide = wide.apply(lambda column: column.map(lambda v: "—" if pd.isna(v) else f"{v:.3f}"))
        wide.index = [f"{n:,}" for n in wide.index]
        wide.index.name = "anchor pairs n"
        row = group.iloc[0]
        parts += [
            f"### {task}: {benchmark} ({row['images']:,} images), anchors {row['anchors']}",
            "",
            f"{primary}, best setting per method and n (chosen on the benchmark itself):",
            "",
            markdown_table(wide),
            "",
        ]
        metrics = [
            c for c in group.columns if c not in _COMPARISON_COLUMNS and group[c].notna().any()
        ]
        detail = group[["method", "n", "setting", *metrics]].copy()
        for metric in metrics:
            detail[metric] = detail[metric].map(lambda v: f"{v:.3f}")
        detail["n"] = detail["n"].map(lambda n: f"{n:,}")
        parts += [markdown_table(detail.set_index("method")), ""]
    return "\n".join(parts)


_COMPARISON_COLUMNS = {
    "method",
    "task",
    "benchmark",
    "images",
    "anchors",
    "vision",
    "text",
    "n",
    "n_used",
    "setting",
    "primary_metric",
    "primary",
    "path",
    "mtime",
}


def comparison_plots(best: pd.DataFrame, out_dir: str | Path, stem: str) -> list[Path]:
    """One figure per (task, benchmark): the primary metric against n (log axis), one line per
    method at its best setting for each n. PNG and PDF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for (task, benchmark), group in best.groupby(["task", "benchmark"], sort=True):
        fig, axis = plt.subplots(figsize=(6.5, 4.2))
        for method, curve in group.groupby("method", sort=False):
            curve = curve.sort_values("n")
            axis.plot(curve["n"], curve["primary"], marker="o", label=method)
        ns = sorted(group["n"].unique())
        axis.set_xscale("log")
        axis.set_xticks(ns, [f"{n:,}" for n in ns], fontsize=8)
        axis.minorticks_off()
        axis.set_xlabel("anchor pairs n (first n, log scale)")
        axis.set_ylabel(group["primary_metric"].iloc[0])
        row = group.iloc[0]
        axis.set_title(
            f"{task}: {benchmark} ({row['images']:,} images); anchors {row['anchors']}\n"
            f"{encoder_label(row['vision'])} + {encoder_label(row['text'])}; "
            "best setting per method and n",
            fontsize=9,
        )
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
        fig.tight_layout()
        for suffix in (".png", ".pdf"):
            path = out_dir / f"{stem}_{task}_{benchmark}{suffix}"
            fig.savefig(path, dpi=150)
            written.append(path)
        plt.close(fig)
    return written

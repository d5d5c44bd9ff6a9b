"""Figure 4 of the ASIF paper: a metric against the number of anchor pairs n, curves over k and
p, one figure per setup with several n (PNG and PDF)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from asif_exp.reports.curves import figure4_series
from asif_exp.reports.labels import benchmark_label, encoder_label, slug
from asif_exp.reports.loading import SETUP

# The metric Figure 4 plots for each task unless told otherwise.
FIGURE4_METRICS = {"classification": "top1", "retrieval": "retrieval.mean_recall"}


def metric_label(metric: str) -> str:
    if metric == "top1":
        return "zero-shot top-1 (%)"
    label = metric.removeprefix("retrieval.").replace("image_to_text.", "image->text ")
    return label.replace("text_to_image.", "text->image ").replace("_", " ") + " (%)"


def figure4(
    cells: pd.DataFrame,
    out_dir: str | Path,
    split: str | None = None,
    stem: str = "fig4",
    metric: str | None = None,
) -> list[Path]:
    """A metric against the number of anchor pairs n (log axis) for every setup with several n:
    (a) one curve per k at the best p, (b) one curve per p at the best k. PNG and PDF.

    `metric`: a cell metric (e.g. "retrieval.text_to_image.R@10"), plotted for the setups that
    have it; None: each setup's task's own (`FIGURE4_METRICS`: top-1, retrieval mean recall).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for setup, group in cells.groupby(SETUP + ["split"], sort=True, dropna=False):
        if split is not None and setup[-1] != split:
            continue
        plotted = metric or FIGURE4_METRICS.get(group["task"].iloc[0], "top1")
        if plotted not in group or group[plotted].isna().any() or group["n"].nunique() < 2:
            continue
        series = figure4_series(group[["n", "k", "p", plotted]].to_dict("records"), plotted)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True, sharey=True)
        ns = sorted(group["n"].unique())
        for axis, curves in zip(axes, series, strict=True):
            for xs, ys, key in zip(curves["xs"], curves["ys"], curves["keys"], strict=True):
                axis.plot(xs, [100 * y for y in ys], marker="o", label=key)
            if plotted == "top1" and group["classes"].iloc[0]:
                chance = 100 / group["classes"].iloc[0]
                axis.axhline(chance, color="grey", ls=":", lw=1, label="chance")
            axis.set_xscale("log")
            axis.set_xticks(ns, [f"{n:,}" for n in ns], fontsize=8)  # the grid's n, not 10^x
            axis.minorticks_off()
            axis.set_xlabel("anchor pairs n (log scale)")
            varied, fixed = curves["varied"], curves["fixed"]
            axis.set_title(f"curves over {varied}, {fixed}={curves['fixed_value']:g}")
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(title=varied, fontsize=8)
        axes[0].set_ylabel(metric_label(plotted))
        row = group.iloc[0]
        split_note = "" if row["split"] == "all" else f", {row['split']} half"
        fig.suptitle(
            f"ASIF: {encoder_label(row['vision'])} + {encoder_label(row['text'])}; "
            f"anchors {row['anchors']} (up to {int(group['n'].max()):,} pairs); "
            f"{benchmark_label(row['benchmark'], int(row['subset']))}{split_note}, "
            f"{int(row['images']):,} images",
            fontsize=10,
        )
        fig.tight_layout()
        encoders = f"{slug(row['vision'])}_{slug(row['text'])}"
        name = f"{stem}_{encoders}_{row['anchors']}_{row['benchmark']}"
        if row["split"] != "all":
            name += f"_{row['split']}"
        if plotted != "top1":
            name += "_" + slug(plotted.removeprefix("retrieval.")).replace("@", "")
        for suffix in (".png", ".pdf"):
            path = out_dir / f"{name}{suffix}"
            fig.savefig(path, dpi=150)
            written.append(path)
        plt.close(fig)
    if not written:
        raise ValueError(
            f"no setup with {metric or 'its task metric'} for several n: nothing to plot"
        )
    return written

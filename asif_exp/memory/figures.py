"""Figures and tables of the memory tools: an explanation (Fig. 5), the accuracy-coverage
curve of abstention and the anchor-usage distribution, each written atomically.
The command line that computes and writes them is `asif_exp.explain`.
"""

from __future__ import annotations

import csv
import io
import textwrap
from collections.abc import Callable
from pathlib import Path

import torch
from matplotlib.figure import Figure
from PIL import Image

from asif_exp.memory.explanation import Explanation
from asif_exp.results import write_atomic


def _save_figure(figure: Figure, path: Path) -> None:
    write_atomic(path, lambda staging: figure.savefig(staging, format="png", dpi=110))


def write_csv(rows: list[dict], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, lambda staging: staging.write_text(buffer.getvalue()))


def render_explanation(
    explanation: Explanation,
    query_image: Image.Image,
    anchor_image: Callable[[str], Image.Image | None],
    path: Path,
    top_anchors: int = 6,
    title: str = "",
) -> None:
    """Figure 5 of the paper: the query, the anchor pairs that drove each class, their shares."""
    classes = explanation.classes[:2]
    columns = top_anchors + 2
    figure = Figure(figsize=(1.9 * columns, 3.3 * len(classes)), layout="constrained")
    grid = figure.add_gridspec(
        len(classes), columns, width_ratios=[1.3] + [1] * top_anchors + [2.2]
    )
    query_axis = figure.add_subplot(grid[:, 0])
    query_axis.imshow(query_image)
    query_axis.set_axis_off()
    truth = ""
    if explanation.label is not None:  # the true class is always among the explained ones
        names = {c.class_index: c.class_name for c in explanation.classes}
        truth = f"\ntrue: {names[explanation.label]}"
    query_axis.set_title(f"{title}\npredicted: {classes[0].class_name}{truth}", fontsize=9)
    for row, explained in enumerate(classes):
        shown = explained.contributions[:top_anchors]
        for column, contribution in enumerate(shown, start=1):
            axis = figure.add_subplot(grid[row, column])
            image = anchor_image(contribution.id)
            if image is not None:
                axis.imshow(image)
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(
                f"#{contribution.anchor}  {contribution.contribution / explained.score:.0%}"
                if explained.score
                else f"#{contribution.anchor}",
                fontsize=7,
            )
            axis.set_xlabel(textwrap.fill(contribution.caption, 24)[:140], fontsize=6)
        bars = figure.add_subplot(grid[row, -1])
        # Bars for the drawn anchors; the others' share is in the title (it can dwarf them).
        values = [c.contribution for c in shown]
        others = len(explained.contributions) - len(shown)
        rest = explained.score - sum(values)
        bars.barh(range(len(shown)), values, color="tab:blue")
        bars.set_yticks(range(len(shown)), [f"#{c.anchor}" for c in shown], fontsize=7)
        bars.invert_yaxis()
        bars.tick_params(axis="x", labelsize=7)
        kind = "winner" if row == 0 else "runner-up"
        share = f"{others} other anchors: {rest / explained.score:.0%}" if explained.score else ""
        bars.set_title(
            f"{kind}: {explained.class_name}, score {explained.score:.4f}\n{share}", fontsize=8
        )
    _save_figure(figure, path)


def render_coverage(rows: list[dict], path: Path, operating_point: dict | None = None) -> None:
    figure = Figure(figsize=(5, 3.8), layout="constrained")
    axis = figure.add_subplot()
    answered = [r for r in rows if r["accuracy"] is not None]
    coverage = [r["coverage"] for r in answered]
    axis.plot(coverage, [r["accuracy"] for r in answered], marker=".", label="accuracy on answered")
    axis.plot(
        coverage,
        [r["accuracy_all"] for r in answered],
        linestyle="--",
        label='"unknown" counted wrong',
    )
    if operating_point is not None and operating_point["accuracy"] is not None:
        axis.scatter(
            [operating_point["coverage"]],
            [operating_point["accuracy"]],
            color="red",
            zorder=3,
            label=f"threshold {operating_point['threshold']:g}",
        )
    axis.set_xlabel("coverage (fraction answered)")
    axis.set_ylabel("top-1 accuracy")
    axis.set_xlim(0, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    _save_figure(figure, path)


def render_usage(counts: dict[str, torch.Tensor], path: Path) -> None:
    figure = Figure(figsize=(5, 3.8), layout="constrained")
    axis = figure.add_subplot()
    for name, values in counts.items():
        axis.plot(values.sort(descending=True).values.tolist(), label=name)
    axis.set_xlabel("anchors, most used first")
    axis.set_ylabel("queries using the anchor")
    axis.set_yscale("symlog")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    _save_figure(figure, path)

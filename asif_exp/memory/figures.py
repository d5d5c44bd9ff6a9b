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
from matplotlib.ticker import MaxNLocator
from PIL import Image

from asif_exp.memory.explanation import Explanation, RetrievalExplanation
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
        bars, others, rest = _anchor_row(
            figure,
            grid,
            row,
            1,
            explained.contributions,
            top_anchors,
            explained.score,
            anchor_image,
        )
        kind = "winner" if row == 0 else "runner-up"
        share = f"{others} other anchors: {rest / explained.score:.0%}" if explained.score else ""
        bars.set_title(
            f"{kind}: {explained.class_name}, score {explained.score:.4f}\n{share}", fontsize=8
        )
    _save_figure(figure, path)


def _anchor_row(
    figure,
    grid,
    row,
    first_column,
    contributions,
    top_anchors,
    score,
    anchor_image,
    color="tab:blue",
):
    """Row `row` of an explanation figure's `grid`: the first `top_anchors`
    pairs (image, caption, share of `score`) from `first_column` on, then a bar per pair's
    contribution in the last cell. Returns (the bars' axis, how many pairs are not drawn,
    their summed contribution)."""
    shown = contributions[:top_anchors]
    for column, contribution in enumerate(shown, start=first_column):
        axis = figure.add_subplot(grid[row, column])
        picture = anchor_image(contribution.id)
        if picture is not None:
            axis.imshow(picture)
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_title(
            f"#{contribution.anchor}  {contribution.contribution / score:.0%}"
            if score
            else f"#{contribution.anchor}",
            fontsize=7,
        )
        axis.set_xlabel(textwrap.fill(contribution.caption, 24)[:140], fontsize=6)
    bars = figure.add_subplot(grid[row, -1])
    # Bars for the drawn anchors; the others' share is in the title (it can dwarf them).
    values = [c.contribution for c in shown]
    bars.barh(range(len(shown)), values, color=color)
    bars.set_yticks(range(len(shown)), [f"#{c.anchor}" for c in shown], fontsize=7)
    bars.invert_yaxis()
    bars.tick_params(axis="x", labelsize=7)
    return bars, len(contributions) - len(shown), score - sum(values)


def render_coverage(
    curves: dict[str, list[dict]],
    path: Path,
    operating_points: dict[str, dict] | None = None,
    measure: str = "top-1 accuracy",
) -> None:
    """One accuracy-coverage curve per query direction (rows as `coverage_rows` gives them)."""
    figure = Figure(figsize=(5, 3.8), layout="constrained")
    axis = figure.add_subplot()
    colors = ["tab:blue", "tab:orange", "tab:green"]
    for (name, rows), color in zip(curves.items(), colors, strict=False):
        answered = [r for r in rows if r["accuracy"] is not None]
        coverage = [r["coverage"] for r in answered]
        label = f"{name}: " if len(curves) > 1 else ""
        axis.plot(
            coverage,
            [r["accuracy"] for r in answered],
            marker=".",
            color=color,
            label=f"{label}on answered",
        )
        axis.plot(
            coverage,
            [r["accuracy_all"] for r in answered],
            linestyle="--",
            color=color,
            label=f'{label}"unknown" counted wrong',
        )
        point = (operating_points or {}).get(name)
        if point is not None and point["accuracy"] is not None:
            axis.scatter(
                [point["coverage"]],
                [point["accuracy"]],
                color="red",
                zorder=3,
                label=f"{label}threshold {point['threshold']:g}",
            )
    axis.set_xlabel("coverage (fraction answered)")
    axis.set_ylabel(measure)
    axis.set_xlim(0, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
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


def _text_panel(axis, text: str, width: int = 28) -> None:
    axis.text(0.5, 0.5, textwrap.fill(text, width), ha="center", va="center", fontsize=8, wrap=True)
    axis.set_xticks([])
    axis.set_yticks([])


def render_match_explanation(
    explanation: RetrievalExplanation,
    image: Callable[[int], Image.Image],
    anchor_image: Callable[[str], Image.Image | None],
    path: Path,
    top_anchors: int = 6,
    title: str = "",
) -> None:
    """A retrieval query, its best candidates (right ones marked), and per explained match the
    anchor pairs that link query and candidate with their shares of the score.

    `image(index)` loads benchmark image `index` (the query of image_to_text, the candidates of
    text_to_image)."""
    image_query = explanation.direction == "image_to_text"
    rows = explanation.explained
    columns = top_anchors + 3
    figure = Figure(figsize=(1.9 * columns, 3.3 * max(1, len(rows))), layout="constrained")
    grid = figure.add_gridspec(
        max(1, len(rows)), columns, width_ratios=[1.6, 1.3] + [1] * top_anchors + [2.2]
    )
    query_axis = figure.add_subplot(grid[:, 0])
    if image_query:
        query_axis.imshow(image(explanation.query))
        query_axis.set_axis_off()
    else:
        _text_panel(query_axis, f'"{explanation.query_name}"', 30)
    best = "\n".join(
        f"{'✓' if c.right else '✗'} {c.rank}. {c.score:.4f} "
        + (textwrap.shorten(c.name, 34) if image_query else c.name)
        for c in explanation.candidates
    )
    hit = "R@1 hit" if explanation.hit_at_1 else "R@1 miss"
    query_axis.set_title(
        f"{title}\n{explanation.direction} query #{explanation.query} ({hit})", fontsize=9
    )
    query_axis.text(
        0.0,
        -0.04,
        f"best candidates:\n{best}",
        transform=query_axis.transAxes,
        fontsize=6,
        va="top",
    )
    for row, explained in enumerate(rows):
        candidate = explained.candidate
        candidate_axis = figure.add_subplot(grid[row, 1])
        if image_query:
            _text_panel(candidate_axis, f'"{candidate.name}"', 22)
        else:
            candidate_axis.imshow(image(candidate.index))
            candidate_axis.set_xticks([])
            candidate_axis.set_yticks([])
        mark = "right" if candidate.right else "wrong"
        candidate_axis.set_title(
            f"{explained.why} (#{candidate.index}, rank {candidate.rank}, {mark})", fontsize=7
        )
        bars, others, rest = _anchor_row(
            figure,
            grid,
            row,
            2,
            explained.contributions,
            top_anchors,
            candidate.score,
            anchor_image,
            color="tab:blue" if candidate.right else "tab:red",
        )
        bars.xaxis.set_major_locator(MaxNLocator(4))
        share = f"{others} other anchors: {rest / candidate.score:.0%}" if candidate.score else ""
        bars.set_title(f"image x caption entries, score {candidate.score:.4f}\n{share}", fontsize=8)
    _save_figure(figure, path)

"""Table 1 of the ASIF paper: our zero-shot top-1 beside the paper's published numbers (every
version of the paper), with the differences; `.md`, `.tex` and `.csv`.

The paper's numbers are data: `experiments/table1/paper_table1.json` (`paper_rows`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pandas as pd

from asif_exp.config import PROJECT_ROOT
from asif_exp.reports.labels import benchmark_label, encoder_label, fmt, markdown_table
from asif_exp.reports.loading import SETUP

log = logging.getLogger(__name__)

PAPER_NUMBERS = PROJECT_ROOT / "experiments" / "table1" / "paper_table1.json"


@dataclass(frozen=True)
class PaperRow:
    """Top-1 (%) as printed in one version of the paper; None (or absent) where it prints none."""

    method: str
    version: str  # "" where the row is the same in every version (or its version is unknown)
    vision: str | None  # the paper's image encoder as a timm tag (None: not an ASIF row)
    top1: dict[str, float | None] = field(default_factory=dict)
    note: str = ""
    # other checkpoints of the same network and training data that our runs may compare with it
    comparable: tuple[str, ...] = ()
    starred: tuple[str, ...] = ()  # benchmarks whose figure the paper marks with an asterisk

    def compares(self, vision: str) -> bool:
        return self.vision is not None and (vision == self.vision or vision in self.comparable)


@cache
def paper_numbers() -> dict:
    """`experiments/table1/paper_table1.json`: the paper's benchmarks, rows and notes."""
    return json.loads(PAPER_NUMBERS.read_text())


def paper_rows() -> tuple[PaperRow, ...]:
    """Every row of the paper's Table 1, in the paper's order."""
    return tuple(
        PaperRow(
            row["method"],
            row["version"],
            row["vision"],
            row["top1"],
            row.get("note", ""),
            tuple(row.get("comparable", ())),
            tuple(row.get("starred", ())),
        )
        for row in paper_numbers()["rows"]
    )


def select_cells(
    cells: pd.DataFrame, n: int | None = None, k: int | None = None, p: float | None = None
) -> pd.DataFrame:
    """One reported cell per setup.

    With results on both halves of the authors' split, (n, k, p) is chosen on "val" (best
    top-1; ties: larger n, smaller k, smaller p) and the "test" cell is reported. Otherwise
    the cell at the given n (default: the largest), k and p; where several remain, the best
    one is reported and marked as chosen on the evaluation set itself (optimistic).
    """
    chosen = []
    for _, group in cells.groupby(SETUP, sort=True, dropna=False):
        group = _filter(group, n, k, p)
        if group.empty:
            continue
        splits = set(group["split"])
        if {"val", "test"} <= splits:
            val = _best(group[group["split"] == "val"])
            test = group[
                (group["split"] == "test")
                & (group["n"] == val["n"])
                & (group["k"] == val["k"])
                & (group["p"] == val["p"])
            ]
            if test.empty:
                log.warning("no test cell for the val choice n=%s k=%s p=%s", val.n, val.k, val.p)
                continue
            row = test.iloc[0].copy()
            row["selection"] = (
                f"tuned on the val half (top-1 {100 * val['top1']:.1f}); reported on the test half"
            )
        else:
            split = "all" if "all" in splits else sorted(splits)[0]
            candidates = group[group["split"] == split]
            if n is None:
                candidates = candidates[candidates["n"] == candidates["n"].max()]
            row = _best(candidates).copy()
            row["selection"] = (
                "the configured cell"
                if len(candidates) == 1
                else f"best of {len(candidates)} (k, p) on this set itself (optimistic)"
            )
        chosen.append(row)
    if not chosen:
        raise ValueError(f"no cell matches n={n}, k={k}, p={p}")
    return pd.DataFrame(chosen).reset_index(drop=True)


def _classification(cells: pd.DataFrame) -> pd.DataFrame:
    """Table 1 is zero-shot classification: the cells of other tasks (retrieval) are left out."""
    classification = cells[cells["task"] == "classification"]
    if classification.empty:
        raise ValueError("no classification results among the cells: Table 1 has nothing to show")
    return classification


def _filter(group: pd.DataFrame, n, k, p) -> pd.DataFrame:
    for column, value in (("n", n), ("k", k), ("p", p)):
        if value is not None:
            group = group[group[column] == value]
    return group


def _best(candidates: pd.DataFrame, metric: str = "top1") -> pd.Series:
    ranked = candidates.sort_values([metric, "n", "k", "p"], ascending=[False, False, True, True])
    return ranked.iloc[0]


@dataclass
class Table1:
    wide: pd.DataFrame  # rows: paper versions, ours, differences; columns: benchmarks
    long: pd.DataFrame  # one row per (our setup, benchmark), paper values and differences
    notes: list[str]
    notes_title: str = "How each of our numbers was chosen:"
    caption: str = "zero-shot top-1 accuracy (%), ours beside the paper's."


def _version_key(version: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in (version or "paper").lower()).strip("_")


def _paper_label(paper: PaperRow) -> str:
    return f"{paper.method} — paper" + (f", {paper.version}" if paper.version else "")


def build_table1(cells: pd.DataFrame, n=None, k=None, p=None) -> Table1:
    """Our top-1 (%) beside the paper's (every published version), with the differences."""
    selected = select_cells(_classification(cells), n, k, p)
    columns = [b for b in paper_numbers()["benchmarks"] if b in set(selected["benchmark"])]
    columns += sorted(set(selected["benchmark"]) - set(columns))
    paper_columns = any(b in paper_numbers()["benchmarks"] for b in columns)

    long_rows = []
    for row in selected.itertuples():
        entry = {
            "method": f"ASIF {encoder_label(row.vision)} + {encoder_label(row.text)}",
            "vision": row.vision,
            "text": row.text,
            "anchors": row.anchors,
            "pairs": row.pairs,
            "benchmark": row.benchmark,
            "subset": row.subset,
            "images": row.images,
            "variant": row.variant,
            "n": row.n,
            "k": row.k,
            "p": row.p,
            "selection": row.selection,
            "ours_top1": round(100 * row.top1, 2),
        }
        for paper in paper_rows():
            value = paper.top1.get(row.benchmark) if paper.compares(row.vision) else None
            if value is not None:
                key = _version_key(paper.version)
                entry[f"paper_{key}"] = value
                entry[f"diff_{key}"] = round(entry["ours_top1"] - value, 2)
        long_rows.append(entry)
    long = pd.DataFrame(long_rows)

    wide_rows: dict[str, dict[str, str]] = {}
    ours_visions = list(dict.fromkeys(selected["vision"]))
    if paper_columns:
        for paper in paper_rows():
            if paper.vision is None or any(map(paper.compares, ours_visions)):
                wide_rows[_paper_label(paper)] = {b: _paper_cell(paper, b) for b in columns}
    groups = list(long.groupby(["method", "anchors", "pairs", "variant"], sort=False))
    for (method, anchors, pairs, variant), group in groups:
        values = {b: group[group["benchmark"] == b]["ours_top1"] for b in columns}
        name = f"{method} — ours, {anchors} ({pairs:,} pairs)"
        if long["variant"].nunique() > 1:
            name += f" [{variant.split(':')[0]}]"
        wide_rows[name] = {b: fmt(v.iloc[0] if len(v) else None) for b, v in values.items()}
        for paper in paper_rows():
            key = f"diff_{_version_key(paper.version)}"
            if paper.compares(group["vision"].iloc[0]) and key in group:
                diffs = {b: group[group["benchmark"] == b][key] for b in columns}
                version = f", {paper.version}" if paper.version else ""
                label = f"  Δ ours − paper{version} ({paper.method})"
                if sum(paper.compares(g["vision"].iloc[0]) for _, g in groups) > 1:
                    label = f"  Δ {name} − paper{version}"  # several of ours: name which
                wide_rows[label] = {
                    b: fmt(d.iloc[0] if len(d) else None, signed=True) for b, d in diffs.items()
                }
    wide = pd.DataFrame.from_dict(wide_rows, orient="index", columns=columns)
    subsets = dict(zip(selected["benchmark"], selected["subset"], strict=False))
    wide.columns = [benchmark_label(b, int(subsets.get(b, 0) or 0)) for b in columns]
    wide.index.name = "zero-shot top-1 (%)"

    notes = sorted(
        {
            f"{r.method}, {r.benchmark}: {r.selection}; n={r.n}, k={r.k}, p={r.p:g}, "
            f"{r.images:,} images"
            for r in long.itertuples()
        }
    )
    notes += _paper_notes(
        [p for p in paper_rows() if paper_columns and _paper_label(p) in wide_rows], columns
    )
    notes += sorted(
        {
            f"{encoder_label(vision)} compared with the paper's {paper.method} row, whose image "
            f"encoder is {paper.vision}"
            for vision in ours_visions
            for paper in paper_rows()
            if paper_columns and paper.compares(vision) and vision != paper.vision
        }
    )
    return Table1(wide, long, notes)


def _paper_cell(paper: PaperRow, benchmark: str) -> str:
    value = paper.top1.get(benchmark)
    return fmt(value) + ("*" if value is not None and benchmark in paper.starred else "")


def _paper_notes(papers: list[PaperRow], columns: list[str]) -> list[str]:
    notes = [f"{_paper_label(p)}: {p.note}" for p in papers if p.note]
    if any(set(p.starred) & set(columns) for p in papers):
        notes.append(paper_numbers()["tuned_on_val_note"])
    return notes


def paper_table1() -> Table1:
    """The paper's own Table 1 (every row of paper_rows()), with no results of ours."""
    columns = list(paper_numbers()["benchmarks"])
    wide = pd.DataFrame.from_dict(
        {_paper_label(p): {b: _paper_cell(p, b) for b in columns} for p in paper_rows()},
        orient="index",
        columns=columns,
    )
    wide.columns = [benchmark_label(b) for b in columns]
    wide.index.name = "zero-shot top-1 (%)"
    long = pd.DataFrame(
        [
            {
                "method": p.method,
                "version": p.version,
                "vision": p.vision,
                "benchmark": b,
                "paper_top1": p.top1[b],
                "starred": b in p.starred,
            }
            for p in paper_rows()
            for b in columns
            if p.top1.get(b) is not None
        ]
    )
    return Table1(
        wide,
        long,
        _paper_notes(list(paper_rows()), columns),
        notes_title="Notes:",
        caption="zero-shot top-1 accuracy (%) as published.",
    )


def _tex_escape(text: str) -> str:
    for char in "&%$#_{}":
        text = text.replace(char, "\\" + char)
    return text


def write_table1(table: Table1, out_stem: str | Path, title: str = "Table 1") -> list[Path]:
    """`<stem>.md` (table and how each number was chosen), `<stem>.tex`, `<stem>.csv` (long)."""
    stem = Path(out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    markdown = [
        f"### {title}",
        "",
        markdown_table(table.wide),
        "",
        table.notes_title,
        "",
    ]
    markdown += [f"- {note}" for note in table.notes]
    paths = [stem.with_suffix(".md"), stem.with_suffix(".tex"), stem.with_suffix(".csv")]
    paths[0].write_text("\n".join(markdown) + "\n")
    wide = table.wide.rename_axis(None)
    latex = wide.to_latex(
        caption=f"{_tex_escape(title)}: {_tex_escape(table.caption)}",
        label="tab:asif-table1",
        escape=True,
        column_format="l" + "r" * len(wide.columns),
    )
    for text, tex in (("Δ", "$\\Delta$"), ("−", "$-$"), ("—", "--")):  # plain pdflatex
        latex = latex.replace(text, tex)
    paths[1].write_text(latex)
    table.long.to_csv(paths[2], index=False)
    return paths

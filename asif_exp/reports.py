"""Table 1 and Figure 4 of the ASIF paper, built from results.json files (the source of truth).

    cells = load_cells(["outputs/sweeps/table1_mini"])      # one row per (job, n, k, p)
    table = build_table1(cells)                              # ours beside the paper's numbers
    write_table1(table, "experiments/table1/mini")           # .md, .tex, .csv
    figure4(cells, "experiments/fig4/mini")                  # .png, .pdf per setup

A "setup" is everything but the grid: encoders, anchors, benchmark (and subset), ASIF options.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from asif_exp.results import RunResults, read_results

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- the paper

PAPER_BENCHMARKS = ("imagenet", "cifar100", "oxford_pets", "imagenet_v2")
BENCHMARK_LABELS = {
    "imagenet": "ImageNet",
    "cifar100": "CIFAR-100",
    "oxford_pets": "Pets",
    "imagenet_v2": "ImageNet-v2",
    "cifar10": "CIFAR-10",
    "imagenet_mini": "ImageNet-mini",
    "synthetic_shapes": "Shapes",
}
ENCODER_LABELS = {
    "vit_base_patch16_224_miil.in21k": "ViT-B/16 sup. IN-21k (MIIL)",
    "vit_base_patch16_224.augreg_in21k": "ViT-B/16 sup. IN-21k (AugReg)",
    "vit_small_patch8_224.dino": "DINO ViT-S/8 unsup.",
    "efficientnet_lite0": "EfficientNet-Lite0",
    "tf_efficientnet_lite0": "EfficientNet-Lite0",
    "efficientnet_lite2": "EfficientNet-Lite2",
    "tf_efficientnet_lite2": "EfficientNet-Lite2",
    "sentence-transformers/sentence-t5-base": "sentence-T5-base",
    "sentence-transformers/all-mpnet-base-v2": "all-mpnet-base-v2",
    "sentence-transformers/all-MiniLM-L6-v2": "all-MiniLM-L6-v2",
}


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


# The paper's supervised ViT-B/16: ImageNet-21k weights of Ridnik et al. 2021 (timm's MIIL tag);
# Google's AugReg ImageNet-21k weights of the same network are compared with the same row.
VIT_IN21K, VIT_IN21K_AUGREG = "vit_base_patch16_224_miil.in21k", "vit_base_patch16_224.augreg_in21k"
DINO = "vit_small_patch8_224.dino"
TUNED_ON_VAL = (
    "Figures with an asterisk (*) are marked so in the paper: tuned on ImageNet validation"
)
PAPER_TABLE1: tuple[PaperRow, ...] = (
    PaperRow(
        "CLIP (400M private pairs)",
        "",
        None,
        {"imagenet": 68.6, "cifar100": 68.7, "oxford_pets": 88.9},
    ),
    PaperRow("CLIP (15M public pairs)", "", None, {"imagenet": 31.3}),
    PaperRow("LiT (10M public pairs)", "", None, {"imagenet": 66.9}),
    PaperRow(
        "CLIP (901M pairs, Zhai et al.)",
        "",
        None,
        {"imagenet": 50.6, "cifar100": 47.9, "oxford_pets": 70.3, "imagenet_v2": 43.3},
    ),
    PaperRow(
        "LiT (901M pairs)",
        "",
        None,
        {"imagenet": 70.1, "cifar100": 70.9, "oxford_pets": 88.1, "imagenet_v2": 61.7},
    ),
    PaperRow(
        "ASIF ViT-B/16 sup. (1.6M pairs)",
        "arXiv v1 (2022)",
        VIT_IN21K,
        {"imagenet": 55.4, "cifar100": 63.3, "oxford_pets": 71.5, "imagenet_v2": 45.6},
        comparable=(VIT_IN21K_AUGREG,),
        starred=("imagenet",),
    ),
    PaperRow(
        "ASIF ViT-B/16 sup. (1.6M pairs)",
        "NeurIPS 2023",
        VIT_IN21K,
        {"imagenet": 60.9, "cifar100": 50.2, "oxford_pets": 81.5, "imagenet_v2": 52.2},
        comparable=(VIT_IN21K_AUGREG,),
    ),
    PaperRow(
        "ASIF DINO ViT-S/8 unsup. (1.6M pairs)",
        "",
        DINO,
        {"imagenet": 53.0, "cifar100": 46.5, "oxford_pets": 74.7, "imagenet_v2": 45.9},
        starred=("imagenet",),
    ),
)

# ----------------------------------------------------------------------------- loading

SETUP = ["vision", "text", "anchors", "pairs", "benchmark", "subset", "variant"]


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


def _variant(results: RunResults) -> str:
    options = results.options
    return (
        f"{options.get('preset', 'clean')}: clamp={options.get('clamp_negative')}, "
        f"normalize={options.get('normalize')}, templates={options.get('template_aggregation')}"
    )


def load_cells(paths: Iterable[str | Path]) -> pd.DataFrame:
    """One row per grid cell of every results.json, with the cell's scalar metrics (top1, ...
    for classification; retrieval.* for retrieval; absent metrics are NaN); a cell computed
    twice keeps the newest."""
    rows = []
    for file in find_results(paths):
        results = read_results(file)
        config = results.config
        bench_cfg = config.get("benchmark", {})
        class_names = results.benchmark.details.get("class_names")
        common = {
            "task": results.task,
            "vision": results.encoders["vision"]["model_name"],
            "text": results.encoders["text"]["model_name"],
            "anchors": results.anchors.name,
            "pairs": results.anchors.used,
            "benchmark": results.benchmark.name,
            "subset": bench_cfg.get("subset") or 0,
            "split": bench_cfg.get("authors_split") or "all",
            "variant": _variant(results),
            "images": results.benchmark.used,
            "classes": len(class_names) if class_names else 0,  # 0: not a labelled benchmark
            "sweep_name": config.get("sweep_name"),
            "path": str(file),
            "mtime": file.stat().st_mtime,
        }
        metrics = results.scalar_metrics()
        for cell in results.rows():
            rows.append(
                {
                    **common,
                    **{key: cell[key] for key in ("n", "k", "p")},
                    **{key: cell[key] for key in metrics},
                }
            )
    if not rows:
        raise ValueError(f"no results.json found under {list(map(str, paths))}")
    cells = pd.DataFrame(rows).sort_values("mtime")
    cells = cells.drop_duplicates(SETUP + ["split", "n", "k", "p"], keep="last")
    return cells.sort_values(SETUP + ["split", "n", "k", "p"]).reset_index(drop=True)


# ----------------------------------------------------------------------------- Table 1


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


def _label(model_name: str) -> str:
    return ENCODER_LABELS.get(model_name, model_name)


def _benchmark_label(benchmark: str, subset: int = 0) -> str:
    label = BENCHMARK_LABELS.get(benchmark, benchmark)
    return f"{label} ({subset:,} subset)" if subset else label


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
    columns = [b for b in PAPER_BENCHMARKS if b in set(selected["benchmark"])]
    columns += sorted(set(selected["benchmark"]) - set(columns))
    paper_columns = any(b in PAPER_BENCHMARKS for b in columns)

    long_rows = []
    for row in selected.itertuples():
        entry = {
            "method": f"ASIF {_label(row.vision)} + {_label(row.text)}",
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
        for paper in PAPER_TABLE1:
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
        for paper in PAPER_TABLE1:
            if paper.vision is None or any(map(paper.compares, ours_visions)):
                wide_rows[_paper_label(paper)] = {b: _paper_cell(paper, b) for b in columns}
    groups = list(long.groupby(["method", "anchors", "pairs", "variant"], sort=False))
    for (method, anchors, pairs, variant), group in groups:
        values = {b: group[group["benchmark"] == b]["ours_top1"] for b in columns}
        name = f"{method} — ours, {anchors} ({pairs:,} pairs)"
        if long["variant"].nunique() > 1:
            name += f" [{variant.split(':')[0]}]"
        wide_rows[name] = {b: _fmt(v.iloc[0] if len(v) else None) for b, v in values.items()}
        for paper in PAPER_TABLE1:
            key = f"diff_{_version_key(paper.version)}"
            if paper.compares(group["vision"].iloc[0]) and key in group:
                diffs = {b: group[group["benchmark"] == b][key] for b in columns}
                version = f", {paper.version}" if paper.version else ""
                label = f"  Δ ours − paper{version} ({paper.method})"
                if sum(paper.compares(g["vision"].iloc[0]) for _, g in groups) > 1:
                    label = f"  Δ {name} − paper{version}"  # several of ours: name which
                wide_rows[label] = {
                    b: _fmt(d.iloc[0] if len(d) else None, signed=True) for b, d in diffs.items()
                }
    wide = pd.DataFrame.from_dict(wide_rows, orient="index", columns=columns)
    subsets = dict(zip(selected["benchmark"], selected["subset"], strict=False))
    wide.columns = [_benchmark_label(b, int(subsets.get(b, 0) or 0)) for b in columns]
    wide.index.name = "zero-shot top-1 (%)"

    notes = sorted(
        {
            f"{r.method}, {r.benchmark}: {r.selection}; n={r.n}, k={r.k}, p={r.p:g}, "
            f"{r.images:,} images"
            for r in long.itertuples()
        }
    )
    notes += _paper_notes(
        [p for p in PAPER_TABLE1 if paper_columns and _paper_label(p) in wide_rows], columns
    )
    notes += sorted(
        {
            f"{_label(vision)} compared with the paper's {paper.method} row, whose image "
            f"encoder is {paper.vision}"
            for vision in ours_visions
            for paper in PAPER_TABLE1
            if paper_columns and paper.compares(vision) and vision != paper.vision
        }
    )
    return Table1(wide, long, notes)


def _paper_cell(paper: PaperRow, benchmark: str) -> str:
    value = paper.top1.get(benchmark)
    return _fmt(value) + ("*" if value is not None and benchmark in paper.starred else "")


def _paper_notes(papers: list[PaperRow], columns: list[str]) -> list[str]:
    notes = [f"{_paper_label(p)}: {p.note}" for p in papers if p.note]
    if any(set(p.starred) & set(columns) for p in papers):
        notes.append(TUNED_ON_VAL)
    return notes


def paper_table1() -> Table1:
    """The paper's own Table 1 (every row of PAPER_TABLE1), with no results of ours."""
    columns = list(PAPER_BENCHMARKS)
    wide = pd.DataFrame.from_dict(
        {_paper_label(p): {b: _paper_cell(p, b) for b in columns} for p in PAPER_TABLE1},
        orient="index",
        columns=columns,
    )
    wide.columns = [_benchmark_label(b) for b in columns]
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
            for p in PAPER_TABLE1
            for b in columns
            if p.top1.get(b) is not None
        ]
    )
    return Table1(
        wide,
        long,
        _paper_notes(list(PAPER_TABLE1), columns),
        notes_title="Notes:",
        caption="zero-shot top-1 accuracy (%) as published.",
    )


def _fmt(value, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table (index as the first column)."""
    header = [frame.index.name or ""] + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in frame.iterrows():
        cells = [str(index).replace("|", "\\|")] + [str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


# ----------------------------------------------------------------------------- Figure 4


# The metric Figure 4 plots for each task unless told otherwise.
FIGURE4_METRICS = {"classification": "top1", "retrieval": "retrieval.mean_recall"}


def _metric_label(metric: str) -> str:
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
        largest = group[group["n"] == group["n"].max()]
        best = _best(largest, plotted)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True, sharey=True)
        ns = sorted(group["n"].unique())
        for axis, (fixed, fixed_value, varied) in zip(
            axes, (("p", best["p"], "k"), ("k", best["k"], "p")), strict=True
        ):
            panel = group[group[fixed] == fixed_value]
            for value, curve in panel.groupby(varied):
                curve = curve.sort_values("n")
                axis.plot(curve["n"], 100 * curve[plotted], marker="o", label=f"{varied}={value:g}")
            if plotted == "top1" and group["classes"].iloc[0]:
                chance = 100 / group["classes"].iloc[0]
                axis.axhline(chance, color="grey", ls=":", lw=1, label="chance")
            axis.set_xscale("log")
            axis.set_xticks(ns, [f"{n:,}" for n in ns], fontsize=8)  # the grid's n, not 10^x
            axis.minorticks_off()
            axis.set_xlabel("anchor pairs n (log scale)")
            axis.set_title(f"curves over {varied}, {fixed}={fixed_value:g}")
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(title=varied, fontsize=8)
        axes[0].set_ylabel(_metric_label(plotted))
        row = group.iloc[0]
        split_note = "" if row["split"] == "all" else f", {row['split']} half"
        fig.suptitle(
            f"ASIF: {_label(row['vision'])} + {_label(row['text'])}; anchors {row['anchors']} "
            f"(up to {int(group['n'].max()):,} pairs); "
            f"{_benchmark_label(row['benchmark'], int(row['subset']))}{split_note}, "
            f"{int(row['images']):,} images",
            fontsize=10,
        )
        fig.tight_layout()
        encoders = f"{_slug(row['vision'])}_{_slug(row['text'])}"
        name = f"{stem}_{encoders}_{row['anchors']}_{row['benchmark']}"
        if row["split"] != "all":
            name += f"_{row['split']}"
        if plotted != "top1":
            name += "_" + _slug(plotted.removeprefix("retrieval.")).replace("@", "")
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


def _slug(model_name: str) -> str:
    return model_name.split("/")[-1].replace(".", "-")


# ----------------------------------------------------------------------------- method comparison

METHOD_ORDER = ("asif", "dense_rr", "ridge", "procrustes", "cca", "csa")
# Left out of comparison tables: they never rank settings (no-overlap fractions are ASIF's).
_NOT_COMPARED = ("per_class_accuracy", "no_overlap_fraction")


def load_method_cells(paths: Iterable[str | Path]) -> pd.DataFrame:
    """One row per cell of every results.json, any method and task: method, task, benchmark,
    anchors, n, the cell's other parameters (as `setting`, e.g. "k=800, p=8"), its scalar
    metrics, and the task's primary metric (`primary`). A cell computed twice keeps the newest."""
    rows = []
    for file in find_results(paths):
        results = read_results(file)
        metrics = [
            m for m in results.scalar_metrics() if not any(m.endswith(x) for x in _NOT_COMPARED)
        ]
        for cell in results.cells:
            others = {k: v for k, v in cell.params.items() if k not in ("n", "n_used")}
            rows.append(
                {
                    "method": results.method,
                    "task": results.task,
                    "benchmark": results.benchmark.name,
                    "images": results.benchmark.used,
                    "anchors": results.anchors.name,
                    "vision": results.encoders["vision"]["model_name"],
                    "text": results.encoders["text"]["model_name"],
                    "n": cell.params["n"],
                    "n_used": cell.params.get("n_used", cell.params["n"]),
                    "setting": ", ".join(f"{k}={v:g}" for k, v in others.items()) or "-",
                    "primary_metric": results.primary_metric,
                    "primary": cell.metrics[results.primary_metric],
                    **{m: cell.metrics[m] for m in metrics},
                    "path": str(file),
                    "mtime": file.stat().st_mtime,
                }
            )
    if not rows:
        raise ValueError(f"no results.json found under {list(map(str, paths))}")
    keys = ["task", "benchmark", "anchors", "vision", "text", "method", "n", "setting"]
    cells = pd.DataFrame(rows).sort_values("mtime").drop_duplicates(keys, keep="last")
    return cells.sort_values(keys).reset_index(drop=True)


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
            f"{_label(row['vision'])} + {_label(row['text'])}; best setting per method and n",
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

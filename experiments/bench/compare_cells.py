"""Compare two Figure 4 cell tables (`build_figure.py --csv`) cell by cell: how many cells of
each metric moved, by how much at most (points), and the best cell per n. Used to check that a
change to the encoding path leaves the real benchmarks where they were.

    python experiments/bench/compare_cells.py experiments/fig4/flickr8k/cells.csv new/cells.csv
"""

from __future__ import annotations

import argparse

import pandas as pd

KEYS = ["task", "benchmark", "n", "k", "p"]
METRICS = (
    ["top1", "top5"]
    + [
        f"retrieval.{direction}.R@{r}"
        for direction in ("image_to_text", "text_to_image")
        for r in (1, 5, 10)
    ]
    + ["retrieval.mean_recall"]
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("before")
    parser.add_argument("after")
    args = parser.parse_args(argv)
    before, after = pd.read_csv(args.before), pd.read_csv(args.after)
    cells = before.merge(after, on=KEYS, suffixes=("_before", "_after"))
    print(f"{len(before)} cells before, {len(after)} after, {len(cells)} in both")
    for benchmark, group in cells.groupby("benchmark"):
        for metric in METRICS:
            difference = (group[f"{metric}_after"] - group[f"{metric}_before"]).abs().dropna()
            if difference.empty:
                continue
            print(
                f"{benchmark:14s} {metric:30s} {len(difference):4d} cells, "
                f"{int((difference > 1e-9).sum()):3d} moved, at most {100 * difference.max():.3f} "
                "points"
            )
        best = "retrieval.mean_recall" if group["task"].iloc[0] == "retrieval" else "top1"
        for side in ("before", "after"):
            per_n = group.groupby("n")[f"{best}_{side}"].max()
            cells_text = ", ".join(f"n={n}: {100 * v:.2f}" for n, v in per_n.items())
            print(f"{benchmark:14s} best {best} per n, {side}: {cells_text}")


if __name__ == "__main__":
    main()

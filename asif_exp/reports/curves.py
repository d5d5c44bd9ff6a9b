"""Figure 4's curves: which cells each curve follows, for the report's figure and for the W&B
mirror alike. Plain Python (no pandas), so that tracking a run stays light."""

from __future__ import annotations

GRID_KEYS = {"n", "k", "p"}  # ASIF's grid: Figure 4's curves plot a metric against n


def figure4_choice(cells: list[dict], metric: str) -> dict:
    """The cell the curves are drawn through: the best `metric` at the largest n (ties: the
    smaller k, then the smaller p)."""
    largest = max(c["n"] for c in cells)
    return max((c for c in cells if c["n"] == largest), key=lambda c: (c[metric], -c["k"], -c["p"]))


def figure4_series(cells: list[dict], metric: str = "top1") -> list[dict]:
    """Figure 4's curves from a grid's cells ({n, k, p, metric...}): (a) one curve per k at the
    chosen p, (b) one per p at the chosen k. Each: {name, title, fixed, fixed_value, varied,
    values, xs: [[n...]], ys: [[metric...]], keys}.

    Empty when the grid has a single n (nothing to draw against n).
    """
    ns = sorted({c["n"] for c in cells})
    if len(ns) < 2:
        return []
    best = figure4_choice(cells, metric)
    series = []
    for fixed, varied in (("p", "k"), ("k", "p")):
        values = sorted({c[varied] for c in cells if c[fixed] == best[fixed]})
        xs, ys, keys = [], [], []
        for value in values:
            # Cells with k > n were skipped: each line has its own xs.
            line = sorted(
                (c["n"], c[metric]) for c in cells if c[fixed] == best[fixed] and c[varied] == value
            )
            xs.append([n for n, _ in line])
            ys.append([y for _, y in line])
            keys.append(f"{varied}={value:g}")
        series.append(
            {
                "name": f"fig4_{varied}_curves",
                "title": f"{metric} vs n, curves over {varied} ({fixed}={best[fixed]:g})",
                "fixed": fixed,
                "fixed_value": best[fixed],
                "varied": varied,
                "values": values,
                "xs": xs,
                "ys": ys,
                "keys": keys,
            }
        )
    return series

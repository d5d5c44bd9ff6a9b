"""Reports built from results.json files (the source of truth): one loader, one module per
artifact.

    cells = load_cells(["outputs/sweeps/table1_mini"])      # one row per (job, n, k, p)
    table = build_table1(cells)                              # ours beside the paper's numbers
    write_table1(table, "experiments/table1/mini")           # .md, .tex, .csv
    figure4(cells, "experiments/fig4/mini")                  # .png, .pdf per setup

- `loading`: every results file under some folders, read once; ASIF's grid cells (`load_cells`)
  and every method's cells (`load_method_cells`) as tables;
- `table1`: Table 1, ours beside the paper's published numbers
  (`experiments/table1/paper_table1.json`);
- `fig4`: Figure 4, a metric against n, curves over k and p;
- `curves`: which cells Figure 4's curves follow (shared with the W&B mirror, no pandas);
- `comparison`: the baselines against ASIF, best setting per method and n;
- `labels`: display names and markdown tables.

A "setup" is everything but the grid: encoders, anchors, benchmark (and subset), ASIF options.
"""

from asif_exp.reports.comparison import (
    METHOD_ORDER,
    best_per_method,
    comparison_markdown,
    comparison_plots,
)
from asif_exp.reports.curves import figure4_series
from asif_exp.reports.fig4 import FIGURE4_METRICS, figure4
from asif_exp.reports.labels import markdown_table
from asif_exp.reports.loading import SETUP, find_results, load_cells, load_method_cells
from asif_exp.reports.table1 import (
    PaperRow,
    Table1,
    build_table1,
    paper_numbers,
    paper_rows,
    paper_table1,
    select_cells,
    write_table1,
)

__all__ = [
    "FIGURE4_METRICS",
    "METHOD_ORDER",
    "SETUP",
    "PaperRow",
    "Table1",
    "best_per_method",
    "build_table1",
    "comparison_markdown",
    "comparison_plots",
    "figure4",
    "figure4_series",
    "find_results",
    "load_cells",
    "load_method_cells",
    "markdown_table",
    "paper_numbers",
    "paper_rows",
    "paper_table1",
    "select_cells",
    "write_table1",
]

"""Build the baselines comparison from results.json files: one table (markdown and CSV: the best
setting per method and n, every metric of it) and one plot per task (the primary metric against
n, one line per method).

python experiments/baselines/build.py outputs/sweeps/baselines --out experiments/baselines/flickr8k
"""

from __future__ import annotations

import argparse
from pathlib import Path

from asif_exp.reports import (
    best_per_method,
    comparison_markdown,
    comparison_plots,
    load_method_cells,
)
from asif_exp.results import write_atomic


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "results", nargs="+", help="folders searched for results.json (recursively)"
    )
    parser.add_argument(
        "--out", required=True, help="output stem: <out>.md, <out>.csv, <out>_*.png"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    best = best_per_method(load_method_cells(args.results))
    markdown = "## Baselines on the same anchors\n\n" + comparison_markdown(best)
    write_atomic(out.with_suffix(".md"), lambda staging: staging.write_text(markdown))
    columns = [c for c in best.columns if c not in ("path", "mtime")]
    write_atomic(
        out.with_suffix(".csv"), lambda staging: best[columns].to_csv(staging, index=False)
    )
    written = [out.with_suffix(".md"), out.with_suffix(".csv")]
    written += comparison_plots(best, out.parent, out.name)
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

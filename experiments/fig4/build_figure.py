"""Build Figure 4 (PNG and PDF, one per setup with several n) from results.json files.

python experiments/fig4/build_figure.py outputs/sweeps/fig4_mini --out experiments/fig4/mini
python experiments/fig4/build_figure.py outputs/sweeps/fig4_flickr8k \
    --out experiments/fig4/flickr8k --metric default \
    --metric retrieval.image_to_text.R@1 --metric retrieval.text_to_image.R@10
"""

from __future__ import annotations

import argparse
from pathlib import Path

from asif_exp.reports import figure4, load_cells


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "results", nargs="+", help="folders searched for results.json (recursively)"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", default=None, help="only this benchmark split (all, val, test)")
    parser.add_argument(
        "--metric",
        action="append",
        help="a cell metric to plot (repeatable); 'default' (the default): each task's own "
        "(top-1; retrieval.mean_recall)",
    )
    parser.add_argument("--csv", help="also write every cell (one row each) to this CSV file")
    args = parser.parse_args()
    cells = load_cells(args.results)
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        cells.drop(columns=["path", "mtime"]).to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    for metric in args.metric or ["default"]:
        chosen = None if metric == "default" else metric
        for path in figure4(cells, args.out, split=args.split, metric=chosen):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()

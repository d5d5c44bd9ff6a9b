"""Build Figure 4 (PNG and PDF, one per setup with several n) from results.json files.

python experiments/fig4/build_figure.py outputs/sweeps/fig4_mini --out experiments/fig4/mini
"""

from __future__ import annotations

import argparse

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
    args = parser.parse_args()
    for path in figure4(load_cells(args.results), args.out, split=args.split):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Build Table 1 (markdown, LaTeX, CSV) from results.json files under the given folders.

    python experiments/table1/build_table.py outputs/sweeps/table1_mini \
        --out experiments/table1/mini
    python experiments/table1/build_table.py outputs/sweeps/table1_paper --k 800 --p 8 \
        --out experiments/table1/paper
    python experiments/table1/build_table.py --paper-only --out experiments/table1/paper_reference
"""

from __future__ import annotations

import argparse

from asif_exp.reports import build_table1, load_cells, markdown_table, paper_table1, write_table1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "results", nargs="*", help="folders searched for results.json (recursively)"
    )
    parser.add_argument(
        "--paper-only", action="store_true", help="the paper's own rows, no results of ours"
    )
    parser.add_argument("--out", required=True, help="output path without suffix, e.g. .../table1")
    parser.add_argument("--n", type=int, default=None, help="report this n (default: largest)")
    parser.add_argument("--k", type=int, default=None, help="report this k (default: tuned on val)")
    parser.add_argument(
        "--p", type=float, default=None, help="report this p (default: tuned on val)"
    )
    parser.add_argument("--title", default="Table 1")
    args = parser.parse_args()
    if args.paper_only == bool(args.results):
        parser.error("give results folders, or --paper-only without them")
    if args.paper_only:
        table = paper_table1()
    else:
        table = build_table1(load_cells(args.results), n=args.n, k=args.k, p=args.p)
    for path in write_table1(table, args.out, args.title):
        print(f"wrote {path}")
    print(markdown_table(table.wide))


if __name__ == "__main__":
    main()

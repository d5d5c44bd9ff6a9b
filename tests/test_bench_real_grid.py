"""A tiny run of experiments/bench/bench_real_grid.py on synthetic embeddings (no timing
assertions: the script prints times; the test checks it runs and reports every part)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "bench_real_grid.py"


def test_bench_real_grid_runs_and_reports_each_part(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_real_grid", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--synthetic", "--queries", "60", "--anchors", "500", "--ns", "200,500"]
    args += ["--ks", "5,20,300", "--ps", "1,2", "--device", "cpu", "--json", str(tmp_path / "r")]
    numbers = bench.main(args)
    assert numbers["cells"] == 10  # k=300 > n=200 is skipped
    assert numbers["queries"] == 60 and numbers["anchors"] == 500
    assert all(numbers[key] > 0 for key in ("topk_s", "scoring_s", "similarity_products_s"))
    assert numbers["best_top1"] > 0.2  # the synthetic classes are learnable (chance 0.1)
    printed = capsys.readouterr().out
    assert "synthetic embeddings (--synthetic)" in printed and "x the products" in printed
    assert (tmp_path / "r").exists()

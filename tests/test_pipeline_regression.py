"""The pipeline gives the same cells as the code these results were recorded with.

tests/data/pre_refactor_cells.json holds, per case, the config overrides and every cell's
metrics as the pre-refactor `asif_exp.run.run` computed them. They were produced by running that
commit in a throwaway worktree (`git worktree add /tmp/old cc9b6d4`), with PYTHONPATH=/tmp/old,
`run(compose_config(overrides + ["progress=false", "paths.cache_dir=..."], out_dir))` for each
case, and dumping `{n, k, p, top1, top5, mean_per_class_recall, no_overlap_fraction,
per_class_accuracy}` of every row of `cells`. The cases cover both scoring paths (class means,
clean options; best prompt, the authors' options) on the embedded default and on a coco_mini
-> CIFAR-10 slice.

tests/data/regression_cells.json holds the cases added before the engine became a package
(issue 21): retrieval (a drawn-shapes pairs file against the embedded anchors, and a Flickr8k
test slice against Flickr8k anchors) and two baselines (ridge, CCA with a skipped cell) on the
embedded default. Each case lists its method, task, overrides and every cell of results.json
(`params` and `metrics`) as commit 886e8fe computed them, recorded with that commit checked out
by `PYTHONPATH=. python tests/test_pipeline_regression.py` (it rewrites the file; `{pairs}` in
an override is the drawn-shapes pairs file, made by `shapes_pairs_file`). One cell was updated
since: in `embedded_shapes_retrieval` at (n 150, k 20, p 4), image->text R@1 0.50 -> 0.55 (one
of 20 images, a near-tie) and the mean recall with it. 886e8fe recorded it with the compiled
scoring loop rounding each term as multiply-then-add, while the CPU's own MKL product (this
machine's AVX-512 kernel) fuses the terms its vectors leave over; the loop now rounds as MKL
does (`scoring.mkl_fused_tail`), so both paths give the new value, bit for bit.
"""

import json
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import SHARED_DATA, TINY, compose_config, require_shared_data, shapes_pairs_file

from asif_exp.pipeline import run
from asif_exp.results import read_results

DATA = Path(__file__).parent / "data"
EXPECTED = json.loads((DATA / "pre_refactor_cells.json").read_text())
RECORDED = DATA / "regression_cells.json"

# The embedded default at a size that encodes in seconds (conftest.TINY without k, p, progress).
EMBEDDED = [o for o in TINY if not o.startswith(("asif.", "progress="))]
PAIRS_BENCHMARK = [
    "benchmark=flickr8k",
    "benchmark.path={pairs}",
    "benchmark.image_root=null",
    "benchmark.splits=null",
]
CASES = {
    "embedded_shapes_retrieval": [
        *EMBEDDED,
        *PAIRS_BENCHMARK,
        "task=retrieval",
        "asif.n=[50,150]",
        "asif.k=[5,20]",
        "asif.p=[1,4]",
    ],
    "embedded_shapes_retrieval_authors": [
        *EMBEDDED,
        *PAIRS_BENCHMARK,
        "task=retrieval",
        "asif=authors",
        "asif.n=[50,150]",
        "asif.k=[5,20]",
        "asif.p=[1,4]",
    ],
    "embedded_ridge": [*EMBEDDED, "method=ridge", "asif.n=[50,150]", "method.alpha=[0.1,10]"],
    "embedded_cca": [
        *EMBEDDED,
        "method=cca",
        "asif.n=[50,150]",
        "method.r=[8,100]",  # r = 100 > n - 1 at n = 50: a skipped cell
        "method.regularization=[0.3,1]",
    ],
    "flickr8k_retrieval": [
        "task=retrieval",
        "anchors=flickr8k",
        "anchors.limit=300",
        "benchmark=flickr8k",
        "benchmark.limit=40",  # the first 8 test images, 5 captions each
        "asif.n=[150,300]",
        "asif.k=[10,50]",
        "asif.p=[1,4]",
    ],
}
NEEDS_SHARED_DATA = {"flickr8k_retrieval"}


def run_case(name: str, out_dir: Path, cache_dir: Path):
    """Run one case of `CASES`; returns its results record as read back from disk."""
    pairs = shapes_pairs_file(out_dir / "pairs")
    overrides = [o.replace("{pairs}", str(pairs)) for o in CASES[name]]
    extra = ["progress=false", f"paths.cache_dir={cache_dir}"]
    if name in NEEDS_SHARED_DATA:
        extra.append(f"paths.data_root={SHARED_DATA}")
    run(compose_config([*overrides, *extra], out_dir / "run"))
    return read_results(out_dir / "run" / "results.json")


def check_case(name, tmp_path, cache_dir):
    case = EXPECTED["cases"][name]
    overrides = [*case["overrides"], "progress=false", f"paths.cache_dir={cache_dir}"]
    results = run(compose_config(overrides, tmp_path))
    record = read_results(tmp_path / "results.json")
    assert (record.method, record.task) == ("asif", "classification")
    got = {(c.params["n"], c.params["k"], c.params["p"]): c.metrics for c in record.cells}
    assert len(got) == len(case["cells"]) == len(results["cells"])
    for expected in case["cells"]:
        metrics = got[(expected["n"], expected["k"], expected["p"])]
        for key, value in expected.items():
            if key not in ("n", "k", "p"):
                assert metrics[key] == pytest.approx(value, rel=1e-9, nan_ok=True), (name, key)


@pytest.mark.parametrize("name", ["embedded_clean", "embedded_authors"])
def test_embedded_default_metrics_unchanged(name, tmp_path, tiny_cache_dir):
    check_case(name, tmp_path, tiny_cache_dir)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["coco_cifar10_clean", "coco_cifar10_authors"])
def test_coco_mini_cifar10_metrics_unchanged(name, tmp_path, tiny_cache_dir):
    require_shared_data("coco_mini", "captions.jsonl")
    require_shared_data("cifar10_test")
    check_case(name, tmp_path, tiny_cache_dir)


def check_recorded(name, tmp_path, cache_dir):
    expected = json.loads(RECORDED.read_text())["cases"][name]
    assert expected["overrides"] == CASES[name]  # the case recorded is the case run
    record = run_case(name, tmp_path, cache_dir)
    assert (record.method, record.task) == (expected["method"], expected["task"])
    assert [c.params for c in record.cells] == [c["params"] for c in expected["cells"]]
    for cell, want in zip(record.cells, expected["cells"], strict=True):
        assert cell.metrics.keys() == want["metrics"].keys(), (name, cell.params)
        for key, value in want["metrics"].items():
            got = cell.metrics[key]
            assert got == pytest.approx(value, rel=1e-9, nan_ok=True), (name, cell.params, key)


@pytest.mark.parametrize(
    "name",
    [
        "embedded_shapes_retrieval",
        "embedded_shapes_retrieval_authors",
        "embedded_ridge",
        "embedded_cca",
    ],
)
def test_embedded_retrieval_and_baseline_cells_unchanged(name, tmp_path, tiny_cache_dir):
    check_recorded(name, tmp_path, tiny_cache_dir)


@pytest.mark.slow
def test_flickr8k_retrieval_cells_unchanged(tmp_path, tiny_cache_dir):
    require_shared_data("flickr8k", "captions.jsonl")
    check_recorded("flickr8k_retrieval", tmp_path, tiny_cache_dir)


def record_all() -> None:
    """Rewrite tests/data/regression_cells.json with the cells the checked-out code computes."""
    cases = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in CASES:
            if name in NEEDS_SHARED_DATA and not SHARED_DATA.exists():
                sys.exit(f"{SHARED_DATA} not found: cannot record {name}")
            record = run_case(name, Path(folder) / name, Path(folder) / "cache")
            cells = [{"params": c.params, "metrics": c.metrics} for c in record.cells]
            cases[name] = dict(
                method=record.method, task=record.task, overrides=CASES[name], cells=cells
            )
            print(name, len(cells), "cells")
    payload = {"source": "commit 886e8fe, by record_all() in this file", "cases": cases}
    RECORDED.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    record_all()

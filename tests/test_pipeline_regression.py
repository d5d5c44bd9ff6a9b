"""The pipeline gives the same metrics as the code before methods and tasks (commit cc9b6d4).

tests/data/pre_refactor_cells.json holds, per case, the config overrides and every cell's
metrics as the pre-refactor `asif_exp.run.run` computed them. They were produced by running that
commit in a throwaway worktree (`git worktree add /tmp/old cc9b6d4`), with PYTHONPATH=/tmp/old,
`run(compose_config(overrides + ["progress=false", "paths.cache_dir=..."], out_dir))` for each
case, and dumping `{n, k, p, top1, top5, mean_per_class_recall, no_overlap_fraction,
per_class_accuracy}` of every row of `cells`. The cases cover both scoring paths (class means,
clean options; best prompt, the authors' options) on the embedded default and on a coco_mini
-> CIFAR-10 slice.
"""

import json
from pathlib import Path

import pytest
from conftest import compose_config, require_shared_data

from asif_exp.pipeline import run
from asif_exp.results import read_results

EXPECTED = json.loads((Path(__file__).parent / "data" / "pre_refactor_cells.json").read_text())


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

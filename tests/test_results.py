"""The results record: JSON round trip, version 1 files still load, unknown ones fail clearly."""

import json

import pytest

from asif_exp.errors import ResultsFormatError
from asif_exp.results import CellResult, DataSummary, RunResults, read_results


def record() -> RunResults:
    cells = [
        CellResult({"n": n, "alpha": a}, {"recall@1": n / 100 + a, "per_query": [1.0]})
        for n in (10, 20)
        for a in (0.1, 1.0)
    ]
    return RunResults(
        method="ridge",
        task="retrieval",
        options={"fit": "lstsq"},
        anchors=DataSummary("pairs", 30, 20, [{"id": "x"}]),
        benchmark=DataSummary("flickr", 5, 5, [], {"captions": 25}),
        encoders={"vision": {"model_name": "v"}, "text": {"model_name": "t"}},
        cells=cells,
        headline=cells[-1],
        primary_metric="recall@1",
        notes={"skipped": []},
    )


def test_round_trip_with_other_params_and_metrics(tmp_path):
    original = record()
    original.write(tmp_path / "results.json")
    raw = json.loads((tmp_path / "results.json").read_text())
    assert raw["schema_version"] == 2 and raw["recall@1"] == original.headline.metrics["recall@1"]
    assert raw["cells"][0] == {"n": 10, "alpha": 0.1, "recall@1": 0.2, "per_query": [1.0]}
    assert read_results(tmp_path / "results.json") == original
    assert original.scalar_metrics() == ["recall@1"]


def test_version_1_loads_as_asif_classification(tmp_path):
    row = {"n": 5, "k": 2, "p": 1.0, "top1": 0.5, "top5": 1.0, "per_class_accuracy": [0.5]}
    v1 = {
        "format_version": 1,
        "options": {"preset": "clean"},
        "anchors": {"name": "a", "pairs": 5, "pairs_used": 5, "skipped_images": []},
        "benchmark": {"name": "b", "images": 2, "images_used": 2, "class_names": ["x"]},
        "encoders": {},
        "cells": [row],
        "skipped_cells_k_gt_n": [[5, 8]],
        **row,
    }
    (tmp_path / "results.json").write_text(json.dumps(v1))
    loaded = read_results(tmp_path / "results.json")
    assert (loaded.method, loaded.task, loaded.primary_metric) == ("asif", "classification", "top1")
    assert loaded.cells[0].params == {"n": 5, "k": 2, "p": 1.0}
    assert loaded.benchmark.details["class_names"] == ["x"]
    assert loaded.notes == {"skipped_cells": [{"n": 5, "k": 8, "reason": "k > n"}]}


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"schema_version": 7}', "schema version 7.*rerun"),
        ('{"schema_version": 2, "cells": []}', "not a results record.*rerun"),
        ("{half", "not valid JSON.*rerun"),
    ],
)
def test_unreadable_files_are_one_line_errors(tmp_path, content, message):
    (tmp_path / "results.json").write_text(content)
    with pytest.raises(ResultsFormatError, match=message) as error:
        read_results(tmp_path / "results.json")
    assert "\n" not in str(error.value) and "results.json" in str(error.value)

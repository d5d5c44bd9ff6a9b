"""A tiny run of experiments/bench/bench_encoding.py on real images: every variant runs, and the
pipeline's embeddings agree with the re-implemented path of before. No timing assertions."""

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import SHARED_DATA, require_shared_data

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "bench_encoding.py"


@pytest.mark.slow
def test_bench_encoding_runs_and_agrees_with_todays_path(tmp_path, monkeypatch):
    require_shared_data("cifar10_test")
    require_shared_data("flickr8k", "captions.jsonl")
    monkeypatch.setenv("ASIF_DATA_ROOT", str(SHARED_DATA))
    spec = importlib.util.spec_from_file_location("bench_encoding", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "encoding.json"
    tiny = ["--cifar", "10", "--flickr", "3", "--captions", "12", "--repeats", "1"]
    bench.main([*tiny, "--batch-size", "4", "--workers", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    (vision,) = report["vision"]
    assert set(vision["sets"]) == {"CIFAR-10 test", "Flickr8k test"}
    for result in vision["sets"].values():
        one_stream = {"pipeline, one stream"} if vision["streams"] > 1 else set()
        assert set(result["variants"]) == {
            "preprocessing alone", "today's preprocessing alone", "model alone",
            "model alone, one stream",
            "model alone, glibc defaults", "today's model alone", "pipeline", "today's path",
            "pipeline, 1 workers", *one_stream,
        }  # fmt: skip
        assert result["min_cosine_to_today"] >= 0.9999
        assert result["speedup_over_today"]["median"] > 0
    assert report["text"]["captions"] == 12

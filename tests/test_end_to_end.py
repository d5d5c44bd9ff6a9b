"""One real run of the embedded default: real encoders, real engine, results.json on disk."""

import json

import pytest
from conftest import TINY, compose_config
from PIL import Image

from asif_exp.pipeline import run, summary_table

# Chance is 1/5 (five shapes); measured 0.95+ at this size. A broken pipeline lands near 0.2.
ABOVE_CHANCE = 0.5


def test_embedded_default_end_to_end(tmp_path, tiny_cache_dir):
    cfg = compose_config([*TINY, f"paths.cache_dir={tiny_cache_dir}"], tmp_path / "run1")
    results = run(cfg)
    on_disk = json.loads((tmp_path / "run1" / "results.json").read_text())
    assert on_disk["top1"] == results["top1"] > ABOVE_CHANCE
    for key in (
        "top1",
        "top5",
        "per_class_accuracy",
        "n",
        "k",
        "p",
        "timings",
        "options",
        "config",
    ):
        assert key in on_disk, key
    assert (on_disk["n"], on_disk["k"], on_disk["p"]) == (150, 20, 2.0)
    assert len(on_disk["per_class_accuracy"]) == 5
    assert on_disk["options"]["preset"] == "clean" and on_disk["options"]["clamp_negative"] is True
    assert on_disk["config"]["paths"]["output_dir"] == str(tmp_path / "run1")  # resolved
    assert "synthetic_shapes" in summary_table(results)

    # A second run is served from the cache and gives the same numbers.
    again = run(compose_config([*TINY, f"paths.cache_dir={tiny_cache_dir}"], tmp_path / "run2"))
    assert all(again["embeddings_from_cache"].values())
    assert again["top1"] == results["top1"]


def test_grid_in_one_job_and_n_slices_the_cache(tmp_path, tiny_cache_dir):
    cfg = compose_config(
        [
            *TINY,
            f"paths.cache_dir={tiny_cache_dir}",
            "asif.n=[50,150]",
            "asif.k=[5,20]",
            "asif.p=[1,4]",
        ],
        tmp_path,
    )
    results = run(cfg)
    assert len(results["cells"]) == 8
    assert all(results["embeddings_from_cache"].values())  # n slices cached anchors
    assert {(c["n"], c["k"], c["p"]) for c in results["cells"]} == {
        (n, k, p) for n in (50, 150) for k in (5, 20) for p in (1.0, 4.0)
    }


def test_k_larger_than_n_fails_before_encoding(tmp_path):
    cfg = compose_config(
        [*TINY, "asif.n=10", "asif.k=20", f"paths.cache_dir={tmp_path}/c"], tmp_path
    )
    with pytest.raises(ValueError, match=r"asif.k=20 exceeds every n in \[10\]"):
        run(cfg)
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "c").exists()


def test_unreadable_images_skip_and_report_or_raise(tmp_path, tiny_cache_dir):
    images = tmp_path / "data" / "img"
    images.mkdir(parents=True)
    rows = []
    for i in range(12):
        Image.new("RGB", (32, 32), (20 * i, 100, 30)).save(images / f"{i}.png")
        rows.append(f'{{"image": "img/{i}.png", "caption": "a shade number {i}"}}')
    (images / "5.png").write_bytes(b"this is not a png")
    (tmp_path / "data" / "pairs.jsonl").write_text("\n".join(rows))
    overrides = [
        *TINY,
        "anchors=pairs_file",
        "anchors.path=pairs.jsonl",
        f"paths.data_root={tmp_path}/data",
        f"paths.cache_dir={tiny_cache_dir}",
        "asif.k=3",
    ]
    results = run(compose_config(overrides, tmp_path / "skip"))
    assert results["anchors"]["pairs_used"] == 11
    assert [f["id"] for f in results["anchors"]["skipped_images"]] == ["img/5.png"]
    with pytest.raises(ValueError, match="unreadable image 'img/5.png'"):
        run(
            compose_config(
                [*overrides, "data.on_bad_image=raise", "cache=false"], tmp_path / "raise"
            )
        )
    assert not (tmp_path / "raise" / "results.json").exists()


def test_skip_existing_reruns_a_job_whose_results_are_unreadable(tmp_path, tiny_cache_dir):
    overrides = [*TINY, f"paths.cache_dir={tiny_cache_dir}", "skip_existing=true"]
    (tmp_path / "results.json").write_text('{"top1": 0.5, "cells": [')  # a hand-damaged file
    results = run(compose_config(overrides, tmp_path))
    assert json.loads((tmp_path / "results.json").read_text())["top1"] == results["top1"]
    assert run(compose_config(overrides, tmp_path)) == json.loads(
        (tmp_path / "results.json").read_text()
    )

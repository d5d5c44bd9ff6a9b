"""The W&B mirror of results.json, offline into tmp_path: metrics, tables, Figure 4 line plots,
group and tags; the run is finished even when the job fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

import asif_exp.config  # noqa: F401  (registers the config schemas)
from asif_exp.reports.curves import figure4_series
from asif_exp.tracking import open_tracker, run_tags

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def _tiny_data(tmp_path: Path) -> None:
    colours = ["red", "blue", "red", "blue", "red", "blue"]
    with (tmp_path / "pairs.jsonl").open("w") as handle:
        for i, colour in enumerate(colours):
            Image.new("RGB", (40, 40), colour).save(tmp_path / f"{i}.png")
            handle.write(json.dumps({"image": f"{i}.png", "caption": f"a {colour} square"}) + "\n")
    for colour in ("red", "blue"):
        (tmp_path / "bench" / colour).mkdir(parents=True)
        Image.new("RGB", (40, 40), colour).save(tmp_path / "bench" / colour / "0.png")


def _offline_run(output_dir: Path) -> tuple[Path, bytes]:
    [run_dir] = (output_dir / "wandb").glob("offline-run-*")
    [record] = run_dir.glob("run-*.wandb")
    return run_dir, record.read_bytes()


def test_a_job_mirrors_its_results_to_wandb(tmp_path, monkeypatch):
    import wandb

    from asif_exp.tracking import WandbTracker

    # wandb 0.31 has no reader for offline run files (and strings in them can be split across
    # blocks), so the run's group, tags and summary are captured on their way in.
    captured: dict = {}
    real_init, real_log = wandb.init, WandbTracker.log_results

    def init(**kwargs):
        captured.update(kwargs)
        return real_init(**kwargs)

    def log_results(self, results):
        real_log(self, results)
        captured["summary"] = set(self.run.summary.keys())

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(WandbTracker, "log_results", log_results)
    _tiny_data(tmp_path)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "anchors=pairs_file",
                f"anchors.path={tmp_path / 'pairs.jsonl'}",
                "benchmark=image_folder",
                f"benchmark.root={tmp_path / 'bench'}",
                f"paths.cache_dir={tmp_path / 'cache'}",
                f"paths.output_dir={tmp_path / 'out'}",
                "encoder.vision.resize_size=64",
                "encoder.vision.crop_size=64",
                "asif.n=[3,6]",
                "asif.k=[1,2]",
                "asif.p=[1,2]",
                "logger=wandb",
                "+sweep_name=wandb_test",
                "progress=false",
                "device=cpu",
            ],
        )
    from asif_exp.pipeline import run

    results = run(cfg)
    run_dir, _ = _offline_run(tmp_path / "out")
    tables = sorted(p.name for p in (run_dir / "files" / "media" / "table").glob("*.table.json"))
    assert [t.split("_")[0] for t in tables] == ["fig4", "fig4", "results"]
    assert tables[0].startswith("fig4_k_curves") and tables[1].startswith("fig4_p_curves")
    [results_table] = (run_dir / "files" / "media" / "table").glob("results_*.table.json")
    logged = json.loads(results_table.read_text())
    assert len(logged["data"]) == len(results["cells"]) == 8
    assert logged["columns"][:4] == ["anchors", "benchmark", "vision", "text"]
    assert captured["group"] == "wandb_test"
    assert {"pairs_file", "image_folder", "tf_efficientnet_lite0"} <= set(captured["tags"])
    assert {"best_top1", "anchor_pairs_used", "top1"} <= captured["summary"]


def test_the_run_is_finished_when_the_job_fails(tmp_path):
    import wandb

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        logger = compose("config", overrides=["logger=wandb"]).logger
    with pytest.raises(RuntimeError, match="boom"):
        with open_tracker(logger, {"sweep_name": "s"}, tmp_path, "failing-job"):
            raise RuntimeError("boom")
    assert wandb.run is None
    _offline_run(tmp_path)  # the run was written


def test_figure4_series_per_k_and_per_p():
    cells = [
        {"n": n, "k": k, "p": p, "top1": n / 1000 + (k == 50) * 0.1 + (p == 2) * 0.05}
        for n in (100, 200)
        for k in (10, 50, 150)
        for p in (1, 2)
        if k <= n
    ]
    by_k, by_p = figure4_series(cells)
    assert by_k["keys"] == ["k=10", "k=50", "k=150"] and "p=2" in by_k["title"]
    assert by_k["xs"] == [[100, 200], [100, 200], [200]]  # k=150 > n=100 was not computed
    assert by_p["keys"] == ["p=1", "p=2"] and "k=50" in by_p["title"]
    assert figure4_series([c for c in cells if c["n"] == 200]) == []  # a single n: no curves


def test_tags_name_the_sweep_and_the_split():
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["logger=wandb", "+sweep_name=grid"])
    tags = run_tags(cfg.logger, {"sweep_name": "grid", "benchmark": {"authors_split": "val"}})
    assert tags[:3] == ["asif", "synthetic_shapes", "tf_efficientnet_lite0"]  # duplicates dropped
    assert "grid" in tags and "val" in tags and cfg.logger.group == "grid"

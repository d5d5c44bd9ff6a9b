"""Fault injection (issue 13): each way a run could go silently wrong, crash on a damaged file or
bury a user's mistake under a traceback, tried on purpose.

Faults covered elsewhere, which must keep working (not repeated here):
- truncated, bit-flipped, unparsable and meta-less cache entries are recomputed:
  tests/test_cache.py::test_damaged_entries_are_detected_and_recomputed, and through a whole
  job tests/test_robustness.py::test_truncated_cache_entry_is_detected_and_recomputed;
- a sweep killed halfway resumes with skip_existing, redoing only unfinished jobs:
  tests/test_robustness.py::test_sweep_killed_halfway_resumes_with_skip_existing;
- a failing job still finishes its W&B run: tests/test_wandb.py::test_the_run_is_finished_...;
- a chunked extraction killed halfway resumes: tests/test_extract.py.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_ROOT, subprocess_env
from fakes import CONF_DIR, FAKE, config, write_pairs
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

import asif_exp.embeddings
import asif_exp.explain
import asif_exp.methods.asif.method
from asif_exp.cli import one_line, run_cli, user_errors_in_one_line
from asif_exp.embeddings import EmbeddingCache
from asif_exp.memory import AsifModel, ModelFormatError, load_model
from asif_exp.options import ConfigError, check_config
from asif_exp.pipeline import run
from asif_exp.results import RESULTS_FILE, read_results, write_json_atomic
from asif_exp.tasks.classification import classification_metrics

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def engine_calls(monkeypatch) -> list:
    """Counts the jobs that actually score (a skipped job does not)."""
    real, calls = asif_exp.methods.asif.method.score_grid, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(asif_exp.methods.asif.method, "score_grid", counted)
    return calls


# ----------------------------------------------------------------------------- skip_existing


def test_skip_existing_reruns_a_job_left_by_another_config(tmp_path, engine_calls, caplog):
    first = run(config(tmp_path, "asif.k=3", "skip_existing=true"))
    with caplog.at_level(logging.WARNING):
        again = run(config(tmp_path, "asif.k=5", "skip_existing=true"))
    assert (first["k"], again["k"], len(engine_calls)) == (3, 5, 2)
    assert "produced by another config (asif.k: 3 -> 5)" in caplog.text
    assert read_results(tmp_path / "out" / RESULTS_FILE).headline.params["k"] == 5


def test_skip_existing_ignores_keys_that_change_no_number(tmp_path, engine_calls):
    run(config(tmp_path, "skip_existing=true"))
    unchanged = ["skip_existing=true", "progress=true", "sweep_name=resumed", "cache=false"]
    again = run(config(tmp_path, *unchanged))
    assert len(engine_calls) == 1 and again["k"] == 5


@pytest.mark.parametrize(
    "damage",
    [
        b'{"schema_version": 2, "method": "asif\xff"}',  # not UTF-8
        b"[]",  # valid JSON, not a record
        b'{"schema_version": 2}',  # a record's start only
        b"",  # empty
        "truncated",  # half of a real results.json
        "no primary metric",  # a record whose cells lack the task's metric
    ],
)
def test_skip_existing_reruns_a_damaged_results_json(tmp_path, engine_calls, damage, caplog):
    path = tmp_path / "out" / RESULTS_FILE
    run(config(tmp_path))
    whole = path.read_bytes()
    if damage == "truncated":
        damage = whole[: len(whole) // 2]
    elif damage == "no primary metric":
        raw = json.loads(whole)
        raw["cells"] = [{k: v for k, v in c.items() if k != "top1"} for c in raw["cells"]]
        damage = json.dumps(raw).encode()
    path.write_bytes(damage)
    with caplog.at_level(logging.WARNING):
        again = run(config(tmp_path, "skip_existing=true"))
    assert len(engine_calls) == 2 and "running the job again" in caplog.text
    assert read_results(path).rows() == json.loads(path.read_text())["cells"] == again["cells"]


# ----------------------------------------------------------------------------- config values


@pytest.mark.parametrize(
    "override, message",
    [
        ("asif.k=2.7", r"asif.k=2.7: expected an integer"),
        ("asif.k=true", r"asif.k=True: expected an integer"),
        ("asif.k=[5,2.5]", r"asif.k=\[5, 2.5\]: expected an integer"),
        ("asif.k=0", r"asif.k=0: must be at least 1"),
        ("asif.n=[10,1.5]", r"asif.n=\[10, 1.5\]: expected an integer"),
        ("asif.p=inf", r"asif.p=inf: expected a finite number"),
        ("asif.p=nan", r"asif.p=nan: expected a finite number"),
        ("asif.p=-1", r"asif.p=-1: expected a finite positive number"),
        ("asif.memory_budget_mb=inf", r"asif.memory_budget_mb=inf: expected a finite"),
        (
            "data.on_bad_image=rasie",
            r"data.on_bad_image='rasie': expected one of skip, skip_failed_downloads, raise$",
        ),
        ("asif.normalize=images", r"asif.normalize='images': expected one of both, prompt, none"),
        ("asif.template_aggregation=median", r"expected one of mean, max"),
        ("asif.compute_dtype=fp16", r"expected one of auto, float32, bfloat16, float16"),
        ("asif.preset=paper", r"asif.preset='paper': expected one of clean, authors"),
        ("encoder.vision.precision=half", r"encoder.vision.precision='half'"),
        ("anchors.repeated_pairs=dorp", r"expected one of keep, drop, error"),
        ("benchmark.authors_split=train", r"expected one of null, val, test"),
        ("logger.mode=offlin", r"logger.mode='offlin': expected one of online, offline"),
        ("device=cdua", r"device='cdua': expected auto, cpu, mps, cuda or cuda:<index>"),
        ("device=cuda:x", r"device='cuda:x'"),
    ],
)
def test_bad_config_values_are_refused_before_any_work(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message) as refused:
        run(config(tmp_path, override, "logger=wandb"))  # not even a W&B run is started
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("override", ["extract.stage=everything", "device=gpu"])
def test_extract_config_is_checked_too(tmp_path, override):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("extract", [override])
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        check_config(cfg)


def _saved_model(directory: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)
    model = AsifModel(images, texts, list("abcdefgh"), [f"c {i}" for i in range(8)], k=3, p=1.0)
    return model.save(directory)


def test_options_a_saved_model_would_ignore_are_refused(tmp_path):
    model_dir = _saved_model(tmp_path / "model")
    overrides = [f"model_dir={model_dir}", "asif.k=7", "anchors=coco_mini"]
    cfg = config(tmp_path, *overrides, name="explain")
    with pytest.raises(ConfigError, match=r"so asif.k=7 anchors=coco_mini would be ignored"):
        asif_exp.explain.explain_main(cfg, overrides)
    assert not (tmp_path / "out").exists()
    # the same options without model_dir build a model from the anchors: no conflict
    check_config(config(tmp_path, "asif.k=7", name="explain"), ["asif.k=7"])


# ----------------------------------------------------------------------------- the cache

_WRITER = """
import sys, time, torch
from pathlib import Path
from asif_exp.embeddings import EmbeddingCache
root, me, saves = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
(root / f"ready-{me}").touch()
while not (root / "go").exists():
    time.sleep(0.01)
cache = EmbeddingCache(root)
tensors = {"embeddings": torch.arange(4000.0).reshape(200, 20)}
for i in range(saves):
    cache.save({"kind": "stress"}, tensors, {"failures": []})
    assert cache.load({"kind": "stress"}) is not None, i
"""


def test_concurrent_writers_of_one_entry_all_succeed(tmp_path):
    writers, saves = 3, 20
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path), str(i), str(saves)],
            env=subprocess_env(OMP_NUM_THREADS="1"),
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(writers)
    ]
    try:
        while len(list(tmp_path.glob("ready-*"))) < writers:  # all imported: start together
            assert all(p.poll() is None for p in processes), "a writer died on import"
            time.sleep(0.05)
        (tmp_path / "go").touch()
        errors = [p.communicate(timeout=600)[1] for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert [p.returncode for p in processes] == [0] * writers, errors
    cache = EmbeddingCache(tmp_path)
    tensors, extra = cache.load({"kind": "stress"})
    assert torch.equal(tensors["embeddings"], torch.arange(4000.0).reshape(200, 20))
    assert [p.name for p in cache.root.iterdir()] == [cache.path({"kind": "stress"}).name]


def test_a_damaged_entry_met_while_saving_is_replaced(tmp_path):
    cache, identity = EmbeddingCache(tmp_path), {"kind": "x"}
    cache.save(identity, {"embeddings": torch.zeros(2, 3)}, {})
    (cache.path(identity) / "chunk-00000.safetensors").write_bytes(b"damaged")
    cache.save(identity, {"embeddings": torch.ones(2, 3)}, {})
    assert torch.equal(cache.load(identity)[0]["embeddings"], torch.ones(2, 3))


def test_cache_files_are_as_readable_as_the_umask_allows(tmp_path, monkeypatch):
    # a cache shared by a group: group-readable, nothing for others
    monkeypatch.setattr(asif_exp.embeddings, "_UMASK", 0o027)  # (read once, at import)
    previous = os.umask(0o027)
    try:
        cache = EmbeddingCache(tmp_path)
        cache.save({"kind": "x"}, {"embeddings": torch.zeros(2, 3)}, {})
        entry = cache.path({"kind": "x"})
        modes = {p.name: p.stat().st_mode & 0o777 for p in [entry, *entry.iterdir()]}
    finally:
        os.umask(previous)
    assert modes == {
        entry.name: 0o750,
        "chunk-00000.safetensors": 0o640,
        "meta.json": 0o640,
        "verified.json": 0o640,
    }


# ----------------------------------------------------------------------------- one-line errors


def _bad_model(tmp_path: Path) -> Path:
    model_dir = _saved_model(tmp_path / "model")
    meta = json.loads((model_dir / "model.json").read_text())
    (model_dir / "model.json").write_text(json.dumps({**meta, "files": []}))
    return model_dir


def test_model_json_without_files_is_a_model_format_error(tmp_path):
    with pytest.raises(ModelFormatError, match=r'model.json: "files" lacks the size and sha256'):
        load_model(_bad_model(tmp_path))


@pytest.mark.parametrize(
    "entry, overrides, message",
    [
        ("asif_exp", ["asif.k=2.7"], "asif.k=2.7: expected an integer or a list of integers"),
        ("asif_exp", ["asif.kk=3"], "Could not override 'asif.kk': Key 'kk' not in 'AsifConfig'"),
        ("asif_exp.explain", ["model_dir=BAD_MODEL"], 'model.json: "files" lacks'),
        ("asif_exp.extract", ["extract.stage=everything"], "extract.stage='everything'"),
    ],
)
def test_user_errors_are_one_line_on_the_command_line(tmp_path, entry, overrides, message):
    overrides = [o.replace("BAD_MODEL", str(_bad_model(tmp_path))) for o in overrides]
    done = subprocess.run(
        [sys.executable, "-m", entry, *overrides, f"hydra.run.dir={tmp_path / 'out'}"],
        cwd=tmp_path,
        env=subprocess_env(ASIF_CACHE_DIR=str(tmp_path / "cache")),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1
    [line] = done.stderr.splitlines()  # one line: no traceback, no Hydra preamble
    assert line.startswith("error: ") and message in line, line
    assert not (tmp_path / "cache").exists()  # refused before anything was encoded


def test_the_debug_switch_keeps_the_traceback(monkeypatch, capsys):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "")  # run_cli sets it; restored after the test

    def job():
        with user_errors_in_one_line():
            raise ConfigError("asif.k=2.7: expected an integer")

    with pytest.raises(SystemExit) as exited:
        job()
    assert exited.value.code == 1
    assert capsys.readouterr().err.startswith("error: asif.k=2.7: expected an integer")
    monkeypatch.setenv("ASIF_DEBUG", "1")
    with pytest.raises(ConfigError):
        job()

    def bad_composition():
        raise ConfigCompositionException("Could not override 'asif.kk'.")

    with pytest.raises(ConfigCompositionException):
        run_cli(bad_composition)
    monkeypatch.delenv("ASIF_DEBUG")
    with pytest.raises(SystemExit):
        run_cli(bad_composition)
    assert capsys.readouterr().err.startswith("error: Could not override 'asif.kk'")


def test_composition_errors_read_as_one_line(tmp_path):
    with pytest.raises(ConfigCompositionException) as refused:
        config(tmp_path, "benchmark=cifar1O")
    assert one_line(refused.value).startswith(
        "In 'config': Could not find 'benchmark/cifar1O'; Available options in 'benchmark': "
    )
    assert "cifar10, cifar100" in one_line(refused.value)
    assert "search path" not in one_line(refused.value)


def test_a_bug_is_not_a_user_error():
    with pytest.raises(ZeroDivisionError), user_errors_in_one_line():
        1 / 0  # noqa: B018


def test_skipped_images_are_counted_on_the_console(tmp_path, caplog):
    write_pairs(tmp_path / "data" / "pairs", 12, bad={3: b"not an image", 7: b"nor this"})
    with caplog.at_level(logging.WARNING):
        run(config(tmp_path, "anchors=pairs_file", "anchors.path=pairs/pairs.jsonl"))
    assert "anchors pairs_file: skipped 2 unreadable image(s) of 12" in caplog.text
    assert "first: 3.png" in caplog.text


def test_explain_checks_every_query_before_writing(tmp_path):
    cfg = config(tmp_path, "query=[0,100]", "usage=false", name="explain")
    with pytest.raises(ConfigError, match=r"query=100: benchmark synthetic_shapes has images"):
        asif_exp.explain.explain_main(cfg)
    assert not list(tmp_path.glob("out/explain_q*"))


# ----------------------------------------------------------------------------- strict JSON


def test_results_json_is_strict_json(tmp_path):
    with pytest.raises(ValueError, match="a NaN or infinity reached the writer"):
        write_json_atomic(tmp_path / "x.json", {"top1": float("nan")})
    assert not list(tmp_path.iterdir())
    # A class without images has no accuracy: null, not NaN.
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    metrics = classification_metrics(scores, torch.tensor([0, 1, 1]), 3)
    assert metrics["per_class_accuracy"] == [1.0, 0.5, None]
    assert metrics["mean_per_class_recall"] == 0.75


# ----------------------------------------------------------------------------- W&B multirun


def test_wandb_offline_multirun_gives_each_job_its_own_run(tmp_path):
    """A real multirun (subprocess, fake encoders): one finished offline run per job, none
    merged into another."""
    command = [
        sys.executable,
        str(TESTS / "fakes.py"),
        "-m",
        *FAKE,
        "asif.k=3,5",
        "logger=wandb",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    done = subprocess.run(
        command,
        cwd=tmp_path,
        env=subprocess_env(WANDB_MODE="offline", WANDB_SILENT="true"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted((tmp_path / "sweep").glob("[0-9]"))
    assert [read_results(j / RESULTS_FILE).headline.params["k"] for j in jobs] == [3, 5]
    runs = [list((j / "wandb").glob("offline-run-*")) for j in jobs]
    assert [len(r) for r in runs] == [1, 1] and runs[0][0].name != runs[1][0].name
    assert all(list(r[0].glob("run-*.wandb")) for r in runs)
    assert PROJECT_ROOT.exists()

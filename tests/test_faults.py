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

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PROJECT_ROOT, subprocess_env
from fakes import CONF_DIR, FAKE, config, write_pairs
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, OverrideParseException
from PIL import Image
from reference import random_embeddings, reference_for_cell

import asif_exp.embeddings
import asif_exp.explain
import asif_exp.methods.asif.method
from asif_exp.cli import is_user_error, one_line, run_cli, user_errors_in_one_line
from asif_exp.data import ImageFiles, file_hashes, is_blank, to_rgb
from asif_exp.embeddings import EmbeddingCache
from asif_exp.errors import ConfigError, DataError, ModelFormatError
from asif_exp.memory import AsifModel, load_model
from asif_exp.methods.asif import AsifMethod, AsifOptions, relative_representation
from asif_exp.methods.asif.topk import TopK
from asif_exp.methods.base import MethodReport
from asif_exp.options import check_config
from asif_exp.pipeline import run
from asif_exp.problem import EmbeddedProblem, Targets
from asif_exp.results import RESULTS_FILE, read_results, write_json_atomic
from asif_exp.tasks.classification import classification_metrics
from asif_exp.tasks.classification_grid import evaluate_grid

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
        (
            "asif_exp.explain",
            ["task=retrieval", "direction=sideways"],
            "direction=sideways: task=retrieval has image_to_text, text_",
        ),
        ("asif_exp.extract", ["extract.stage=everything"], "extract.stage='everything'"),
    ],
)
def test_user_errors_are_one_line_on_the_command_line(tmp_path, entry, overrides, message):
    if any("BAD_MODEL" in o for o in overrides):
        bad_model = str(_bad_model(tmp_path))
        overrides = [o.replace("BAD_MODEL", bad_model) for o in overrides]
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


# ============================================================================= issue 22
# A test per class of fault: config values, file-system faults, image modes, invisible
# captions, numeric underflow, a grid with no evaluable cell, pairs-file formats, overrides
# Hydra cannot parse, multiruns with failed jobs, the cache's identity and its leftovers.


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=ridge", "+method.alpah=1"], r"method.alpah: not an option of method=ridge"),
        (["+alpah=1"], r"alpah: not an option of the config"),
        (["method=cca", "method.r=0"], r"method.r=0: must be at least 1"),
        (["method=cca", "method.regularization=2"], r"method.regularization=2: expected a num"),
        (["method=ridge", "method.alpha=abc"], r"method.alpha='abc': expected a finite positive"),
        (["method=ridge", "method.template_aggregation=median"], r"expected one of mean, max"),
        (["task=retrieval", "task.recall_at=[0]"], r"task.recall_at=\[0\]: must be at least 1"),
        (["encoder.vision.interpolation=cubic"], r"interpolation='cubic': expected one of"),
        (["encoder.vision.batch_size=0"], r"encoder.vision.batch_size=0: must be at least 1"),
        (["encoder.text.batch_size=-2"], r"encoder.text.batch_size=-2: must be at least 1"),
        (["encoder.text.max_seq_length=0"], r"encoder.text.max_seq_length=0: must be at least"),
        (["encoder.text.max_seq_length=-1"], r"encoder.text.max_seq_length=-1: must be at least"),
        (["encoder.vision.std=[1,0,1]"], r"encoder.vision.std=\[1.0, 0.0, 1.0\]: expected three"),
        (["seed=-1"], r"seed=-1: must be between 0 and 4294967295"),
        (["seed=4294967296"], r"seed=4294967296: must be between 0 and 4294967295"),
        (["benchmark.subset_seed=-5"], r"benchmark.subset_seed=-5: must be between 0 and"),
        (["benchmark.templates=photo2"], r"benchmark.templates='photo2': no built-in templates"),
        (["benchmark.class_names=cifar11"], r"benchmark.class_names='cifar11': no built-in"),
        (["anchors.limit=-3"], r"anchors.limit=-3: must be at least 1 \(or null\)"),
        (["anchors.limit=0"], r"anchors.limit=0: must be at least 1 \(or null\)"),
        (["benchmark.limit=-1"], r"benchmark.limit=-1: must be at least 1"),
        (["benchmark.subset=0"], r"benchmark.subset=0: must be at least 1"),
        (["asif.k=[]"], r"asif.k=\[\]: empty grid"),
        (["asif.n=[10,0]"], r"asif.n=\[10, 0\]: must be at least 1"),
    ],
)
def test_every_config_value_is_checked_before_any_work(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as refused:
        run(config(tmp_path, *overrides, "logger=wandb"))
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_cuda_device_that_is_not_there_is_refused_before_loading_anything(tmp_path):
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=rf"device={device}: this machine has no CUDA"):
            run(config(tmp_path, f"device={device}"))
    assert not (tmp_path / "cache").exists()


def _cli(tmp_path: Path, *arguments: str, entry: str = "asif_exp", **env):
    return subprocess.run(
        [sys.executable, "-m", entry, *arguments] if entry else [sys.executable, *arguments],
        cwd=tmp_path,
        env=subprocess_env(ASIF_CACHE_DIR=str(tmp_path / "cache"), **env),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=ridge", "+method.alpah=1"], "error: method.alpah: not an option of method=ridge"),
        (["method=cca", "method.r=0"], "error: method.r=0: must be at least 1"),
        (["anchors.path=/data/a#b.jsonl"], "quote a value holding #, ="),
        (["anchors.path=/data/x=y.jsonl"], "override 'anchors.path=/data/x=y.jsonl' cannot be"),
        (["hydra.run.dir=RUN_DIR_FILE"], "error: RUN_DIR_FILE: File exists"),
    ],
)
def test_more_user_errors_are_one_line_on_the_command_line(tmp_path, overrides, message):
    run_dir_file = tmp_path / "a_file"
    run_dir_file.write_text("not a folder")
    overrides = [o.replace("RUN_DIR_FILE", str(run_dir_file)) for o in overrides]
    message = message.replace("RUN_DIR_FILE", str(run_dir_file))
    run_dir = (
        []
        if any(o.startswith("hydra.run.dir") for o in overrides)
        else [f"hydra.run.dir={tmp_path / 'out'}"]
    )
    done = _cli(tmp_path, *overrides, *run_dir)
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith("error: ") and message in line, line
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- file system


def test_an_output_folder_that_is_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(ConfigError, match=r"paths.output_dir=.*out: cannot write there: .*a file"):
        run(config(tmp_path))
    assert not (tmp_path / "cache").exists()


def test_a_folder_where_a_file_is_expected_and_the_reverse_name_the_path(tmp_path):
    (tmp_path / "data" / "pairs.jsonl").mkdir(parents=True)
    with pytest.raises(DataError, match=r"pairs.jsonl: a folder; expected a pairs file"):
        run(config(tmp_path, "anchors=pairs_file", "anchors.path=pairs.jsonl"))
    (tmp_path / "data" / "classes").write_text("a file")
    overrides = ["benchmark=image_folder", "benchmark.root=classes", "benchmark.class_names=null"]
    with pytest.raises(DataError, match=r"classes is a file; expected a folder of class folders"):
        run(config(tmp_path, *overrides))


def test_a_full_disk_names_the_results_file(tmp_path, monkeypatch, capsys):
    def full(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError) as refused:
        write_json_atomic(tmp_path / "results.json", {"top1": 0.5})
    expected = f"{tmp_path / 'results.json'}: No space left on device (the disk is full)"
    assert one_line(refused.value) == expected
    assert is_user_error(refused.value)


@pytest.mark.parametrize("fault", ["cache dir is a file", "disk full"])
def test_a_cache_that_cannot_be_written_warns_once_and_the_run_goes_on(
    tmp_path, monkeypatch, caplog, fault
):
    if fault == "cache dir is a file":
        (tmp_path / "cache").write_text("a file")
    else:

        def full(tensors, path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        monkeypatch.setattr(asif_exp.embeddings, "save_tensors", full)
    with caplog.at_level(logging.WARNING):
        results = run(config(tmp_path))
    warnings = [r for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(warnings) == 1, caplog.text  # once, though four entries were computed
    assert results["top1"] == run(config(tmp_path, "cache=false", output="again"))["top1"]
    assert read_results(tmp_path / "out" / RESULTS_FILE).headline.metrics["top1"] > 0


def test_leftovers_of_killed_writers_are_removed_and_a_live_writers_kept(tmp_path):
    cache = EmbeddingCache(tmp_path)
    cache.root.mkdir(parents=True)
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(finished.stdout)  # a process that has exited
    host = socket.gethostname()
    dead = cache.root / f".staging-{'a' * 32}-1234abcd-{dead_pid}@{host}"
    live = cache.root / f".staging-{'b' * 32}-1234abcd-{os.getpid()}@{host}"
    elsewhere = cache.root / f".staging-{'c' * 32}-1234abcd-{dead_pid}@another-host"
    old = cache.root / f".trash-{'d' * 32}-1234abcd"  # an older writer's name, two days old
    for folder in (dead, live, elsewhere, old):
        folder.mkdir()
        (folder / "embeddings.safetensors").write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days_ago, two_days_ago))
    cache.save({"kind": "x"}, {"embeddings": torch.zeros(2, 3)}, {})
    assert sorted(p.name for p in cache.root.iterdir()) == sorted(
        [cache.path({"kind": "x"}).name, live.name, elsewhere.name]
    )


# ----------------------------------------------------------------------------- image modes


def _open(tmp_path: Path, image: Image.Image, name: str) -> Image.Image:
    image.save(tmp_path / name)
    return ImageFiles(tmp_path, [name]).load(0)


def test_a_16_bit_greyscale_png_is_scaled_not_clipped_to_white(tmp_path):
    levels = (np.arange(64 * 64, dtype=np.int64).reshape(64, 64) * 16).astype(np.uint16)
    source = Image.fromarray(levels)
    assert source.mode == "I;16"
    loaded = np.asarray(_open(tmp_path, source, "deep.png"))
    expected = np.round(levels.astype(np.float64) * 255 / 65535).astype(np.uint8)  # plain
    assert loaded.shape == (64, 64, 3) and (loaded == expected[..., None]).all()
    assert 0 < loaded.mean() < 255  # not white


def test_32_bit_integer_pixels_are_read_as_16_bit_and_float_pixels_refused(tmp_path):
    levels = np.array([[0, 257, 65535]], dtype=np.int32)
    assert np.asarray(to_rgb(Image.fromarray(levels, "I")))[0, :, 0].tolist() == [0, 1, 255]
    with pytest.raises(ValueError, match=r"image mode 'I' with values outside 0..65535"):
        to_rgb(Image.fromarray(np.array([[70000]], dtype=np.int32), "I"))
    floats = Image.fromarray(np.array([[0.5, 1.0]], dtype=np.float32), "F")
    with pytest.raises(ValueError, match=r"image mode 'F': 32-bit floating-point pixels"):
        _open(tmp_path, floats, "float.tiff")


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LA", "PA"])
def test_every_other_mode_becomes_rgb(mode):
    colour = Image.new("RGB", (4, 4), (200, 100, 50))
    image = colour.convert("P").convert("PA") if mode == "PA" else colour.convert(mode)
    assert to_rgb(image).mode == "RGB"


# ----------------------------------------------------------------------------- captions


@pytest.mark.parametrize("caption", ["\u200b\u200d", "\ufeff \u2060", "\u3164", " \t\u00a0"])
def test_a_caption_of_invisible_characters_is_refused_like_an_empty_one(tmp_path, caption):
    write_pairs(tmp_path / "data" / "pairs", 4)
    path = tmp_path / "data" / "pairs" / "pairs.jsonl"
    rows = path.read_text().splitlines()
    rows[2] = json.dumps({"image": "2.png", "caption": caption})
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl, line 3: caption of pair 2 .* is empty"):
        run(config(tmp_path, "anchors=pairs_file", "anchors.path=pairs/pairs.jsonl"))
    assert is_blank(caption) and not is_blank("a\u200bcat")


# ----------------------------------------------------------------------------- pairs files


@pytest.mark.parametrize("name", ["pairs.json", "pairs.ndjson", "pairs.txt"])
def test_json_lines_under_another_name_are_read_as_json_lines(tmp_path, name):
    write_pairs(tmp_path / "data" / "pairs", 6)
    (tmp_path / "data" / "pairs" / "pairs.jsonl").rename(tmp_path / "data" / "pairs" / name)
    results = run(config(tmp_path, "anchors=pairs_file", f"anchors.path=pairs/{name}"))
    assert results["anchors"]["pairs_used"] == 6


def test_a_json_array_is_refused_not_read_as_csv(tmp_path):
    write_pairs(tmp_path / "data" / "pairs", 3)
    path = tmp_path / "data" / "pairs" / "pairs.json"
    path.write_text(json.dumps([{"image": "0.png", "caption": "a"}]))
    with pytest.raises(DataError, match=r"pairs.json: a JSON array; pairs files are JSON Lines"):
        run(config(tmp_path, "anchors=pairs_file", "anchors.path=pairs/pairs.json"))


# ----------------------------------------------------------------------------- numbers


def test_a_large_p_does_not_underflow_to_chance():
    """Similarities of random 256-d embeddings are small (about 0.1-0.3): their 100th power is
    0 in float32. Normalised sides are powered relative to each row's largest value: the
    engine then scores as a float64 plain reference does."""
    g = torch.Generator().manual_seed(0)
    problem = random_embeddings(g, 40, 60, 5, 2, 256, 256)
    options = AsifOptions()
    cells, _ = evaluate_grid(
        **problem,
        ns=[60],
        ks=[20],
        ps=[2, 100, 130],
        options=options,
        keep_scores=True,
        progress=False,
    )
    for cell in cells:
        reference = reference_for_cell(problem, cell, options)
        assert torch.allclose(cell.scores, reference, atol=1e-5), cell.p
        assert torch.equal(cell.predictions, reference.argmax(1))
        assert cell.no_overlap_fraction < 0.5


def test_the_power_is_unchanged_where_it_does_not_underflow():
    g = torch.Generator().manual_seed(1)
    values = torch.rand(30, 12, generator=g).sort(dim=1, descending=True).values
    top = TopK(values, torch.arange(12).expand(30, 12), 12)
    for p in (1, 2, 8, 2.5):
        powered = values.pow(int(p) if float(p).is_integer() else p)
        plain = powered / powered.norm(dim=1, keepdim=True)
        assert torch.equal(relative_representation(top, 12, p, True, True).to_dense(), plain)


def test_underflowed_representations_on_a_side_not_normalised_are_flagged(caplog):
    """With normalize=prompt an image's scale matters (text->image retrieval): it is not
    rescaled, but its representations that underflowed are listed in the notes and logged."""
    g = torch.Generator().manual_seed(0)
    problem = random_embeddings(g, 40, 60, 5, 2, 256, 256)
    targets = Targets(
        [str(i) for i in range(10)],
        problem["prompt_embeddings"],
        problem["prompt_class"],
        [str(c) for c in range(5)],
    )
    embedded = EmbeddedProblem(
        problem["anchor_image_embeddings"],
        problem["anchor_text_embeddings"],
        problem["image_embeddings"],
        targets,
        problem["labels"],
    )
    options = AsifOptions(normalize="prompt")
    method = AsifMethod(ks=[20], ps=[2.0, 100.0], options=options, progress=False)
    report = MethodReport()
    with caplog.at_level(logging.WARNING):
        cells = list(method.score(embedded, [60], report))
    [flagged] = report.notes["underflowed_cells"]
    assert (flagged["p"], flagged["side"], flagged["rows"]) == (100.0, "image", 40)
    assert "40 image representation(s) of 40 underflowed" in caplog.text
    assert cells[1].scores.abs().max() < 1e-30  # what the note warns about
    assert "underflowed_cells" not in MethodReport().notes


def test_a_grid_where_no_cell_can_be_fitted_says_why(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"method=cca: no cell of the grid can be evaluated: "
        r"2 skipped \(r=100000 exceeds min\(d_image, d_text, n - 1\)",
    ):
        run(config(tmp_path, "method=cca", "method.r=100000", "method.regularization=[0.1,0.5]"))


# ----------------------------------------------------------------------------- multirun


def test_a_multirun_goes_on_past_a_failed_job_and_lists_it(tmp_path):
    done = _cli(
        tmp_path,
        str(TESTS / "fakes.py"),
        "-m",
        *FAKE,
        "asif.k=3,0,5",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        entry="",
    )
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors[0] == "error: job 1 (asif.k=0): asif.k=0: must be at least 1", errors
    assert errors[1].startswith("error: 1 of 3 jobs failed") and "2 finished" in errors[1]
    assert "Traceback" not in done.stderr
    finished = {p.parent.name for p in (tmp_path / "sweep").glob("*/" + RESULTS_FILE)}
    assert finished == {"0", "2"}


def test_an_override_hydra_cannot_parse_gets_a_hint(capsys):
    def unparsable():
        raise OverrideParseException("anchors.path=/a#b", "token recognition error at: '#'")

    with pytest.raises(SystemExit):
        run_cli(unparsable)
    error = capsys.readouterr().err
    assert error.startswith("error: override 'anchors.path=/a#b' cannot be parsed")
    assert "key='a value'" in error and len(error.splitlines()) == 1


# ----------------------------------------------------------------------------- cache identity


def _two_classes(root: Path) -> None:
    """Two class folders of same-sized images (BMP: the size depends on the dimensions only)."""
    for label, colours in (("red", [(250, 10, 10), (220, 40, 30)]), ("blue", [(10, 20, 240)])):
        (root / label).mkdir(parents=True)
        for i, colour in enumerate(colours * 2):
            Image.new("RGB", (24, 24), colour).save(root / label / f"{i}.bmp")


def _swap(a: Path, b: Path) -> None:
    staging = a.with_name("swap.tmp")
    a.rename(staging)
    b.rename(a)
    staging.rename(b)


def test_swapping_same_sized_images_changes_the_cache_identity(tmp_path):
    root = tmp_path / "data" / "classes"
    _two_classes(root)
    overrides = ["benchmark=image_folder", "benchmark.root=classes", "benchmark.class_names=null"]
    overrides += ["benchmark.templates=photo1"]
    first = run(config(tmp_path, *overrides))
    _swap(root / "red" / "0.bmp", root / "blue" / "0.bmp")
    _swap(root / "red" / "1.bmp", root / "blue" / "1.bmp")
    cached = run(config(tmp_path, *overrides, output="again"))
    fresh = run(config(tmp_path, *overrides, "cache=false", output="fresh"))
    benchmark = f"benchmark {cached['benchmark']['name']}"
    assert first["embeddings_from_cache"][benchmark] is False
    assert cached["embeddings_from_cache"][benchmark] is False  # not the stale entry
    assert cached["cells"] == fresh["cells"]
    assert len({p.stat().st_size for p in root.rglob("*.bmp")}) == 1  # names, sizes: unchanged


def test_the_hash_index_reads_only_new_or_changed_files(tmp_path, monkeypatch):
    monkeypatch.setattr(file_hashes, "RACY_SECONDS", 0)  # the files are seconds old
    read = []
    real = file_hashes.sha256_of_file
    monkeypatch.setattr(file_hashes, "sha256_of_file", lambda p: read.append(p) or real(p))
    file_hashes.remember_in(tmp_path / "cache")
    root = tmp_path / "images"
    _two_classes(root)
    ids = sorted(str(p.relative_to(root)) for p in root.rglob("*.bmp"))
    time.sleep(0.01)
    first = ImageFiles(root, ids).fingerprint
    assert len(read) == len(ids)
    assert ImageFiles(root, ids).fingerprint == first and len(read) == len(ids)  # none read
    changed = root / "red" / "0.bmp"
    Image.new("RGB", (24, 24), (1, 2, 3)).save(changed)  # same size, other bytes
    assert ImageFiles(root, ids).fingerprint != first
    assert read[len(ids) :] == [str(changed)]
    file_hashes.remember_in(None)

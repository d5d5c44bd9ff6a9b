"""A tiny run of experiments/bench/bench_engine.py: the engine and the authors' algorithm agree.

No timing assertions: the benchmark prints times, the test only checks that it runs and that
both implementations predict the same class for every image in every cell.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "bench_engine.py"
TINY = [
    "--scale", "custom", "--device", "cpu", "--queries", "60", "--classes", "5",
    "--templates", "3", "--anchors", "3000", "--dim", "16", "--ns", "1000,2000,3000",
    "--ks", "5,20", "--ps", "1,8", "--k", "20", "--dic-size", "1000",
    "--baseline-grid", "measure",
]  # fmt: skip


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_engine", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_identical(report: dict, cells: int) -> None:
    assert report["grid"]["cells"] == cells
    for part in ("single", "grid"):
        agreement = report[part]["agreement"]
        assert agreement["identical_cells"] == agreement["cells"] > 0, (part, agreement)
        assert agreement["min_fraction"] == 1.0


def test_bench_engine_agrees_with_the_authors_algorithm(tmp_path):
    # Default authors' budget: the image x prompt product is a dense einsum.
    report = load_bench().main([*TINY, "--repeats", "2", "--json", str(tmp_path / "bench.json")])
    assert_identical(report, cells=3 * 2 * 2)
    assert report["single"]["repeats"] == report["grid"]["repeats"] == 2
    assert report["grid"]["baseline_label"] == "measured"
    assert json.loads((tmp_path / "bench.json").read_text())["grid"]["cells"] == 12
    assert report["single"]["engine_top1"] > 0.4  # the synthetic classes are learnable (chance 0.2)
    assert [row["n"] for row in report["scaling"]] == [1000, 2000, 3000]


def test_bench_repeats_default_by_scale_and_must_be_positive(capsys):
    bench = load_bench()
    assert bench.parse_args(["--scale", "cpu"]).repeats == 3  # shared CPUs: fastest of 3
    assert bench.parse_args(TINY).repeats == 1
    with pytest.raises(SystemExit):
        bench.parse_args([*TINY, "--repeats", "0"])
    assert "--repeats 0: must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("baseline_gb", ["0.0001"])
def test_bench_cli_with_the_authors_sparse_branch(tmp_path, baseline_gb):
    # A tiny authors' budget: query rows split, and the product by torch.sparse.mm in 6 chunks.
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "--baseline-gb", baseline_gb, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=subprocess_env(),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "whole grid (12 cells)" in result.stdout
    assert_identical(json.loads(out.read_text()), cells=12)


GPU_CHECK = SCRIPT.parent / "gpu_check.sh"


def test_gpu_check_dry_run_writes_its_summary(tmp_path):
    # The GPU check runs its steps at tiny scale on the CPU, so that the script cannot rot.
    result = subprocess.run(
        ["bash", str(GPU_CHECK), "--dry-run", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**subprocess_env(), "PYTHON": sys.executable},
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["step"] for s in summary["steps"]] == [
        "gpu_tests", "bench_bf16", "bench_float32", "calibration"
    ]  # fmt: skip
    assert all(s["exit_status"] == 0 for s in summary["steps"]), summary["steps"]
    float32 = summary["bench_float32"]
    for part in ("single", "grid"):
        assert float32[part]["agreement"]["min_fraction"] == 1.0
    assert summary["calibration"]["cells"]
    assert "# GPU check" in (tmp_path / "gpu_check.md").read_text()

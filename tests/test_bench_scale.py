"""bench_scale.py at a size that runs in seconds: its lines are printed, its numbers sane."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import PROJECT_ROOT, subprocess_env

SCRIPT = PROJECT_ROOT / "experiments" / "bench" / "bench_scale.py"


def test_bench_scale_runs_small_and_prints_its_verdicts(tmp_path: Path):
    command = [
        sys.executable,
        str(SCRIPT),
        "--anchors=3000",
        "--queries=40",
        "--prompts=200",
        "--chunk-rows=700",  # several chunks: tiles cross chunk borders
        f"--workdir={tmp_path}",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, env=subprocess_env(), timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "anchors: wrote 3,000 pairs in 5 chunks" in out
    assert re.search(r"peak memory / anchor bytes: \d+\.\d\dx", out)
    # k = 800 > n = 400: that cell is skipped, the other 14 are compared
    assert "2 processes vs 1: identical predictions in 14/14 cells" in out, out
    for n in (400, 800, 1600, 3000):
        assert re.search(rf"^\s+2\s+{n:,}\s+\d", out, re.M), out
    # a second run reuses the anchors written by the first
    again = subprocess.run(
        command, capture_output=True, text=True, env=subprocess_env(), timeout=600
    )
    assert again.returncode == 0 and "already in" in again.stdout

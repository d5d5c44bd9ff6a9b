"""A real Hydra multirun in a subprocess: `python -m asif_exp +sweep=k_p_n`."""

import json
import subprocess
import sys

from conftest import PROJECT_ROOT, TINY, subprocess_env


def test_sweep_k_p_n_leaves_one_results_json_per_job(tmp_path, tiny_cache_dir):
    command = [
        sys.executable,
        "-m",
        "asif_exp",
        "+sweep=k_p_n",
        *TINY,
        "asif.n=60,150",
        "asif.k=20,5",
        "asif.p=1,4",
        f"paths.cache_dir={tiny_cache_dir}",
        f"hydra.sweep.dir={tmp_path}",
    ]
    env = subprocess_env(HF_HUB_OFFLINE="1")
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/results.json"))]
    assert len(results) == 8
    cells = {(r["n"], r["k"], r["p"]) for r in results}
    assert cells == {(n, k, p) for n in (60, 150) for k in (20, 5) for p in (1.0, 4.0)}
    assert all(r["config"]["sweep_name"] == "k_p_n" for r in results)
    assert all(r["top1"] > 0.3 for r in results if r["k"] == 20)
    # outputs never depend on the working directory
    assert not (tmp_path / "outputs").exists() and (PROJECT_ROOT / "conf").exists()

"""Gather the outputs of gpu_check.sh into one JSON and one markdown summary.

    python experiments/bench/gpu_summary.py OUT_DIR
reads OUT_DIR/{steps.tsv, bench_bf16.json, bench_float32.json, calibration.json,
encoding.json} (any missing file is reported as missing) and writes OUT_DIR/gpu_check.json
and OUT_DIR/gpu_check.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def steps(out: Path) -> list[dict]:
    """steps.tsv: name, exit status, seconds (one line per step of gpu_check.sh)."""
    rows = []
    if (out / "steps.tsv").exists():
        for line in (out / "steps.tsv").read_text().splitlines():
            name, status, seconds = line.split("\t")
            rows.append({"step": name, "exit_status": int(status), "seconds": float(seconds)})
    return rows


def bench_lines(name: str, bench: dict | None) -> list[str]:
    if bench is None:
        return [f"- {name}: no result (see {name}.log)"]
    single, grid = bench["single"], bench["grid"]
    lines = [f"- {name}: {bench['machine']}, engine dtype {bench['engine_dtype']}"]
    lines.append(
        f"  - single eval n={single['n']} k={single['k']} p={single['p']:g}: engine "
        f"{single['engine_s']:.3f}s (top-k {single['engine_topk_s']:.3f}s, products only "
        f"{single['products_s']:.3f}s), baseline {single.get('baseline_s', float('nan')):.2f}s, "
        f"ratio {single.get('ratio', float('nan')):.1f}x"
    )
    lines.append(
        f"  - whole grid ({grid['cells']} cells): engine {grid['engine_s']:.3f}s (top-k "
        f"{grid['engine_topk_s']:.3f}s + scoring {grid['engine_scoring_s']:.3f}s), peak "
        f"{grid['engine_peak_mb']:.0f} MB"
    )
    for part, label in ((single, "single"), (grid, "grid")):
        if "agreement" in part:
            a = part["agreement"]
            lines.append(
                f"  - agreement with the baseline ({label}): {a['identical_cells']}/{a['cells']} "
                f"cells identical, min fraction {a['min_fraction']:.6f}"
            )
    return lines


def encoding_lines(encoding: dict | None) -> list[str]:
    if encoding is None:
        return ["- no result (see encoding.log; it runs on GPU only)"]
    lines = []
    for vision in encoding["vision"]:
        for set_name, result in vision["sets"].items():
            rates = {name: round(v["per_s_median"], 1) for name, v in result["variants"].items()}
            lines.append(
                f"- {vision['config']}, {set_name}: speed-up over today's path "
                f"{result['speedup_over_today']['median']:.2f}x, pipeline / model alone "
                f"{result['pipeline_over_model']['median']:.2f}x, lowest cosine to today "
                f"{result['min_cosine_to_today']:.6f}; images/s {rates}"
            )
    return lines


def main(out: Path) -> dict:
    summary = {
        "steps": steps(out),
        "bench_bf16": load(out / "bench_bf16.json"),
        "bench_float32": load(out / "bench_float32.json"),
        "calibration": load(out / "calibration.json"),
        "encoding": load(out / "encoding.json"),
    }
    md = ["# GPU check", ""]
    md += ["| step | exit status | seconds |", "| --- | --- | --- |"]
    md += [f"| {s['step']} | {s['exit_status']} | {s['seconds']:.0f} |" for s in summary["steps"]]
    md += ["", "## Benchmark (engine against the faithful authors' baseline)", ""]
    md += bench_lines("bench_bf16", summary["bench_bf16"])
    md += bench_lines("bench_float32", summary["bench_float32"])
    md += ["", "## Scoring cost model", ""]
    calibration = summary["calibration"]
    if calibration is None:
        md.append("- no result (see calibration.log)")
    else:
        md.append(
            f"- {calibration['device']}, {calibration['dtype']}: the constants in use pick the "
            f"faster path in {calibration['right_choices']} of {calibration['judged_cells']} "
            "cells"
        )
        for name, value in calibration["suggested"].items():
            md.append(f"- {name}: in use {calibration['current'][name]}, measured median {value}")
        for cell in calibration["cells"]:
            md.append(
                f"  - n={cell['n']} k={cell['k']}: per p dense {cell['dense_s']}, sparse "
                f"{cell['sparse_s']}; engine takes {'dense' if cell['engine_dense'] else 'sparse'}"
            )
    md += ["", "## Encoding (bench_encoding.py)", ""]
    md += encoding_lines(summary["encoding"])
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "gpu_check.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return summary


if __name__ == "__main__":
    main(Path(sys.argv[1]))

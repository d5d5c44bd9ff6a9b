"""Experiment trackers. results.json is the source of truth; W&B is a mirror of it.

A W&B run gets: the resolved config; one logged step per cell (its parameters and metrics);
the headline numbers in its summary; every cell as a `wandb.Table` ("results"); and, for an
ASIF grid with several n, Figure 4's curves as line plots (the task's primary metric against n,
one line per k at the best p, and one per p at the best k). Runs of a sweep share a group
(`logger.group`, default `sweep_name`) and carry tags naming the encoders, anchors and
benchmark. Everything works with WANDB_MODE=offline.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from asif_exp.results import RunResults

log = logging.getLogger(__name__)


class NullTracker:
    def log_results(self, results: RunResults) -> None:
        pass


class WandbTracker:
    def __init__(self, run):
        self.run = run

    def log_results(self, results: RunResults) -> None:
        import wandb

        rows = results.rows()
        columns = [*results.headline.params, *results.scalar_metrics()]
        table = wandb.Table(columns=["anchors", "benchmark", "vision", "text", *columns])
        setup = [
            results.anchors.name,
            results.benchmark.name,
            results.encoders["vision"]["model_name"],
            results.encoders["text"]["model_name"],
        ]
        for step, row in enumerate(rows):  # one W&B point per grid cell
            self.run.log({c: row.get(c) for c in columns}, step=step)
            table.add_data(*setup, *[row.get(c) for c in columns])
        extra = {"results": table}
        # (imported here: only a W&B run draws curves)
        from asif_exp.reports.curves import GRID_KEYS, figure4_series

        if GRID_KEYS <= set(rows[0]):  # ASIF's (n, k, p) grid
            for curve in figure4_series(rows, results.primary_metric):
                extra[curve["name"]] = wandb.plot.line_series(
                    xs=curve["xs"],
                    ys=curve["ys"],
                    keys=curve["keys"],
                    title=curve["title"],
                    xname="n",
                )
        self.run.log(extra, step=len(rows))
        headline = results.headline.row()
        for key in columns:
            self.run.summary[key] = headline[key]
        self.run.summary["anchor_pairs_used"] = results.anchors.used
        self.run.summary["anchor_images_skipped"] = len(results.anchors.skipped_images)
        self.run.summary["benchmark_images_used"] = results.benchmark.used
        primary = results.primary_metric
        self.run.summary[f"best_{primary}"] = max(row[primary] for row in rows)


def run_tags(logger_cfg, resolved_config: dict) -> list[str]:
    """The configured tags plus the sweep and the benchmark split, when set."""
    tags = list(logger_cfg.tags or [])
    tags.append(resolved_config.get("sweep_name"))
    tags.append((resolved_config.get("benchmark") or {}).get("authors_split"))
    # W&B rejects empty tags and tags over 64 characters.
    return list(dict.fromkeys(str(t)[:64] for t in tags if t not in (None, "")))


@contextlib.contextmanager
def open_tracker(logger_cfg, resolved_config: dict, output_dir: Path, job_name: str):
    """Yields a tracker; a W&B run is always finished, with a failure code on error."""
    if logger_cfg.name == "none":
        yield NullTracker()
        return
    if logger_cfg.name != "wandb":
        raise ValueError(f"logger.name={logger_cfg.name!r}: expected 'none' or 'wandb'")
    import wandb

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=logger_cfg.project,
        entity=logger_cfg.entity,
        mode=logger_cfg.mode,
        group=logger_cfg.group,
        tags=run_tags(logger_cfg, resolved_config),
        name=job_name,
        config=resolved_config,
        dir=str(output_dir),
        reinit="finish_previous",
    )
    exit_code = 1
    try:
        yield WandbTracker(run)
        exit_code = 0
    finally:
        run.finish(exit_code=exit_code)

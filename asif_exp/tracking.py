"""Experiment trackers. results.json is the source of truth; W&B is a mirror of it."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class NullTracker:
    def log_results(self, results: dict) -> None:
        pass


class WandbTracker:
    def __init__(self, run):
        self.run = run

    def log_results(self, results: dict) -> None:
        import wandb

        columns = ["n", "k", "p", "top1", "top5", "mean_per_class_recall", "no_overlap_fraction"]
        table = wandb.Table(columns=columns)
        for step, cell in enumerate(results["cells"]):  # one W&B point per grid cell
            self.run.log({c: cell[c] for c in columns}, step=step)
            table.add_data(*[cell[c] for c in columns])
        self.run.log({"results": table})
        for key in ("top1", "top5", "mean_per_class_recall", "n", "k", "p"):
            if key in results:
                self.run.summary[key] = results[key]


@contextlib.contextmanager
def open_tracker(logger_cfg, resolved_config: dict, output_dir: Path, job_name: str):
    """Yields a tracker; a W&B run is always finished, with a failure code on error."""
    if logger_cfg.name == "none":
        yield NullTracker()
        return
    if logger_cfg.name != "wandb":
        raise ValueError(f"logger.name={logger_cfg.name!r}: expected 'none' or 'wandb'")
    import wandb

    run = wandb.init(
        project=logger_cfg.project,
        entity=logger_cfg.entity,
        mode=logger_cfg.mode,
        group=logger_cfg.group,
        tags=list(logger_cfg.tags),
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

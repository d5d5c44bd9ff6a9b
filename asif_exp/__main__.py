"""`python -m asif_exp`: compose the config with Hydra and run one job (under `torchrun`, one
rank of a sharded job: see asif_exp/distributed.py)."""

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from asif_exp import config as _config  # noqa: F401  (registers the schemas)
from asif_exp.cli import run_cli, user_errors_in_one_line
from asif_exp.pipeline import run_job, summary_table

log = logging.getLogger("asif_exp")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    with user_errors_in_one_line():
        results = run_job(cfg)
    if results is None:  # a rank > 0 of a sharded run: rank 0 reports
        return None
    log.info("\n%s\nresults: %s/results.json", summary_table(results), cfg.paths.output_dir)
    return results.headline.metrics[results.primary_metric]  # the objective, for sweepers


def quiet_other_ranks() -> None:
    """A rank > 0 of torchrun writes no Hydra files (config copies, log file) that could clash
    with rank 0's in a shared output directory: it logs to the console only."""
    if int(os.environ.get("RANK", "0")) > 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


if __name__ == "__main__":
    quiet_other_ranks()
    run_cli(main)

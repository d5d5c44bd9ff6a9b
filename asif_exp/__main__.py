"""`python -m asif_exp`: compose the config with Hydra and run one job."""

import logging

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


if __name__ == "__main__":
    run_cli(main)

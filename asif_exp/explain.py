"""`python -m asif_exp.explain task=retrieval anchors=flickr8k benchmark=flickr8k 'query=[0,7]'`:
look inside an ASIF model (explain, edit, abstain, anchor usage) from a run's cached embeddings.
The job is `asif_exp.memory.job.explain_main`; its config is conf/explain.yaml (the run's config
with the `ExplainRunConfig` schema of asif_exp/config.py)."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from asif_exp import config as _config  # noqa: F401  (registers the schemas)
from asif_exp.cli import run_cli, user_errors_in_one_line
from asif_exp.memory.job import explain_main

__all__ = ["explain_main", "main"]


@hydra.main(version_base="1.3", config_path="../conf", config_name="explain")
def main(cfg: DictConfig) -> None:
    with user_errors_in_one_line():
        explain_main(cfg, list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    run_cli(main)

"""What a task is: a score matrix (images x targets) and the ground truth -> a metrics dict.

A task module `asif_exp/tasks/<name>.py` defines `build(cfg) -> Task`; the config file
`conf/task/<name>.yaml` holds `name: <name>` and the task's options.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor

from asif_exp.options import build_component
from asif_exp.problem import EmbeddedProblem


class Task(Protocol):
    name: str
    primary_metric: str  # the sweep objective; cells are listed best-first by it
    # What the images are scored against: "class_prompts" (a labelled benchmark's classes) or
    # "captions" (a benchmark of image-caption pairs); `pipeline.embed_problem` builds them.
    targets: str

    def metrics(self, scores: Tensor, problem: EmbeddedProblem) -> dict[str, Any]:
        """Metrics of one cell's scores against `problem.truth` (plain floats and lists)."""


def load_task(cfg) -> Task:
    """The task named by `cfg.task.name`, built from the config."""
    return build_component("tasks", "task", cfg)

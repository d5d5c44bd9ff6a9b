"""What a task is: a score matrix (images x targets) and the ground truth -> a metrics dict.

A task module `asif_exp/tasks/<name>.py` defines `build(cfg) -> Task`; the config file
`conf/task/<name>.yaml` holds `name: <name>` and the task's options.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from torch import Tensor

from asif_exp.problem import EmbeddedProblem


class Task(Protocol):
    name: str
    primary_metric: str  # the sweep objective; cells are listed best-first by it

    def metrics(self, scores: Tensor, problem: EmbeddedProblem) -> dict[str, Any]:
        """Metrics of one cell's scores against `problem.truth` (plain floats and lists)."""


def load_task(cfg) -> Task:
    name = cfg.task.name
    try:
        module = importlib.import_module(f"asif_exp.tasks.{name}")
    except ModuleNotFoundError:
        raise ValueError(
            f"task={name!r}: no module asif_exp/tasks/{name}.py (see conf/task/)"
        ) from None
    return module.build(cfg)

"""What a task is: a score matrix (images x targets) and the ground truth -> a metrics dict.

A task module `asif_exp/tasks/<name>.py` defines `build(cfg) -> Task`; the config file
`conf/task/<name>.yaml` holds `name: <name>` and the task's options.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from asif_exp.options import build_component
from asif_exp.problem import EmbeddedProblem


@dataclass
class QueryDirection:
    """One way a task asks its score matrix: the queries are its rows (images) or its columns
    (targets), the other side their candidates. What `asif_exp.explain` needs to know of a task
    to explain, abstain and count hits, whatever the task."""

    name: str  # image_to_class, image_to_text, text_to_image
    query_kind: str  # "image" or "text"
    candidate_kind: str  # "class", "text" or "image"
    by_column: bool  # the queries are the score matrix's columns
    right: Tensor  # (queries x candidates) bool: each query's right candidates
    hit_metric: str  # the task's metric that is the mean of `hits`
    # True: a wrong candidate scoring as high as the best right one is a miss (retrieval);
    # False: ties go to the lower candidate index, as argmax breaks them (classification).
    ties_count_against: bool

    def view(self, scores: Tensor) -> Tensor:
        """(queries x candidates) scores."""
        return scores.T if self.by_column else scores

    def hits(self, scores: Tensor) -> Tensor:
        """(queries,) bool: the query's top-1 candidate is right, as the task counts it."""
        view = self.view(scores)
        right = self.right.to(view.device)
        if not self.ties_count_against:
            return right.gather(1, view.argmax(dim=1, keepdim=True)).flatten()
        best_right = view.masked_fill(~right, -torch.inf).amax(dim=1, keepdim=True)
        return ~((view >= best_right) & ~right).any(dim=1)


class Task(Protocol):
    name: str
    primary_metric: str  # the sweep objective; cells are listed best-first by it
    # What the images are scored against: "class_prompts" (a labelled benchmark's classes) or
    # "captions" (a benchmark of image-caption pairs); `pipeline.embed_problem` builds them.
    targets: str
    direction_names: tuple[str, ...]  # of `directions`, in order (known before any data)

    def metrics(self, scores: Tensor, problem: EmbeddedProblem) -> dict[str, Any]:
        """Metrics of one cell's scores against `problem.truth` (plain floats and lists)."""

    def directions(self, problem: EmbeddedProblem) -> list[QueryDirection]:
        """The ways this task queries the score matrix, the default first."""


def load_task(cfg) -> Task:
    """The task named by `cfg.task.name`, built from the config."""
    return build_component("tasks", "task", cfg)

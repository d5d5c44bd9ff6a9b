"""What a method is: given the embedded problem and the anchor prefixes, a score matrix per cell.

A method module `asif_exp/methods/<name>.py` (or package, as `asif/`) defines
`build(cfg) -> Method`; the config file `conf/method/<name>.yaml` holds `name: <name>` and the
method's own options. That is all it takes to add one (the pipeline finds the module by the
name).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from asif_exp.options import build_component
from asif_exp.problem import EmbeddedProblem


@dataclass
class ScoredCell:
    """One cell of a method's grid: its parameters and its (images x targets) scores."""

    params: dict[str, Any]  # e.g. {"n": 200, "k": 50, "p": 2.0} or {"n": 200, "alpha": 1.0}
    scores: Tensor  # dense float32; targets are groups (classes) when the texts are grouped


@dataclass
class MethodReport:
    """What a method tells about its run besides scores; all of it goes into results.json.

    `skipped`: the cells of the grid that were not scored, each its parameters (n as the anchor
    rows used, as in a scored cell) and `reason`, the same shape for every method (the pipeline
    writes them as `notes.skipped_cells`, n relabelled as the listed n asked for).
    """

    timings: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)  # e.g. {"n": 50, "k": 80, "reason": ...}


class Method(Protocol):
    name: str

    def record(self) -> dict:
        """Every option that changes a number (recorded in results.json)."""

    def hyperparameters(self) -> dict[str, list]:
        """The method's own axes of the grid, besides n, with their values (e.g. {"k": [200],
        "p": [2.0]}, {"alpha": [0.1, 1.0]}): they name the job."""

    def check(self, ns: list[int]) -> None:
        """Fail, before anything is encoded, on a grid this method cannot run."""

    def score(
        self, problem: EmbeddedProblem, ns: list[int], report: MethodReport
    ) -> Iterator[ScoredCell]:
        """Every cell of the grid: `ns` anchor prefixes (the first n pairs) times the method's
        own hyper-parameters."""


def load_method(cfg) -> Method:
    """The method named by `cfg.method.name`, built from the config."""
    return build_component("methods", "method", cfg)


def max_over_groups(scores: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """(images x groups): each group's best text."""
    images, texts = scores.shape
    per_group = texts // num_groups
    layout = torch.arange(num_groups, device=groups.device).repeat_interleave(per_group)
    if per_group * num_groups == texts and torch.equal(groups, layout):
        # Texts grouped contiguously, as many per group: a max pooling instead of a scatter
        # (about 3x faster than `amax` over a (images, groups, per_group) view).
        pooled = torch.nn.functional.max_pool1d(scores[:, None], per_group, per_group)
        return pooled.view(images, num_groups)
    out = scores.new_full((images, num_groups), -torch.inf)
    return out.scatter_reduce(1, groups.expand(images, -1), scores, reduce="amax")

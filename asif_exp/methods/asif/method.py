"""ASIF as a method of the pipeline (`AsifMethod`, `build`), the top-k memo kept between the jobs
of a multirun, and one (n, k, p) model's scores kept whole for `asif_exp.memory`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from asif_exp.methods.asif.grid import score_grid
from asif_exp.methods.asif.layouts import transpose_csr
from asif_exp.methods.asif.options import AsifOptions, asif_options, check_grid, function_of
from asif_exp.methods.asif.scoring import (
    image_representations,
    prompt_representations_t,
    score_targets,
)
from asif_exp.methods.asif.topk import TopK
from asif_exp.methods.base import MethodReport, ScoredCell
from asif_exp.options import anchor_prefixes, int_values, positive_values
from asif_exp.problem import EmbeddedProblem

log = logging.getLogger(__name__)

K_EXCEEDS_N = "k > n"  # why a cell of the grid is skipped: it cannot keep more anchors than n

# Top-k passes kept between the jobs of an in-process multirun over k, p and n; only the
# latest set of embeddings is kept, to bound memory.
_TOPK_MEMO: dict[tuple, dict] = {}


def topk_memo_for(embedding_keys: tuple) -> dict:
    if embedding_keys not in _TOPK_MEMO:
        _TOPK_MEMO.clear()
        _TOPK_MEMO[embedding_keys] = {}
    return _TOPK_MEMO[embedding_keys]


@dataclass
class AsifMethod:
    """ASIF over the grid anchor prefixes x `asif.k` x `asif.p`, in one top-k pass."""

    ks: list[int]
    ps: list[float]
    options: AsifOptions
    preset: str = "clean"
    progress: bool = True
    name: str = "asif"

    def record(self) -> dict:
        return {
            **self.options.to_dict(),
            "preset": self.preset,
            "function": function_of(self.options),
        }

    def hyperparameters(self) -> dict[str, list]:
        return {"k": self.ks, "p": self.ps}

    def check(self, ns: list[int]) -> None:
        check_grid(ns, self.ks, self.ps, max(ns), self.options.clamp_negative)

    def score(
        self, problem: EmbeddedProblem, ns: list[int], report: MethodReport
    ) -> Iterator[ScoredCell]:
        grid: dict = {}
        memo = topk_memo_for(problem.cache_keys)
        for params, scores in score_grid(
            problem, ns, self.ks, self.ps, self.options, grid, self.progress, memo
        ):
            yield ScoredCell(params, scores)
        report.skipped += [{"n": n, "k": k, "reason": K_EXCEEDS_N} for n, k in grid.pop("skipped")]
        report.timings.update(grid)


def build(cfg) -> AsifMethod:
    options = asif_options(cfg)
    function = function_of(options)
    if function != cfg.asif.preset and cfg.asif.preset != "custom":
        log.warning(
            "asif.preset=%s, but the options compute the %r function; results record both",
            cfg.asif.preset,
            function,
        )
    return AsifMethod(
        ks=int_values("asif.k", cfg.asif.k),
        ps=positive_values("asif.p", cfg.asif.p),
        options=options,
        preset=cfg.asif.preset,
        progress=cfg.progress,
    )


def grid_values(cfg, n_available: int) -> tuple[list[int], list[int], list[float]]:
    """asif.n, asif.k and asif.p as typed lists, checked against the anchors available."""
    ns = anchor_prefixes(cfg.asif.n, n_available)
    method = build(cfg)
    method.check(ns)
    return ns, method.ks, method.ps


@dataclass
class ModelScores:
    """One scoring pass of a single (n, k, p) model, kept whole for explanations and usage."""

    image_rr: Tensor  # sparse CSR (queries x n)
    targets: Tensor  # sparse CSR (targets x n): class means ("mean") or prompts ("max")
    target_class: Tensor  # (targets,) class of each target row
    target_scores: Tensor  # (queries x targets)
    scores: Tensor  # (queries x classes)

    def best_target(self, classes: Tensor) -> Tensor:
        """For each query, the best-scoring target row of `classes[query]` (lowest on ties)."""
        in_class = self.target_class[None, :] == classes[:, None]
        return self.target_scores.masked_fill(~in_class, -torch.inf).argmax(dim=1)


def model_scores(
    image_top: TopK,
    prompt_top: TopK,
    k: int,
    p: float,
    groups: Tensor,
    num_groups: int,
    options: AsifOptions,
) -> ModelScores:
    """The scoring core applied to one model's top-k snapshots; results on the CPU."""
    image_rr = image_representations(image_top, k, p, options)
    prompt_t = prompt_representations_t(prompt_top, k, p, options)
    targets_t, target_scores, scores = score_targets(
        image_rr, prompt_t, groups.long().to(image_rr.device), num_groups, options
    )
    if options.template_aggregation == "mean":
        target_class = torch.arange(num_groups)
    else:  # "max": a class scores as its best prompt
        target_class = groups.long().cpu()
    return ModelScores(
        image_rr.cpu(),
        transpose_csr(targets_t).cpu(),
        target_class,
        target_scores.cpu(),
        scores.cpu(),
    )

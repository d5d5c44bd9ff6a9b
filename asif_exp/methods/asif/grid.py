"""The (n, k, p) grid: one top-k pass per side, then every valid cell's scores (`score_grid`)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from asif_exp.methods.asif.layouts import (
    class_averaging_t,
    row_layout,
    transposed_layout,
    use_dense,
)
from asif_exp.methods.asif.options import AsifOptions, check_grid
from asif_exp.methods.asif.scoring import cell_scores
from asif_exp.methods.asif.topk import memoized_topk
from asif_exp.problem import EmbeddedProblem
from asif_exp.tensors import check_embeddings


def target_groups(problem: EmbeddedProblem) -> Tensor:
    """The group (score column) of each target text: its class, or itself when ungrouped."""
    groups = problem.targets.groups
    return torch.arange(len(problem.targets.texts)) if groups is None else groups


def check_problem(problem: EmbeddedProblem) -> None:
    """The embeddings a grid scores: anchor pairs that match, finite non-empty matrices, one
    group per target text, at least one group."""
    anchor_images, anchor_texts = problem.anchor_images, problem.anchor_texts
    if anchor_images.shape[0] != anchor_texts.shape[0]:
        raise ValueError(
            f"anchor pairs mismatch: {anchor_images.shape[0]} image embeddings but "
            f"{anchor_texts.shape[0]} text embeddings"
        )
    for name, tensor in [
        ("image embeddings", problem.images),
        ("anchor image embeddings", anchor_images),
        ("prompt embeddings", problem.targets.embeddings),
        ("anchor text embeddings", anchor_texts),
    ]:
        check_embeddings(name, tensor)
    if len(target_groups(problem)) != problem.targets.embeddings.shape[0]:
        raise ValueError("labels / prompt_class must have one entry per image / prompt")
    if problem.targets.count < 1:
        raise ValueError("the class list is empty")


def score_grid(
    problem: EmbeddedProblem,
    ns: Iterable[int],
    ks: Iterable[int],
    ps: Iterable[float],
    options: AsifOptions = AsifOptions(),
    report: dict | None = None,
    progress: bool = True,
    topk_memo: dict | None = None,
) -> Iterator[tuple[dict, Tensor]]:
    """({"n", "k", "p"}, dense (images x groups) scores) for every valid cell of the grid,
    from one top-k pass per side: the problem's images against its targets' groups (classes, or
    each text its own). Scores stay on the compute device.

    Cells with k > n are skipped (listed in `report["skipped"]`); `report` also receives the
    timings. `topk_memo`, a dict the caller keeps between calls on the same embeddings (the
    jobs of a multirun), lets later calls reuse top-k passes instead of redoing them.
    """
    report = {} if report is None else report
    ns, ks, ps = sorted(set(ns)), sorted(set(ks)), sorted(set(ps))
    check_problem(problem)
    check_grid(ns, ks, ps, problem.anchor_images.shape[0], options.clamp_negative)
    device = options.resolved_device()
    prompt_class = target_groups(problem).long().to(device)
    num_classes = problem.targets.count
    mean = options.template_aggregation == "mean"
    # Built before the top-k pass so that a class without prompts fails fast.
    averaging_t = class_averaging_t(prompt_class, num_classes) if mean else None

    report["skipped"] = [[n, k] for n in ns for k in ks if k > n]
    k_max = max(k for k in ks if k <= ns[-1])
    start = time.perf_counter()
    image_top = memoized_topk(
        topk_memo, "image", problem.images, problem.anchor_images, ns, k_max, options, progress
    )
    prompts, anchor_texts = problem.targets.embeddings, problem.anchor_texts
    prompt_top = memoized_topk(
        topk_memo, "prompt", prompts, anchor_texts, ns, k_max, options, progress
    )
    _synchronize(device)
    report["topk_s"] = time.perf_counter() - start

    scoring_s = 0.0
    images, prompts = problem.images.shape[0], len(prompt_class)
    valid = [(n, k) for n in ns for k in ks if k <= n]
    bar = tqdm(
        total=len(valid) * len(ps),
        desc="grid cells",
        disable=not progress or len(valid) * len(ps) == 1,
    )
    prompt_by_anchor, image_by_id = {}, {}
    for n, k in valid:
        start = time.perf_counter()
        # The sparsity patterns depend on (n, k) only: built once, reused for every p; the
        # sorts behind them once per n, for every k.
        if n not in prompt_by_anchor:
            prompt_by_anchor = {n: prompt_top[n].indices.reshape(-1).argsort(stable=True)}
            image_by_id = {n: image_top[n].indices.sort(dim=1)}
        image_layout = row_layout(image_top[n], k, image_by_id[n])
        prompt_layout = transposed_layout(prompt_top[n], k, prompt_by_anchor[n])
        targets = num_classes if mean else prompts
        k_target = k * prompts / num_classes if mean else k  # a class holds its prompts' anchors
        dense = use_dense(images, targets, n, k, min(k_target, n), options.budget_elements, device)
        cell = cell_scores(
            image_layout, prompt_layout, ps, prompt_class, num_classes, options, dense, averaging_t
        )
        for p, scores in cell:
            scoring_s += time.perf_counter() - start
            yield {"n": n, "k": k, "p": p}, scores
            start = time.perf_counter()
            bar.update()
    bar.close()
    report["scoring_s"] = scoring_s


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

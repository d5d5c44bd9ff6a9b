"""Zero-shot classification over a whole ASIF grid in one call, for benchmarks and tests: the
engine's `score_grid` followed by the classification metrics of every cell (the pipeline takes
the same two steps through its method and task)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor

from asif_exp.methods.asif import AsifOptions, GridInputs, score_grid
from asif_exp.tasks.classification import classification_metrics


@dataclass
class ClassifiedCell:
    """One cell of a classified grid: its (n, k, p), metrics and predictions."""

    n: int
    k: int
    p: float
    top1: float
    top5: float
    mean_per_class_recall: float
    per_class_accuracy: list[float | None]  # None: a class without images
    no_overlap_fraction: float  # queries that share no anchor with any prompt (scores all 0)
    predictions: Tensor  # (queries,) predicted class
    scores: Tensor | None = None  # (queries, classes), kept only when asked for


def evaluate_grid(
    image_embeddings: Tensor,
    anchor_image_embeddings: Tensor,
    prompt_embeddings: Tensor,
    anchor_text_embeddings: Tensor,
    labels: Tensor,
    prompt_class: Tensor,
    num_classes: int,
    ns: Iterable[int],
    ks: Iterable[int],
    ps: Iterable[float],
    options: AsifOptions = AsifOptions(),
    keep_scores: bool = False,
    progress: bool = True,
    topk_memo: dict | None = None,
) -> tuple[list[ClassifiedCell], dict]:
    """Zero-shot classification accuracy for every valid (n, k, p): `score_grid` plus the
    classification metrics, in one call (for benchmarks and tests). Returns (cells, timings),
    the skipped cells under timings["skipped"]."""
    inputs = GridInputs(
        image_embeddings,
        anchor_image_embeddings,
        prompt_embeddings,
        anchor_text_embeddings,
        prompt_class,
        num_classes,
    )
    if len(labels) != image_embeddings.shape[0]:
        raise ValueError("labels / prompt_class must have one entry per image / prompt")
    labels = labels.long().to(options.resolved_device())
    timings: dict = {}
    cells = []
    for params, scores in score_grid(inputs, ns, ks, ps, options, timings, progress, topk_memo):
        metrics = classification_metrics(scores, labels, num_classes)
        cells.append(
            ClassifiedCell(**params, scores=scores.cpu() if keep_scores else None, **metrics)
        )
    return cells, timings

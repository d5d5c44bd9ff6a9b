"""Zero-shot classification over a whole ASIF grid in one call, for benchmarks and tests: the
engine's `score_grid` followed by the classification metrics of every cell (the pipeline takes
the same two steps through its method and task)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor

from asif_exp.methods.asif import AsifOptions, score_grid
from asif_exp.problem import EmbeddedProblem, Targets
from asif_exp.tasks.classification import classification_metrics


def classification_problem(
    images: Tensor,
    anchor_images: Tensor,
    prompts: Tensor,
    anchor_texts: Tensor,
    prompt_class: Tensor,
    num_classes: int,
    labels: Tensor | None = None,
) -> EmbeddedProblem:
    """A zero-shot classification problem from bare embeddings (benchmarks and tests): prompts
    grouped by class, texts and class names numbered."""
    targets = Targets(
        [f"prompt {i}" for i in range(prompts.shape[0])],
        prompts,
        prompt_class,
        [f"class {c}" for c in range(num_classes)],
    )
    return EmbeddedProblem(anchor_images, anchor_texts, images, targets, labels)


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
    problem = classification_problem(
        image_embeddings,
        anchor_image_embeddings,
        prompt_embeddings,
        anchor_text_embeddings,
        prompt_class,
        num_classes,
        labels,
    )
    if len(labels) != image_embeddings.shape[0]:
        raise ValueError("labels / prompt_class must have one entry per image / prompt")
    labels = labels.long().to(options.resolved_device())
    timings: dict = {}
    cells = []
    for params, scores in score_grid(problem, ns, ks, ps, options, timings, progress, topk_memo):
        metrics = classification_metrics(scores, labels, num_classes)
        cells.append(
            ClassifiedCell(**params, scores=scores.cpu() if keep_scores else None, **metrics)
        )
    return cells, timings

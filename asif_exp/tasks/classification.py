"""Zero-shot classification: top-1, top-5, mean per-class recall, per-class accuracy, and the
fraction of images that share no anchor with any class (all scores 0: ASIF cannot tell)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from asif_exp.problem import EmbeddedProblem
from asif_exp.tasks.base import QueryDirection


def accuracy_metrics(scores: Tensor, labels: Tensor, num_classes: int) -> dict:
    """top-1, top-5, per-class accuracy; argmax ties go to the lower class index."""
    labels = labels.to(scores.device)
    predictions = scores.argmax(dim=1)
    correct = predictions == labels
    top5_k = min(5, num_classes)
    # Rank of the true class: classes scoring strictly higher, plus ties at lower index.
    true_scores = scores.gather(1, labels[:, None])
    fifth = scores.topk(top5_k, dim=1).values[:, -1:]
    in_top5 = true_scores > fifth
    # Only where the true class ties with the fifth score does the rank need counting.
    tied = (true_scores == fifth).flatten().nonzero().flatten()
    if tied.numel():
        rows, true_tied = scores[tied], true_scores[tied]
        higher = (rows > true_tied).sum(1)
        classes = torch.arange(num_classes, device=scores.device)
        tied_before = ((rows == true_tied) & (classes < labels[tied, None])).sum(1)
        in_top5[tied] = ((higher + tied_before) < top5_k)[:, None]
    in_top5 = in_top5.flatten()
    counts = torch.bincount(labels, minlength=num_classes).double()
    hits = torch.bincount(labels, weights=correct.double(), minlength=num_classes)
    # None (null in results.json) for a class without images: it has no accuracy
    per_class = [None if math.isnan(a) else a for a in (hits / counts).tolist()]
    present = [a for a in per_class if a is not None]
    return {
        "predictions": predictions,
        "top1": float(correct.float().mean()),
        "top5": float(in_top5.float().mean()),
        "per_class_accuracy": per_class,
        "mean_per_class_recall": sum(present) / len(present),
    }


def no_overlap(scores: Tensor) -> Tensor:
    """Queries whose scores are all zero: they share no anchor with any target."""
    return (scores == 0).all(dim=1)


def classification_metrics(scores: Tensor, labels: Tensor, num_classes: int) -> dict:
    """The metrics of one cell, predictions included (on the CPU)."""
    metrics = accuracy_metrics(scores, labels, num_classes)
    metrics["predictions"] = metrics["predictions"].cpu()
    metrics["no_overlap_fraction"] = float(no_overlap(scores).float().mean())
    return metrics


@dataclass
class Classification:
    name: str = "classification"
    primary_metric: str = "top1"
    targets: str = "class_prompts"
    direction_names: tuple[str, ...] = ("image_to_class",)

    def metrics(self, scores: Tensor, problem: EmbeddedProblem) -> dict:
        names = problem.targets.group_names
        if not names:
            raise ValueError("classification needs class names (grouped prompts); got none")
        if len(problem.truth) != scores.shape[0]:
            raise ValueError(f"{len(problem.truth)} labels for {scores.shape[0]} scored images")
        metrics = classification_metrics(scores, problem.truth, len(names))
        return {
            "top1": metrics["top1"],
            "top5": metrics["top5"],
            "mean_per_class_recall": metrics["mean_per_class_recall"],
            "no_overlap_fraction": metrics["no_overlap_fraction"],
            "per_class_accuracy": metrics["per_class_accuracy"],
        }

    def directions(self, problem: EmbeddedProblem) -> list[QueryDirection]:
        """Images query the classes; the right one is the label."""
        labels = problem.truth.long()
        right = labels[:, None] == torch.arange(problem.targets.count)[None, :]
        return [QueryDirection("image_to_class", "image", "class", False, right, "top1", False)]


def build(cfg) -> Classification:
    return Classification()

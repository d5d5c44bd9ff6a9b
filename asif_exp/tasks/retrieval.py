"""Zero-shot retrieval (as CLIP_benchmark does it): image->text and text->image Recall@K from
one (images x captions) score matrix.

- image->text Recall@K: the fraction of images with at least one of their own captions among
  the K best-scoring captions;
- text->image Recall@K: the fraction of captions whose own image is among the K best images.

Ties count against the query (pessimistic, and independent of the order of images and
captions): a query hits at K when fewer than K *wrong* candidates score at least as high as its
best right one. A query whose scores are all equal (ASIF: no anchor shared with any candidate)
therefore never hits, where an index-order rule would credit whatever comes first.

Metric keys are flat, `retrieval.image_to_text.R@1` ... `retrieval.text_to_image.R@10`, plus
`retrieval.mean_recall` (the mean of those recalls, the primary metric) and the fractions of
images and captions whose scores are all zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from asif_exp.errors import ConfigError
from asif_exp.options import int_values
from asif_exp.problem import EmbeddedProblem
from asif_exp.tasks.base import QueryDirection

PREFIX = "retrieval"


def wrong_at_least_as_high(scores: Tensor, caption_image: Tensor) -> tuple[Tensor, Tensor]:
    """Per image, and per caption: how many wrong candidates score at least as high as the
    query's best right one (a hit at K is a count below K).

    `scores` is (images x captions); `caption_image[j]` is caption j's image. Every image must
    have at least one caption.
    """
    images, captions = scores.shape
    caption_image = caption_image.to(scores.device)
    own = caption_image[None, :] == torch.arange(images, device=scores.device)[:, None]
    if not bool(own.any(dim=1).all()):
        missing = (~own.any(dim=1)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"retrieval: images without a caption (first: {missing})")
    # image -> text: the best own caption against every other caption
    best_own = scores.masked_fill(~own, -torch.inf).amax(dim=1, keepdim=True)
    image_wrong = ((scores >= best_own) & ~own).sum(dim=1)
    # text -> image: the own image against every other image (the own one ties with itself)
    own_score = scores.gather(0, caption_image[None, :])
    text_wrong = (scores >= own_score).sum(dim=0) - 1
    return image_wrong, text_wrong


def retrieval_metrics(scores: Tensor, caption_image: Tensor, ks: Sequence[int]) -> dict:
    """Recall@K both ways for every K in `ks`, their mean, and the no-overlap fractions."""
    image_wrong, text_wrong = wrong_at_least_as_high(scores, caption_image)
    metrics = {}
    for direction, wrong in (("image_to_text", image_wrong), ("text_to_image", text_wrong)):
        for k in ks:
            metrics[f"{PREFIX}.{direction}.R@{k}"] = float((wrong < k).float().mean())
    metrics[f"{PREFIX}.mean_recall"] = sum(metrics.values()) / len(metrics)
    zero = scores == 0
    metrics[f"{PREFIX}.image_no_overlap_fraction"] = float(zero.all(dim=1).float().mean())
    metrics[f"{PREFIX}.caption_no_overlap_fraction"] = float(zero.all(dim=0).float().mean())
    return metrics


@dataclass
class Retrieval:
    recall_at: tuple[int, ...] = (1, 5, 10)
    name: str = "retrieval"
    primary_metric: str = f"{PREFIX}.mean_recall"
    targets: str = "captions"  # the benchmark's captions, each its own target
    direction_names: tuple[str, ...] = ("image_to_text", "text_to_image")

    def metrics(self, scores: Tensor, problem: EmbeddedProblem) -> dict:
        truth = problem.truth
        if scores.shape != (problem.images.shape[0], len(truth)):
            raise ValueError(
                f"retrieval: scores of shape {tuple(scores.shape)} for "
                f"{problem.images.shape[0]} images and {len(truth)} captions"
            )
        return retrieval_metrics(scores, truth, self.recall_at)

    def directions(self, problem: EmbeddedProblem) -> list[QueryDirection]:
        """image_to_text (rows query the captions; right: the image's own captions), then
        text_to_image (columns query the images; right: the caption's image). A tie with a
        wrong candidate is a miss, as in the recalls."""
        own = problem.truth.long()[None, :] == torch.arange(problem.images.shape[0])[:, None]
        return [
            QueryDirection(
                "image_to_text", "image", "text", False, own, f"{PREFIX}.image_to_text.R@1", True
            ),
            QueryDirection(
                "text_to_image", "text", "image", True, own.T, f"{PREFIX}.text_to_image.R@1", True
            ),
        ]


def build(cfg) -> Retrieval:
    ks = int_values("task.recall_at", cfg.task.recall_at)
    if not ks or min(ks) < 1:
        raise ConfigError(f"task.recall_at={list(ks)}: expected positive integers")
    return Retrieval(tuple(sorted(set(ks))))

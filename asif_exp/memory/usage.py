"""Usage and abstention: how many queries use each anchor, pruning the unused ones, and
answering "unknown" when a query shares no anchor with any prompt (or scores under a threshold).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from asif_exp.memory.model import AsifModel, Prompts
from asif_exp.tasks.classification import no_overlap

UNKNOWN = -1  # the prediction of an abstaining model


# ----------------------------------------------------------------------------- abstain


def abstain(scores: Tensor, threshold: float | None = None) -> Tensor:
    """Predictions, with `UNKNOWN` where nothing overlaps or the best score is under `threshold`."""
    predictions = scores.argmax(dim=1)  # ties to the lower class, as everywhere else
    unknown = no_overlap(scores)
    if threshold is not None:
        unknown |= scores.max(dim=1).values < threshold
    return predictions.masked_fill(unknown, UNKNOWN)


def coverage_curve(
    scores: Tensor, labels: Tensor, thresholds: Sequence[float | None] | None = None, num: int = 50
) -> list[dict]:
    """Accuracy on the answered queries, against coverage, as the abstention threshold moves.

    Default thresholds: none (only no-overlap queries abstain), then quantiles of the best
    scores, so coverage runs from full to ~0. `accuracy` counts only answered queries (None
    when none is answered); `accuracy_all` counts "unknown" as wrong.
    """
    best = scores.max(dim=1).values
    if thresholds is None:
        quantiles = torch.linspace(0, 1, num, dtype=torch.double)
        thresholds = [None, *sorted(set(torch.quantile(best.double(), quantiles).tolist()))]
    rows = []
    for threshold in thresholds:
        predictions = abstain(scores, threshold)
        answered = predictions != UNKNOWN
        correct = int((predictions[answered] == labels[answered]).sum())
        covered = int(answered.sum())
        rows.append(
            {
                "threshold": None if threshold is None else float(threshold),
                "coverage": covered / len(labels),
                "accuracy": correct / covered if covered else None,
                "accuracy_all": correct / len(labels),
                "answered": covered,
                "correct": correct,
                "no_overlap": int(no_overlap(scores).sum()),
            }
        )
    return rows


# ----------------------------------------------------------------------------- anchor usage


@dataclass
class AnchorUsage:
    """How many queries (or prompts) use each anchor."""

    image_topk: Tensor  # (n,) queries whose top-k includes the anchor
    prompt_topk: Tensor  # (n,) prompts whose top-k includes it
    explanation: Tensor  # (n,) queries whose predicted-class score it contributes to
    queries: int

    def summary(self) -> dict:
        return {
            "queries": self.queries,
            "image_topk": usage_summary(self.image_topk),
            "explanation": usage_summary(self.explanation),
            "prompt_topk": usage_summary(self.prompt_topk),
            "used_by_images_or_prompts": int(((self.image_topk + self.prompt_topk) > 0).sum()),
        }


def anchor_usage(model: AsifModel, image_embeddings: Tensor, prompts: Prompts) -> AnchorUsage:
    scored = model.score(image_embeddings, prompts)
    image = scored.image_rr.to_sparse_coo().coalesce()
    query_of, anchor_of = image.indices()
    nonzero = image.values() != 0
    image_topk = torch.bincount(anchor_of[nonzero], minlength=model.n)
    prompt_rr = model.prompt_representations(prompts.embeddings)
    prompt_topk = torch.bincount(
        prompt_rr.col_indices()[prompt_rr.values() != 0], minlength=model.n
    )
    # An anchor explains query i when it is non-zero in both i's representation and the
    # representation of i's predicted class (its best prompt under "max").
    winners = scored.best_target(scored.scores.argmax(dim=1))
    targets = scored.targets.to_sparse_coo().coalesce()
    target_keys = targets.indices()[0] * model.n + targets.indices()[1]
    target_keys = target_keys[targets.values() != 0]
    query_keys = winners[query_of] * model.n + anchor_of
    shared = torch.isin(query_keys, target_keys) & nonzero
    explanation = torch.bincount(anchor_of[shared], minlength=model.n)
    return AnchorUsage(image_topk, prompt_topk, explanation, len(image_embeddings))


def usage_summary(counts: Tensor) -> dict:
    """Shape of a usage distribution: how many anchors are used, how concentrated the use is."""
    counts = counts.double()
    total = float(counts.sum())
    ordered = counts.sort(descending=True).values
    top_decile = ordered[: max(1, math.ceil(len(ordered) / 10))].sum()
    # Gini coefficient: 0 when every anchor is used equally, towards 1 when a few take all.
    ascending = ordered.flip(0)
    ranks = torch.arange(1, len(counts) + 1, dtype=torch.double)
    gini = (
        float(((2 * ranks - len(counts) - 1) * ascending).sum() / (len(counts) * total))
        if total
        else 0.0
    )
    quantiles = torch.quantile(counts, torch.tensor([0.5, 0.9, 0.99], dtype=torch.double)).tolist()
    return {
        "anchors": len(counts),
        "used": int((counts > 0).sum()),
        "unused": int((counts == 0).sum()),
        "unused_fraction": float((counts == 0).double().mean()),
        "total_uses": int(total),
        "max": int(ordered[0]),
        "median": quantiles[0],
        "p90": quantiles[1],
        "p99": quantiles[2],
        "top10pct_share": float(top_decile / total) if total else 0.0,
        "gini": gini,
    }


def prune_unused(model: AsifModel, counts: Tensor) -> AsifModel:
    """The model without the anchors whose count is 0."""
    if not bool((counts > 0).any()):
        raise ValueError("no anchor is used: pruning would leave an empty model")
    return model.keep(counts > 0)

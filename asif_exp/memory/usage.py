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
from asif_exp.methods.asif import ModelScores
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
    correct = scores.argmax(dim=1) == labels.to(scores.device)
    return coverage_rows(scores.max(dim=1).values, correct, no_overlap(scores), thresholds, num)


def coverage_rows(
    best: Tensor,
    correct: Tensor,
    unknown: Tensor,
    thresholds: Sequence[float | None] | None = None,
    num: int = 50,
) -> list[dict]:
    """The coverage curve of any queries: `best[i]` is query i's best score, `correct[i]` whether
    its top-1 answer is right, `unknown[i]` whether it always abstains (no anchor shared with
    any candidate). A query answers when it is not unknown and `best >= threshold`."""
    if thresholds is None:
        quantiles = torch.linspace(0, 1, num, dtype=torch.double)
        thresholds = [None, *sorted(set(torch.quantile(best.double(), quantiles).tolist()))]
    rows = []
    for threshold in thresholds:
        answered = ~unknown if threshold is None else ~unknown & (best >= threshold)
        covered, right = int(answered.sum()), int((correct & answered).sum())
        rows.append(
            {
                "threshold": None if threshold is None else float(threshold),
                "coverage": covered / len(best),
                "accuracy": right / covered if covered else None,
                "accuracy_all": right / len(best),
                "answered": covered,
                "correct": right,
                "no_overlap": int(unknown.sum()),
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
    image_topk = topk_counts(scored.image_rr)
    prompt_topk = topk_counts(model.prompt_representations(prompts.embeddings))
    explanation = explanation_counts(scored)
    return AnchorUsage(image_topk, prompt_topk, explanation, len(image_embeddings))


def explanation_counts(scored: ModelScores, by_column: bool = False) -> Tensor:
    """(n,) per anchor: how many queries' top-1 score it contributes to (non-zero both in the
    query's representation and in its top candidate's). Queries are the images (rows; a
    class's candidate is its mean or, under "max", its best prompt) or, `by_column`, the
    targets (captions: each ranks the images by its column of target scores)."""
    if by_column:
        return _shared_with_partner(
            scored.targets, scored.image_rr, scored.target_scores.argmax(dim=0)
        )
    winners = scored.best_target(scored.scores.argmax(dim=1))
    return _shared_with_partner(scored.image_rr, scored.targets, winners)


def _shared_with_partner(queries: Tensor, partners: Tensor, partner_of: Tensor) -> Tensor:
    """(n,) per anchor: queries (CSR rows) whose partner row `partner_of[query]` (in the CSR
    `partners`) is non-zero at that anchor too, as the query is."""
    n = queries.shape[1]
    query = queries.to_sparse_coo().coalesce()
    query_of, anchor_of = query.indices()
    partner = partners.to_sparse_coo().coalesce()
    partner_keys = partner.indices()[0] * n + partner.indices()[1]
    partner_keys = partner_keys[partner.values() != 0]
    shared = torch.isin(partner_of[query_of] * n + anchor_of, partner_keys)
    return torch.bincount(anchor_of[shared & (query.values() != 0)], minlength=n)


def topk_counts(representations: Tensor, rows: Tensor | None = None) -> Tensor:
    """(n,) per anchor: how many of the CSR `representations`' rows (all, or `rows`) hold it."""
    coo = representations.to_sparse_coo().coalesce()
    row, anchor = coo.indices()
    keep = coo.values() != 0
    if rows is not None:
        keep &= torch.isin(row, rows)
    return torch.bincount(anchor[keep], minlength=representations.shape[1])


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

"""Explanation: the anchor pairs behind one prediction (Fig. 5 of the paper, as data).

A score is the dot product of two sparse vectors (an image's relative representation and a
class's or a caption's), so it splits exactly over the anchors that are non-zero in both.
`explain` does it for a classification query, `explain_match` for a retrieval query in either
direction. Figures of an explanation are in `asif_exp.memory.figures`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from asif_exp.memory.model import AsifModel, Prompts
from asif_exp.methods.asif import ModelScores
from asif_exp.tasks.base import QueryDirection
from asif_exp.tasks.classification import no_overlap


@dataclass
class Contribution:
    anchor: int  # position in the model
    id: str
    caption: str
    image_value: float  # the query's relative-representation entry
    class_value: float  # the class's (or its best prompt's) entry
    contribution: float  # their product; a class's contributions sum to its score


@dataclass
class ClassExplanation:
    class_index: int
    class_name: str
    score: float
    target: str  # what the image was compared with: the class mean, or the best prompt
    contributions: list[Contribution]  # every shared anchor, largest contribution first


@dataclass
class Explanation:
    predicted: int
    runner_up: int | None
    label: int | None
    no_overlap: bool  # the query shares no anchor with any prompt: every score is 0
    classes: list[ClassExplanation]  # predicted, runner-up, then the true class if neither
    anchors_in_query: int  # non-zero entries of the query's representation

    def to_dict(self) -> dict:
        return asdict(self)


def _row(matrix: Tensor, row: int) -> tuple[Tensor, Tensor]:
    """(column ids, values) of one row of a sparse CSR matrix."""
    crow = matrix.crow_indices()
    lo, hi = int(crow[row]), int(crow[row + 1])
    return matrix.col_indices()[lo:hi], matrix.values()[lo:hi]


def shared_anchors(scored: ModelScores, image: int, target: int) -> tuple[Tensor, ...]:
    """(anchor ids, image values, target values, products) over the anchors non-zero in both
    image row `image` and target row `target`, largest product first (ties: lower id)."""
    image_ids, image_values = _row(scored.image_rr, image)
    target_ids, target_values = _row(scored.targets, target)
    dense_target = torch.zeros(scored.image_rr.shape[1], dtype=target_values.dtype)
    dense_target[target_ids] = target_values
    # Non-zero on both sides (a clamped entry is stored as an explicit 0 and links nothing).
    shared = (dense_target[image_ids] != 0) & (image_values != 0)
    ids, image_values = image_ids[shared], image_values[shared]
    target_values = dense_target[ids]
    products = image_values * target_values
    order = products.argsort(descending=True, stable=True)
    return ids[order], image_values[order], target_values[order], products[order]


def _explain_class(model, scored, query, c, prompts) -> ClassExplanation:
    target = int(scored.best_target(torch.full((len(scored.scores),), c))[query])
    ids, image_values, class_values, products = shared_anchors(scored, query, target)
    if model.options.template_aggregation == "mean":
        what = "mean of the class's prompts"
    else:
        what = prompts.texts[target] if prompts.texts else f"prompt {target}"
    return ClassExplanation(
        class_index=c,
        class_name=prompts.class_names[c],
        score=float(scored.scores[query, c]),
        target=what,
        contributions=[
            Contribution(
                anchor=int(ids[i]),
                id=model.anchor_ids[int(ids[i])],
                caption=model.anchor_captions[int(ids[i])],
                image_value=float(image_values[i]),
                class_value=float(class_values[i]),
                contribution=float(products[i]),
            )
            for i in range(len(ids))
        ],
    )


def explain(
    model: AsifModel, image_embedding: Tensor, prompts: Prompts, label: int | None = None
) -> Explanation:
    """The anchor pairs behind one query's prediction and its runner-up.

    A class's score is the dot product of two sparse vectors, so it splits exactly over the
    anchors that are non-zero in both: those are the pairs that drove the prediction.
    """
    query = image_embedding.reshape(1, -1)
    scored = model.score(query, prompts)
    scores = scored.scores[0]
    # Class order as argmax breaks ties: higher score first, then lower class index.
    ranked = sorted(range(len(scores)), key=lambda c: (-float(scores[c]), c))
    shown = ranked[:2] + ([label] if label is not None and label not in ranked[:2] else [])
    return Explanation(
        predicted=ranked[0],
        runner_up=ranked[1] if len(ranked) > 1 else None,
        label=label,
        no_overlap=bool(no_overlap(scored.scores)[0]),
        classes=[_explain_class(model, scored, 0, c, prompts) for c in shown],
        anchors_in_query=int(scored.image_rr.values().ne(0).sum()),
    )


# ----------------------------------------------------------------------------- retrieval


@dataclass
class PairContribution:
    anchor: int  # position in the model
    id: str
    caption: str
    image_value: float  # the image's relative-representation entry (query or candidate)
    caption_value: float  # the caption's entry
    contribution: float  # their product; a match's contributions sum to its score


@dataclass
class Candidate:
    index: int  # the candidate's index in the benchmark (an image, or a caption)
    name: str  # its image id, or its caption
    score: float
    right: bool  # one of the query's own (the image's captions, the caption's image)
    rank: int  # 1-based, by score then index


@dataclass
class MatchExplanation:
    candidate: Candidate
    why: str  # "best", "best right" or "best wrong"
    contributions: list[PairContribution]  # every shared anchor, largest contribution first


@dataclass
class RetrievalExplanation:
    direction: str  # image_to_text or text_to_image
    query: int  # the query's index in the benchmark (an image, or a caption)
    query_name: str
    hit_at_1: bool  # as R@1 counts it: no wrong candidate scores as high as the best right one
    best_right_rank: int
    no_overlap: bool  # the query shares no anchor with any candidate: every score is 0
    anchors_in_query: int  # non-zero entries of the query's representation
    candidates: list[Candidate]  # the best ones, best first
    explained: list[MatchExplanation]  # the best; then the best right one, or if the best is
    # right, the best wrong one (what the truth had to beat)

    def to_dict(self) -> dict:
        return asdict(self)


def explain_match(
    model: AsifModel,
    scored: ModelScores,
    direction: QueryDirection,
    query: int,
    query_index: int,
    query_name: str,
    candidate_index: list[int],
    candidate_names: list[str],
    top: int = 5,
) -> RetrievalExplanation:
    """The best candidates of one retrieval query (row `query` of `direction`'s view of the
    images x captions scores) and the anchor pairs behind the best and the best right one.

    `query_index`, `query_name`: the query in the benchmark; `candidate_index[c]` and
    `candidate_names[c]` name the view's column c.
    Each pair's contribution is (image entry) x (caption entry); they sum to the match's score.
    """
    view = direction.view(scored.target_scores)
    scores, right = view[query], direction.right[query]
    order = scores.argsort(descending=True, stable=True)  # ties: lower index first
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(order) + 1)

    def candidate(c: int) -> Candidate:
        return Candidate(
            candidate_index[c], candidate_names[c], float(scores[c]), bool(right[c]), int(rank[c])
        )

    def explained(c: int, why: str) -> MatchExplanation:
        image, text = (c, query) if direction.by_column else (query, c)
        ids, image_values, caption_values, products = shared_anchors(scored, image, text)
        contributions = [
            PairContribution(
                anchor=int(a),
                id=model.anchor_ids[int(a)],
                caption=model.anchor_captions[int(a)],
                image_value=float(v),
                caption_value=float(w),
                contribution=float(x),
            )
            for a, v, w, x in zip(ids, image_values, caption_values, products, strict=True)
        ]
        return MatchExplanation(candidate(c), why, contributions)

    ranked_right = [int(c) for c in order if right[c]]
    best = int(order[0])
    if right[best]:
        wrong = [int(c) for c in order if not right[c]]
        shown = [explained(best, "best")] + ([explained(wrong[0], "best wrong")] if wrong else [])
    else:
        shown = [explained(best, "best")] + (
            [explained(ranked_right[0], "best right")] if ranked_right else []
        )
    rr = scored.image_rr if direction.query_kind == "image" else scored.targets
    _, query_values = _row(rr, query)
    return RetrievalExplanation(
        direction=direction.name,
        query=query_index,
        query_name=query_name,
        hit_at_1=bool(direction.hits(scored.target_scores)[query]),
        best_right_rank=int(rank[ranked_right[0]]) if ranked_right else -1,
        no_overlap=bool((scores == 0).all()),
        anchors_in_query=int(query_values.ne(0).sum()),
        candidates=[candidate(int(c)) for c in order[:top]],
        explained=shown,
    )

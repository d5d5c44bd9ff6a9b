"""Explanation: the anchor pairs behind one prediction (Fig. 5 of the paper, as data).

A class's score is the dot product of two sparse vectors, so it splits exactly over the anchors
that are non-zero in both. Figures of an explanation are in `asif_exp.memory.figures`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from asif_exp.memory.model import AsifModel, Prompts
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


def _explain_class(model, scored, query, c, prompts) -> ClassExplanation:
    target = int(scored.best_target(torch.full((len(scored.scores),), c))[query])
    image_ids, image_values = _row(scored.image_rr, query)
    target_ids, target_values = _row(scored.targets, target)
    dense_target = torch.zeros(model.n, dtype=target_values.dtype)
    dense_target[target_ids] = target_values
    shared = dense_target[image_ids] != 0
    ids, image_values = image_ids[shared], image_values[shared]
    class_values = dense_target[ids]
    products = image_values * class_values
    order = products.argsort(descending=True, stable=True)
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
            for i in order.tolist()
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

"""The `authors` preset against a faithful re-implementation of the authors' published function.

`experiments/bench/authors_baseline.py` re-implements noranta4/ASIF's
`relreps.zero_shot_classification`, including its running top-k buffer that starts as k zeros:
negative similarities never survive, so the function clamps negatives at 0. The engine under
`AUTHORS_OPTIONS` must predict the same class for every image in every (n, k, p) cell, in three
regimes: many negative similarities in the top-k (n close to k), fewer than k positive
similarities, and all similarities positive.

Anchors are random Gaussian vectors, so no two anchor images are equal: `torch.topk` breaks exact
ties arbitrarily (duplicated anchor images in real data), and the engine breaks them by anchor id,
so on duplicates the two may legitimately pick different, equally similar anchors.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from asif_exp.methods.asif import AUTHORS_OPTIONS, AUTHORS_UNCLAMPED_OPTIONS, AsifOptions
from asif_exp.tasks.classification_grid import evaluate_grid
from asif_exp.tensors import unit_rows

BASELINE = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "authors_baseline.py"
NS, KS, PS = [100, 200, 300], [20, 90], [1.0, 3.0, 8.0]
CLASSES, TEMPLATES, DIC_SIZE = 6, 3, 100  # chunks of 100 anchors: the buffer merge is exercised


def authors_zero_shot():
    spec = importlib.util.spec_from_file_location("authors_baseline", BASELINE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.zero_shot_classification


def problem(seed: int, shift: float) -> dict:
    """Unit-norm random embeddings. `shift` moves queries along one direction and anchors along
    the opposite one (negative shift: similarities mostly negative) or the same one (positive:
    all positive); 0: about half of the similarities are negative."""
    g = torch.Generator().manual_seed(seed)

    def embed(rows: int, dim: int, sign: float) -> torch.Tensor:
        x = torch.randn(rows, dim, generator=g)
        x[:, 0] += sign * abs(shift) * dim**0.5
        return unit_rows(x)

    anchor_sign = -1.0 if shift < 0 else 1.0
    return dict(
        image_embeddings=embed(50, 16, 1.0),
        anchor_image_embeddings=embed(max(NS), 16, anchor_sign),
        prompt_embeddings=embed(CLASSES * TEMPLATES, 12, 1.0),
        anchor_text_embeddings=embed(max(NS), 12, anchor_sign),
        labels=torch.randint(0, CLASSES, (50,), generator=g),
        prompt_class=torch.arange(CLASSES).repeat_interleave(TEMPLATES),
        num_classes=CLASSES,
    )


def engine_predictions(prob: dict, options: dict) -> dict:
    cells, _ = evaluate_grid(
        **prob, ns=NS, ks=KS, ps=PS, options=AsifOptions(device="cpu", **options), progress=False
    )
    return {(c.n, c.k, c.p): c.predictions for c in cells}


def baseline_predictions(prob: dict, zero_buffer: bool) -> dict:
    zero_shot = authors_zero_shot()
    out = {}
    for k in KS:
        predictions = zero_shot(
            prob["image_embeddings"],
            prob["prompt_embeddings"],
            prob["anchor_image_embeddings"],
            prob["anchor_text_embeddings"],
            k,
            NS,
            PS,
            TEMPLATES,
            dic_size=DIC_SIZE,
            zero_buffer=zero_buffer,
        )
        out.update({(n, k, p): pred for (n, p), pred in predictions.items()})
    return out


def positive_fraction(prob: dict) -> float:
    sims = prob["image_embeddings"] @ prob["anchor_image_embeddings"].T
    return float((sims > 0).float().mean())


@pytest.mark.parametrize(
    "offset, regime",
    [(0.0, "about half negative: many top-k entries negative at n close to k"),
     (-0.6, "mostly negative: fewer than k positive similarities"),
     (3.0, "all similarities positive")],
)  # fmt: skip
@pytest.mark.parametrize("seed", [0, 1])
def test_authors_preset_is_the_authors_function(offset, regime, seed):
    prob = problem(seed, offset)
    fraction = positive_fraction(prob)
    if offset == 3.0:
        assert fraction == 1.0, regime
    if offset < 0:  # on both sides, at every n
        for queries, anchors in [("image", "anchor_image"), ("prompt", "anchor_text")]:
            sims = prob[f"{queries}_embeddings"] @ prob[f"{anchors}_embeddings"].T
            positives = (sims > 0).sum(1).float()
            assert float(positives.median()) < max(KS) / 2, regime  # most rows: < k positives
    engine = engine_predictions(prob, AUTHORS_OPTIONS)
    faithful = baseline_predictions(prob, zero_buffer=True)
    assert engine.keys() == faithful.keys() and len(engine) == len(NS) * len(KS) * len(PS)
    for cell, predicted in engine.items():
        assert torch.equal(predicted, faithful[cell]), (regime, cell)
        assert len(set(predicted.tolist())) >= 3, (regime, cell)  # not a degenerate answer


def test_the_zero_buffer_matters_and_the_unclamped_preset_matches_its_absence():
    prob = problem(0, 0.0)
    faithful = baseline_predictions(prob, zero_buffer=True)
    without_zero_buffer = baseline_predictions(prob, zero_buffer=False)
    differing = [c for c in faithful if not torch.equal(faithful[c], without_zero_buffer[c])]
    assert differing, "with many negative similarities the zero buffer must change predictions"
    unclamped = engine_predictions(prob, AUTHORS_UNCLAMPED_OPTIONS)
    for cell, predicted in unclamped.items():
        assert torch.equal(predicted, without_zero_buffer[cell]), cell

"""Property-based tests: the engine and the memory tools against plain dense references,
on shapes, k, p and options drawn by hypothesis."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import random_embeddings, reference_for_cell

from asif_exp.memory import AsifModel, Prompts, explain
from asif_exp.methods.asif import AsifOptions, streaming_topk
from asif_exp.tasks.classification_grid import evaluate_grid

# Non-integer p only with clamping: see test_fractional_p_without_clamping_is_finite.
P_VALUES = [1.0, 2.0, 3.0, 8.0]
SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@st.composite
def problems(draw):
    images, anchors = draw(st.integers(1, 12), label="images"), draw(st.integers(2, 60))
    classes, templates = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    d_image, d_text = draw(st.integers(2, 9)), draw(st.integers(2, 9))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16), label="seed"))
    ns = sorted(draw(st.sets(st.integers(1, anchors), min_size=1, max_size=2)))
    ks = sorted(draw(st.sets(st.integers(1, anchors), min_size=1, max_size=2)))
    if min(ks) > max(ns):  # at least one valid cell
        ks = sorted({draw(st.integers(1, max(ns))), *ks})
    return dict(
        **random_embeddings(g, images, anchors, classes, templates, d_image, d_text),
        ns=ns,
        ks=ks,
        ps=sorted(draw(st.sets(st.sampled_from(P_VALUES), min_size=1, max_size=2))),
    )


option_sets = st.builds(
    AsifOptions,
    clamp_negative=st.booleans(),
    normalize=st.sampled_from(["both", "prompt", "none"]),
    template_aggregation=st.sampled_from(["mean", "max"]),
    memory_budget_mb=st.sampled_from([0.0005, 0.01, 64.0]),  # from many tiny chunks to one
    device=st.just("cpu"),
)


@SETTINGS
@given(problem=problems(), options=option_sets)
def test_grid_equals_the_dense_reference(problem, options):
    cells, timings = evaluate_grid(**problem, options=options, keep_scores=True, progress=False)
    valid = {(n, k) for n in problem["ns"] for k in problem["ks"] if k <= n}
    assert {(c.n, c.k) for c in cells} == valid
    assert len(cells) == len(valid) * len(problem["ps"])
    assert sorted(map(tuple, timings["skipped"])) == sorted(
        (n, k) for n in problem["ns"] for k in problem["ks"] if k > n
    )
    for cell in cells:
        expected = reference_for_cell(problem, cell, options)
        torch.testing.assert_close(cell.scores, expected, rtol=1e-4, atol=1e-5)
        # Predictions agree wherever the best class wins by more than rounding.
        top2 = expected.topk(min(2, expected.shape[1]), dim=1).values
        clear = (
            top2[:, 0] - top2[:, -1] > 1e-4
            if expected.shape[1] > 1
            else torch.ones(len(expected), dtype=torch.bool)
        )
        assert torch.equal(cell.predictions[clear], expected.argmax(1)[clear])


@SETTINGS
@given(
    rows=st.integers(1, 6),
    anchors=st.integers(1, 40),
    k=st.integers(1, 40),
    levels=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    budget=st.sampled_from([0.0002, 0.002, 64.0]),
)
def test_topk_with_ties_is_the_sorted_prefix(rows, anchors, k, levels, seed, budget):
    # Small integer vectors give exactly tied similarities: ties must go to the lower id,
    # whatever the chunking.
    g = torch.Generator().manual_seed(seed)
    queries = torch.randint(-levels, levels + 1, (rows, 3), generator=g).float()
    anchor_vectors = torch.randint(-levels, levels + 1, (anchors, 3), generator=g).float()
    ns = sorted({max(1, anchors // 2), anchors})
    tops = streaming_topk(
        queries,
        anchor_vectors,
        ns,
        k,
        AsifOptions(device="cpu", memory_budget_mb=budget),
        progress=False,
    )
    sims = queries @ anchor_vectors.T
    for n in ns:
        for row in range(rows):
            order = sorted(range(n), key=lambda j: (-float(sims[row, j]), j))[: min(k, n)]
            assert tops[n].indices[row].tolist() == order
            assert tops[n].values[row].tolist() == [float(sims[row, j]) for j in order]


@SETTINGS
@given(problem=problems(), options=option_sets, data=st.data())
def test_edits_and_explanations_agree_with_the_engine(problem, options, data):
    anchors = len(problem["anchor_image_embeddings"])
    k = data.draw(st.integers(1, anchors), label="k")
    p = data.draw(st.sampled_from(P_VALUES), label="p")
    model = AsifModel(
        problem["anchor_image_embeddings"],
        problem["anchor_text_embeddings"],
        [f"img{i}" for i in range(anchors)],
        [f"caption {i}" for i in range(anchors)],
        k,
        p,
        options,
    )
    prompts = Prompts(
        problem["prompt_embeddings"],
        problem["prompt_class"],
        [f"c{c}" for c in range(problem["num_classes"])],
    )
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=anchors, max_size=anchors)))
    if int(keep.sum()) < k:
        with pytest.raises(ValueError, match="fewer than k"):
            model.keep(keep)
        return
    edited = model.keep(keep)
    cells, _ = evaluate_grid(
        problem["image_embeddings"],
        problem["anchor_image_embeddings"][keep],
        problem["prompt_embeddings"],
        problem["anchor_text_embeddings"][keep],
        problem["labels"],
        problem["prompt_class"],
        problem["num_classes"],
        [int(keep.sum())],
        [k],
        [p],
        options,
        keep_scores=True,
        progress=False,
    )
    scores = edited.scores(problem["image_embeddings"], prompts)
    torch.testing.assert_close(scores, cells[0].scores)
    assert edited.anchor_ids == [f"img{i}" for i in keep.nonzero().flatten().tolist()]
    query = data.draw(st.integers(0, len(problem["image_embeddings"]) - 1), label="query")
    explanation = explain(edited, problem["image_embeddings"][query], prompts)
    assert explanation.predicted == int(scores[query].argmax())
    for explained in explanation.classes:
        total = sum(c.contribution for c in explained.contributions)
        assert total == pytest.approx(
            float(scores[query, explained.class_index]), rel=1e-4, abs=1e-6
        )


@settings(SETTINGS, max_examples=15)
@given(problem=problems(), p=st.sampled_from([0.5, 1.5, 3.5]))
def test_fractional_p_with_clamping_equals_the_dense_reference(problem, p):
    options = AsifOptions(device="cpu")
    problem["ps"] = [p]
    cells, _ = evaluate_grid(**problem, options=options, keep_scores=True, progress=False)
    for cell in cells:
        expected = reference_for_cell(problem, cell, options)  # clean defaults
        torch.testing.assert_close(cell.scores, expected, rtol=1e-4, atol=1e-5)


def test_fractional_p_without_clamping_is_finite_or_refused():
    g = torch.Generator().manual_seed(0)
    try:
        cells, _ = evaluate_grid(
            torch.randn(5, 4, generator=g),
            torch.randn(20, 4, generator=g),
            torch.randn(3, 4, generator=g),
            torch.randn(20, 4, generator=g),
            torch.tensor([0, 1, 2, 0, 1]),
            torch.arange(3),
            3,
            [20],
            [15],
            [3.5],
            AsifOptions(device="cpu", clamp_negative=False),
            keep_scores=True,
            progress=False,
        )
    except ValueError as error:
        assert "clamp_negative=false" in str(error)  # refused, naming the combination
        return
    assert torch.isfinite(cells[0].scores).all()

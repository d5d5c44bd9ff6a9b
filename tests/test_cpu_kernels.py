"""The compiled CPU loops (streaming top-k, grouped scoring) against plain PyTorch references."""

import pytest
import torch

from asif_exp.methods.asif import select_topk
from asif_exp.methods.asif.cpu_kernels import (
    MAX_WIDTH,
    MKL_VECTOR,
    append_above,
    grouped_products,
    keep_top,
)


@pytest.mark.parametrize("levels", [None, 7, 1], ids=["distinct", "many-ties", "two-values"])
@pytest.mark.parametrize("k", [1, 120, 449, 450])
def test_keep_top_is_the_top_k_set_with_ties_to_the_lower_id(levels, k):
    g = torch.Generator().manual_seed(k)
    values = torch.randn(60, 500, generator=g)
    if levels:  # rounded: many entries equal to the k-th value
        values = (values * levels).round() / levels
    values[:, 450:] = -torch.inf  # padding, never kept
    ids = torch.stack([torch.randperm(10**6, generator=g)[:500] for _ in range(60)]).int()
    expected = select_topk(values, ids, k)

    got_values, got_ids = values.clone(), ids.clone()
    keep_top(got_values, got_ids, 500, k)
    got = select_topk(got_values[:, :k], got_ids[:, :k], k)  # the kernel leaves no order
    assert torch.equal(got[1], expected[1])
    assert torch.equal(got[0], expected[0])


def test_keep_top_looks_only_at_the_given_width():
    values = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.8]])
    ids = torch.arange(5, dtype=torch.int32)[None].contiguous()
    keep_top(values, ids, 3, 2)
    assert sorted(ids[0, :2].tolist()) == [1, 2]
    assert values[0, 3:].tolist() == pytest.approx([0.9, 0.8])  # untouched


def test_append_above_appends_each_rows_entries_in_column_order():
    g = torch.Generator().manual_seed(0)
    sims = torch.randn(40, 300, generator=g)
    threshold = torch.randn(40, generator=g) + 1.0
    fill = torch.randint(0, 50, (40,), generator=g)
    values = torch.full((40, 10 + 50 + 300), -torch.inf)
    ids = torch.full((40, 10 + 50 + 300), -1, dtype=torch.int32)
    before_values, before_ids, before_fill = values.clone(), ids.clone(), fill.clone()

    append_above(sims, threshold, 1000, values, ids, fill, 10)

    for row in range(40):
        cols = (sims[row] > threshold[row]).nonzero().flatten()
        start = 10 + int(before_fill[row])
        assert int(fill[row]) == int(before_fill[row]) + len(cols)
        assert torch.equal(values[row, start : start + len(cols)], sims[row, cols])
        assert torch.equal(ids[row, start : start + len(cols)], (cols + 1000).int())
        # nothing else written
        assert torch.equal(values[row, :start], before_values[row, :start])
        assert torch.equal(ids[row, start + len(cols) :], before_ids[row, start + len(cols) :])


def _random_csr(g, rows, cols, density):
    dense = torch.rand(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < density)
    dense[0] = 0  # a row without entries
    csr = dense.to_sparse_csr()
    return dense, csr.crow_indices().int(), csr.col_indices().int()


@pytest.mark.parametrize("width", [1, 3, MAX_WIDTH])
def test_grouped_products_are_each_groups_best_target_score(width):
    g = torch.Generator().manual_seed(width)
    images, n, targets = 30, 200, 12
    image_dense, image_crow, image_col = _random_csr(g, images, n, 0.1)
    target_dense, target_crow, target_row = _random_csr(g, n, targets, 0.2)  # (n x targets)
    # Each product has its own values on the shared patterns.
    image_values = torch.rand(width, len(image_col), generator=g)
    target_values = torch.rand(len(target_row), width, generator=g)
    group = torch.tensor([2, 0, 1, 2, 0, 1, 1, 0, 2, 0, 2, 1], dtype=torch.int32)  # interleaved
    got = grouped_products(
        image_crow, image_col, image_values, target_crow, target_row, target_values, group, 4
    )
    assert got.shape == (width, images, 4)
    for w in range(width):
        left = torch.zeros(images, n)
        left[image_dense != 0] = image_values[w]  # row-major order = CSR order
        right = torch.zeros(n, targets)
        right[target_dense != 0] = target_values[:, w]
        products = left.double() @ right.double()
        expected = torch.stack([products[:, group == c].amax(1) for c in range(3)], 1).float()
        torch.testing.assert_close(got[w, :, :3], expected)
        assert bool((got[w, 0, :3] == 0).all())  # the empty row scores 0
        assert bool((got[w, :, 3] == -torch.inf).all())  # a group without targets


@pytest.mark.parametrize("fused_tail", [False, True])
def test_grouped_products_round_as_a_sequential_sum_in_anchor_order(fused_tail):
    # Each anchor's target entries: vectors of MKL_VECTOR (multiply, round, add, round), then
    # with `fused_tail` the leftovers in one rounding (the exact float64 product plus the sum,
    # rounded to float32: the fused multiply-add, save a double rounding too rare to matter).
    g = torch.Generator().manual_seed(5)
    images, n, targets = 6, 40, 2 * MKL_VECTOR + 5
    image_dense, image_crow, image_col = _random_csr(g, images, n, 0.5)
    target_dense, target_crow, target_row = _random_csr(g, n, targets, 0.6)
    got = grouped_products(
        image_crow,
        image_col,
        image_dense[image_dense != 0][None],
        target_crow,
        target_row,
        target_dense[target_dense != 0][:, None],
        torch.arange(targets, dtype=torch.int32),
        targets,
        fused_tail,
    )
    expected = torch.zeros(images, targets)
    for row in range(images):
        for anchor in image_dense[row].nonzero()[:, 0].tolist():
            cols = target_dense[anchor].nonzero()[:, 0].tolist()
            tail = len(cols) - len(cols) % MKL_VECTOR if fused_tail else len(cols)
            for i, t in enumerate(cols):
                term = image_dense[row, anchor].double() * target_dense[anchor, t].double()
                if i < tail:
                    expected[row, t] += term.float()
                else:
                    expected[row, t] = (expected[row, t].double() + term).float()
    assert torch.equal(got[0], expected)


def test_grouped_products_refuse_mismatched_or_too_many_value_sets():
    one = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="2 image value rows, 3 target columns"):
        grouped_products(one, one, torch.zeros(2, 1), one, one, torch.zeros(1, 3), one, 1)
    with pytest.raises(ValueError, match=f"{MAX_WIDTH + 1} image value rows"):
        grouped_products(
            one, one, torch.zeros(MAX_WIDTH + 1, 1), one, one, torch.zeros(1, MAX_WIDTH + 1), one, 1
        )

"""The compiled CPU loops of the streaming top-k against plain PyTorch references."""

import pytest
import torch

from asif_exp.methods.asif import select_topk
from asif_exp.methods.cpu_kernels import append_above, keep_top


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

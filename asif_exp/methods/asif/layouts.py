"""Sparse layouts of relative representations and the CSR helpers around them: a top-k snapshot
laid out as CSR (rows x n) or transposed (n x rows) once per (n, k) and reused for every p;
class means; and the cost model that picks a dense GEMM or a sparse product per cell."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from asif_exp.methods.asif.topk import TopK

# A row's largest power below this is computed relative to the row's largest value before it is
# normalised: the squares in its norm then stay normal floats, exact to float32 precision
# (sqrt(smallest normal x 2^24), about 4e-16).
SAFE_POWER = (torch.finfo(torch.float32).tiny * 2.0**24) ** 0.5


def _process(values: Tensor, p: float, clamp_negative: bool, normalize: bool) -> Tensor:
    """(rows, k) top-k similarities -> values of the relative representation (row order kept)."""
    if clamp_negative:
        values = values.clamp_min(0.0)
    # An integer power is repeated multiplication (faster than the generic float pow).
    exponent = int(p) if float(p).is_integer() else p
    powered = values.pow(exponent)
    if normalize:
        powered = _without_underflow(values, powered, exponent)
        norms = powered.norm(dim=1, keepdim=True)
        powered = powered / norms.clamp_min(torch.finfo(values.dtype).tiny)
    return powered


def _largest(values: Tensor) -> Tensor:
    return values.abs().amax(dim=1, keepdim=True)


def _without_underflow(values: Tensor, powered: Tensor, exponent: float) -> Tensor:
    """Rows about to be normalised whose largest power is so small that their squares lose
    precision or vanish (a large p: 0.3 ** 100 is 0 in float32), powered relative to the row's
    largest value instead: that changes no ranking and no normalised representation. Other rows
    are left as they are, bit for bit."""
    largest = _largest(values)
    lost = (largest > 0) & (largest.pow(exponent) < SAFE_POWER)
    if not bool(lost.any()):
        return powered
    relative = (values / largest.clamp_min(torch.finfo(values.dtype).tiny)).pow(exponent)
    return torch.where(lost, relative, powered)


def underflowed_rows(top: TopK, k: int, p: float, clamp_negative: bool) -> int:
    """Rows of a side that is not normalised whose largest top-k value raised to p falls below
    the smallest normal float: their representation lost precision or vanished (all zero)
    although they had similarities. (A normalised side is computed without underflow.)"""
    values = top.values[:, :k]
    largest = _largest(values.clamp_min(0.0) if clamp_negative else values)
    exponent = int(p) if float(p).is_integer() else p
    tiny = torch.finfo(values.dtype).tiny
    return int(((largest > 0) & (largest.pow(exponent) < tiny)).sum())


def _check_k(top: TopK, k: int) -> None:
    if k > top.n:
        raise ValueError(f"k={k} exceeds n={top.n}: cannot keep more anchors than there are")


@dataclass
class SparseLayout:
    """A top-k representation at one (n, k) laid out as a CSR matrix, values still to compute.

    The layout depends on (n, k) only, so every p of the grid reuses it: one sort per (n, k).
    """

    crow: Tensor
    col: Tensor
    base: Tensor  # (rows, k) top-k similarities, each row in its own order
    order: Tensor | None  # positions in the flattened processed values, in CSR order
    shape: tuple[int, int]

    def values(self, p: float, clamp_negative: bool, normalize: bool) -> Tensor:
        """The representation's values at p, in CSR order."""
        values = _process(self.base, p, clamp_negative, normalize).reshape(-1)
        return values if self.order is None else values[self.order]

    def csr(self, p: float, clamp_negative: bool, normalize: bool) -> Tensor:
        values = self.values(p, clamp_negative, normalize)
        return torch.sparse_csr_tensor(
            self.crow, self.col, values, self.shape, check_invariants=False
        )


def row_layout(top: TopK, k: int, by_id: tuple[Tensor, Tensor] | None = None) -> SparseLayout:
    """(rows x n), each row's anchors sorted (CSR kernels want sorted column indices).

    `by_id`, `top.indices.sort(dim=1)` (ids ascending, their ranks), is shared by every k at
    one n: keeping the entries of rank < k keeps that order, and finding them (one `nonzero`)
    costs less than sorting again.
    """
    _check_k(top, k)
    rows, width = top.indices.shape
    if by_id is None:
        col, order = top.indices[:, :k].sort(dim=1)
    else:
        col, order = by_id
        if k < width:
            kept = (order < k).nonzero(as_tuple=True)[1].view(rows, k)  # k per row, in order
            col, order = col.gather(1, kept), order.gather(1, kept)
    crow = torch.arange(0, rows * k + 1, k, device=col.device)
    base = top.values.gather(1, order)
    return SparseLayout(crow, col.reshape(-1), base, None, (rows, top.n))


def transposed_layout(top: TopK, k: int, by_anchor: Tensor | None = None) -> SparseLayout:
    """(n x rows): the transposed representation, built directly instead of transposing a CSR.

    `by_anchor`, the stable argsort of `top.indices.reshape(-1)` (by anchor, then by row), is
    shared by every k at one n: keeping the entries of rank < k keeps that order.
    """
    _check_k(top, k)
    rows, width = top.indices.shape
    if by_anchor is None:
        by_anchor = top.indices.reshape(-1).argsort(stable=True)
    if k < width:
        by_anchor = by_anchor[by_anchor % width < k]
    row, rank = by_anchor // width, by_anchor % width
    crow = torch.zeros(top.n + 1, dtype=torch.long, device=row.device)
    crow[1:] = torch.bincount(top.indices.reshape(-1)[by_anchor], minlength=top.n).cumsum(0)
    return SparseLayout(crow, row, top.values[:, :k], row * k + rank, (top.n, rows))


def relative_representation(
    top: TopK, k: int, p: float, clamp_negative: bool, normalize: bool
) -> Tensor:
    """Sparse CSR (rows x n): top-k similarities, clamped (optionally), raised to p, normalised."""
    return row_layout(top, k).csr(p, clamp_negative, normalize)


def _csr_row_ids(matrix: Tensor) -> Tensor:
    crow = matrix.crow_indices()
    return torch.repeat_interleave(torch.arange(len(crow) - 1, device=crow.device), crow.diff())


def _scale_csr(matrix: Tensor, scale: Tensor) -> Tensor:
    return torch.sparse_csr_tensor(
        matrix.crow_indices(),
        matrix.col_indices(),
        matrix.values() * scale,
        matrix.shape,
        check_invariants=False,
    )


def normalize_csr_rows(matrix: Tensor) -> Tensor:
    rows, values = _csr_row_ids(matrix), matrix.values()
    norms = torch.zeros(matrix.shape[0], device=values.device).index_add_(0, rows, values * values)
    return _scale_csr(matrix, 1 / norms.sqrt().clamp_min(torch.finfo(values.dtype).tiny)[rows])


def normalize_csr_columns(matrix: Tensor) -> Tensor:
    cols, values = matrix.col_indices(), matrix.values()
    norms = torch.zeros(matrix.shape[1], device=values.device).index_add_(0, cols, values * values)
    return _scale_csr(matrix, 1 / norms.sqrt().clamp_min(torch.finfo(values.dtype).tiny)[cols])


def _class_counts(prompt_class: Tensor, num_classes: int) -> Tensor:
    counts = torch.bincount(prompt_class, minlength=num_classes).float()
    if bool((counts == 0).any()):
        missing = (counts == 0).nonzero().flatten()[:5].tolist()
        raise ValueError(f"classes without any prompt: {missing}")
    return counts


def class_averaging_t(prompt_class: Tensor, num_classes: int) -> Tensor:
    """CSR (prompts x classes) with 1/|class| at (prompt, class of prompt)."""
    counts = _class_counts(prompt_class, num_classes)
    prompts = len(prompt_class)
    crow = torch.arange(prompts + 1, device=prompt_class.device)
    return torch.sparse_csr_tensor(
        crow,
        prompt_class,
        1.0 / counts[prompt_class],
        (prompts, num_classes),
        check_invariants=False,
    )


def class_representation(
    prompt_rr: Tensor, prompt_class: Tensor, num_classes: int, normalize: bool
):
    """Mean of each class's prompt representations (a sparse C x n matrix)."""
    counts = _class_counts(prompt_class, num_classes)
    order = prompt_class.argsort(stable=True)
    crow = torch.zeros(num_classes + 1, dtype=torch.long, device=prompt_class.device)
    crow[1:] = counts.long().cumsum(0)
    averaging = torch.sparse_csr_tensor(
        crow,
        order,
        1.0 / counts[prompt_class[order]],
        (num_classes, len(prompt_class)),
        check_invariants=False,
    )
    classes = averaging @ prompt_rr
    return normalize_csr_rows(classes) if normalize else classes


def csr_rows(matrix: Tensor, start: int, end: int) -> Tensor:
    crow = matrix.crow_indices()
    lo, hi = int(crow[start]), int(crow[end])
    return torch.sparse_csr_tensor(
        crow[start : end + 1] - lo,
        matrix.col_indices()[lo:hi],
        matrix.values()[lo:hi],
        (end - start, matrix.shape[1]),
        check_invariants=False,
    )


# The scoring cost model, in units of one multiply-add of a dense GEMM in the compute dtype, per
# device type (`experiments/bench/calibrate_scoring.py` measures them):
# - SPARSE_MAC_COST: one multiply-add of a sparse product (on a CPU the grid's compiled loop,
#   several p per walk);
# - DENSE_ZERO_COST: one element of a dense image block (allocated and zeroed);
# - DENSE_FILL_COST: one non-zero written into it.
# CPU: measured on the 2-core EPYC (2026-12-01, 2 threads, 5,000 rows; medians with 10 and 1,000
# targets): sparse 43 and 50 (12-45 in the cells where the choice is close; far higher only
# where per-row work dominates and sparse wins anyway), zero 12 and 124, fill 53 and 638 (the
# unit, one GEMM multiply-add, is dearer with few targets). These constants pick the faster
# path in all 18 measured cells (one a 2 % tie) and in all 35 (n, k) of the real Figure 4 grid
# (sparse everywhere; the old model, without the cost of building dense blocks, took dense in
# 20 of them, 4x slower).
# CUDA: not measured, guesses (cuSPARSE SpGEMM, ~1e9-1e10 products/s, against bf16 tensor cores,
# ~3e14 multiply-adds/s; a zeroed element and a scattered entry about one and ten bytes' worth
# of HBM bandwidth); calibrate them on a GPU.
SPARSE_MAC_COST = {"cpu": 30.0, "cuda": 1e4}
DENSE_ZERO_COST = {"cpu": 30.0, "cuda": 50.0}
DENSE_FILL_COST = {"cpu": 300.0, "cuda": 500.0}


def use_dense(
    rows: int,
    targets: int,
    n: int,
    k_image: int,
    k_target: float,
    budget: int,
    device: torch.device,
) -> bool:
    """Dense GEMM when cheaper than the sparse product and the dense target fits the budget.

    A sparse product costs rows * k_image * (nnz of the target per anchor) multiply-adds. A
    dense one costs rows * n * targets, plus building the dense image blocks: rows * n zeroed
    elements and rows * k_image entries written. At small n (density k/n high) and many
    targets dense wins; with few targets building the blocks costs more than the GEMM saves.
    """
    if n * targets > budget:
        return False
    device_type = device.type if device.type in SPARSE_MAC_COST else "cpu"
    sparse = rows * k_image * (targets * k_target / n) * SPARSE_MAC_COST[device_type]
    dense = rows * (
        n * (targets + DENSE_ZERO_COST[device_type]) + k_image * DENSE_FILL_COST[device_type]
    )
    return dense < sparse


def densify(matrix: Tensor, dtype: torch.dtype) -> Tensor:
    """A CSR matrix as a dense one, by one flat copy of its entries (`to_dense` costs several
    times more per entry on a CPU)."""
    rows, cols = matrix.shape
    dense = torch.zeros(rows, cols, dtype=dtype, device=matrix.device)
    flat = _csr_row_ids(matrix) * cols + matrix.col_indices()
    dense.view(-1).index_copy_(0, flat, matrix.values().to(dtype))
    return dense


def transpose_csr(matrix: Tensor) -> Tensor:
    return matrix.t().to_sparse_csr()

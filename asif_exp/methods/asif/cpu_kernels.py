"""Fused CPU loops for the streaming top-k pass and for grid scoring, compiled by numba.

PyTorch has no single CPU operation for "append the entries of each row above that row's
threshold": it takes a compare, a `nonzero` and half a dozen index operations, each a pass over
memory, which together cost about a third of the similarity GEMM they follow. One compiled
loop per row does it in a single read of the tile, several times faster. Likewise the running
top-k is re-selected by bucketing each row's values (a histogram, then an exact look inside
the one bucket that holds the k-th value), about 4x faster than `torch.topk`, whose partition
spends its time on unpredictable branches. The engine uses these loops on CPU tensors only; on
a GPU it keeps its PyTorch path (tested equal).

Scoring a grid cell multiplies the same two sparsity patterns once per p. `grouped_products`
walks the patterns once for several p at a time (the p count is a compile-time constant, so
the inner loop unrolls) and reduces each image's target scores to its groups' best on the
fly: about 1.5x faster than one MKL sparse product per p, with bit-identical sums: the same
order (anchors ascending) and the same roundings. MKL's kernels from AVX2 on add each anchor's
targets in vectors of 8 (multiply, then add: two roundings) and the rest of them one by one in
fused multiply-adds (one rounding); older kernels never fuse. The loop does the same, in the
way the CPU's MKL is measured to (`scoring.mkl_fused_tail`).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba.extending import intrinsic
from numba.np.unsafe.ndarray import to_fixed_tuple
from torch import Tensor

# CPU tensors take these compiled loops (tests turn this off to run, on the CPU, the PyTorch
# path that GPUs take).
USE_CPU_KERNELS = True


@numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
def _append_above(sims, threshold, start, values, ids, fill, offset):
    for row in numba.prange(sims.shape[0]):
        filled, bar = fill[row], threshold[row]
        for col in range(sims.shape[1]):
            value = sims[row, col]
            if value > bar:
                values[row, offset + filled] = value
                ids[row, offset + filled] = start + col
                filled += 1
        fill[row] = filled


def _use_torch_threads() -> None:
    """As many threads as PyTorch's (`torch.set_num_threads` applies to these loops too)."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def append_above(
    sims: Tensor,
    threshold: Tensor,
    start: int,
    values: Tensor,
    ids: Tensor,
    fill: Tensor,
    offset: int,
) -> None:
    """For each row r, append the entries of `sims[r]` strictly above `threshold[r]` (in column
    order) to `values[r]` / `ids[r]` at columns offset + fill[r], ...; their ids are start + column;
    `fill` is advanced. The caller guarantees room: offset + fill[r] + sims.shape[1] <=
    values.shape[1].

    float32 `sims`, `threshold` (rows,), `values`; int32 `ids`; int64 `fill`; all contiguous CPU
    tensors, modified in place.
    """
    _use_torch_threads()
    _append_above(
        sims.numpy(), threshold.numpy(), start, values.numpy(), ids.numpy(), fill.numpy(), offset
    )


BUCKETS = 1024


@numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
def _keep_top(values, ids, width, k):
    for row in numba.prange(values.shape[0]):
        low, high = np.inf, -np.inf  # over the real entries (padding is -inf)
        for col in range(width):
            value = values[row, col]
            if value > -np.inf:
                low, high = min(low, value), max(high, value)
        scale = (BUCKETS - 1) / (high - low) if high > low else 0.0
        # Bucket of a value: monotone in the value, so whole buckets rank above one another.
        counts = np.zeros(BUCKETS, dtype=np.int64)
        for col in range(width):
            value = values[row, col]
            if value >= low:
                counts[int((value - low) * scale)] += 1
        above, bucket = 0, BUCKETS - 1  # entries in the buckets above `bucket`
        while above + counts[bucket] < k:
            above += counts[bucket]
            bucket -= 1
        inside = np.empty(counts[bucket], dtype=values.dtype)
        inside_ids = np.empty(counts[bucket], dtype=ids.dtype)
        found = 0
        for col in range(width):
            value = values[row, col]
            if value >= low and int((value - low) * scale) == bucket:
                inside[found], inside_ids[found] = value, ids[row, col]
                found += 1
        kth = np.sort(inside)[found - (k - above)]  # the k-th largest value of the row
        kept = 0
        for col in range(width):  # entries above it to the front, in place (kept <= col)
            value = values[row, col]
            values[row, kept], ids[row, kept] = value, ids[row, col]
            kept += value > kth
        if kept < k:  # entries equal to the k-th value fill the rest, lowest ids first
            tied = np.sort(inside_ids[inside == kth])
            for j in range(k - kept):
                values[row, kept + j], ids[row, kept + j] = kth, tied[j]


def keep_top(values: Tensor, ids: Tensor, width: int, k: int) -> None:
    """In place: columns [0, k) of each row become the top k of its columns [0, width), in no
    particular order; equal values at the boundary go to the lower id (ids unique per row).
    -inf entries are padding, never kept; every row must hold at least k finite entries.

    float32 `values` and int32 `ids`, contiguous CPU tensors; 1 <= k <= width.
    """
    _use_torch_threads()
    _keep_top(values.numpy(), ids.numpy(), width, k)


# Most p values one `grouped_products` call takes (one compiled loop per count, up to this).
MAX_WIDTH = 8
# The vector length of MKL's sparse product kernels that fuse the leftover terms (float32, AVX2).
MKL_VECTOR = 8


@intrinsic
def _fused_multiply_add(typingctx, a, b, c):
    """a * b + c rounded once (LLVM's fma), as MKL adds the terms left over by its vectors."""
    if not a == b == c:
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return c(a, b, c), codegen


def _grouped_products_loop(width: int, fused_tail: bool):
    """The loop of `grouped_products` for `width` p values at once, each anchor's last
    (targets % MKL_VECTOR) terms fused or not (compile-time constants)."""

    @numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def loop(image_crow, image_col, image_values, target_crow, target_row, target_values,
             target_group, out):  # fmt: skip
        targets, groups = target_group.shape[0], out.shape[2]
        for row in numba.prange(image_crow.shape[0] - 1):
            # acc[t * width + w]: the score of target t at the w-th p (one row, in cache).
            acc = np.zeros(targets * width, dtype=np.float32)
            for j in range(image_crow[row], image_crow[row + 1]):
                # In registers: the compiler cannot tell that `acc` does not overwrite them.
                weights = to_fixed_tuple(image_values[:, j], width)
                anchor = image_col[j]
                first, end = target_crow[anchor], target_crow[anchor + 1]
                tail = end - (end - first) % MKL_VECTOR if fused_tail else end
                for e in range(first, tail):
                    at, et = target_row[e] * width, e * width
                    for w in range(width):
                        acc[at + w] += weights[w] * target_values[et + w]
                for e in range(tail, end):
                    at, et = target_row[e] * width, e * width
                    for w in range(width):
                        acc[at + w] = _fused_multiply_add(
                            weights[w], target_values[et + w], acc[at + w]
                        )
            best = np.full(groups * width, -np.inf, dtype=np.float32)
            for t in range(targets):
                at, bt = t * width, target_group[t] * width
                for w in range(width):
                    best[bt + w] = max(best[bt + w], acc[at + w])
            for w in range(width):
                for g in range(groups):
                    out[w, row, g] = best[g * width + w]

    return loop


_GROUPED_PRODUCTS = {
    (width, fused_tail): _grouped_products_loop(width, fused_tail)
    for width in range(1, MAX_WIDTH + 1)
    for fused_tail in (False, True)
}


def grouped_products(
    image_crow: Tensor,
    image_col: Tensor,
    image_values: Tensor,
    target_crow: Tensor,
    target_row: Tensor,
    target_values: Tensor,
    target_group: Tensor,
    groups: int,
    fused_tail: bool = False,
) -> Tensor:
    """Scores of W sparse products sharing their patterns, reduced to each group's best target.

    The images are CSR (rows x n) with `image_values` (W, nnz), row w the values of the w-th
    product; the targets are CSR (n x targets), transposed, with `target_values` (nnz, W)
    (interleaved: they are read in the innermost loop). Returns float32 (W, rows, groups):
    out[w, r, g] = max over the targets t with target_group[t] = g of
    sum_a image_w[r, a] * target_w[a, t] (-inf for a group without targets). Sums run in each
    row's column order: with sorted column indices, the order of MKL's product. Each term is
    multiplied, then added; with `fused_tail`, the last (entries % MKL_VECTOR) of each anchor's
    target entries are added in one fused multiply-add, as MKL's AVX2+ kernels do.

    float32 values, int32 indices; contiguous CPU tensors; 1 <= W <= MAX_WIDTH.
    """
    width = image_values.shape[0]
    if not 1 <= width <= MAX_WIDTH or target_values.shape[1] != width:
        raise ValueError(f"{width} image value rows, {target_values.shape[1]} target columns")
    out = torch.empty(width, len(image_crow) - 1, groups)
    _use_torch_threads()
    _GROUPED_PRODUCTS[width, fused_tail](
        image_crow.numpy(),
        image_col.numpy(),
        image_values.numpy(),
        target_crow.numpy(),
        target_row.numpy(),
        target_values.numpy().reshape(-1),
        target_group.numpy(),
        out.numpy(),
    )
    return out

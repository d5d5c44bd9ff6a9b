"""Fused CPU loops for the streaming top-k pass, compiled by numba.

PyTorch has no single CPU operation for "append the entries of each row above that row's
threshold": it takes a compare, a `nonzero` and half a dozen index operations, each a pass over
memory, which together cost about a third of the similarity GEMM they follow. One compiled
loop per row does it in a single read of the tile, several times faster. The engine uses it on
CPU tensors only; on a GPU it keeps its PyTorch path (tested equal).
"""

from __future__ import annotations

import numba
import torch
from torch import Tensor


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
    `fill` is advanced. The caller guarantees room: fill[r] + sims.shape[1] <= width - offset.

    float32 `sims`, `threshold` (rows,), `values`; int32 `ids`; int64 `fill`; all contiguous CPU
    tensors, modified in place.
    """
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    _append_above(
        sims.numpy(), threshold.numpy(), start, values.numpy(), ids.numpy(), fill.numpy(), offset
    )

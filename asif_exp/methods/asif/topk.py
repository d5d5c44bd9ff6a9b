"""The streaming top-k pass: one visit of the anchors in prefix order, a running top-k_max per
row (the candidate pool) snapshotted at every n of the grid, exact ties to the lower anchor id
(`select_topk`), and the memo that lets the jobs of a multirun reuse a pass."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from asif_exp import distributed
from asif_exp.methods.asif import cpu_kernels
from asif_exp.methods.asif.cpu_kernels import append_above, keep_top
from asif_exp.methods.asif.options import AsifOptions
from asif_exp.rows import ChunkedRows, read_rows
from asif_exp.tensors import check_embeddings, unit_rows


@dataclass
class TopK:
    """Top-k similarities of each row to the first n anchors, sorted by (value desc, id asc)."""

    values: Tensor  # (rows, width) float32
    indices: Tensor  # (rows, width) int64 anchor ids
    n: int


def _order_by_value_then_id(values: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row by value descending, equal values by anchor id ascending (deterministic)."""
    by_id = ids.argsort(dim=1, stable=True)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    by_value = values.argsort(dim=1, descending=True, stable=True)
    return values.gather(1, by_value), ids.gather(1, by_value)


def select_topk(values: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row, sorted by (value desc, id asc); ties at the boundary go to the lower id.

    `torch.topk` alone leaves the choice among equal values to the backend. One extra place
    tells which rows are affected (the (k+1)-th value equals the k-th): only those rows are
    re-selected, and only rows with equal values inside the top-k are re-ordered, so the common
    tie-free case costs a single `topk`.
    """
    width = values.shape[1]
    k = min(k, width)
    top_values, positions = values.topk(min(k + 1, width), dim=1)
    if k < width:
        ambiguous = (top_values[:, k] == top_values[:, k - 1]).nonzero().flatten()
        top_values, positions = top_values[:, :k].contiguous(), positions[:, :k].contiguous()
    else:
        ambiguous = positions.new_empty(0)
    top_ids = ids.gather(1, positions)
    if ambiguous.numel():
        # Every entry tied with the k-th value, then the stable order among them decides.
        rows_values, rows_ids = values[ambiguous], ids[ambiguous]
        wide = int((rows_values >= top_values[ambiguous, k - 1 :]).sum(dim=1).max())
        rows_values, wide_positions = rows_values.topk(wide, dim=1)
        rows_values, rows_ids = _order_by_value_then_id(
            rows_values, rows_ids.gather(1, wide_positions)
        )
        top_values[ambiguous], top_ids[ambiguous] = rows_values[:, :k], rows_ids[:, :k]
    tied = (top_values[:, 1:] == top_values[:, :-1]).any(dim=1).nonzero().flatten()
    if tied.numel():
        top_values[tied], top_ids[tied] = _order_by_value_then_id(top_values[tied], top_ids[tied])
    return top_values, top_ids


def _chunk_bounds(ns: Sequence[int], chunk: int, first: int) -> list[tuple[int, int]]:
    """Anchor ranges [start, end), cut at every n of the grid: `first` anchors, then each range
    at most as long as all before it (and at most `chunk`).

    Growing geometrically keeps the share of a range above the running k-th value (about
    k / start for anchors in random order) small, so the threshold filter stays selective.
    """
    bounds, start = [], 0
    for n in sorted(set(ns)):
        while start < n:
            end = min(start + (first if start == 0 else min(chunk, max(start, first))), n)
            bounds.append((start, end))
            start = end
    return bounds


def matmul_f32(left: Tensor, right: Tensor) -> Tensor:
    """left @ right in float32; 16-bit GEMMs on CUDA accumulate and write float32.

    Rounding similarities or scores to 16 bits would create many exact ties (top-k, argmax).
    """
    if left.is_cuda and left.dtype != torch.float32:
        try:
            return torch.mm(left, right, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # a torch or a dtype without mm(out_dtype=...)
            pass
    return (left @ right).float()


def similarities(block: Tensor, anchors: Tensor) -> Tensor:
    """float32 (rows x anchors) similarities."""
    return matmul_f32(block, anchors.T)


def _resident(anchors: Tensor | ChunkedRows, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether all anchors fit on the device (half of its free memory); else copy per chunk."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return anchors.numel() * dtype.itemsize <= free // 2


def _keep_topk(values: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top-k set of each row (ties at the boundary to the lower id), in no particular order.

    An unsorted `topk` is about 3x cheaper than a sorted one; only the rare rows where an entry
    equal to the k-th value was left out are re-selected by `select_topk`.
    """
    if values.shape[1] <= k:
        return values, ids
    top_values, positions = values.topk(k, dim=1, sorted=False)
    top_ids = ids.gather(1, positions)
    kth = top_values.amin(dim=1, keepdim=True)
    # (A boolean sum into int32 is several times faster than the default int64 one.)
    left_out = (values == kth).sum(1, dtype=torch.int32) > (top_values == kth).sum(
        1, dtype=torch.int32
    )
    left_out = left_out.nonzero().flatten()
    if left_out.numel():
        top_values[left_out], top_ids[left_out] = select_topk(values[left_out], ids[left_out], k)
    return top_values, top_ids


# Re-select the running top-k each time the anchors seen grow by this factor.
RESELECT_GROWTH = 2.0


class CandidatePool:
    """Running top-k of a block of rows, and the candidates found since the last selection.

    One buffer per row: the running top-k in columns [0, k), then the pool. Until the first
    selection every anchor is a candidate (tiles are copied in whole); after it, only entries
    above the running k-th value are (`add_above`), appended at each row's own fill position.
    The top-k is re-selected, in place, when a row's pool could overflow, each time the anchors
    seen have doubled (a fresher threshold) and when a snapshot is due: a few selections per
    pass instead of one per anchor tile. Anchor ids are int32 (4 bytes less to move per
    candidate; 2**31 anchors is far beyond any anchor set).
    """

    def __init__(
        self, rows: int, k: int, capacity: int, pad_id: int, device: torch.device, tile: int
    ):
        self.compiled = device.type == "cpu" and cpu_kernels.USE_CPU_KERNELS
        if self.compiled:  # the compiled append needs room for a whole tile (small on a CPU)
            capacity = max(capacity, tile)
        self.k, self.capacity, self.pad_id = k, capacity, pad_id
        self.values = torch.full((rows, k + capacity), -torch.inf, device=device)
        self.ids = torch.full((rows, k + capacity), pad_id, dtype=torch.int32, device=device)
        self.held = 0  # columns of the running top-k in use: min(k, anchors seen)
        self.fill = torch.zeros(rows, dtype=torch.long, device=device)  # pool entries per row
        self.used = 0  # fill.max()
        self.kth: Tensor | None = None
        self.seen = self.seen_at_selection = 0  # anchors added so far / at the last selection

    def threshold(self) -> Tensor | None:
        """What a later anchor must exceed to matter: the running k-th value, once k are held.

        Stale between selections (the pool may hold better candidates): a lower bound, so the
        filter is still exact.
        """
        if self.held < self.k:
            return None
        if self.kth is None:
            self.kth = self.values[:, : self.k].amin(dim=1, keepdim=True)
        return self.kth

    def add_all(self, sims: Tensor, start: int) -> None:
        """Every entry of a tile of similarities to anchors start, start + 1, ... is a candidate."""
        width = sims.shape[1]
        self.seen += width
        if self.used + width > self.capacity:
            if width > self.capacity // 2:  # a wide tile: select from it directly
                self._select_with_tile(sims, start)
                return
            self.select()
        pool = slice(self.k + self.used, self.k + self.used + width)
        self.values[:, pool] = sims
        self.ids[:, pool] = torch.arange(
            start, start + width, dtype=torch.int32, device=sims.device
        )
        self.used += width
        self.fill.fill_(self.used)  # rows that had fewer keep a gap of padding

    def add_above(self, sims: Tensor, start: int) -> None:
        """Append the entries of a tile strictly above each row's threshold.

        Once k are held, a later anchor (higher id) can only enter with a value strictly above
        the running k-th value, and after the first few thousand anchors that is a small
        fraction of the tile. On a CPU one compiled loop per row appends them
        (`cpu_kernels.append_above`); elsewhere a compare and a `nonzero`, then a copy straight
        to their places in the pool by flat index.
        """
        width = sims.shape[1]
        self.seen += width
        if self.compiled:  # its capacity holds a whole tile (see __init__)
            if self.used + width > self.capacity:  # room for a whole tile in every row
                self.select()
            threshold = self.threshold().flatten()
            append_above(sims, threshold, start, self.values, self.ids, self.fill, self.k)
            self.used = int(self.fill.max())
        else:
            self._add_above_by_index(sims, start)
        if self.seen >= RESELECT_GROWTH * self.seen_at_selection:
            # A threshold from half the anchors seen lets through about twice the entries a
            # fresh one would: re-select each time the anchors seen double.
            self.select()

    def _add_above_by_index(self, sims: Tensor, start: int) -> None:
        rows, width = sims.shape
        found = (sims > self.threshold()).view(-1).nonzero().flatten()  # row-major order
        row = torch.div(found, width, rounding_mode="floor")
        counts = torch.bincount(row, minlength=rows)
        most = int((self.fill + counts).max())
        if most > self.capacity:
            self.select()
            most = int(counts.max())
            if most > self.capacity:  # more candidates than the pool holds: select directly
                self._select_with_tile(sims, start)
                return
        # Row r's candidates go to columns k + fill[r], k + fill[r] + 1, ...
        row_start = (counts.cumsum(0) - counts) - self.fill - self.k
        row_start -= torch.arange(rows, device=sims.device) * self.values.shape[1]
        place = torch.arange(len(found), device=sims.device) - row_start[row]
        # (take / index_copy_ are several times faster than the equivalent [] indexing.)
        self.values.view(-1).index_copy_(0, place, sims.take(found))
        self.ids.view(-1).index_copy_(0, place, (found - row * width + start).to(torch.int32))
        self.fill += counts
        self.used = most

    def _select_with_tile(self, sims: Tensor, start: int) -> None:
        """Select from the pool and every entry of a tile (anchors start, start + 1, ...)."""
        ids = torch.arange(start, start + sims.shape[1], dtype=torch.int32, device=sims.device)
        self.select(sims, ids.expand_as(sims))

    def select(self, values: Tensor | None = None, ids: Tensor | None = None) -> None:
        """Keep the top-k of (running top-k + pool + the given candidates); empty the pool."""
        if not self.used and values is None:
            return
        end = self.k + self.used
        # Columns [held, k) are padding; every row holds the same number of real entries until
        # k are held (candidates are then dense), so padding is never selected over a real one.
        seen = self.held + (self.used if values is None else self.used + values.shape[1])
        held = min(self.k, seen)
        if self.compiled and values is None:
            keep_top(self.values, self.ids, end, held)
        else:
            all_values, all_ids = self.values[:, :end], self.ids[:, :end]
            if values is not None:
                all_values = torch.cat([all_values, values], 1)
                all_ids = torch.cat([all_ids, ids], 1)
            top_values, top_ids = _keep_topk(all_values, all_ids, held)
            self.values[:, :held], self.ids[:, :held] = top_values, top_ids
        self.values[:, held:end] = -torch.inf  # (the compiled selection leaves copies there)
        self.ids[:, held:end] = self.pad_id
        self.held, self.kth = held, None
        self.seen_at_selection = self.seen
        self.fill.zero_()
        self.used = 0

    def snapshot(self) -> tuple[Tensor, Tensor]:
        """The running top-k so far, sorted by (value desc, id asc); ids as int64."""
        self.select()
        values, ids = self.values[:, : self.held], self.ids[:, : self.held]
        values, ids = select_topk(values, ids, self.held)
        self.values[:, : self.held], self.ids[:, : self.held] = values, ids
        return values, ids.long()


def tile_elements(device: torch.device, budget: int) -> int:
    """Similarities computed at once. On a CPU a tile that stays in cache (the compare and the
    `nonzero` then read it from cache, not memory) is faster than one large block; on a GPU
    larger is better, up to the budget."""
    return budget if device.type != "cpu" else min(budget, CPU_TILE_ELEMENTS)


# About 16 MB of float32 similarities: in the last-level cache of the CPUs we use.
CPU_TILE_ELEMENTS = 2**22
# Candidates held per row between two selections, in units of k_max.
POOL_WIDTH = 4


def anchor_reader(
    anchors: Tensor | ChunkedRows,
    n_max: int,
    device: torch.device,
    dtype: torch.dtype,
    normalize: bool,
) -> Callable[[int, int], Tensor]:
    """Anchor rows [start, end) as the pass multiplies them: on the device, in the compute
    dtype, unit-norm if `normalize` (per tile: never a normalised copy of all anchors; a row's
    norm does not depend on the rows beside it). `ChunkedRows` are read from disk tile by tile
    and each tile is checked for NaN and inf. On a GPU, anchors that fit are converted once and
    stay there (tile by tile, so no full float32 copy is made)."""

    def tile(start: int, end: int) -> Tensor:
        rows = read_rows(anchors, start, end)
        if isinstance(anchors, ChunkedRows):
            check_embeddings(f"anchor rows {start}..{end - 1}", rows)
        return (unit_rows(rows) if normalize else rows).to(device=device, dtype=dtype)

    if device.type != "cuda" or not _resident(anchors[:n_max], device, dtype):
        return tile
    resident = torch.empty((n_max, anchors.shape[1]), device=device, dtype=dtype)
    step = max(1, CPU_TILE_ELEMENTS // anchors.shape[1])
    for start in range(0, n_max, step):
        resident[start : start + step] = tile(start, min(start + step, n_max))
    return lambda start, end: resident[start:end]


def streaming_topk(
    queries: Tensor,
    anchors: Tensor | ChunkedRows,
    ns: Sequence[int],
    k_max: int,
    options: AsifOptions = AsifOptions(),
    desc: str = "top-k",
    progress: bool = True,
    to_cpu: bool = True,
    normalize_anchors: bool = False,
) -> dict[int, TopK]:
    """Running top-k_max of unit-norm `queries` against the first n `anchors`, for every n in `ns`
    (anchors unit-norm, or normalised tile by tile with `normalize_anchors`; a tensor, or
    `ChunkedRows` read from disk tile by tile).

    Anchors are visited once in prefix order, one tile (rows x anchors) of similarities at a time.
    Once k_max are held, only entries above the running k-th value are kept as candidates (a
    later anchor, with a higher id, must beat it strictly); the top-k is re-selected only when
    the candidate pool is full or at a snapshot n. Memory does not grow with n: a tile, the pool
    and the snapshots. Returned tensors live on the CPU, or on the compute device if not `to_cpu`.
    """
    device = options.resolved_device()
    dtype = options.resolved_dtype(device)
    ns = sorted(set(ns))
    n_max = ns[-1]
    rows = queries.shape[0]
    elements_per_tile = tile_elements(device, options.budget_elements)
    # All rows at once unless a tile of a useful width (GEMM efficiency) would not fit.
    min_width = min(n_max, 256)
    rows_per_block = max(1, min(rows, elements_per_tile // min_width))
    width = max(1, min(n_max, elements_per_tile // rows_per_block))
    bounds = _chunk_bounds(ns, width, first=min(width, max(4 * k_max, 4096)))

    anchor_tile = anchor_reader(anchors, n_max, device, dtype, normalize_anchors)
    snapshots: dict[int, list[tuple[Tensor, Tensor]]] = {n: [] for n in ns}
    bar = tqdm(
        total=len(bounds) * math.ceil(rows / rows_per_block), desc=desc, disable=not progress
    )
    for row_start in range(0, rows, rows_per_block):
        block = queries[row_start : row_start + rows_per_block].to(device=device, dtype=dtype)
        pool = CandidatePool(len(block), k_max, POOL_WIDTH * k_max, n_max, device, width)
        for start, end in bounds:
            sims = similarities(block, anchor_tile(start, end))
            if pool.threshold() is None:  # not yet a selection of k_max anchors
                pool.add_all(sims, start)
            else:
                pool.add_above(sims, start)
            if end in snapshots:
                snapshots[end].append(pool.snapshot())
            bar.update()
    bar.close()
    out = {}
    for n, parts in snapshots.items():
        values, ids = torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])
        out[n] = TopK(values.cpu(), ids.cpu(), n) if to_cpu else TopK(values, ids, n)
    return out


def memoized_topk(memo, side, queries, anchors, ns, k_max, options, progress) -> dict[int, TopK]:
    """Top-k snapshots from `memo` where a wide enough one exists; the rest in one pass (over
    this process's shard of the anchors, merged exactly, when several processes share it:
    `sharded_topk`)."""
    memo = {} if memo is None else memo
    device = options.resolved_device()
    key = (side, str(device), options.resolved_dtype(device))
    found = {n: memo[key + (n,)] for n in ns if key + (n,) in memo}
    found = {n: top for n, top in found.items() if top.values.shape[1] >= min(k_max, n)}
    missing = [n for n in ns if n not in found]
    if missing:
        one_pass = streaming_topk if distributed.world_size() == 1 else sharded_topk
        computed = one_pass(
            unit_rows(queries),
            anchors,
            missing,
            k_max,
            options,
            f"{side} top-k",
            progress,
            to_cpu=False,
            normalize_anchors=True,
        )
        found.update(computed)
        memo.update({key + (n,): top for n, top in computed.items()})
    return found


def shard_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """Anchor ids [low, high) of `rank` among `size`: consecutive, sizes differing by at most 1."""
    return n * rank // size, n * (rank + 1) // size


def sharded_topk(
    queries: Tensor,
    anchors,
    ns: Sequence[int],
    k_max: int,
    options,
    desc: str = "top-k",
    progress: bool = True,
    to_cpu: bool = True,
    normalize_anchors: bool = False,
) -> dict:
    """`streaming_topk` over this rank's shard of the anchors, merged exactly over all ranks:
    every rank returns the top-k_max of each n of `ns`, as one process would compute it."""
    me, size = distributed.rank(), distributed.world_size()
    ns = sorted(set(ns))
    n_max = ns[-1]
    low, high = shard_range(n_max, me, size)
    local_ns = sorted({min(n, high) - low for n in ns if n > low})
    local = {}
    if local_ns:
        local = streaming_topk(
            queries,
            anchors[low:high],
            local_ns,
            k_max,
            options,
            f"{desc}, shard {me + 1}/{size}",
            progress and me == 0,
            to_cpu=False,
            normalize_anchors=normalize_anchors,
        )
    device = options.resolved_device()
    rows = queries.shape[0]
    out = {}
    for n in ns:
        # This rank's list for n, padded to k_max (-inf never beats a similarity).
        values = torch.full((rows, k_max), -torch.inf, device=device)
        ids = torch.full((rows, k_max), n_max, dtype=torch.long, device=device)
        if n > low:
            part = local[min(n, high) - low]
            width = part.values.shape[1]
            values[:, :width], ids[:, :width] = part.values, part.indices + low
        every_values = [torch.empty_like(values) for _ in range(size)]
        every_ids = [torch.empty_like(ids) for _ in range(size)]
        dist.all_gather(every_values, values)
        dist.all_gather(every_ids, ids)
        top_values, top_ids = select_topk(
            torch.cat(every_values, 1), torch.cat(every_ids, 1), min(k_max, n)
        )
        if to_cpu:
            top_values, top_ids = top_values.cpu(), top_ids.cpu()
        out[n] = TopK(top_values, top_ids, n)
    return out

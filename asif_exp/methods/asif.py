"""The ASIF engine: sparse relative representations and zero-shot scoring over a (n, k, p) grid.

One streaming pass over the anchors, in prefix order, keeps a running top-k_max of every
query's (and every prompt's) similarities and snapshots it at each n of the grid. Every
(n, k, p) cell reuses that pass: a smaller k is a prefix of the sorted top-k_max, and every
p powers the same values. Scores are sparse-sparse products, or, where a cell is dense enough
for a GEMM to be cheaper, dense products over blocks that fit the memory budget; never a whole
dense queries x n matrix. CPU and GPU run the same code; on a GPU everything stays on the device
and only metrics and predictions come back.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from asif_exp.methods.base import MethodReport, ScoredCell, max_over_groups
from asif_exp.methods.cpu_kernels import MAX_WIDTH, append_above, grouped_products, keep_top
from asif_exp.options import (
    AGGREGATION_CHOICES,
    NORMALIZE_CHOICES,
    ConfigError,
    anchor_prefixes,
    check_prefixes,
    int_values,
    positive_values,
)
from asif_exp.problem import EmbeddedProblem
from asif_exp.tasks.classification import classification_metrics

log = logging.getLogger(__name__)

# torch warns on every sparse CSR use that the API is beta and unchecked; the engine builds its
# CSR tensors itself (sorted, in range), and the repeated warnings would bury the run's output.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# A row's largest power below this is computed relative to the row's largest value before it is
# normalised: the squares in its norm then stay normal floats, exact to float32 precision
# (sqrt(smallest normal x 2^24)).
SAFE_POWER = (torch.finfo(torch.float32).tiny * 2.0**24) ** 0.5


def resolve_device(device: str) -> torch.device:
    """ "auto" means cuda when available; anything else is a torch device name."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class AsifOptions:
    """Every option that changes a number. Defaults are the clean variant; see `AUTHORS_OPTIONS`."""

    clamp_negative: bool = True  # zero negative similarities before the power
    normalize: str = "both"  # which sides' representations are L2-normalised
    template_aggregation: str = "mean"  # "mean" of a class's prompt representations, or "max" score
    compute_dtype: str = "auto"  # similarity GEMM dtype; "auto": bfloat16 on GPU, float32 on CPU
    memory_budget_mb: float = 1024.0  # cap on one dense block (rows x anchors, or images x prompts)
    device: str = "auto"  # "auto": cuda when available

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZE_CHOICES:
            raise ConfigError(
                f"asif.normalize={self.normalize!r}: expected one of {NORMALIZE_CHOICES}"
            )
        if self.template_aggregation not in AGGREGATION_CHOICES:
            raise ConfigError(
                f"asif.template_aggregation={self.template_aggregation!r}: "
                f"expected one of {AGGREGATION_CHOICES}"
            )
        if self.compute_dtype != "auto" and self.compute_dtype not in DTYPES:
            raise ConfigError(
                f"asif.compute_dtype={self.compute_dtype!r}: "
                f"expected 'auto' or one of {list(DTYPES)}"
            )
        if self.memory_budget_mb <= 0:
            raise ConfigError(f"asif.memory_budget_mb={self.memory_budget_mb}: must be positive")

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        if self.compute_dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.compute_dtype]

    @property
    def budget_elements(self) -> int:
        return max(1, int(self.memory_budget_mb * 2**20 / 4))

    def to_dict(self) -> dict:
        return asdict(self)


# The authors' published function (noranta4/ASIF, `relreps.zero_shot_classification`): their
# running top-k buffer starts as k zeros, so a negative similarity never survives (negatives are
# clamped); only the prompt side is normalised; the best single prompt decides.
AUTHORS_OPTIONS = dict(clamp_negative=True, normalize="prompt", template_aggregation="max")
# Their structure without the zero buffer: negatives kept. Not a function the authors computed.
AUTHORS_UNCLAMPED_OPTIONS = {**AUTHORS_OPTIONS, "clamp_negative": False}
CLEAN_OPTIONS = dict(clamp_negative=True, normalize="both", template_aggregation="mean")
FUNCTIONS = {
    "clean": CLEAN_OPTIONS,
    "authors": AUTHORS_OPTIONS,
    "authors_unclamped": AUTHORS_UNCLAMPED_OPTIONS,
}


def function_of(options: AsifOptions) -> str:
    """Which named function the options compute: clean, authors, authors_unclamped or custom."""
    for name, values in FUNCTIONS.items():
        if all(getattr(options, key) == value for key, value in values.items()):
            return name
    return "custom"


@dataclass
class TopK:
    """Top-k similarities of each row to the first n anchors, sorted by (value desc, id asc)."""

    values: Tensor  # (rows, width) float32
    indices: Tensor  # (rows, width) int64 anchor ids
    n: int


# ----------------------------------------------------------------------------- validation


def check_embeddings(name: str, embeddings: Tensor) -> None:
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(
            f"{name}: expected a non-empty 2-D tensor, got shape {tuple(embeddings.shape)}"
        )
    # A row whose sum is finite has only finite entries (NaN and inf propagate; inf - inf is
    # NaN): one fast reduction instead of a full-size boolean tensor; only rows whose sum is
    # not finite (including finite rows that overflow it) are looked at entry by entry.
    finite = torch.isfinite(embeddings.sum(dim=1))
    if not bool(finite.all()):
        finite[~finite] = torch.isfinite(embeddings[~finite]).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"{name}: {int((~finite).sum())} rows contain NaN or inf (first rows: {bad})"
        )


def unit_rows(embeddings: Tensor) -> Tensor:
    """L2-normalise rows so that dot products are cosine similarities."""
    return torch.nn.functional.normalize(embeddings.float(), dim=1)


def check_grid(
    ns: Sequence[int],
    ks: Sequence[int],
    ps: Sequence[float],
    n_available: int,
    clamp_negative: bool = True,
) -> None:
    if not ns or not ks or not ps:
        raise ConfigError(f"empty grid: n={list(ns)}, k={list(ks)}, p={list(ps)}")
    check_prefixes(ns, n_available)
    for k in ks:
        if k < 1:
            raise ConfigError(f"asif.k={k}: must be at least 1")
    if min(ks) > max(ns):
        raise ConfigError(f"asif.k={min(ks)} exceeds every n in {sorted(ns)}: k must be <= n")
    for p in ps:
        if not p > 0:
            raise ConfigError(f"asif.p={p}: must be positive")
        if not clamp_negative and p != int(p):
            # A negative similarity has no real non-integer power: scores would be NaN.
            raise ConfigError(
                f"asif.p={p} with asif.clamp_negative=false: negative similarities have no "
                "real non-integer power; use an integer p or clamp negatives"
            )


# ----------------------------------------------------------------------------- top-k


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


def _matmul_f32(left: Tensor, right: Tensor) -> Tensor:
    """left @ right in float32; 16-bit GEMMs on CUDA accumulate and write float32.

    Rounding similarities or scores to 16 bits would create many exact ties (top-k, argmax).
    """
    if left.is_cuda and left.dtype != torch.float32:
        try:
            return torch.mm(left, right, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # a torch or a dtype without mm(out_dtype=...)
            pass
    return (left @ right).float()


def _similarities(block: Tensor, anchors: Tensor) -> Tensor:
    """float32 (rows x anchors) similarities."""
    return _matmul_f32(block, anchors.T)


def _resident(anchors: Tensor, device: torch.device, dtype: torch.dtype) -> bool:
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
# CPU tensors take the compiled loops of `cpu_kernels` (tests turn this off to run the PyTorch
# path that GPUs take on the CPU).
USE_CPU_KERNELS = True


class _CandidatePool:
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
        self.compiled = device.type == "cpu" and USE_CPU_KERNELS
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


def _tile_elements(device: torch.device, budget: int) -> int:
    """Similarities computed at once. On a CPU a tile that stays in cache (the compare and the
    `nonzero` then read it from cache, not memory) is faster than one large block; on a GPU
    larger is better, up to the budget."""
    return budget if device.type != "cpu" else min(budget, CPU_TILE_ELEMENTS)


# About 16 MB of float32 similarities: in the last-level cache of the CPUs we use.
CPU_TILE_ELEMENTS = 2**22
# Candidates held per row between two selections, in units of k_max.
POOL_WIDTH = 4


def streaming_topk(
    queries: Tensor,
    anchors: Tensor,
    ns: Sequence[int],
    k_max: int,
    options: AsifOptions = AsifOptions(),
    desc: str = "top-k",
    progress: bool = True,
    to_cpu: bool = True,
) -> dict[int, TopK]:
    """Running top-k_max of unit-norm `queries` against the first n `anchors`, for every n in `ns`.

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
    tile_elements = _tile_elements(device, options.budget_elements)
    # All rows at once unless a tile of a useful width (GEMM efficiency) would not fit.
    min_width = min(n_max, 256)
    rows_per_block = max(1, min(rows, tile_elements // min_width))
    width = max(1, min(n_max, tile_elements // rows_per_block))
    bounds = _chunk_bounds(ns, width, first=min(width, max(4 * k_max, 4096)))

    anchors = anchors[:n_max]
    if _resident(anchors, device, dtype):
        anchors = anchors.to(device=device, dtype=dtype)
    snapshots: dict[int, list[tuple[Tensor, Tensor]]] = {n: [] for n in ns}
    bar = tqdm(
        total=len(bounds) * math.ceil(rows / rows_per_block), desc=desc, disable=not progress
    )
    for row_start in range(0, rows, rows_per_block):
        block = queries[row_start : row_start + rows_per_block].to(device=device, dtype=dtype)
        pool = _CandidatePool(len(block), k_max, POOL_WIDTH * k_max, n_max, device, width)
        for start, end in bounds:
            sims = _similarities(block, anchors[start:end].to(device=device, dtype=dtype))
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


def _memoized_topk(memo, side, queries, anchors, ns, k_max, options, progress) -> dict[int, TopK]:
    """Top-k snapshots from `memo` where a wide enough one exists; the rest in one pass."""
    memo = {} if memo is None else memo
    device = options.resolved_device()
    key = (side, str(device), options.resolved_dtype(device))
    found = {n: memo[key + (n,)] for n in ns if key + (n,) in memo}
    found = {n: top for n, top in found.items() if top.values.shape[1] >= min(k_max, n)}
    missing = [n for n in ns if n not in found]
    if missing:
        computed = streaming_topk(
            unit_rows(queries),
            unit_rows(anchors),
            missing,
            k_max,
            options,
            f"{side} top-k",
            progress,
            to_cpu=False,
        )
        found.update(computed)
        memo.update({key + (n,): top for n, top in computed.items()})
    return found


# ----------------------------------------------------------------------------- representations


def _process(values: Tensor, p: float, clamp_negative: bool, normalize: bool) -> Tensor:
    """(rows, k) top-k similarities -> values of the relative representation (row order kept)."""
    if clamp_negative:
        values = values.clamp_min(0.0)
    # An integer power is repeated multiplication (faster than the generic float pow).
    exponent = int(p) if float(p).is_integer() else p
    powered = values.pow(exponent)
    if normalize:
        powered = _without_underflow(values, powered, exponent)
        powered = powered / powered.norm(dim=1, keepdim=True).clamp_min(
            torch.finfo(values.dtype).tiny
        )
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
class _SparseLayout:
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


def _row_layout(top: TopK, k: int, by_id: tuple[Tensor, Tensor] | None = None) -> _SparseLayout:
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
    return _SparseLayout(crow, col.reshape(-1), base, None, (rows, top.n))


def _transposed_layout(top: TopK, k: int, by_anchor: Tensor | None = None) -> _SparseLayout:
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
    return _SparseLayout(crow, row, top.values[:, :k], row * k + rank, (top.n, rows))


def relative_representation(
    top: TopK, k: int, p: float, clamp_negative: bool, normalize: bool
) -> Tensor:
    """Sparse CSR (rows x n): top-k similarities, clamped (optionally), raised to p, normalised."""
    return _row_layout(top, k).csr(p, clamp_negative, normalize)


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


def _normalize_csr_rows(matrix: Tensor) -> Tensor:
    rows, values = _csr_row_ids(matrix), matrix.values()
    norms = torch.zeros(matrix.shape[0], device=values.device).index_add_(0, rows, values * values)
    return _scale_csr(matrix, 1 / norms.sqrt().clamp_min(torch.finfo(values.dtype).tiny)[rows])


def _normalize_csr_columns(matrix: Tensor) -> Tensor:
    cols, values = matrix.col_indices(), matrix.values()
    norms = torch.zeros(matrix.shape[1], device=values.device).index_add_(0, cols, values * values)
    return _scale_csr(matrix, 1 / norms.sqrt().clamp_min(torch.finfo(values.dtype).tiny)[cols])


def _class_counts(prompt_class: Tensor, num_classes: int) -> Tensor:
    counts = torch.bincount(prompt_class, minlength=num_classes).float()
    if bool((counts == 0).any()):
        missing = (counts == 0).nonzero().flatten()[:5].tolist()
        raise ValueError(f"classes without any prompt: {missing}")
    return counts


def _averaging_t(prompt_class: Tensor, num_classes: int) -> Tensor:
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
    return _normalize_csr_rows(classes) if normalize else classes


def _csr_rows(matrix: Tensor, start: int, end: int) -> Tensor:
    crow = matrix.crow_indices()
    lo, hi = int(crow[start]), int(crow[end])
    return torch.sparse_csr_tensor(
        crow[start : end + 1] - lo,
        matrix.col_indices()[lo:hi],
        matrix.values()[lo:hi],
        (end - start, matrix.shape[1]),
        check_invariants=False,
    )


def _sparse_dense_product(left: Tensor, right: Tensor, out: Tensor) -> None:
    """out = left (CSR) @ right (CSR), `out` dense."""
    if left.device.type == "cpu":
        # MKL writes the dense result directly: about twice as fast as a sparse product + to_dense.
        try:
            torch.addmm(out, left, right, beta=0, out=out)  # beta=0: `out` is not read
            return
        except (RuntimeError, NotImplementedError):  # a build without MKL sparse
            pass
    out.copy_((left @ right).to_dense())


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


def _use_dense(
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


def _densify(matrix: Tensor, dtype: torch.dtype) -> Tensor:
    """A CSR matrix as a dense one, by one flat copy of its entries (`to_dense` costs several
    times more per entry on a CPU)."""
    rows, cols = matrix.shape
    dense = torch.zeros(rows, cols, dtype=dtype, device=matrix.device)
    flat = _csr_row_ids(matrix) * cols + matrix.col_indices()
    dense.view(-1).index_copy_(0, flat, matrix.values().to(dtype))
    return dense


def _scores_t(
    image_rr: Tensor, target_t: Tensor, budget: int, dense: bool, dtype: torch.dtype
) -> Tensor:
    """Dense float32 (images x targets) = image_rr (CSR images x n) @ target_t (CSR n x targets),
    in image chunks whose dense blocks (or sparse intermediate products) fit `budget` elements."""
    (images, n), targets = image_rr.shape, target_t.shape[1]
    if dense:
        target_dense = _densify(target_t, dtype)
        per_row = max(n, targets)
    else:  # a sparse product's intermediate products per image row
        per_row = image_rr.values().numel() / images * target_t.values().numel() / n
        per_row = max(targets, int(per_row))
    rows_per_chunk = max(1, budget // max(1, per_row))
    out = torch.empty(images, targets, device=image_rr.device)
    for start in range(0, images, rows_per_chunk):
        end = min(start + rows_per_chunk, images)
        chunk = _csr_rows(image_rr, start, end)
        if dense:
            out[start:end] = _matmul_f32(_densify(chunk, dtype), target_dense)
        else:
            _sparse_dense_product(chunk, target_t, out[start:end])
    return out


def _transpose_csr(matrix: Tensor) -> Tensor:
    return matrix.t().to_sparse_csr()


def sparse_scores(image_rr: Tensor, target_rr: Tensor, options: AsifOptions) -> Tensor:
    """Dense (images x targets) dot products of two sparse CSR matrices, returned on the CPU."""
    device = options.resolved_device()
    target_t = _transpose_csr(target_rr.to(device))
    return _scores_t(
        image_rr.to(device), target_t, options.budget_elements, False, torch.float32
    ).cpu()


# ----------------------------------------------------------------------------- the scoring core


def _targets_t(
    prompt_t: Tensor,
    groups: Tensor,
    num_groups: int,
    options: AsifOptions,
    averaging_t: Tensor | None = None,
) -> Tensor:
    """CSR (n x targets): the class means ("mean"; normalised if prompts are) or the prompts."""
    if options.template_aggregation != "mean":
        return prompt_t
    if averaging_t is None:
        averaging_t = _averaging_t(groups, num_groups)
    targets_t = prompt_t @ averaging_t  # (n x classes), the class means
    if options.normalize in ("both", "prompt"):
        targets_t = _normalize_csr_columns(targets_t)
    return targets_t


def score_targets(
    image_rr: Tensor,
    prompt_t: Tensor,
    groups: Tensor,
    num_groups: int,
    options: AsifOptions,
    dense: bool = False,
    averaging_t: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The one place ASIF turns representations into scores (grid, `class_scores`, AsifModel).

    `image_rr` is CSR (images x n); `prompt_t` the prompts' representations transposed, CSR
    (n x prompts), already normalised if the prompt side is. Returns (targets_t, target_scores,
    scores): the targets as CSR (n x targets), the class means ("mean") or the prompts ("max");
    their dense (images x targets) scores; and the (images x groups) scores.
    """
    device = image_rr.device
    targets_t = _targets_t(prompt_t, groups, num_groups, options, averaging_t)
    dtype = options.resolved_dtype(device) if dense else torch.float32
    target_scores = _scores_t(image_rr, targets_t, options.budget_elements, dense, dtype)
    if options.template_aggregation == "mean":
        return targets_t, target_scores, target_scores
    return targets_t, target_scores, max_over_groups(target_scores, groups, num_groups)


def prompt_representations_t(top: TopK, k: int, p: float, options: AsifOptions) -> Tensor:
    """The prompts' relative representations, transposed: CSR (n x prompts)."""
    normalize = options.normalize in ("both", "prompt")
    return _transposed_layout(top, k).csr(p, options.clamp_negative, normalize)


def image_representations(top: TopK, k: int, p: float, options: AsifOptions) -> Tensor:
    """The images' relative representations: CSR (images x n)."""
    return _row_layout(top, k).csr(p, options.clamp_negative, options.normalize == "both")


def class_scores(
    image_rr: Tensor,
    prompt_rr: Tensor,
    prompt_class: Tensor,
    num_classes: int,
    options: AsifOptions,
) -> Tensor:
    """(images x classes) scores under the configured template aggregation (on the CPU)."""
    device = options.resolved_device()
    _, _, scores = score_targets(
        image_rr.to(device),
        _transpose_csr(prompt_rr.to(device)),
        prompt_class.long().to(device),
        num_classes,
        options,
    )
    return scores.cpu()


# ----------------------------------------------------------------------------- the grid


@dataclass
class GridInputs:
    """Embeddings of one zero-shot problem, as the grid takes them (rows in dataset order)."""

    images: Tensor  # (images, d_image)
    anchor_images: Tensor  # (pairs, d_image)
    prompts: Tensor  # (prompts, d_text)
    anchor_texts: Tensor  # (pairs, d_text)
    prompt_class: Tensor  # (prompts,) group of each prompt
    num_classes: int

    def check(self) -> None:
        if self.anchor_images.shape[0] != self.anchor_texts.shape[0]:
            raise ValueError(
                f"anchor pairs mismatch: {self.anchor_images.shape[0]} image embeddings but "
                f"{self.anchor_texts.shape[0]} text embeddings"
            )
        for name, tensor in [
            ("image embeddings", self.images),
            ("anchor image embeddings", self.anchor_images),
            ("prompt embeddings", self.prompts),
            ("anchor text embeddings", self.anchor_texts),
        ]:
            check_embeddings(name, tensor)
        if len(self.prompt_class) != self.prompts.shape[0]:
            raise ValueError("labels / prompt_class must have one entry per image / prompt")
        if self.num_classes < 1:
            raise ValueError("the class list is empty")


def score_grid(
    inputs: GridInputs,
    ns: Iterable[int],
    ks: Iterable[int],
    ps: Iterable[float],
    options: AsifOptions = AsifOptions(),
    report: dict | None = None,
    progress: bool = True,
    topk_memo: dict | None = None,
) -> Iterator[tuple[dict, Tensor]]:
    """({"n", "k", "p"}, dense (images x classes) scores) for every valid cell of the grid,
    from one top-k pass per side. Scores stay on the compute device.

    Cells with k > n are skipped (listed in `report["skipped"]`); `report` also receives the
    timings. `topk_memo`, a dict the caller keeps between calls on the same embeddings (the
    jobs of a multirun), lets later calls reuse top-k passes instead of redoing them.
    """
    report = {} if report is None else report
    ns, ks, ps = sorted(set(ns)), sorted(set(ks)), sorted(set(ps))
    inputs.check()
    check_grid(ns, ks, ps, inputs.anchor_images.shape[0], options.clamp_negative)
    device = options.resolved_device()
    prompt_class = inputs.prompt_class.long().to(device)
    num_classes = inputs.num_classes
    mean = options.template_aggregation == "mean"
    # Built before the top-k pass so that a class without prompts fails fast.
    averaging_t = _averaging_t(prompt_class, num_classes) if mean else None

    report["skipped"] = [[n, k] for n in ns for k in ks if k > n]
    report["underflowed"] = []
    k_max = max(k for k in ks if k <= ns[-1])
    start = time.perf_counter()
    image_top = _memoized_topk(
        topk_memo, "image", inputs.images, inputs.anchor_images, ns, k_max, options, progress
    )
    prompt_top = _memoized_topk(
        topk_memo, "prompt", inputs.prompts, inputs.anchor_texts, ns, k_max, options, progress
    )
    _synchronize(device)
    report["topk_s"] = time.perf_counter() - start

    scoring_s = 0.0
    images, prompts = inputs.images.shape[0], len(prompt_class)
    valid = [(n, k) for n in ns for k in ks if k <= n]
    bar = tqdm(
        total=len(valid) * len(ps),
        desc="grid cells",
        disable=not progress or len(valid) * len(ps) == 1,
    )
    prompt_by_anchor, image_by_id = {}, {}
    # A side that is not normalised keeps its scale (it matters for text->image retrieval with
    # normalize=prompt): not rescaled, but its underflowed rows are flagged.
    unnormalised = [("image", image_top)] if options.normalize != "both" else []
    unnormalised += [("prompt", prompt_top)] if options.normalize == "none" else []
    for n, k in valid:
        start = time.perf_counter()
        # The sparsity patterns depend on (n, k) only: built once, reused for every p; the
        # sorts behind them once per n, for every k.
        if n not in prompt_by_anchor:
            prompt_by_anchor = {n: prompt_top[n].indices.reshape(-1).argsort(stable=True)}
            image_by_id = {n: image_top[n].indices.sort(dim=1)}
        image_layout = _row_layout(image_top[n], k, image_by_id[n])
        prompt_layout = _transposed_layout(prompt_top[n], k, prompt_by_anchor[n])
        targets = num_classes if mean else prompts
        k_target = k * prompts / num_classes if mean else k  # a class holds its prompts' anchors
        dense = _use_dense(images, targets, n, k, min(k_target, n), options.budget_elements, device)
        cell = _cell_scores(
            image_layout, prompt_layout, ps, prompt_class, num_classes, options, dense, averaging_t
        )
        for p, scores in cell:
            scoring_s += time.perf_counter() - start
            for side, top in unnormalised:
                rows = underflowed_rows(top[n], k, p, options.clamp_negative)
                if rows:
                    log.warning(
                        "cell n=%d k=%d p=%g: %d %s representation(s) of %d underflowed (not "
                        "normalised, so not rescaled; listed in the notes)",
                        *(n, k, p, rows, side, top[n].values.shape[0]),
                    )
                    report["underflowed"].append(
                        {"n_used": n, "k": k, "p": p, "side": side, "rows": rows}
                    )
            yield {"n": n, "k": k, "p": p}, scores
            start = time.perf_counter()
            bar.update()
    bar.close()
    report["scoring_s"] = scoring_s


def _cell_scores(
    image_layout: _SparseLayout,
    prompt_layout: _SparseLayout,
    ps: Sequence[float],
    groups: Tensor,
    num_groups: int,
    options: AsifOptions,
    dense: bool,
    averaging_t: Tensor | None,
) -> Iterator[tuple[float, Tensor]]:
    """(p, (images x groups) scores) for every p of one (n, k) cell, in the order of `ps`.

    On a CPU, sparse cells take the compiled loop, several p per walk over the two patterns
    (as many as the memory budget holds the scores of); elsewhere, one product per p. Both give
    the same sums, bit for bit.
    """
    clamp, images = options.clamp_negative, image_layout.shape[0]
    normalize_image = options.normalize == "both"
    normalize_prompt = options.normalize in ("both", "prompt")
    compiled = image_layout.crow.device.type == "cpu" and USE_CPU_KERNELS and not dense
    scores_per_p = max(1, images * num_groups)
    width = max(1, min(MAX_WIDTH, options.budget_elements // scores_per_p)) if compiled else 1
    for start in range(0, len(ps), width):
        batch = ps[start : start + width]
        if compiled and len(batch) > 1:  # (for a single p, MKL's product is as fast)
            targets = [
                _targets_t(
                    prompt_layout.csr(p, clamp, normalize_prompt),
                    groups,
                    num_groups,
                    options,
                    averaging_t,
                )
                for p in batch
            ]
            if all(_same_pattern(targets[0], other) for other in targets[1:]):
                mean = options.template_aggregation == "mean"
                scores = grouped_products(  # int32 indices: less memory to read per product
                    image_layout.crow.int(),
                    image_layout.col.int(),
                    torch.stack([image_layout.values(p, clamp, normalize_image) for p in batch]),
                    targets[0].crow_indices().int(),
                    targets[0].col_indices().int(),
                    torch.stack([target.values() for target in targets], 1),
                    (torch.arange(num_groups) if mean else groups).int(),  # mean: class = group
                    num_groups,
                )
                yield from zip(batch, scores, strict=True)
                continue
        for p in batch:
            _, _, scores = score_targets(
                image_layout.csr(p, clamp, normalize_image),
                prompt_layout.csr(p, clamp, normalize_prompt),
                groups,
                num_groups,
                options,
                dense,
                averaging_t,
            )
            yield p, scores


def _same_pattern(a: Tensor, b: Tensor) -> bool:
    return torch.equal(a.crow_indices(), b.crow_indices()) and torch.equal(
        a.col_indices(), b.col_indices()
    )


@dataclass
class CellResult:
    n: int
    k: int
    p: float
    top1: float
    top5: float
    mean_per_class_recall: float
    per_class_accuracy: list[float | None]  # None: a class without images
    no_overlap_fraction: float  # queries that share no anchor with any prompt (scores all 0)
    predictions: Tensor  # (queries,) predicted class
    scores: Tensor | None = None  # (queries, classes), kept only when asked for


def evaluate_grid(
    image_embeddings: Tensor,
    anchor_image_embeddings: Tensor,
    prompt_embeddings: Tensor,
    anchor_text_embeddings: Tensor,
    labels: Tensor,
    prompt_class: Tensor,
    num_classes: int,
    ns: Iterable[int],
    ks: Iterable[int],
    ps: Iterable[float],
    options: AsifOptions = AsifOptions(),
    keep_scores: bool = False,
    progress: bool = True,
    topk_memo: dict | None = None,
) -> tuple[list[CellResult], dict]:
    """Zero-shot classification accuracy for every valid (n, k, p): `score_grid` plus the
    classification metrics, in one call (for benchmarks and tests). Returns (cells, timings),
    the skipped cells under timings["skipped"]."""
    inputs = GridInputs(
        image_embeddings,
        anchor_image_embeddings,
        prompt_embeddings,
        anchor_text_embeddings,
        prompt_class,
        num_classes,
    )
    if len(labels) != image_embeddings.shape[0]:
        raise ValueError("labels / prompt_class must have one entry per image / prompt")
    labels = labels.long().to(options.resolved_device())
    timings: dict = {}
    cells = []
    for params, scores in score_grid(inputs, ns, ks, ps, options, timings, progress, topk_memo):
        metrics = classification_metrics(scores, labels, num_classes)
        cells.append(CellResult(**params, scores=scores.cpu() if keep_scores else None, **metrics))
    return cells, timings


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the method


def asif_options(cfg) -> AsifOptions:
    """The `asif` config group (and `device`) as engine options; bad values fail here."""
    return AsifOptions(
        clamp_negative=cfg.asif.clamp_negative,
        normalize=cfg.asif.normalize,
        template_aggregation=cfg.asif.template_aggregation,
        compute_dtype=cfg.asif.compute_dtype,
        memory_budget_mb=cfg.asif.memory_budget_mb,
        device=cfg.device,
    )


# Top-k passes kept between the jobs of an in-process multirun over k, p and n; only the
# latest set of embeddings is kept, to bound memory.
_TOPK_MEMO: dict[tuple, dict] = {}


def topk_memo_for(embedding_keys: tuple) -> dict:
    if embedding_keys not in _TOPK_MEMO:
        _TOPK_MEMO.clear()
        _TOPK_MEMO[embedding_keys] = {}
    return _TOPK_MEMO[embedding_keys]


@dataclass
class AsifMethod:
    """ASIF over the grid anchor prefixes x `asif.k` x `asif.p`, in one top-k pass."""

    ks: list[int]
    ps: list[float]
    options: AsifOptions
    preset: str = "clean"
    progress: bool = True
    name: str = "asif"

    def record(self) -> dict:
        return {
            **self.options.to_dict(),
            "preset": self.preset,
            "function": function_of(self.options),
        }

    def check(self, ns: list[int]) -> None:
        check_grid(ns, self.ks, self.ps, max(ns), self.options.clamp_negative)

    def score(
        self, problem: EmbeddedProblem, ns: list[int], report: MethodReport
    ) -> Iterator[ScoredCell]:
        targets = problem.targets
        groups = targets.groups
        if groups is None:  # each text its own target
            groups = torch.arange(len(targets.texts))
        inputs = GridInputs(
            problem.images,
            problem.anchor_images,
            targets.embeddings,
            problem.anchor_texts,
            groups,
            targets.count,
        )
        grid: dict = {}
        memo = topk_memo_for(problem.cache_keys)
        for params, scores in score_grid(
            inputs, ns, self.ks, self.ps, self.options, grid, self.progress, memo
        ):
            yield ScoredCell(params, scores)
        report.notes["skipped_cells_k_gt_n"] = grid.pop("skipped")
        underflowed = grid.pop("underflowed")
        if underflowed:
            report.notes["underflowed_cells"] = underflowed
        report.timings.update(grid)


def build(cfg) -> AsifMethod:
    options = asif_options(cfg)
    function = function_of(options)
    if function != cfg.asif.preset and cfg.asif.preset != "custom":
        log.warning(
            "asif.preset=%s, but the options compute the %r function; results record both",
            cfg.asif.preset,
            function,
        )
    return AsifMethod(
        ks=int_values("asif.k", cfg.asif.k),
        ps=positive_values("asif.p", cfg.asif.p),
        options=options,
        preset=cfg.asif.preset,
        progress=cfg.progress,
    )


def grid_values(cfg, n_available: int) -> tuple[list[int], list[int], list[float]]:
    """asif.n, asif.k and asif.p as typed lists, checked against the anchors available."""
    ns = anchor_prefixes(cfg.asif.n, n_available)
    method = build(cfg)
    method.check(ns)
    return ns, method.ks, method.ps


@dataclass
class ModelScores:
    """One scoring pass of a single (n, k, p) model, kept whole for explanations and usage."""

    image_rr: Tensor  # sparse CSR (queries x n)
    targets: Tensor  # sparse CSR (targets x n): class means ("mean") or prompts ("max")
    target_scores: Tensor  # (queries x targets)
    scores: Tensor  # (queries x classes)


def model_scores(
    image_top: TopK,
    prompt_top: TopK,
    k: int,
    p: float,
    groups: Tensor,
    num_groups: int,
    options: AsifOptions,
) -> ModelScores:
    """The scoring core applied to one model's top-k snapshots; results on the CPU."""
    image_rr = image_representations(image_top, k, p, options)
    prompt_t = prompt_representations_t(prompt_top, k, p, options)
    targets_t, target_scores, scores = score_targets(
        image_rr, prompt_t, groups.long().to(image_rr.device), num_groups, options
    )
    return ModelScores(
        image_rr.cpu(), _transpose_csr(targets_t).cpu(), target_scores.cpu(), scores.cpu()
    )

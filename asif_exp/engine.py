"""The ASIF engine: sparse relative representations and zero-shot scoring over a (n, k, p) grid.

One streaming pass over the anchors, in prefix order, keeps a running top-k_max of every
query's (and every prompt's) similarities and snapshots it at each n of the grid. Every
(n, k, p) cell reuses that pass: a smaller k is a prefix of the sorted top-k_max, and every
p powers the same values. Scores are sparse-sparse products, never a dense queries x n matrix.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

NORMALIZE_CHOICES = ("both", "prompt", "none")
AGGREGATION_CHOICES = ("mean", "max")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
            raise ValueError(f"asif.normalize={self.normalize!r}: expected one of {NORMALIZE_CHOICES}")
        if self.template_aggregation not in AGGREGATION_CHOICES:
            raise ValueError(
                f"asif.template_aggregation={self.template_aggregation!r}: "
                f"expected one of {AGGREGATION_CHOICES}"
            )
        if self.compute_dtype != "auto" and self.compute_dtype not in DTYPES:
            raise ValueError(
                f"asif.compute_dtype={self.compute_dtype!r}: expected 'auto' or one of {list(DTYPES)}"
            )
        if self.memory_budget_mb <= 0:
            raise ValueError(f"asif.memory_budget_mb={self.memory_budget_mb}: must be positive")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        if self.compute_dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.compute_dtype]

    @property
    def budget_elements(self) -> int:
        return max(1, int(self.memory_budget_mb * 2**20 / 4))

    def to_dict(self) -> dict:
        return asdict(self)


# What the authors' published code does (see DESIGN.md): no clamping, only the prompt side
# normalised, and the best single prompt decides.
AUTHORS_OPTIONS = dict(clamp_negative=False, normalize="prompt", template_aggregation="max")


@dataclass
class TopK:
    """Top-k similarities of each row to the first n anchors, sorted by (value desc, id asc)."""

    values: Tensor  # (rows, width) float32
    indices: Tensor  # (rows, width) int64 anchor ids
    n: int


# ----------------------------------------------------------------------------- validation


def check_embeddings(name: str, embeddings: Tensor) -> None:
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty 2-D tensor, got shape {tuple(embeddings.shape)}")
    finite = torch.isfinite(embeddings).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"{name}: {int((~finite).sum())} rows contain NaN or inf (first rows: {bad})"
        )


def unit_rows(embeddings: Tensor) -> Tensor:
    """L2-normalise rows so that dot products are cosine similarities."""
    return torch.nn.functional.normalize(embeddings.float(), dim=1)


def check_grid(ns: Sequence[int], ks: Sequence[int], ps: Sequence[float], n_available: int) -> None:
    if not ns or not ks or not ps:
        raise ValueError(f"empty grid: n={list(ns)}, k={list(ks)}, p={list(ps)}")
    for n in ns:
        if n < 1 or n > n_available:
            raise ValueError(f"asif.n={n}: must be between 1 and the {n_available} anchors available")
    for k in ks:
        if k < 1:
            raise ValueError(f"asif.k={k}: must be at least 1")
    if min(ks) > max(ns):
        raise ValueError(f"asif.k={min(ks)} exceeds every n in {sorted(ns)}: k must be <= n")
    for p in ps:
        if not p > 0:
            raise ValueError(f"asif.p={p}: must be positive")


# ----------------------------------------------------------------------------- top-k


def _order_by_value_then_id(values: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row by value descending, equal values by anchor id ascending (deterministic)."""
    by_id = ids.argsort(dim=1, stable=True)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    by_value = values.argsort(dim=1, descending=True, stable=True)
    return values.gather(1, by_value), ids.gather(1, by_value)


def select_topk(values: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row, ties at the boundary going to the lower anchor id.

    `torch.topk` alone leaves the choice among equal values to the backend; rows where the
    k-th value is tied beyond the k places are re-selected with a stable sort.
    """
    k = min(k, values.shape[1])
    top_values, positions = values.topk(k, dim=1)
    top_ids = ids.gather(1, positions)
    kth = top_values[:, -1:]
    ambiguous = ((values >= kth).sum(dim=1) > k).nonzero().flatten()
    if ambiguous.numel():
        rows_values, rows_ids = _order_by_value_then_id(values[ambiguous], ids[ambiguous])
        top_values[ambiguous], top_ids[ambiguous] = rows_values[:, :k], rows_ids[:, :k]
    return _order_by_value_then_id(top_values, top_ids)


def _chunk_bounds(ns: Sequence[int], chunk: int) -> list[tuple[int, int]]:
    """Anchor ranges [start, end) of at most `chunk` anchors, cut at every n of the grid."""
    bounds, start = [], 0
    for n in sorted(set(ns)):
        while start < n:
            end = min(start + chunk, n)
            bounds.append((start, end))
            start = end
    return bounds


def streaming_topk(
    queries: Tensor,
    anchors: Tensor,
    ns: Sequence[int],
    k_max: int,
    options: AsifOptions = AsifOptions(),
    desc: str = "top-k",
    progress: bool = True,
) -> dict[int, TopK]:
    """Running top-k_max of unit-norm `queries` against the first n `anchors`, for every n in `ns`.

    Anchors are visited once in prefix order; at most `options.memory_budget_mb` of similarities
    exist at a time. Returned tensors live on the CPU.
    """
    device = options.resolved_device()
    dtype = options.resolved_dtype(device)
    ns = sorted(set(ns))
    n_max = ns[-1]
    rows = queries.shape[0]
    budget = options.budget_elements
    # Prefer all rows at once and long anchor chunks; split rows only when a useful chunk
    # (a few times k_max) would not fit.
    min_chunk = min(n_max, max(4 * k_max, 4096))
    rows_per_block = max(1, min(rows, budget // min_chunk))
    chunk = max(1, min(n_max, budget // rows_per_block))
    bounds = _chunk_bounds(ns, chunk)

    anchors_on_device = anchors[:n_max].to(device=device, dtype=dtype)
    snapshots: dict[int, list[tuple[Tensor, Tensor]]] = {n: [] for n in ns}
    bar = tqdm(
        total=len(bounds) * math.ceil(rows / rows_per_block), desc=desc, disable=not progress
    )
    for row_start in range(0, rows, rows_per_block):
        block = queries[row_start : row_start + rows_per_block].to(device=device, dtype=dtype)
        run_values = torch.empty(block.shape[0], 0, device=device)
        run_ids = torch.empty(block.shape[0], 0, dtype=torch.long, device=device)
        for start, end in bounds:
            sims = (block @ anchors_on_device[start:end].T).float()
            ids = torch.arange(start, end, device=device).expand_as(sims)
            chunk_values, chunk_ids = select_topk(sims, ids, k_max)
            run_values, run_ids = select_topk(
                torch.cat([run_values, chunk_values], dim=1),
                torch.cat([run_ids, chunk_ids], dim=1),
                k_max,
            )
            if end in snapshots:
                snapshots[end].append((run_values.cpu(), run_ids.cpu()))
            bar.update()
    bar.close()
    return {
        n: TopK(torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts]), n)
        for n, parts in snapshots.items()
    }


def _memoized_topk(memo, side, queries, anchors, ns, k_max, options, progress) -> dict[int, TopK]:
    """Top-k snapshots from `memo` where a wide enough one exists; the rest in one pass."""
    memo = {} if memo is None else memo
    key = (side, options.resolved_dtype(options.resolved_device()))
    found = {n: memo[key + (n,)] for n in ns if key + (n,) in memo}
    found = {n: top for n, top in found.items() if top.values.shape[1] >= min(k_max, n)}
    missing = [n for n in ns if n not in found]
    if missing:
        computed = streaming_topk(
            unit_rows(queries), unit_rows(anchors), missing, k_max, options, f"{side} top-k", progress
        )
        found.update(computed)
        memo.update({key + (n,): top for n, top in computed.items()})
    return found


# ----------------------------------------------------------------------------- representations


def relative_representation(
    top: TopK, k: int, p: float, clamp_negative: bool, normalize: bool
) -> Tensor:
    """Sparse CSR (rows x n): top-k similarities, clamped (optionally), raised to p, normalised."""
    if k > top.n:
        raise ValueError(f"k={k} exceeds n={top.n}: cannot keep more anchors than there are")
    values, ids = top.values[:, :k], top.indices[:, :k]
    if clamp_negative:
        values = values.clamp_min(0.0)
    values = values.pow(p)
    if normalize:
        values = values / values.norm(dim=1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
    return _csr_from_rows(values, ids, top.n)


def _csr_from_rows(values: Tensor, ids: Tensor, n: int) -> Tensor:
    ids, order = ids.sort(dim=1)  # CSR kernels want sorted column indices
    values = values.gather(1, order)
    rows, width = ids.shape
    crow = torch.arange(0, rows * width + 1, width, dtype=torch.long)
    return torch.sparse_csr_tensor(
        crow, ids.reshape(-1), values.reshape(-1), (rows, n), check_invariants=False
    )


def _normalize_csr_rows(matrix: Tensor) -> Tensor:
    coo = matrix.to_sparse_coo().coalesce()
    row, values = coo.indices()[0], coo.values()
    norms = torch.zeros(matrix.shape[0]).index_add_(0, row, values * values).sqrt()
    values = values / norms[row].clamp_min(torch.finfo(values.dtype).tiny)
    return torch.sparse_coo_tensor(coo.indices(), values, coo.shape).to_sparse_csr()


def class_representation(prompt_rr: Tensor, prompt_class: Tensor, num_classes: int, normalize: bool):
    """Mean of each class's prompt representations (a sparse C x n matrix)."""
    counts = torch.bincount(prompt_class, minlength=num_classes).float()
    if bool((counts == 0).any()):
        missing = (counts == 0).nonzero().flatten()[:5].tolist()
        raise ValueError(f"classes without any prompt: {missing}")
    prompts = torch.arange(len(prompt_class))
    averaging = torch.sparse_coo_tensor(
        torch.stack([prompt_class, prompts]), 1.0 / counts[prompt_class], (num_classes, len(prompts))
    ).to_sparse_csr()
    classes = averaging @ prompt_rr
    return _normalize_csr_rows(classes) if normalize else classes


def sparse_scores(image_rr: Tensor, target_rr: Tensor, options: AsifOptions) -> Tensor:
    """Dense (images x targets) dot products of two sparse CSR matrices, in image chunks."""
    device = options.resolved_device()
    target_t = target_rr.t().to_sparse_csr().to(device)  # (n x targets)
    rows_per_chunk = max(1, options.budget_elements // max(1, target_rr.shape[0]))
    crow, col, val = image_rr.crow_indices(), image_rr.col_indices(), image_rr.values()
    out = []
    for start in range(0, image_rr.shape[0], rows_per_chunk):
        end = min(start + rows_per_chunk, image_rr.shape[0])
        lo, hi = int(crow[start]), int(crow[end])
        chunk = torch.sparse_csr_tensor(
            crow[start : end + 1] - lo,
            col[lo:hi],
            val[lo:hi],
            (end - start, image_rr.shape[1]),
            check_invariants=False,
        ).to(device)
        out.append((chunk @ target_t).to_dense().cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------- scoring and metrics


@dataclass
class CellResult:
    n: int
    k: int
    p: float
    top1: float
    top5: float
    mean_per_class_recall: float
    per_class_accuracy: list[float]
    no_overlap_fraction: float  # queries that share no anchor with any prompt (scores all 0)
    predictions: Tensor  # (queries,) predicted class
    scores: Tensor | None = None  # (queries, classes), kept only when asked for

    def metrics(self) -> dict:
        return {
            "n": self.n,
            "k": self.k,
            "p": self.p,
            "top1": self.top1,
            "top5": self.top5,
            "mean_per_class_recall": self.mean_per_class_recall,
            "no_overlap_fraction": self.no_overlap_fraction,
        }


def class_scores(
    image_rr: Tensor, prompt_rr: Tensor, prompt_class: Tensor, num_classes: int, options: AsifOptions
) -> Tensor:
    """(images x classes) scores under the configured template aggregation."""
    normalize_prompt = options.normalize in ("both", "prompt")
    if options.template_aggregation == "mean":
        classes = class_representation(prompt_rr, prompt_class, num_classes, normalize_prompt)
        return sparse_scores(image_rr, classes, options)
    prompt_scores = sparse_scores(image_rr, prompt_rr, options)
    out = torch.full((prompt_scores.shape[0], num_classes), -torch.inf)
    index = prompt_class.expand(prompt_scores.shape[0], -1)
    return out.scatter_reduce(1, index, prompt_scores, reduce="amax")


def accuracy_metrics(scores: Tensor, labels: Tensor, num_classes: int) -> dict:
    """top-1, top-5, per-class accuracy; argmax ties go to the lower class index."""
    predictions = scores.argmax(dim=1)
    correct = predictions == labels
    top5_k = min(5, num_classes)
    # Rank of the true class: classes scoring strictly higher, plus ties at lower index.
    true_scores = scores.gather(1, labels[:, None])
    higher = (scores > true_scores).sum(1)
    tied_before = ((scores == true_scores) & (torch.arange(num_classes) < labels[:, None])).sum(1)
    in_top5 = (higher + tied_before) < top5_k
    per_class = []
    for c in range(num_classes):
        mask = labels == c
        per_class.append(float(correct[mask].float().mean()) if bool(mask.any()) else float("nan"))
    present = [a for a in per_class if not math.isnan(a)]
    return {
        "predictions": predictions,
        "top1": float(correct.float().mean()),
        "top5": float(in_top5.float().mean()),
        "per_class_accuracy": per_class,
        "mean_per_class_recall": sum(present) / len(present),
    }


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
    """Zero-shot accuracy for every valid (n, k, p) of the grid from one top-k pass per side.

    Cells with k > n are skipped (listed in the returned timings under "skipped").
    `topk_memo`, a dict the caller keeps between calls on the same embeddings (the jobs of a
    multirun), lets later calls reuse top-k passes instead of redoing them.
    Returns (cells, timings).
    """
    ns, ks, ps = sorted(set(ns)), sorted(set(ks)), sorted(set(ps))
    if anchor_image_embeddings.shape[0] != anchor_text_embeddings.shape[0]:
        raise ValueError(
            f"anchor pairs mismatch: {anchor_image_embeddings.shape[0]} image embeddings but "
            f"{anchor_text_embeddings.shape[0]} text embeddings"
        )
    for name, tensor in [
        ("image embeddings", image_embeddings),
        ("anchor image embeddings", anchor_image_embeddings),
        ("prompt embeddings", prompt_embeddings),
        ("anchor text embeddings", anchor_text_embeddings),
    ]:
        check_embeddings(name, tensor)
    if len(labels) != image_embeddings.shape[0] or len(prompt_class) != prompt_embeddings.shape[0]:
        raise ValueError("labels / prompt_class must have one entry per image / prompt")
    if num_classes < 1:
        raise ValueError("the class list is empty")
    check_grid(ns, ks, ps, anchor_image_embeddings.shape[0])
    labels, prompt_class = labels.long().cpu(), prompt_class.long().cpu()

    timings: dict = {"skipped": [[n, k] for n in ns for k in ks if k > n]}
    k_max = max(k for k in ks if k <= ns[-1])
    start = time.perf_counter()
    image_top = _memoized_topk(
        topk_memo, "image", image_embeddings, anchor_image_embeddings, ns, k_max, options, progress
    )
    prompt_top = _memoized_topk(
        topk_memo, "prompt", prompt_embeddings, anchor_text_embeddings, ns, k_max, options, progress
    )
    timings["topk_s"] = time.perf_counter() - start

    start = time.perf_counter()
    normalize_image = options.normalize == "both"
    normalize_prompt = options.normalize in ("both", "prompt")
    cells = []
    valid = [(n, k, p) for n in ns for k in ks if k <= n for p in ps]
    for n, k, p in tqdm(valid, desc="grid cells", disable=not progress or len(valid) == 1):
        image_rr = relative_representation(
            image_top[n], k, p, options.clamp_negative, normalize_image
        )
        prompt_rr = relative_representation(
            prompt_top[n], k, p, options.clamp_negative, normalize_prompt
        )
        scores = class_scores(image_rr, prompt_rr, prompt_class, num_classes, options)
        metrics = accuracy_metrics(scores, labels, num_classes)
        no_overlap = float((scores == 0).all(dim=1).float().mean())
        cells.append(
            CellResult(
                n=n, k=k, p=p, no_overlap_fraction=no_overlap,
                scores=scores if keep_scores else None, **metrics,
            )
        )
    timings["scoring_s"] = time.perf_counter() - start
    return cells, timings

"""The scoring core: representations -> (images x targets) scores in blocks that fit the memory
budget, class means or best prompt (`score_targets`, the one place for it), and a grid cell's
scores for several p at once (`cell_scores`, the compiled CPU walk or one product per p)."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from asif_exp.methods.asif import cpu_kernels
from asif_exp.methods.asif.cpu_kernels import MAX_WIDTH, MKL_VECTOR, grouped_products
from asif_exp.methods.asif.layouts import (
    SparseLayout,
    class_averaging_t,
    csr_rows,
    densify,
    normalize_csr_columns,
    row_layout,
    transpose_csr,
    transposed_layout,
)
from asif_exp.methods.asif.options import AsifOptions
from asif_exp.methods.asif.topk import TopK, matmul_f32
from asif_exp.methods.base import max_over_groups


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


@functools.cache
def mkl_fused_tail() -> bool:
    """Whether the CPU's sparse product (`_sparse_dense_product`) fuses the multiply-adds its
    vectors leave over: MKL picks its kernel by the CPU's instruction set (AVX2 on: yes). Tried
    once on random values, so that the compiled loop rounds as it does and gives its bits."""
    g = torch.Generator().manual_seed(0)
    images, n, targets = 16, 256, 4 * MKL_VECTOR + 3  # anchors with full vectors and leftovers

    def random_csr(rows: int, cols: int) -> Tensor:
        mask = torch.rand(rows, cols, generator=g) < 0.5
        return (torch.rand(rows, cols, generator=g) * mask).to_sparse_csr()

    image, target = random_csr(images, n), random_csr(n, targets)
    product = torch.empty(images, targets)
    _sparse_dense_product(image, target, product)
    fused = cpu_kernels.grouped_products(
        image.crow_indices().int(),
        image.col_indices().int(),
        image.values()[None],
        target.crow_indices().int(),
        target.col_indices().int(),
        target.values()[:, None],
        torch.arange(targets, dtype=torch.int32),  # one target per group: the plain product
        targets,
        fused_tail=True,
    )
    return torch.equal(fused[0], product)


def _scores_t(
    image_rr: Tensor, target_t: Tensor, budget: int, dense: bool, dtype: torch.dtype
) -> Tensor:
    """Dense float32 (images x targets) = image_rr (CSR images x n) @ target_t (CSR n x targets),
    in image chunks whose dense blocks (or sparse intermediate products) fit `budget` elements."""
    (images, n), targets = image_rr.shape, target_t.shape[1]
    if dense:
        target_dense = densify(target_t, dtype)
        per_row = max(n, targets)
    else:  # a sparse product's intermediate products per image row
        per_row = image_rr.values().numel() / images * target_t.values().numel() / n
        per_row = max(targets, int(per_row))
    rows_per_chunk = max(1, budget // max(1, per_row))
    out = torch.empty(images, targets, device=image_rr.device)
    for start in range(0, images, rows_per_chunk):
        end = min(start + rows_per_chunk, images)
        chunk = csr_rows(image_rr, start, end)
        if dense:
            out[start:end] = matmul_f32(densify(chunk, dtype), target_dense)
        else:
            _sparse_dense_product(chunk, target_t, out[start:end])
    return out


def sparse_scores(image_rr: Tensor, target_rr: Tensor, options: AsifOptions) -> Tensor:
    """Dense (images x targets) dot products of two sparse CSR matrices, returned on the CPU."""
    device = options.resolved_device()
    target_t = transpose_csr(target_rr.to(device))
    return _scores_t(
        image_rr.to(device), target_t, options.budget_elements, False, torch.float32
    ).cpu()


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
        averaging_t = class_averaging_t(groups, num_groups)
    targets_t = prompt_t @ averaging_t  # (n x classes), the class means
    if options.normalize in ("both", "prompt"):
        targets_t = normalize_csr_columns(targets_t)
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
    return transposed_layout(top, k).csr(p, options.clamp_negative, normalize)


def image_representations(top: TopK, k: int, p: float, options: AsifOptions) -> Tensor:
    """The images' relative representations: CSR (images x n)."""
    return row_layout(top, k).csr(p, options.clamp_negative, options.normalize == "both")


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
        transpose_csr(prompt_rr.to(device)),
        prompt_class.long().to(device),
        num_classes,
        options,
    )
    return scores.cpu()


def cell_scores(
    image_layout: SparseLayout,
    prompt_layout: SparseLayout,
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
    compiled = image_layout.crow.device.type == "cpu" and cpu_kernels.USE_CPU_KERNELS and not dense
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
                    mkl_fused_tail(),
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

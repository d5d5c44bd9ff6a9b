"""The authors' published zero-shot algorithm (noranta4/ASIF, `relreps.py`), re-implemented as the
benchmark baseline. Same structure and the same costs, written here (not copied):

- every n of the grid is a separate computation from scratch (and every k a separate call);
- anchors in chunks of `dic_size` (100k); per chunk a float32 einsum and a `topk`, the query rows
  split so that one similarity block fits `max_gpu_mem_gb` (8 GB) of float32;
- the running top-k lives on the CPU and is merged by concatenating the old and the new top-k
  and taking `topk` again;
- COO sparse tensors; values raised to p with no clamping; only the prompt side L2-normalised;
- the image x prompt product dense (einsum) when an images x n float32 matrix fits the budget,
  otherwise `torch.sparse.mm` over 6 chunks of images;
- prediction: argmax over all class x template prompts, class = prompt index // templates;
- the running buffer starts as k zeros with anchor id 0, as theirs does: a negative similarity
  never survives the merge, so negatives are effectively clamped at 0, and where fewer than k
  similarities are positive the zeros (id 0) stay in the top-k and add nothing.

`zero_buffer=False` starts the buffer at -inf instead: the same structure with negatives kept, a
function the authors never computed (our `authors_unclamped` preset); it exists to show what
the zero buffer changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def relative_represent(
    queries: Tensor, basis: Tensor, k: int, max_gpu_mem_gb: float
) -> tuple[Tensor, Tensor]:
    """(indices, values) of the top-k inner products of every query with `basis`, on the CPU."""
    rows = queries.shape[0]
    values = torch.zeros(rows, k)
    indices = torch.zeros(rows, k, dtype=torch.long)
    max_rows = max_gpu_mem_gb * 1024**3 / 4 / basis.shape[0]
    n_chunks = int(rows / max_rows) + 1
    chunk_rows = int(rows / n_chunks) + n_chunks
    with torch.no_grad():
        for c in range(n_chunks):
            block = slice(c * chunk_rows, (c + 1) * chunk_rows)
            sims = torch.einsum("ik,jk->ij", queries[block], basis)
            top_values, top_indices = torch.topk(sims, k, dim=1)
            values[block], indices[block] = top_values.cpu(), top_indices.cpu()
            del sims
    return indices, values


def sparsify(indices: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """(rows, k) indices and values -> a (rows x n) COO tensor, rows in order."""
    rows = torch.arange(indices.numel()) // indices.shape[1]
    return torch.sparse_coo_tensor(torch.stack([rows, indices.flatten()]), values.flatten(), size)


def normalize_sparse(matrix: Tensor, nnz_per_row: int) -> Tensor:
    """L2-normalise the rows of an (uncoalesced, row-ordered) COO tensor with k entries per row."""
    norms = torch.sparse.sum(matrix * matrix, dim=1).to_dense()
    values = matrix._values().reshape(-1, nnz_per_row) / norms.sqrt()[:, None]
    return torch.sparse_coo_tensor(matrix._indices(), values.flatten(), matrix.shape)


def zero_shot_classification(
    images: Tensor,
    prompts: Tensor,
    anchor_images: Tensor,
    anchor_texts: Tensor,
    k: int,
    ns: Sequence[int],
    ps: Sequence[float],
    templates: int,
    dic_size: int = 100_000,
    max_gpu_mem_gb: float = 8.0,
    zero_buffer: bool = True,
) -> dict[tuple[int, float], Tensor]:
    """Predicted class of every image for each (n, p), for one k. Embeddings pre-normalised.

    Similarities are computed on the embeddings' device; everything else where the authors
    have it (top-k buffers and merges on the CPU, sparse products on the device).
    """
    device = images.device
    m, prompt_count = images.shape[0], prompts.shape[0]
    predictions = {}
    for n in ns:
        n = min(n, anchor_images.shape[0])
        sides = {"image": (images, anchor_images), "prompt": (prompts, anchor_texts)}
        buffers = {
            side: (
                torch.zeros(len(queries), 2 * k, dtype=torch.long),
                torch.full((len(queries), 2 * k), 0.0 if zero_buffer else -torch.inf),
            )
            for side, (queries, _) in sides.items()
        }
        top = {}
        for d in range(n // (dic_size + 1) + 1):
            start, end = d * dic_size, min(n, (d + 1) * dic_size)
            for side, (queries, anchors) in sides.items():
                ids, vals = buffers[side]
                chunk_ids, chunk_vals = relative_represent(
                    queries, anchors[start:end], k, max_gpu_mem_gb
                )
                ids[:, :k], vals[:, :k] = chunk_ids + start, chunk_vals
                top_vals, positions = torch.topk(vals, k, dim=1)
                top_ids = torch.gather(ids, 1, positions)
                ids[:, k:], vals[:, k:] = top_ids, top_vals
                top[side] = (top_ids, top_vals)
        (image_ids, image_vals), (prompt_ids, prompt_vals) = top["image"], top["prompt"]
        for p in ps:
            prompt_rr = sparsify(prompt_ids, prompt_vals**p, (prompt_count, n)).to(device)
            prompt_rr = normalize_sparse(prompt_rr, k)
            if n < max_gpu_mem_gb * 1024**3 / 4 / m:  # dense while images x n fits the budget
                image_rr = sparsify(image_ids, image_vals**p, (m, n)).to(device)
                sims = torch.einsum("ij,kj->ik", image_rr.to_dense(), prompt_rr.to_dense()).cpu()
            else:
                sims = torch.zeros(m, prompt_count)
                bounds = [c * (m // 6) for c in range(6)] + [m]
                for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                    image_rr = sparsify(image_ids[lo:hi], image_vals[lo:hi] ** p, (hi - lo, n))
                    product = torch.sparse.mm(image_rr.to(device), prompt_rr.t())
                    sims[lo:hi] = product.cpu().to_dense()
            predictions[(n, p)] = torch.div(sims.argmax(dim=1), templates, rounding_mode="floor")
    return predictions

"""The (n, k, p) grid: one top-k pass per side, then every valid cell's scores (`score_grid`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from asif_exp.methods.asif.layouts import (
    class_averaging_t,
    row_layout,
    transposed_layout,
    underflowed_rows,
    use_dense,
)
from asif_exp.methods.asif.options import AsifOptions, check_grid
from asif_exp.methods.asif.scoring import cell_scores
from asif_exp.methods.asif.topk import memoized_topk
from asif_exp.tensors import check_embeddings

log = logging.getLogger(__name__)


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
    averaging_t = class_averaging_t(prompt_class, num_classes) if mean else None

    report["skipped"] = [[n, k] for n in ns for k in ks if k > n]
    report["underflowed"] = []  # cells whose representations underflowed on a side not normalised
    k_max = max(k for k in ks if k <= ns[-1])
    start = time.perf_counter()
    image_top = memoized_topk(
        topk_memo, "image", inputs.images, inputs.anchor_images, ns, k_max, options, progress
    )
    prompt_top = memoized_topk(
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
        image_layout = row_layout(image_top[n], k, image_by_id[n])
        prompt_layout = transposed_layout(prompt_top[n], k, prompt_by_anchor[n])
        targets = num_classes if mean else prompts
        k_target = k * prompts / num_classes if mean else k  # a class holds its prompts' anchors
        dense = use_dense(images, targets, n, k, min(k_target, n), options.budget_elements, device)
        cell = cell_scores(
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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

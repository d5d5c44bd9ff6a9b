"""Baselines fitted on the same anchors: images and texts mapped into one shared space and
compared by cosine there (ridge, Procrustes, CCA, CSA, dense relative representations).

Every one of these maps is a function of the anchors' first and second moments (sums and
cross-products of the embeddings). One pass over the anchor rows, in prefix order, gives those
moments at every n of the grid (nested prefixes: the first n pairs, the same anchors ASIF uses),
so a grid over n and a method's hyper-parameters costs one pass plus one small (d x d)
factorisation per n; nothing is re-encoded and the benchmark is never looked at when fitting.

Embeddings are unit-normalised first (the encoders' outputs are compared by cosine), fits run
in float64, scores in float32. A classification class is the mean of its prompts' unit vectors
in the shared space, re-normalised (`template_aggregation=mean`, as ASIF's clean function
averages its prompts' representations), or its best single prompt (`max`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from asif_exp.config import AGGREGATION_CHOICES
from asif_exp.methods.base import MethodReport, ScoredCell, max_over_groups
from asif_exp.options import as_list, check_prefixes
from asif_exp.problem import EmbeddedProblem, Targets
from asif_exp.tensors import check_embeddings, resolve_device, unit_rows

FIT_DTYPE = torch.float64


# ----------------------------------------------------------------------------- moments


@dataclass
class Moments:
    """Sums over the first n anchor pairs (x: image embedding, y: text embedding), float64."""

    n: int
    sum_x: Tensor  # (dx,)
    sum_y: Tensor  # (dy,)
    xx: Tensor  # (dx, dx) X^T X, uncentred
    xy: Tensor  # (dx, dy) X^T Y
    yy: Tensor  # (dy, dy) Y^T Y

    @property
    def mean_x(self) -> Tensor:
        return self.sum_x / self.n

    @property
    def mean_y(self) -> Tensor:
        return self.sum_y / self.n

    def centred(self) -> tuple[Tensor, Tensor, Tensor]:
        """Centred sums of products Xc^T Xc, Xc^T Yc, Yc^T Yc (Xc = X minus its mean row)."""
        mx, my = self.mean_x, self.mean_y
        return (
            self.xx - self.n * torch.outer(mx, mx),
            self.xy - self.n * torch.outer(mx, my),
            self.yy - self.n * torch.outer(my, my),
        )


def prefix_moments(
    anchor_images: Tensor, anchor_texts: Tensor, ns: Sequence[int], chunk: int = 8192
) -> Iterator[Moments]:
    """The moments of the first n unit-normalised anchor pairs, for every n (ascending), from
    one pass over the rows; the anchors' device is used."""
    if anchor_images.shape[0] != anchor_texts.shape[0]:
        raise ValueError(
            f"anchor pairs mismatch: {anchor_images.shape[0]} image embeddings but "
            f"{anchor_texts.shape[0]} text embeddings"
        )
    dx = anchor_images.shape[1]
    joint_dim = dx + anchor_texts.shape[1]
    device = anchor_images.device
    gram = torch.zeros(joint_dim, joint_dim, dtype=FIT_DTYPE, device=device)
    total = torch.zeros(joint_dim, dtype=FIT_DTYPE, device=device)
    start = 0
    for n in sorted(set(ns)):
        while start < n:
            end = min(start + chunk, n)
            rows = torch.cat(
                [_unit64(anchor_images[start:end]), _unit64(anchor_texts[start:end])], dim=1
            )
            gram += rows.T @ rows
            total += rows.sum(dim=0)
            start = end
        yield Moments(
            n,
            total[:dx].clone(),
            total[dx:].clone(),
            gram[:dx, :dx].clone(),
            gram[:dx, dx:].clone(),
            gram[dx:, dx:].clone(),
        )


def _unit64(embeddings: Tensor) -> Tensor:
    return torch.nn.functional.normalize(embeddings.to(FIT_DTYPE), dim=1)


# ----------------------------------------------------------------------------- the shared space


@dataclass
class SharedSpace:
    """z = (e - shift) @ matrix on each side, then unit-normalised; a pair's score is the dot
    product of the two z, each dimension weighted by `weights` when given (CSA)."""

    image_shift: Tensor  # (dx,)
    image_matrix: Tensor  # (dx, m)
    text_shift: Tensor  # (dy,)
    text_matrix: Tensor  # (dy, m)
    weights: Tensor | None = None  # (m,)

    def embed_images(self, embeddings: Tensor) -> Tensor:
        return _project(embeddings, self.image_shift, self.image_matrix)

    def embed_texts(self, embeddings: Tensor) -> Tensor:
        return _project(embeddings, self.text_shift, self.text_matrix)


def _project(embeddings: Tensor, shift: Tensor, matrix: Tensor) -> Tensor:
    device = matrix.device
    z = (unit_rows(embeddings.to(device)) - shift.float()) @ matrix.float()
    return torch.nn.functional.normalize(z, dim=1)


def text_identity(moments: Moments, centre: bool = True) -> tuple[Tensor, Tensor]:
    """(shift, matrix) leaving texts in their own space, centred on the anchor texts' mean."""
    dy = moments.sum_y.shape[0]
    shift = moments.mean_y if centre else torch.zeros_like(moments.mean_y)
    return shift, torch.eye(dy, dtype=FIT_DTYPE, device=moments.sum_y.device)


def group_means(z: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """Each group's mean of unit vectors `z`, re-normalised: (groups x m)."""
    groups = groups.to(z.device)
    counts = torch.bincount(groups, minlength=num_groups)
    if bool((counts == 0).any()):
        missing = (counts == 0).nonzero().flatten()[:5].tolist()
        raise ValueError(f"classes without any prompt: {missing}")
    sums = z.new_zeros(num_groups, z.shape[1]).index_add_(0, groups, z)
    return torch.nn.functional.normalize(sums, dim=1)


def shared_space_scores(
    space: SharedSpace, images: Tensor, targets: Targets, aggregation: str
) -> Tensor:
    """(images x targets) scores: targets are classes when the texts are grouped (prompts),
    else every text (retrieval captions)."""
    image_z = space.embed_images(images)
    if space.weights is not None:
        image_z = image_z * space.weights.to(image_z)
    text_z = space.embed_texts(targets.embeddings)
    if targets.groups is None:
        return image_z @ text_z.T
    if aggregation == "mean":
        return image_z @ group_means(text_z, targets.groups, targets.count).T
    groups = targets.groups.to(text_z.device)
    return max_over_groups(image_z @ text_z.T, groups, targets.count)


# ----------------------------------------------------------------------------- the method

# A method's fit: the moments of one prefix -> (params, space or the reason the cell is
# skipped) for each of its hyper-parameter settings.
Fit = Callable[["Moments"], Iterator[tuple[dict, "SharedSpace | str"]]]


@dataclass
class SharedSpaceMethod:
    """A baseline over the anchor prefixes x its own hyper-parameters, one fit per cell."""

    name: str
    fit: Fit
    options: dict  # the method's config options (recorded in results.json)
    template_aggregation: str = "mean"
    device: str = "auto"
    description: str = ""  # what the shared space is (recorded in results.json)

    def record(self) -> dict:
        return {
            **self.options,
            "template_aggregation": self.template_aggregation,
            "embeddings": "unit-normalised",
            "shared_space": self.description,
        }

    def hyperparameters(self) -> dict[str, list]:
        return {k: as_list(v) for k, v in self.options.items() if k != "template_aggregation"}

    def check(self, ns: list[int]) -> None:
        check_prefixes(ns, max(ns))

    def score(
        self, problem: EmbeddedProblem, ns: list[int], report: MethodReport
    ) -> Iterator[ScoredCell]:
        device = resolve_device(self.device)
        for name, tensor in [
            ("anchor image embeddings", problem.anchor_images),
            ("anchor text embeddings", problem.anchor_texts),
            ("image embeddings", problem.images),
            ("target text embeddings", problem.targets.embeddings),
        ]:
            check_embeddings(name, tensor)
        check_prefixes(ns, problem.anchor_images.shape[0])
        fit_s = scoring_s = 0.0
        start = time.perf_counter()
        moments = prefix_moments(
            problem.anchor_images.to(device), problem.anchor_texts.to(device), ns
        )
        for prefix in moments:
            for params, space in self.fit(prefix):
                cell = {"n": prefix.n, **params}
                if isinstance(space, str):
                    report.skipped.append({**cell, "reason": space})
                    continue
                fit_s += time.perf_counter() - start
                start = time.perf_counter()
                scores = shared_space_scores(
                    space, problem.images, problem.targets, self.template_aggregation
                )
                scoring_s += time.perf_counter() - start
                yield ScoredCell(cell, scores)
                start = time.perf_counter()
        fit_s += time.perf_counter() - start
        report.timings.update({"fit_s": fit_s, "scoring_s": scoring_s})


# ----------------------------------------------------------------------------- config


def method_options(cfg, known: tuple[str, ...]) -> dict[str, Any]:
    """`cfg.method` less its name, checked against the method's options (`known`; their values
    live in conf/method/<name>.yaml): a misspelt or missing key is an error naming it."""
    options = {key: value for key, value in cfg.method.items() if key != "name"}
    name = cfg.method.name
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"method.{unknown[0]}: not an option of method={name} "
            f"(its options: {', '.join(sorted(known))})"
        )
    missing = sorted(set(known) - set(options))
    if missing:
        raise ValueError(f"method.{missing[0]}: missing (see conf/method/{name}.yaml)")
    if options["template_aggregation"] not in AGGREGATION_CHOICES:
        raise ValueError(
            f"method.template_aggregation={options['template_aggregation']!r}: "
            f"expected one of {AGGREGATION_CHOICES}"
        )
    return options


def fraction_values(key: str, raw: Any) -> list[float]:
    """`raw` (a value or a list) as floats in [0, 1]."""
    values = []
    for value in as_list(raw):
        try:
            number = float(value) if not isinstance(value, bool) else float("nan")
        except (TypeError, ValueError):
            number = float("nan")
        if not 0 <= number <= 1:
            raise ValueError(f"{key}={raw!r}: expected a number in [0, 1] or a list of them")
        values.append(number)
    if not values:
        raise ValueError(f"{key}=[]: empty grid")
    return values

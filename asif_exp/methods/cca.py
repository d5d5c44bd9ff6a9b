"""`method=cca`: canonical correlation analysis on the first n anchor pairs; images and texts
compared by cosine in the space of the first r canonical dimensions.

Both modalities are centred; each covariance is shrunk towards a multiple of the identity with
the same trace, C(c) = (1 - c) C + c (tr C / d) I (`regularization` c in [0, 1]: 0 is plain
CCA, 1 makes it partial least squares; scale-free, so one c suits any n and any encoder). With
W_x = C_xx(c)^-1/2 and W_y = C_yy(c)^-1/2, the SVD U S V^T of W_x C_xy W_y gives the directions
A = W_x U and B = W_y V and the (regularised) canonical correlations S. An image maps to
(x - mean_x) A[:, :r], a text to (y - mean_y) B[:, :r].

One eigendecomposition per modality per n serves every c, and one SVD per (n, c) every r.
Cells with r above min(d_image, d_text, n - 1) (the rank of the cross-covariance) are skipped,
and so are cells with c = 0 where a covariance is singular (n <= d): both listed in the notes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from asif_exp.methods.shared_space import (
    Moments,
    SharedSpace,
    SharedSpaceMethod,
    method_options,
)
from asif_exp.options import fraction_values, int_values

# Below this fraction of the mean eigenvalue a covariance counts as singular.
SINGULAR = 1e-10


@dataclass
class Canonical:
    """The first r canonical directions of one (n, regularization) fit."""

    image_directions: Tensor  # (dx, r)
    text_directions: Tensor  # (dy, r)
    correlations: Tensor  # (r,) the singular values S (regularised canonical correlations)
    anchor_correlations: (
        Tensor  # (r,) correlation of each pair of canonical variates on the anchors
    )


def canonical_fits(
    moments: Moments, rs: list[int], regularizations: list[float]
) -> Iterator[tuple[dict, Canonical | str]]:
    """({"r", "regularization"}, the fit or why it is skipped) for every cell at this n."""
    xx, xy, yy = (m / max(moments.n - 1, 1) for m in moments.centred())
    (ex, vx), (ey, vy) = torch.linalg.eigh(xx), torch.linalg.eigh(yy)
    ex, ey = ex.clamp_min(0), ey.clamp_min(0)  # positive semi-definite: drop rounding
    rank = min(xx.shape[0], yy.shape[0], moments.n - 1)
    # C^-1/2 = V diag(l^-1/2) V^T never formed: C_xy in both eigenbases, once per n.
    xy_eigen = vx.T @ xy @ vy
    for c in regularizations:
        shrunk_x = (1 - c) * ex + c * ex.mean()
        shrunk_y = (1 - c) * ey + c * ey.mean()
        if min(shrunk_x.min() / ex.mean(), shrunk_y.min() / ey.mean()) <= SINGULAR:
            for r in rs:
                yield (
                    {"r": r, "regularization": c},
                    f"a covariance is singular at n={moments.n}: use regularization > 0",
                )
            continue
        scale_x, scale_y = shrunk_x.rsqrt(), shrunk_y.rsqrt()
        # The SVD of V_x^T (W_x C_xy W_y) V_y; its singular vectors rotate back by V_x, V_y.
        u, s, vh = torch.linalg.svd(scale_x[:, None] * xy_eigen * scale_y, full_matrices=False)
        a, b = vx @ (scale_x[:, None] * u), vy @ (scale_y[:, None] * vh.T)
        # The variates' own correlations on the anchors (equal to s when c = 0).
        # With n <= d a direction can have (numerically) no variance on the anchors, and its
        # correlation is then 0/0: such directions get correlation 0 (they carry nothing).
        variances = (a * (xx @ a)).sum(0) * (b * (yy @ b)).sum(0)
        degenerate = variances <= SINGULAR * variances.abs().max()
        anchor = (a * (xy @ b)).sum(0) / variances.clamp_min(torch.finfo(a.dtype).tiny).sqrt()
        anchor = anchor.masked_fill(degenerate, 0.0).clamp(-1.0, 1.0)
        for r in rs:
            params = {"r": r, "regularization": c}
            if r > rank:
                yield params, f"r={r} exceeds min(d_image, d_text, n - 1) = {rank}"
                continue
            yield params, Canonical(a[:, :r], b[:, :r], s[:r], anchor[:r])


def cca_options(cfg) -> tuple[dict, list[int], list[float]]:
    options = method_options(cfg)
    rs = int_values("method.r", options["r"])
    regularizations = fraction_values("method.regularization", options["regularization"])
    return options, rs, regularizations


def canonical_method(cfg, name: str, weighted: bool, description: str) -> SharedSpaceMethod:
    """CCA's shared space; `weighted`: each canonical dimension's product weighted by its
    correlation on the anchors (CSA)."""
    options, rs, regularizations = cca_options(cfg)

    def fit(moments: Moments):
        for params, fitted in canonical_fits(moments, rs, regularizations):
            if isinstance(fitted, str):
                yield params, fitted
                continue
            space = SharedSpace(
                moments.mean_x,
                fitted.image_directions,
                moments.mean_y,
                fitted.text_directions,
                weights=fitted.anchor_correlations if weighted else None,
            )
            yield params, space

    return SharedSpaceMethod(
        name,
        fit,
        {"r": rs, "regularization": regularizations},
        options["template_aggregation"],
        cfg.device,
        description,
    )


def build(cfg) -> SharedSpaceMethod:
    return canonical_method(
        cfg, "cca", False, "first r canonical dimensions (centred, shrunk covariances), cosine"
    )

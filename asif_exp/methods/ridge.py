"""`method=ridge`: a least-squares linear map from image to text embeddings with a ridge term.

W = (Xc^T Xc + alpha I)^-1 Xc^T Yc on the first n anchor pairs, centred (scikit-learn's
`Ridge(alpha, fit_intercept=True)`: alpha is absolute, on the sum of squares). An image maps to
(x - mean_x) W, a text to (y - mean_y): both centred on the anchors' means, compared by cosine.
One eigendecomposition of Xc^T Xc per n serves every alpha.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from asif_exp.methods.shared_space import (
    Moments,
    SharedSpace,
    SharedSpaceMethod,
    method_options,
    text_identity,
)
from asif_exp.options import positive_values


def ridge_maps(moments: Moments, alphas: list[float]) -> Iterator[tuple[float, torch.Tensor]]:
    """(alpha, W (dx x dy)) for every alpha: the ridge solution on the centred anchors."""
    xx, xy, _ = moments.centred()
    eigenvalues, vectors = torch.linalg.eigh(xx)
    eigenvalues = eigenvalues.clamp_min(0)  # Xc^T Xc is positive semi-definite; drop rounding
    projected = vectors.T @ xy
    for alpha in alphas:
        yield alpha, vectors @ (projected / (eigenvalues + alpha)[:, None])


def build(cfg) -> SharedSpaceMethod:
    options = method_options(cfg)
    alphas = positive_values("method.alpha", options["alpha"])

    def fit(moments: Moments):
        text_shift, text_matrix = text_identity(moments)
        for alpha, matrix in ridge_maps(moments, alphas):
            yield {"alpha": alpha}, SharedSpace(moments.mean_x, matrix, text_shift, text_matrix)

    return SharedSpaceMethod(
        "ridge",
        fit,
        {"alpha": alphas},
        options["template_aggregation"],
        cfg.device,
        "text space: (x - mean_x) W against y - mean_y, W the centred ridge solution",
    )

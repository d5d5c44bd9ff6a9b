"""`method=procrustes`: an orthogonal map from image to text embeddings, after centring.

R = U V^T from the SVD U S V^T of the centred cross-product Xc^T Yc (dx x dy) on the first n
anchor pairs: the R minimising ||Xc R - Yc|| among maps with orthonormal columns (dx >= dy) or
rows (dx < dy). With unequal dimensions this is a semi-orthogonal map into the text space; it
equals orthogonal Procrustes after zero-padding the smaller side, compared on the smaller side's
dimensions. An image maps to (x - mean_x) R, a text to y - mean_y; compared by cosine. Scale
does not change cosines, so no scaling factor is fitted. No hyper-parameters.
"""

from __future__ import annotations

import torch

from asif_exp.methods.shared_space import (
    Moments,
    SharedSpace,
    SharedSpaceMethod,
    method_options,
    text_identity,
)


def procrustes_map(moments: Moments) -> torch.Tensor:
    """R (dx x dy), semi-orthogonal: the Procrustes solution on the centred anchors."""
    _, xy, _ = moments.centred()
    u, _, vh = torch.linalg.svd(xy, full_matrices=False)
    return u @ vh


def build(cfg) -> SharedSpaceMethod:
    options = method_options(cfg)

    def fit(moments: Moments):
        text_shift, text_matrix = text_identity(moments)
        yield {}, SharedSpace(moments.mean_x, procrustes_map(moments), text_shift, text_matrix)

    return SharedSpaceMethod(
        "procrustes",
        fit,
        {},
        options["template_aggregation"],
        cfg.device,
        "text space: (x - mean_x) R against y - mean_y, R = U V^T (SVD of Xc^T Yc)",
    )

"""`method=dense_rr`: dense relative representations (Moschella et al.), i.e. ASIF with k = n and
p = 1 and negatives kept: an image is its cosine similarities to all first n anchor images, a
text its similarities to the n anchor captions, each L2-normalised; pairs compared by dot
product. (Clamping negatives would be ASIF's clean function at k = n, p = 1: run
`method=asif asif.k=<n> asif.p=1` for that.)

No n-sized vector is ever built. With A_x, A_y the unit anchor embeddings and G the Gram matrix
of [A_x A_y] (the joint second moment, (dx + dy) square), any factor G = R^T R gives
rr(x) . rr(y) = x A_x^T A_y y^T = (x R_x^T) . (y R_y^T) and |rr(x)| = |x R_x^T|: the
representations are isometric to x R_x^T and y R_y^T, of dimension at most dx + dy.
"""

from __future__ import annotations

import torch

from asif_exp.methods.shared_space import Moments, SharedSpace, SharedSpaceMethod, method_options

# Eigenvalues of the Gram matrix below this fraction of the largest are rounding: dropped.
RANK_TOLERANCE = 1e-12


def relative_space(moments: Moments) -> SharedSpace:
    """A space isometric to the dense relative representations over the first n anchors."""
    dx = moments.xx.shape[0]
    gram = torch.cat(
        [torch.cat([moments.xx, moments.xy], 1), torch.cat([moments.xy.T, moments.yy], 1)]
    )
    eigenvalues, vectors = torch.linalg.eigh(gram)
    keep = eigenvalues > RANK_TOLERANCE * eigenvalues.max()
    factor = vectors[:, keep] * eigenvalues[keep].sqrt()  # gram = factor @ factor.T
    zero_x, zero_y = torch.zeros_like(moments.sum_x), torch.zeros_like(moments.sum_y)
    return SharedSpace(zero_x, factor[:dx], zero_y, factor[dx:])


def build(cfg) -> SharedSpaceMethod:
    options = method_options(cfg)

    def fit(moments: Moments):
        yield {}, relative_space(moments)

    return SharedSpaceMethod(
        "dense_rr",
        fit,
        {"k": "n", "p": 1, "clamp_negative": False, "normalize": "both"},
        options["template_aggregation"],
        cfg.device,
        "relative representations over all n anchors (through an isometric factor of the "
        "anchors' joint Gram matrix)",
    )

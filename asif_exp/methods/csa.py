"""`method=csa`: canonical similarity analysis (CSA, UTAustin-SwarmLab's Multi-modal-Data-
Alignment): CCA as in `method=cca`, but the similarity of an image and a text is the sum over
the first r canonical dimensions of their unit-normalised canonical vectors' products, each
weighted by that dimension's correlation (`mmda/utils/sim_utils.py: weighted_corr_sim`). The
weight is the correlation of the two canonical variates on the anchors (CSA's
`diag(A^T B) / n` of the transformed training data), which is the canonical correlation when
regularization = 0. Options as for `method=cca`.
"""

from __future__ import annotations

from asif_exp.methods.cca import canonical_fits, cca_options
from asif_exp.methods.shared_space import Moments, SharedSpace, SharedSpaceMethod


def build(cfg) -> SharedSpaceMethod:
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
                weights=fitted.anchor_correlations,
            )
            yield params, space

    return SharedSpaceMethod(
        "csa",
        fit,
        {"r": rs, "regularization": regularizations},
        options["template_aggregation"],
        cfg.device,
        "first r canonical dimensions, unit vectors, products weighted by correlation",
    )

"""`method=csa`: canonical similarity analysis (CSA, UTAustin-SwarmLab's Multi-modal-Data-
Alignment): CCA as in `method=cca`, but the similarity of an image and a text is the sum over
the first r canonical dimensions of their unit-normalised canonical vectors' products, each
weighted by that dimension's correlation (`mmda/utils/sim_utils.py: weighted_corr_sim`). The
weight is the correlation of the two canonical variates on the anchors (CSA's
`diag(A^T B) / n` of the transformed training data), which is the canonical correlation when
regularization = 0. Options as for `method=cca`.
"""

from __future__ import annotations

from asif_exp.methods.cca import canonical_method
from asif_exp.methods.shared_space import SharedSpaceMethod


def build(cfg) -> SharedSpaceMethod:
    return canonical_method(
        cfg,
        "csa",
        True,
        "first r canonical dimensions, unit vectors, products weighted by correlation",
    )

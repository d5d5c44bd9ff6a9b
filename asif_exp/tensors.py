"""Devices and tensor helpers shared by the encoders, the ASIF engine and the baselines.

Kept apart from the engine so that loading an encoder or a baseline does not load the engine
(nor numba): everything here is plain PyTorch.
"""

from __future__ import annotations

import torch
from torch import Tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """ "auto" means cuda when available; anything else is a torch device name."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_embeddings(name: str, embeddings: Tensor) -> None:
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(
            f"{name}: expected a non-empty 2-D tensor, got shape {tuple(embeddings.shape)}"
        )
    # A row whose sum is finite has only finite entries (NaN and inf propagate; inf - inf is
    # NaN): one fast reduction instead of a full-size boolean tensor; only rows whose sum is
    # not finite (including finite rows that overflow it) are looked at entry by entry.
    finite = torch.isfinite(embeddings.sum(dim=1))
    if not bool(finite.all()):
        finite[~finite] = torch.isfinite(embeddings[~finite]).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"{name}: {int((~finite).sum())} rows contain NaN or inf (first rows: {bad})"
        )


def unit_rows(embeddings: Tensor) -> Tensor:
    """L2-normalise rows so that dot products are cosine similarities."""
    return torch.nn.functional.normalize(embeddings.float(), dim=1)

"""The engine's options: `AsifOptions`, the named presets and which function a set of options
computes, the config group as options, and the checks of a (n, k, p) grid."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from asif_exp.options import AGGREGATION_CHOICES, NORMALIZE_CHOICES, ConfigError, check_prefixes
from asif_exp.tensors import DTYPES, resolve_device


@dataclass(frozen=True)
class AsifOptions:
    """Every option that changes a number. Defaults are the clean variant; see `AUTHORS_OPTIONS`."""

    clamp_negative: bool = True  # zero negative similarities before the power
    normalize: str = "both"  # which sides' representations are L2-normalised
    template_aggregation: str = "mean"  # "mean" of a class's prompt representations, or "max" score
    compute_dtype: str = "auto"  # similarity GEMM dtype; "auto": bfloat16 on GPU, float32 on CPU
    memory_budget_mb: float = 1024.0  # cap on one dense block (rows x anchors, or images x prompts)
    device: str = "auto"  # "auto": cuda when available

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZE_CHOICES:
            raise ConfigError(
                f"asif.normalize={self.normalize!r}: expected one of {NORMALIZE_CHOICES}"
            )
        if self.template_aggregation not in AGGREGATION_CHOICES:
            raise ConfigError(
                f"asif.template_aggregation={self.template_aggregation!r}: "
                f"expected one of {AGGREGATION_CHOICES}"
            )
        if self.compute_dtype != "auto" and self.compute_dtype not in DTYPES:
            raise ConfigError(
                f"asif.compute_dtype={self.compute_dtype!r}: "
                f"expected 'auto' or one of {list(DTYPES)}"
            )
        if self.memory_budget_mb <= 0:
            raise ConfigError(f"asif.memory_budget_mb={self.memory_budget_mb}: must be positive")

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        if self.compute_dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.compute_dtype]

    @property
    def budget_elements(self) -> int:
        return max(1, int(self.memory_budget_mb * 2**20 / 4))

    def to_dict(self) -> dict:
        return asdict(self)


# The authors' published function (noranta4/ASIF, `relreps.zero_shot_classification`): their
# running top-k buffer starts as k zeros, so a negative similarity never survives (negatives are
# clamped); only the prompt side is normalised; the best single prompt decides.
AUTHORS_OPTIONS = dict(clamp_negative=True, normalize="prompt", template_aggregation="max")
# Their structure without the zero buffer: negatives kept. Not a function the authors computed.
AUTHORS_UNCLAMPED_OPTIONS = {**AUTHORS_OPTIONS, "clamp_negative": False}
CLEAN_OPTIONS = dict(clamp_negative=True, normalize="both", template_aggregation="mean")
FUNCTIONS = {
    "clean": CLEAN_OPTIONS,
    "authors": AUTHORS_OPTIONS,
    "authors_unclamped": AUTHORS_UNCLAMPED_OPTIONS,
}


def function_of(options: AsifOptions) -> str:
    """Which named function the options compute: clean, authors, authors_unclamped or custom."""
    for name, values in FUNCTIONS.items():
        if all(getattr(options, key) == value for key, value in values.items()):
            return name
    return "custom"


def check_grid(
    ns: Sequence[int],
    ks: Sequence[int],
    ps: Sequence[float],
    n_available: int,
    clamp_negative: bool = True,
) -> None:
    if not ns or not ks or not ps:
        raise ConfigError(f"empty grid: n={list(ns)}, k={list(ks)}, p={list(ps)}")
    check_prefixes(ns, n_available)
    for k in ks:
        if k < 1:
            raise ConfigError(f"asif.k={k}: must be at least 1")
    if min(ks) > max(ns):
        raise ConfigError(f"asif.k={min(ks)} exceeds every n in {sorted(ns)}: k must be <= n")
    for p in ps:
        if not p > 0:
            raise ConfigError(f"asif.p={p}: must be positive")
        if not clamp_negative and p != int(p):
            # A negative similarity has no real non-integer power: scores would be NaN.
            raise ConfigError(
                f"asif.p={p} with asif.clamp_negative=false: negative similarities have no "
                "real non-integer power; use an integer p or clamp negatives"
            )


def asif_options(cfg) -> AsifOptions:
    """The `asif` config group (and `device`) as engine options; bad values fail here."""
    return AsifOptions(
        clamp_negative=cfg.asif.clamp_negative,
        normalize=cfg.asif.normalize,
        template_aggregation=cfg.asif.template_aggregation,
        compute_dtype=cfg.asif.compute_dtype,
        memory_budget_mb=cfg.asif.memory_budget_mb,
        device=cfg.device,
    )

"""The one place where config values are checked and grid options decoded.

`check_config` runs first in every entry point (run, explain, extract), before any data is read
or encoded: enumerations, device names, finite numbers, typed grid options and conflicting
options. An int option takes ints only (2.0 is accepted as 2; 2.7 and true are refused rather
than truncated); a positive option must be finite and above zero. Every error is a one-line
`ConfigError` naming the config key.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from asif_exp.config import (
    AGGREGATION_CHOICES,
    COMPUTE_DTYPES,
    NORMALIZE_CHOICES,
    ON_BAD_IMAGE,
    REPEATED_PAIRS_POLICIES,
)
from asif_exp.errors import ConfigError

# Every enumerated option of the config groups, with its choices (None: the null value).
CHOICES: dict[str, tuple] = {
    "data.on_bad_image": ON_BAD_IMAGE,
    "anchors.repeated_pairs": REPEATED_PAIRS_POLICIES,
    "asif.normalize": NORMALIZE_CHOICES,
    "asif.template_aggregation": AGGREGATION_CHOICES,
    "asif.compute_dtype": ("auto", *COMPUTE_DTYPES),
    "asif.preset": ("clean", "authors", "authors_unclamped", "custom"),
    "encoder.vision.precision": COMPUTE_DTYPES,
    "benchmark.folder_labels": ("ids", "sorted", "int"),
    "benchmark.authors_split": (None, "val", "test"),
    "logger.name": ("none", "wandb"),
    "logger.mode": ("online", "offline", "disabled"),
    "extract.stage": ("all", "encode", "merge"),
}
DEVICE_FORM = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICE_KEYS = ("device",)
# With a saved model (explain's model_dir), these come from the model: setting them is refused.
FIXED_BY_SAVED_MODEL = ("asif", "anchors")


def as_list(value: Any) -> list:
    if isinstance(value, (list, tuple, ListConfig)):
        return list(value)
    return [value]


def _fail(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{key}={value!r}: expected {expected}")


def _int(key: str, value: Any, raw: Any) -> int:
    if isinstance(value, bool):
        raise _fail(key, raw, "an integer or a list of integers")
    if isinstance(value, int):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _fail(key, raw, "an integer or a list of integers") from None
    if not number.is_integer():
        raise _fail(key, raw, "an integer or a list of integers")
    return int(number)


def int_values(key: str, raw: Any, default: int | None = None) -> list[int]:
    """`raw` (a value or a list) as ints; None entries become `default` when one is given."""
    values = as_list(raw)
    if default is not None:
        values = [default if v is None else v for v in values]
    return [_int(key, v, raw) for v in values]


def positive_values(key: str, raw: Any) -> list[float]:
    """`raw` (a value or a list) as finite positive floats."""
    out = []
    for value in as_list(raw):
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not (math.isfinite(number) and number > 0):
            raise _fail(key, raw, "a finite positive number or a list of them")
        out.append(number)
    return out


def single(key: str, raw: Any) -> Any:
    """The one value of an option that must not be a list or null (explain, one model)."""
    values = as_list(raw)
    if len(values) != 1 or values[0] is None:
        raise ConfigError(f"{key}={raw}: explain needs a single value")
    return values[0]


def anchor_prefixes(raw: Any, n_available: int) -> list[int]:
    """`asif.n`: the anchor-prefix sizes of the grid (None: every available anchor)."""
    ns = int_values("asif.n", raw, default=n_available)
    check_prefixes(ns, n_available)
    return ns


def check_prefixes(ns: Sequence[int], n_available: int) -> None:
    if not ns:
        raise ConfigError("asif.n=[]: empty grid")
    for n in ns:
        if n < 1 or n > n_available:
            raise ConfigError(
                f"asif.n={n}: must be between 1 and the {n_available} anchors available"
            )


def build_component(package: str, group: str, cfg) -> Any:
    """`asif_exp.<package>.<name>.build(cfg)`, `name` being `cfg.<group>.name`: adding a method
    or a task is one module plus one config file, with no list to update."""
    name = cfg[group].name
    try:
        module = importlib.import_module(f"asif_exp.{package}.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"asif_exp.{package}.{name}":
            raise  # the module exists but one of its imports is missing
        raise ConfigError(
            f"{group}={name!r}: no module asif_exp/{package}/{name}.py (see conf/{group}/)"
        ) from None
    return module.build(cfg)


# ----------------------------------------------------------------------------- checks


def _leaves(node: Any, prefix: str = ""):
    """(dotted key, value) of every leaf, unresolved (no interpolation is evaluated)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for value in node:
            yield prefix[:-1], value
    else:
        yield prefix[:-1], node


def _override_key(override: str) -> str:
    """`asif.k=3` -> `asif.k`; `+x=1`, `~x`, `++x=1` -> `x`; `asif=paper` -> `asif`."""
    return override.lstrip("+~").split("=", 1)[0]


def check_config(cfg: DictConfig, overrides: Sequence[str] = ()) -> None:
    """Refuse, with a one-line ConfigError, any value that cannot be right; nothing is read yet.

    `overrides` are the command line's (Hydra's `overrides.task`): they tell an option the user
    set from one left at its default, for options that conflict (explain's `model_dir`).
    """
    for key, value in _leaves(OmegaConf.to_container(cfg, resolve=False)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value}: expected a finite number")
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key, default="<absent>")
        if value != "<absent>" and value not in choices:
            listed = ", ".join("null" if c is None else str(c) for c in choices)
            raise ConfigError(f"{key}={value!r}: expected one of {listed}")
    for key in DEVICE_KEYS:
        value = OmegaConf.select(cfg, key)
        if value is not None and not (isinstance(value, str) and DEVICE_FORM.fullmatch(value)):
            raise ConfigError(f"{key}={value!r}: expected auto, cpu, mps, cuda or cuda:<index>")
    if "asif" in cfg:
        int_values("asif.n", cfg.asif.n, default=1)  # null entries: every anchor
        for k in int_values("asif.k", cfg.asif.k):
            if k < 1:
                raise ConfigError(f"asif.k={k}: must be at least 1")
        positive_values("asif.p", cfg.asif.p)
        positive_values("asif.memory_budget_mb", cfg.asif.memory_budget_mb)
    if OmegaConf.select(cfg, "model_dir"):
        ignored = [o for o in overrides if _override_key(o).split(".")[0] in FIXED_BY_SAVED_MODEL]
        if ignored:
            raise ConfigError(
                f"model_dir={cfg.model_dir}: the saved model fixes its anchors, k, p and "
                f"options, so {' '.join(ignored)} would be ignored; drop "
                f"{'it' if len(ignored) == 1 else 'them'}, or drop model_dir to build the "
                "model from anchors"
            )

"""The one place where grid options from the config are decoded: a value or a list, typed.

An int option takes ints only (2.0 is accepted as 2, 2.5 is refused rather than truncated);
a positive option must be finite and above zero. Errors name the config key.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from typing import Any

from omegaconf import ListConfig


def as_list(value: Any) -> list:
    if isinstance(value, (list, tuple, ListConfig)):
        return list(value)
    return [value]


def _fail(key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{key}={value!r}: expected {expected}")


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
        raise ValueError(f"{key}={raw}: explain needs a single value")
    return values[0]


def anchor_prefixes(raw: Any, n_available: int) -> list[int]:
    """`asif.n`: the anchor-prefix sizes of the grid (None: every available anchor)."""
    ns = int_values("asif.n", raw, default=n_available)
    check_prefixes(ns, n_available)
    return ns


def check_prefixes(ns: Sequence[int], n_available: int) -> None:
    if not ns:
        raise ValueError("asif.n=[]: empty grid")
    for n in ns:
        if n < 1 or n > n_available:
            raise ValueError(
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
        raise ValueError(
            f"{group}={name!r}: no module asif_exp/{package}/{name}.py (see conf/{group}/)"
        ) from None
    return module.build(cfg)

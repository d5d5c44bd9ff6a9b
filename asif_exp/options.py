"""The one place where config values are checked and grid options decoded.

`check_config` runs first in every entry point (run, explain, extract), before any data is read
or encoded: keys the schemas do not know (a `+key=value` override slips past Hydra's struct
check), enumerations, device names (and that the device exists), finite numbers, the range of
every integer and number option, typed grid options, built-in prompt lists and conflicting
options. An int option takes ints only (2.0 is accepted as 2; 2.7 and true are refused rather
than truncated); a positive option must be finite and above zero. Every error is a one-line
`ConfigError` naming the config key.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
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
    # torchvision's InterpolationMode values
    "encoder.vision.interpolation": (
        "nearest",
        "nearest-exact",
        "bilinear",
        "bicubic",
        "box",
        "hamming",
        "lanczos",
    ),
    "method.template_aggregation": AGGREGATION_CHOICES,
}
SEED_RANGE = (0, 2**32 - 1)  # what every seeded generator here accepts (numpy's is the narrowest)
# Integer options: key -> (lowest, highest or None, null allowed). A list (a grid) checks each
# entry; the keys a group does not have (method.r for ridge) are not looked at.
INTEGER_OPTIONS: dict[str, tuple[int, int | None, bool]] = {
    "seed": (*SEED_RANGE, False),
    "anchors.seed": (*SEED_RANGE, False),
    "benchmark.seed": (*SEED_RANGE, False),
    "benchmark.subset_seed": (*SEED_RANGE, False),
    "benchmark.authors_split_seed": (*SEED_RANGE, False),
    "anchors.limit": (1, None, True),
    "benchmark.limit": (1, None, True),
    "benchmark.subset": (1, None, True),
    "anchors.num_samples": (1, None, False),
    "benchmark.num_samples": (1, None, False),
    "anchors.image_size": (1, None, False),
    "benchmark.image_size": (1, None, False),
    "anchors.start": (0, None, False),
    "benchmark.start": (0, None, False),
    "encoder.vision.batch_size": (1, None, False),
    "encoder.vision.resize_size": (1, None, False),
    "encoder.vision.crop_size": (1, None, False),
    "encoder.vision.num_workers": (0, None, True),
    "encoder.vision.cpu_streams": (1, None, True),
    "encoder.text.batch_size": (1, None, False),
    "encoder.text.max_seq_length": (1, None, True),
    "extract.chunk_size": (1, None, False),
    "extract.num_shards": (1, None, False),
    "extract.shard": (0, None, False),
    "extract.num_workers": (0, None, True),
    "asif.n": (1, None, True),  # null: every anchor
    "asif.k": (1, None, False),
    "method.r": (1, None, False),
    "task.recall_at": (1, None, False),
}
# Options that take a value or a list (a grid swept in one job): an empty list is refused.
GRID_OPTIONS = ("asif.n", "asif.k", "asif.p", "method.r", "method.alpha", "method.regularization")
GRID_OPTIONS += ("task.recall_at",)
POSITIVE_OPTIONS = ("asif.p", "asif.memory_budget_mb", "method.alpha")
FRACTION_OPTIONS = ("method.regularization",)  # numbers in [0, 1]
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


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, ListConfig) else value


def _number(value: Any) -> float:
    """`value` as a float; nan for a bool or anything float() refuses."""
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _int(key: str, value: Any, raw: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = _number(value)
    if not number.is_integer():  # nan (a bool, text) and inf are not
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
        number = _number(value)
        if not (math.isfinite(number) and number > 0):
            raise _fail(key, raw, "a finite positive number or a list of them")
        out.append(number)
    return out


def fraction_values(key: str, raw: Any) -> list[float]:
    """`raw` (a value or a list) as floats in [0, 1]."""
    values = []
    for value in as_list(raw):
        number = _number(value)
        if not 0 <= number <= 1:
            raise _fail(key, _plain(raw), "a number in [0, 1] or a list of them")
        values.append(number)
    return values


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
    _check_known_keys(cfg)
    for key, value in _leaves(OmegaConf.to_container(cfg, resolve=False)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value}: expected a finite number")
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key, default="<absent>")
        if value != "<absent>" and value not in choices:
            listed = ", ".join("null" if c is None else str(c) for c in choices)
            raise ConfigError(f"{key}={value!r}: expected one of {listed}")
    _check_numbers(cfg)
    for key in DEVICE_KEYS:
        value = OmegaConf.select(cfg, key)
        if value is not None and not (isinstance(value, str) and DEVICE_FORM.fullmatch(value)):
            raise ConfigError(f"{key}={value!r}: expected auto, cpu, mps, cuda or cuda:<index>")
        if value is not None:
            check_device_exists(key, value)
    _check_preprocessing(cfg)
    if "extract" in cfg and cfg.extract.shard >= cfg.extract.num_shards:
        raise ConfigError(
            f"extract.shard={cfg.extract.shard}: must be below extract.num_shards="
            f"{cfg.extract.num_shards}"
        )
    if OmegaConf.select(cfg, "model_dir"):
        ignored = [o for o in overrides if _override_key(o).split(".")[0] in FIXED_BY_SAVED_MODEL]
        if ignored:
            raise ConfigError(
                f"model_dir={cfg.model_dir}: the saved model fixes its anchors, k, p and "
                f"options, so {' '.join(ignored)} would be ignored; drop "
                f"{'it' if len(ignored) == 1 else 'them'}, or drop model_dir to build the "
                "model from anchors"
            )


def _check_known_keys(node: DictConfig, prefix: str = "") -> None:
    """Every key is a field of its node's schema. Hydra's struct check refuses `method.alpah=1`
    but lets `+method.alpah=1` add the key (and `+alpah=1` at the top): refused here."""
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        fields = [f.name for f in dataclasses.fields(schema)]
        for key in node:
            if key not in fields:
                where = f"{prefix[:-1]}={node.name}" if "name" in fields else prefix[:-1]
                owner = f"of {where}" if where else "of the config"
                raise ConfigError(
                    f"{prefix}{key}: not an option {owner} (its options: {', '.join(fields)})"
                )
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            _check_known_keys(child, f"{prefix}{key}.")


def _check_numbers(cfg: DictConfig) -> None:
    for key in GRID_OPTIONS:
        raw = OmegaConf.select(cfg, key, default="<absent>")
        if isinstance(raw, ListConfig) and len(raw) == 0:
            raise ConfigError(f"{key}=[]: empty grid")
    for key, (lowest, highest, nullable) in INTEGER_OPTIONS.items():
        raw = OmegaConf.select(cfg, key, default="<absent>")
        if raw == "<absent>" or (raw is None and nullable):
            continue
        for value in int_values(key, raw, default=lowest if nullable else None):
            if value < lowest or (highest is not None and value > highest):
                bounds = f"between {lowest} and {highest}" if highest else f"at least {lowest}"
                shown = f"{key}={_plain(raw)}" if isinstance(raw, ListConfig) else f"{key}={value}"
                raise ConfigError(f"{shown}: must be {bounds}" + (" (or null)" * nullable))
    for key in POSITIVE_OPTIONS:
        raw = OmegaConf.select(cfg, key, default="<absent>")
        if raw != "<absent>":
            positive_values(key, _plain(raw))
    for key in FRACTION_OPTIONS:
        raw = OmegaConf.select(cfg, key, default="<absent>")
        if raw != "<absent>":
            fraction_values(key, raw)


def check_device_exists(key: str, device: str) -> None:
    """A named accelerator must be there: found now, not after every model and embedding has
    been loaded."""
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= count:
            found = f"{count} CUDA device(s)" if count else "no CUDA device"
            raise ConfigError(f"{key}={device}: this machine has {found}; use auto or cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}={device}: MPS is not available here; use auto or cpu")


def _check_preprocessing(cfg: DictConfig) -> None:
    vision = OmegaConf.select(cfg, "encoder.vision")
    if vision is None or "mean" not in vision:
        return
    for key in ("mean", "std"):
        values = list(vision[key])
        if len(values) != 3 or (key == "std" and min(values) <= 0):
            expected = "three positive numbers" if key == "std" else "three numbers"
            raise _fail(f"encoder.vision.{key}", values, f"{expected} (one per RGB channel)")

"""Loader kinds by name: `anchors.loader` and `benchmark.loader` pick one.

An anchor loader is `(cfg, data_root) -> AnchorSet`. A benchmark loader is
`(cfg, data_root, class_names) -> (images, labels, class_names)`, where `class_names` is the
configured built-in list or None; the class-balanced subset, the authors' split and the
templates are applied here, the same for every kind. A captioned benchmark loader (a retrieval
benchmark: images with their captions) is `(cfg, data_root) -> CaptionedBenchmark`. A new kind
is one decorated function in the module of its source.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from asif_exp.data.common import (
    AnchorSet,
    Benchmark,
    CaptionedBenchmark,
    Subset,
    apply_authors_split,
    apply_repeated_pairs_policy,
    balanced_subset,
)
from asif_exp.data.prompts import (
    available_class_names,
    available_templates,
    load_class_names,
    load_templates,
)
from asif_exp.errors import ConfigError, DataError

log = logging.getLogger(__name__)
ANCHOR_LOADERS: dict[str, Callable] = {}
BENCHMARK_LOADERS: dict[str, Callable] = {}
CAPTIONED_BENCHMARK_LOADERS: dict[str, Callable] = {}


def _register(table: dict[str, Callable], kinds: tuple[str, ...]):
    def decorate(function: Callable) -> Callable:
        for kind in kinds:
            if kind in table:
                raise ValueError(f"loader kind {kind!r} registered twice")
            table[kind] = function
        return function

    return decorate


def anchor_loader(*kinds: str):
    return _register(ANCHOR_LOADERS, kinds)


def benchmark_loader(*kinds: str):
    return _register(BENCHMARK_LOADERS, kinds)


def captioned_benchmark_loader(*kinds: str):
    return _register(CAPTIONED_BENCHMARK_LOADERS, kinds)


def _lookup(table: dict[str, Callable], key: str, kind: str) -> Callable:
    if kind not in table:
        raise DataError(f"{key}={kind!r}: unknown loader; known: {', '.join(sorted(table))}")
    return table[kind]


def load_anchors(cfg, data_root: str) -> AnchorSet:
    anchors = _lookup(ANCHOR_LOADERS, "anchors.loader", cfg.loader)(cfg, data_root)
    anchors, report = apply_repeated_pairs_policy(anchors, cfg.repeated_pairs)
    anchors.repeats = report
    if report["count"]:
        first = report["examples"][0]
        log.warning(
            "anchors %s: %d repeated image-caption pairs (%s; first: pair %d repeats pair %d, "
            "image %r)",
            anchors.name,
            report["count"],
            report["policy"],
            first["repeat"],
            first["first"],
            first["image"],
        )
    return anchors


def check_prompt_lists(benchmark_cfg) -> None:
    """Built-in templates and class names are named right, before anything is read."""
    available = {"templates": available_templates, "class_names": available_class_names}
    for key, names in available.items():
        value = benchmark_cfg.get(key)
        if isinstance(value, str) and value not in names():
            kind = key.replace("_", " ")
            raise ConfigError(
                f"benchmark.{key}={value!r}: no built-in {kind} of that name; known: "
                f"{', '.join(names())}"
            )


def load_benchmark(cfg, data_root: str) -> Benchmark | CaptionedBenchmark:
    """Labelled images (classification), or images with captions (retrieval: jsonl, csv)."""
    if cfg.loader in CAPTIONED_BENCHMARK_LOADERS:
        return CAPTIONED_BENCHMARK_LOADERS[cfg.loader](cfg, data_root)
    if cfg.loader not in BENCHMARK_LOADERS:
        raise DataError(
            f"benchmark.loader={cfg.loader!r}: unknown loader; known: "
            f"{', '.join(sorted(BENCHMARK_LOADERS))} (labelled images), "
            f"{', '.join(sorted(CAPTIONED_BENCHMARK_LOADERS))} (image-caption pairs, retrieval)"
        )
    class_names = load_class_names(cfg.class_names) if cfg.class_names else None
    loader = BENCHMARK_LOADERS[cfg.loader]
    images, labels, class_names = loader(cfg, data_root, class_names)
    if cfg.subset is not None and cfg.subset < len(labels):
        indices = balanced_subset(labels, cfg.subset, cfg.subset_seed)
        images, labels = Subset(images, indices), [labels[i] for i in indices]
    if cfg.get("authors_split"):
        split, seed = cfg.authors_split, cfg.authors_split_seed
        images, labels = apply_authors_split(images, labels, split, seed)
    return Benchmark(
        cfg.name, images, list(labels), list(class_names or []), load_templates(cfg.templates)
    )

"""One ASIF job: config -> embeddings (cached) -> relative representations -> results.json."""

from __future__ import annotations

import json
import logging
import os
import time
from functools import cache
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from asif_exp.data import load_anchors, load_benchmark, sha_of
from asif_exp.embeddings import EmbeddingCache, encode_images, identity_key
from asif_exp.encoders import ImageEncoder, TextEncoder, text_identity, vision_identity
from asif_exp.methods.asif import AsifOptions, check_grid, evaluate_grid, function_of
from asif_exp.tracking import open_tracker

log = logging.getLogger(__name__)
RESULTS_FORMAT = 1


def as_list(value) -> list:
    if isinstance(value, (list, tuple, ListConfig)):
        return list(value)
    return [value]


def grid_values(cfg: DictConfig, n_available: int) -> tuple[list[int], list[int], list[float]]:
    """asif.n, asif.k and asif.p as lists, checked against the anchors available."""

    def parse(key: str, cast, default=None) -> list:
        try:
            return [default if v is None else cast(v) for v in as_list(cfg.asif[key])]
        except (TypeError, ValueError):
            raise ValueError(
                f"asif.{key}={cfg.asif[key]!r}: expected a number or a list of numbers"
            ) from None

    ns, ks, ps = parse("n", int, n_available), parse("k", int), parse("p", float)
    check_grid(ns, ks, ps, n_available, cfg.asif.clamp_negative)
    return ns, ks, ps


def asif_options(cfg: DictConfig) -> AsifOptions:
    return AsifOptions(
        clamp_negative=cfg.asif.clamp_negative,
        normalize=cfg.asif.normalize,
        template_aggregation=cfg.asif.template_aggregation,
        compute_dtype=cfg.asif.compute_dtype,
        memory_budget_mb=cfg.asif.memory_budget_mb,
        device=cfg.device,
    )


def write_json_atomic(path: Path, payload: dict) -> None:
    """Readers see the old file or the whole new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(staging, path)


# Top-k passes kept between the jobs of an in-process multirun over k, p and n; only the
# latest set of embeddings is kept, to bound memory.
_TOPK_MEMO: dict[tuple, dict] = {}


def topk_memo_for(embedding_keys: tuple) -> dict:
    if embedding_keys not in _TOPK_MEMO:
        _TOPK_MEMO.clear()
        _TOPK_MEMO[embedding_keys] = {}
    return _TOPK_MEMO[embedding_keys]


class Embedder:
    """Cached embeddings for a job; encoders are loaded only on a cache miss."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.cache = EmbeddingCache(cfg.paths.cache_dir, enabled=cfg.cache)
        self.cached: dict[str, bool] = {}
        self.keys: list[str] = []  # identity keys of everything embedded, in order

    @cache  # noqa: B019 - one Embedder per job
    def image_encoder(self) -> ImageEncoder:
        return ImageEncoder(self.cfg.encoder.vision, self.cfg.device)

    @cache  # noqa: B019
    def text_encoder(self) -> TextEncoder:
        return TextEncoder(self.cfg.encoder.text, self.cfg.device)

    def images(self, source, description: str) -> tuple[torch.Tensor, list[int], list[dict]]:
        vision = self.cfg.encoder.vision
        identity = {"kind": "image", "encoder": vision_identity(vision), "data": source.fingerprint}

        def compute():
            embeddings, kept, failures = encode_images(
                self.image_encoder(),
                source,
                vision.batch_size,
                vision.num_workers,
                self.cfg.data.on_bad_image,
                description,
                self.cfg.progress,
            )
            return {"embeddings": embeddings, "kept": torch.tensor(kept)}, {"failures": failures}

        tensors, extra, self.cached[description] = self.cache.get_or_compute(identity, compute)
        self.keys.append(identity_key(identity))
        return tensors["embeddings"], tensors["kept"].tolist(), extra["failures"]

    def texts(self, texts: list[str], description: str) -> torch.Tensor:
        identity = {
            "kind": "text",
            "encoder": text_identity(self.cfg.encoder.text),
            "texts_sha": sha_of(texts),
        }

        def compute():
            return {"embeddings": self.text_encoder().encode(texts, self.cfg.progress)}, {}

        tensors, _, self.cached[description] = self.cache.get_or_compute(identity, compute)
        self.keys.append(identity_key(identity))
        return tensors["embeddings"]


def run(cfg: DictConfig) -> dict:
    """Run one job and return its results (also written to `<output_dir>/results.json`).

    With `skip_existing`, a job whose results.json exists is not run again (resuming a sweep).
    """
    output_dir = Path(cfg.paths.output_dir)
    results_path = output_dir / "results.json"
    if cfg.skip_existing and results_path.exists():
        try:
            finished = json.loads(results_path.read_text())
            log.info("skip_existing: %s already holds results", results_path)
            return finished
        except json.JSONDecodeError:  # written atomically, so only hand edits get here
            log.warning("skip_existing: %s is unreadable; running the job again", results_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    job_name = f"{cfg.anchors.name}-{cfg.benchmark.name}-n{cfg.asif.n}-k{cfg.asif.k}-p{cfg.asif.p}"
    with open_tracker(cfg.logger, resolved, output_dir, job_name) as tracker:
        results = evaluate(cfg, resolved)
        tracker.log_results(results)
    write_json_atomic(results_path, results)
    return results


def evaluate(cfg: DictConfig, resolved: dict) -> dict:
    started = time.perf_counter()
    options = asif_options(cfg)
    function = function_of(options)
    if function != cfg.asif.preset and cfg.asif.preset != "custom":
        log.warning(
            "asif.preset=%s, but the options compute the %r function; results record both",
            cfg.asif.preset,
            function,
        )
    torch.manual_seed(cfg.seed)

    anchors = load_anchors(cfg.anchors, cfg.paths.data_root)
    benchmark = load_benchmark(cfg.benchmark, cfg.paths.data_root)
    ns, ks, ps = grid_values(cfg, len(anchors.captions))  # checked before any encoding

    timings = {}
    embedder = Embedder(cfg)
    t = time.perf_counter()
    anchor_images, anchor_kept, anchor_failures = embedder.images(
        anchors.images, f"anchors {anchors.name}"
    )
    anchor_texts = embedder.texts(anchors.captions, f"anchor captions {anchors.name}")[anchor_kept]
    bench_images, bench_kept, bench_failures = embedder.images(
        benchmark.images, f"benchmark {benchmark.name}"
    )
    prompts, prompt_class = benchmark.prompts()
    prompt_embeddings = embedder.texts(prompts, f"prompts {benchmark.name}")
    timings["embeddings_s"] = time.perf_counter() - t
    labels = torch.tensor(benchmark.labels)[bench_kept]
    if anchor_failures:  # n = null means all anchors that could be read
        ns, ks, ps = grid_values(cfg, len(anchor_kept))

    cells, engine_timings = evaluate_grid(
        bench_images,
        anchor_images,
        prompt_embeddings,
        anchor_texts,
        labels,
        torch.tensor(prompt_class),
        len(benchmark.class_names),
        ns,
        ks,
        ps,
        options,
        progress=cfg.progress,
        topk_memo=topk_memo_for(tuple(embedder.keys)),
    )
    timings.update(engine_timings)
    skipped_cells = timings.pop("skipped")
    timings["total_s"] = time.perf_counter() - started

    rows = [{**c.metrics(), "per_class_accuracy": c.per_class_accuracy} for c in cells]
    results = {
        "format_version": RESULTS_FORMAT,
        "options": {**options.to_dict(), "preset": cfg.asif.preset, "function": function},
        "anchors": {
            "name": anchors.name,
            "pairs": len(anchors.captions),
            "pairs_used": len(anchor_kept),
            "repeated_pairs": anchors.repeats,
            "skipped_images": anchor_failures,
        },
        "benchmark": {
            "name": benchmark.name,
            "images": len(benchmark.labels),
            "images_used": len(bench_kept),
            "skipped_images": bench_failures,
            "class_names": benchmark.class_names,
            "templates": benchmark.templates,
        },
        "encoders": {
            "vision": vision_identity(cfg.encoder.vision),
            "text": text_identity(cfg.encoder.text),
        },
        "embeddings_from_cache": embedder.cached,
        "cells": rows,
        "skipped_cells_k_gt_n": skipped_cells,
        "timings": timings,
        "config": resolved,
    }
    # Top-level numbers: the single cell of a plain run; for a grid, the largest (n, k, p).
    headline = rows[0] if len(rows) == 1 else max(rows, key=lambda r: (r["n"], r["k"], r["p"]))
    results.update(
        {key: headline[key] for key in ("n", "k", "p", "top1", "top5", "per_class_accuracy")}
    )
    return results


def summary_table(results: dict, max_rows: int = 20) -> str:
    """A short, readable table of the cells, best top-1 first."""
    rows = sorted(results["cells"], key=lambda r: -r["top1"])
    lines = [
        f"ASIF  anchors={results['anchors']['name']} ({results['anchors']['pairs_used']} pairs)  "
        f"benchmark={results['benchmark']['name']} ({results['benchmark']['images_used']} images, "
        f"{len(results['benchmark']['class_names'])} classes, "
        f"chance {1 / len(results['benchmark']['class_names']):.3f})",
        f"{'n':>9} {'k':>6} {'p':>6} {'top1':>7} {'top5':>7} {'mpc-recall':>10}",
    ]
    for r in rows[:max_rows]:
        lines.append(
            f"{r['n']:>9} {r['k']:>6} {r['p']:>6g} {r['top1']:>7.4f} {r['top5']:>7.4f} "
            f"{r['mean_per_class_recall']:>10.4f}"
        )
    if len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more cells in results.json")
    return "\n".join(lines)

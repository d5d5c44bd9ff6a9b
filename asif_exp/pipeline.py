"""One job: config -> data -> embeddings (cached) -> method -> task -> results.json.

`embed_problem` turns a composed config into the embedded problem (used by the main run and by
`explain`); the cache identities of every embedding are built here only (`extract` uses them
too), so that a chunked extraction fills exactly the entries a run looks up.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from asif_exp import distributed
from asif_exp.data import (
    AnchorSet,
    Benchmark,
    CaptionedBenchmark,
    Subset,
    check_prompt_lists,
    file_hashes,
    load_anchors,
    load_benchmark,
    readable_in_prefixes,
    sha_of,
)
from asif_exp.embeddings import (
    EmbeddingCache,
    encode_images,
    identity_key,
    refuse_bad_images,
    storage_dtype,
    with_storage_dtype,
)
from asif_exp.encoders import ImageEncoder, TextEncoder, text_identity, vision_identity
from asif_exp.errors import ConfigError, DataError, ResultsFormatError
from asif_exp.methods.base import Method, MethodReport, load_method
from asif_exp.options import anchor_prefixes, check_config
from asif_exp.problem import EmbeddedProblem, Targets
from asif_exp.results import (
    RESULTS_FILE,
    CellResult,
    DataSummary,
    RunResults,
    read_results,
    results_from_dict,
)
from asif_exp.rows import ChunkedRows
from asif_exp.tasks.base import Task, load_task
from asif_exp.tracking import open_tracker

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- cache identities


def image_cache_identity(vision_cfg, source, dtype: str = "float32") -> dict:
    """Everything that changes an image set's embeddings: encoder (weights, preprocessing),
    the images' content and order (`source.fingerprint`), not where they are stored, and the
    dtype they are stored in (`cache_dtype`)."""
    identity = {"kind": "image", "encoder": vision_identity(vision_cfg), "data": source.fingerprint}
    return with_storage_dtype(identity, dtype)


def text_cache_identity(text_cfg, texts: list[str], dtype: str = "float32") -> dict:
    identity = {"kind": "text", "encoder": text_identity(text_cfg), "texts_sha": sha_of(texts)}
    return with_storage_dtype(identity, dtype)


def encoder_identities(cfg: DictConfig) -> dict:
    return {"vision": vision_identity(cfg.encoder.vision), "text": text_identity(cfg.encoder.text)}


class Embedder:
    """Cached embeddings for a job; encoders are loaded only on a cache miss. With `lazy`,
    matrices read from the cache are `ChunkedRows` (read from disk as they are used)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.cache = EmbeddingCache(cfg.paths.cache_dir, enabled=cfg.cache)
        self.dtype_name = cfg.get("cache_dtype", "float32")
        self.dtype = storage_dtype(self.dtype_name)
        file_hashes.remember_in(cfg.paths.cache_dir)  # image files' content hashes, per status
        self.cached: dict[str, bool] = {}
        self.keys: list[str] = []  # identity keys of everything embedded, in order

    @cache  # noqa: B019 - one Embedder per job
    def image_encoder(self) -> ImageEncoder:
        return ImageEncoder(self.cfg.encoder.vision, self.cfg.device)

    @cache  # noqa: B019
    def text_encoder(self) -> TextEncoder:
        return TextEncoder(self.cfg.encoder.text, self.cfg.device)

    def images(
        self, source, description: str, lazy: bool = False
    ) -> tuple[torch.Tensor | ChunkedRows, list[int], list[dict]]:
        """(embeddings of the readable images, their positions in `source`, the failures)."""
        vision = self.cfg.encoder.vision
        identity = image_cache_identity(vision, source, self.dtype_name)

        def compute():
            sliced = self._slice_of_cached_parent(source)
            if sliced is not None:
                log.info("%s: taken from the cached embeddings of its full set", description)
                return sliced
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

        tensors, extra, self.cached[description] = self.cache.get_or_compute(
            identity, compute, self.dtype, lazy
        )
        refuse_bad_images(extra["failures"], self.cfg.data.on_bad_image, description)
        self.keys.append(identity_key(identity))
        failures = extra["failures"]
        if failures:  # results.json lists them all; said here so that nobody misses them
            first = failures[0]
            log.warning(
                "%s: skipped %d unreadable image(s) of %d (data.on_bad_image=%s); first: %s (%s)",
                description,
                len(failures),
                len(source),
                self.cfg.data.on_bad_image,
                first["id"],
                first["error"],
            )
        return tensors["embeddings"], tensors["kept"].tolist(), failures

    def _slice_of_cached_parent(self, source) -> tuple[dict, dict] | None:
        """A subset's entry cut from its full set's cached entry (a class-balanced subset, a
        half of the authors' split): an image's embedding does not depend on which other images
        are encoded with it. None when the full set is not cached. The full set's failures that
        fall in the subset come along (and are refused or skipped as `data.on_bad_image` says)."""
        if not isinstance(source, Subset):
            return None
        parent = self.cache.load(
            image_cache_identity(self.cfg.encoder.vision, source.source, self.dtype_name)
        )
        if parent is None:
            return None
        tensors, extra = parent
        row_of = {position: row for row, position in enumerate(tensors["kept"].tolist())}
        kept = [i for i, position in enumerate(source.indices) if position in row_of]
        failed = {
            source.ids[i] for i, position in enumerate(source.indices) if position not in row_of
        }
        if not kept:
            return None
        rows = [row_of[source.indices[i]] for i in kept]
        failures = [f for f in extra.get("failures", []) if f["id"] in failed]
        return {"embeddings": tensors["embeddings"][rows], "kept": torch.tensor(kept)}, {
            "failures": failures
        }

    def texts(
        self, texts: list[str], description: str, lazy: bool = False
    ) -> torch.Tensor | ChunkedRows:
        identity = text_cache_identity(self.cfg.encoder.text, texts, self.dtype_name)

        def compute():
            return {"embeddings": self.text_encoder().encode(texts, self.cfg.progress)}, {}

        tensors, _, self.cached[description] = self.cache.get_or_compute(
            identity, compute, self.dtype, lazy
        )
        self.keys.append(identity_key(identity))
        return tensors["embeddings"]


# ----------------------------------------------------------------------------- the problem


@dataclass
class EmbeddedAnchors:
    data: AnchorSet
    images: torch.Tensor | ChunkedRows  # readable pairs only, dataset order
    texts: torch.Tensor | ChunkedRows
    kept: list[int]  # positions of the readable pairs in the anchor set
    failures: list[dict]


def embed_anchors(embedder: Embedder, anchors: AnchorSet, lazy: bool = False) -> EmbeddedAnchors:
    """The anchors' embeddings; with `lazy`, cached ones stay on disk (`ChunkedRows`, for a
    method that streams them: `streams_anchors`)."""
    images, kept, failures = embedder.images(anchors.images, f"anchors {anchors.name}", lazy)
    # (for ChunkedRows, a lazy selection)
    texts = embedder.texts(anchors.captions, f"anchor captions {anchors.name}", lazy)[kept]
    return EmbeddedAnchors(anchors, images, texts, kept, failures)


def class_prompt_targets(embedder: Embedder, benchmark: Benchmark) -> Targets:
    prompts, prompt_class = benchmark.prompts()
    return Targets(
        prompts,
        embedder.texts(prompts, f"prompts {benchmark.name}"),
        torch.tensor(prompt_class),
        list(benchmark.class_names),
    )


def caption_targets(
    embedder: Embedder, benchmark: CaptionedBenchmark, kept: list[int]
) -> tuple[Targets, torch.Tensor, list[int], dict]:
    """The captions of the readable images, each its own target; the image (row among the
    readable images) of each caption; each target's position among the benchmark's captions;
    and what the results record about them."""
    row_of = {image: row for row, image in enumerate(kept)}
    used = [j for j, image in enumerate(benchmark.caption_image) if image in row_of]
    embeddings = embedder.texts(benchmark.captions, f"captions {benchmark.name}")
    targets = Targets([benchmark.captions[j] for j in used], embeddings[used])
    truth = torch.tensor([row_of[benchmark.caption_image[j]] for j in used], dtype=torch.long)
    details = {
        "captions": len(benchmark.captions),
        "captions_used": len(used),
        "repeated_pairs": benchmark.repeated_pairs,
    }
    return targets, truth, used, details


@dataclass
class EmbeddedBenchmark:
    """A benchmark's readable images and its targets, embedded, with the ground truth."""

    images: torch.Tensor  # readable images only, dataset order
    kept: list[int]  # position of each embedded image in the benchmark
    failures: list[dict]
    targets: Targets
    truth: torch.Tensor  # labels (images,), or each caption's image row (captions,)
    target_positions: list[int] | None  # captions: each target's benchmark position; else None
    summary: DataSummary


def embed_benchmark(
    embedder: Embedder, benchmark: Benchmark | CaptionedBenchmark
) -> EmbeddedBenchmark:
    """Benchmark images and their targets, embedded (from the cache if there): class prompts
    and labels for a labelled benchmark, captions and each caption's image for a benchmark of
    image-caption pairs."""
    images, kept, failures = embedder.images(benchmark.images, f"benchmark {benchmark.name}")
    positions = None
    if isinstance(benchmark, CaptionedBenchmark):
        targets, truth, positions, details = caption_targets(embedder, benchmark, kept)
    else:
        targets = class_prompt_targets(embedder, benchmark)
        truth = torch.tensor(benchmark.labels)[kept]
        details = {"class_names": benchmark.class_names, "templates": benchmark.templates}
    summary = DataSummary(benchmark.name, len(benchmark.images), len(kept), failures, details)
    return EmbeddedBenchmark(images, kept, failures, targets, truth, positions, summary)


def embed_problem(
    cfg: DictConfig,
    embedder: Embedder,
    anchors: AnchorSet,
    benchmark: Benchmark | CaptionedBenchmark,
    lazy_anchors: bool = False,
) -> EmbeddedProblem:
    """Anchors, benchmark images and their targets, embedded (from the cache if there). With
    `lazy_anchors`, cached anchors stay on disk."""
    anchor = embed_anchors(embedder, anchors, lazy_anchors)
    bench = embed_benchmark(embedder, benchmark)
    return EmbeddedProblem(
        anchor_images=anchor.images,
        anchor_texts=anchor.texts,
        images=bench.images,
        targets=bench.targets,
        truth=bench.truth,
        cache_keys=tuple(embedder.keys),
        anchor_positions=anchor.kept,
        image_positions=bench.kept,
        target_positions=bench.target_positions,
        info={
            "anchors": DataSummary(
                anchors.name,
                len(anchors.captions),
                len(anchor.kept),
                anchor.failures,
                {"repeated_pairs": anchors.repeats},
            ),
            "benchmark": bench.summary,
        },
    )


def check_task_fits_benchmark(task: Task, benchmark: Benchmark | CaptionedBenchmark) -> None:
    """A task scores what its benchmark provides: class prompts (labelled images) or captions."""
    captioned = isinstance(benchmark, CaptionedBenchmark)
    if task.targets == "captions" and not captioned:
        raise ConfigError(
            f"task={task.name} needs a benchmark of image-caption pairs (benchmark.loader jsonl "
            f"or csv, e.g. benchmark=flickr8k); benchmark={benchmark.name} is labelled images"
        )
    if task.targets == "class_prompts" and captioned:
        raise ConfigError(
            f"task={task.name} needs labelled images; benchmark={benchmark.name} is image-caption "
            "pairs: use task=retrieval"
        )


# ----------------------------------------------------------------------------- the run


def run(cfg: DictConfig) -> dict:
    """Run one job; its results as written to `<output_dir>/results.json`."""
    return run_job(cfg).to_dict()


def check_run_config(cfg: DictConfig, overrides: Sequence[str] = ()) -> None:
    """Every check of a config before any work: the schema's and `options.check_config`'s, then
    the data layer's (the built-in prompt lists a benchmark names)."""
    check_config(cfg, overrides)
    if "benchmark" in cfg:
        check_prompt_lists(cfg.benchmark)


def run_job(cfg: DictConfig) -> RunResults | None:
    """Run one job and return its results record (also written to `<output_dir>/results.json`).

    With `skip_existing`, a job whose results.json holds this config's results is not run again
    (resuming a sweep). Started by torchrun (or as several SLURM tasks), the processes share the
    top-k pass (`asif_exp.distributed`); rank 0 alone scores, writes and returns the results,
    the others return None.
    """
    check_run_config(cfg)  # before anything is read, encoded or tracked
    distributed.setup(cfg.device)
    output_dir = Path(cfg.paths.output_dir)
    check_writable_folder(output_dir, "paths.output_dir")
    results_path = output_dir / RESULTS_FILE
    resolved = OmegaConf.to_container(cfg, resolve=True)
    finished = None
    if cfg.skip_existing and results_path.exists() and distributed.is_main():
        finished = finished_results(results_path, resolved)
    if distributed.from_main(finished is not None):  # all ranks skip, or none
        if finished is not None:
            log.info("skip_existing: %s already holds this job's results", results_path)
        return finished
    method, task = load_method(cfg), load_task(cfg)
    if not distributed.is_main():
        evaluate(cfg, resolved, method, task)  # its share of the top-k pass
        return None
    with open_tracker(cfg.logger, resolved, output_dir, job_name(cfg, method)) as tracker:
        results = evaluate(cfg, resolved, method, task)
        tracker.log_results(results)
    results.write(results_path)
    return results


def job_name(cfg: DictConfig, method: Method) -> str:
    """The data, the method and its grid, e.g. `coco_mini-cifar10-asif-n[200, 400]-k50-p[1,2]`."""

    def values(items: list) -> str:
        shown = [f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in items]
        return shown[0] if len(shown) == 1 else f"[{','.join(shown)}]"

    grid = "".join(f"-{key}{values(v)}" for key, v in method.hyperparameters().items())
    return f"{cfg.anchors.name}-{cfg.benchmark.name}-{method.name}-n{cfg.asif.n}{grid}"


def check_writable_folder(folder: Path, key: str) -> None:
    """Check, before any work and without creating anything, that `folder` can be created and
    written: a file where the folder (or one above it) should be, or a folder that cannot be
    written, is one line naming it, not a crash once everything is computed."""
    existing = folder.absolute()
    while not existing.exists():  # (False also below a file: ENOTDIR)
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={folder}: cannot write there: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={folder}: cannot write there: {existing} is not writable")


# Config keys that change no number: a results.json written under other values still counts
# as this job's (skip_existing).
NOT_AFFECTING_RESULTS = (
    "paths.output_dir",
    "paths.root",
    "paths.cache_dir",
    "cache",
    "progress",
    "logger",
    "skip_existing",
    "sweep_name",
    "encoder.vision.num_workers",
    "encoder.vision.cpu_streams",
)


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict) and node:
        return {
            k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()
        }
    return {prefix[:-1]: node}


def config_differences(recorded: dict, current: dict) -> list[str]:
    """`key: recorded -> current` for every result-changing key whose value differs."""
    # as results.json holds it (tuples as lists, other objects as strings)
    current = json.loads(json.dumps(current, default=str))
    old, new = _flat(recorded), _flat(current)
    return [
        f"{key}: {old.get(key, '(absent)')} -> {new.get(key, '(absent)')}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
        and not any(key == k or key.startswith(f"{k}.") for k in NOT_AFFECTING_RESULTS)
    ]


def finished_results(path: Path, resolved: dict) -> RunResults | None:
    """The record at `path` if it is whole and was produced by this config; None (and why, in
    the log) when the job must run again."""
    try:
        finished = read_results(path)
    except ResultsFormatError as error:  # written atomically, so only damage or hand edits
        log.warning("skip_existing: %s; running the job again", error)
        return None
    differences = config_differences(finished.config, resolved)
    if differences:
        shown = "; ".join(differences[:5]) + (
            f"; and {len(differences) - 5} more" if len(differences) > 5 else ""
        )
        log.warning(
            "skip_existing: %s was produced by another config (%s); running the job again",
            path,
            shown,
        )
        return None
    return finished


def evaluate(cfg: DictConfig, resolved: dict, method: Method, task: Task) -> RunResults | None:
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)

    anchors = load_anchors(cfg.anchors, cfg.paths.data_root)
    benchmark = load_benchmark(cfg.benchmark, cfg.paths.data_root)
    check_task_fits_benchmark(task, benchmark)
    listed_ns = anchor_prefixes(cfg.asif.n, len(anchors.captions))  # n = null: all listed
    method.check(listed_ns)  # before any encoding
    streams = getattr(method, "streams_anchors", False)
    if distributed.world_size() > 1 and not streams:
        raise ConfigError(
            f"method={method.name} does not shard its anchors over processes: run it as one "
            "process (not under torchrun)"
        )

    embedder = Embedder(cfg)
    t = time.perf_counter()
    with distributed.main_first():  # rank 0 fills the cache, the others read it
        problem = embed_problem(cfg, embedder, anchors, benchmark, lazy_anchors=streams)
    timings = {"embeddings_s": time.perf_counter() - t}
    used = readable_prefixes(listed_ns, problem.anchor_positions)
    ns = sorted(set(used.values()))
    method.check(ns)

    report = MethodReport()
    if not distributed.is_main():
        for _ in method.score(problem, ns, report):  # the top-k pass only; rank 0 scores
            pass
        return None
    report.notes["world_size"] = distributed.world_size()  # processes of the top-k pass
    cells = listed_prefix_cells(score_and_measure(method, task, problem, ns, report), used)
    report.notes["skipped_cells"] = listed_prefix_skipped(report.skipped, used)
    problem.info["anchors"].details["n_counts"] = N_COUNTS
    timings.update(report.timings)
    timings["total_s"] = time.perf_counter() - started
    return RunResults(
        method=method.name,
        task=task.name,
        options=method.record(),
        anchors=problem.info["anchors"],
        benchmark=problem.info["benchmark"],
        encoders=encoder_identities(cfg),
        cells=cells,
        headline=headline(cells),
        primary_metric=task.primary_metric,
        embeddings_from_cache=embedder.cached,
        notes=report.notes,
        timings=timings,
        config=resolved,
    )


NONFINITE_SCORES = "non-finite scores"
N_COUNTS = "listed pairs, as anchors.limit does; a cell's n_used: the readable pairs among them"


def readable_prefixes(listed_ns: list[int], positions: list[int] | None) -> dict[int, int]:
    """asif.n counts listed pairs: the anchor rows of n are the readable pairs among the first
    n listed, so a grid's n never depends on which downloads failed. {n: rows used}."""
    rows = listed_ns if positions is None else readable_in_prefixes(listed_ns, positions)
    used = dict(zip(listed_ns, rows, strict=True))
    for n, rows in used.items():
        if rows < 1:
            raise DataError(f"asif.n={n}: none of the first {n} anchor pairs has a readable image")
    return used


def listed_prefix_cells(cells: list[CellResult], used: dict[int, int]) -> list[CellResult]:
    """Cells labelled by the listed n asked for (several n may share the same readable rows),
    with n_used, the anchor rows the method used."""
    return [
        CellResult({**cell.params, "n": n, "n_used": cell.params["n"]}, cell.metrics)
        for cell in cells
        for n in sorted(used)
        if used[n] == cell.params["n"]
    ]


def listed_prefix_skipped(skipped: list[dict], used: dict[int, int]) -> list[dict]:
    """The skipped cells as results.json lists them, for every method alike: labelled by the
    listed n asked for, with n_used, as the scored cells are."""
    return [
        {"n": n, "n_used": cell["n"], **{k: v for k, v in cell.items() if k != "n"}}
        for cell in skipped
        for n in sorted(used)
        if used[n] == cell["n"]
    ]


def score_and_measure(
    method: Method, task: Task, problem: EmbeddedProblem, ns: list[int], report: MethodReport
) -> list[CellResult]:
    """Every cell of the method's grid, scored and measured by the task.

    A cell whose scores are not all finite is never measured (NaN compares false, so a
    rank-based metric would count it as a hit): it is skipped, warned about and listed with the
    method's skipped cells; a grid where no cell can be evaluated (all skipped as the method
    cannot fit them, or non-finite) is an error saying why.
    """
    cells = []
    for cell in method.score(problem, ns, report):
        if bool(torch.isfinite(cell.scores).all()):
            cells.append(CellResult(cell.params, task.metrics(cell.scores, problem)))
        else:
            log.warning("%s cell %s: non-finite scores; cell skipped", method.name, cell.params)
            report.skipped.append({**cell.params, "reason": NONFINITE_SCORES})
    if not cells:
        reasons = list(dict.fromkeys(cell["reason"] for cell in report.skipped))
        raise ConfigError(
            f"method={method.name}: no cell of the grid can be evaluated: "
            f"{len(report.skipped)} skipped ({'; '.join(reasons[:3])})"
        )
    return cells


def headline(cells: list[CellResult]) -> CellResult:
    """The single cell of a plain run; for a grid, the largest parameters (e.g. (n, k, p))."""
    return cells[0] if len(cells) == 1 else max(cells, key=lambda c: tuple(c.params.values()))


def summary_table(results: RunResults | dict, max_rows: int = 20) -> str:
    """A short, readable table of the cells, best first by the task's primary metric."""
    if isinstance(results, dict):  # as `run` returns it
        results = results_from_dict(results)
    primary = results.primary_metric
    rows = sorted(results.rows(), key=lambda r: -r[primary])
    params = list(results.headline.params)
    metrics = results.scalar_metrics()
    bench = results.benchmark
    classes = bench.details.get("class_names")
    if classes:
        contents = f", {len(classes)} classes, chance {1 / len(classes):.3f}"
    elif "captions_used" in bench.details:
        contents = f", {bench.details['captions_used']} captions"
    else:
        contents = ""
    # Headers without the task's prefix (retrieval.image_to_text.R@1 -> image_to_text.R@1).
    prefix = f"{results.task}."
    headers = [m[len(prefix) :] if m.startswith(prefix) else m for m in metrics]
    widths = [max(9, len(h)) for h in params + headers]
    lines = [
        f"{results.method}  anchors={results.anchors.name} ({results.anchors.used} pairs)  "
        f"benchmark={bench.name} ({bench.used} images{contents})",
        " ".join(f"{h:>{w}}" for h, w in zip(params + headers, widths, strict=True)),
    ]
    for r in rows[:max_rows]:
        values = [f"{r[name]:g}" for name in params] + [f"{r[name]:.4f}" for name in metrics]
        lines.append(" ".join(f"{v:>{w}}" for v, w in zip(values, widths, strict=True)))
    if len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more cells in results.json")
    return "\n".join(lines)

"""`python -m asif_exp.explain benchmark=cifar10 query=12`: look inside an ASIF model.

From the cached embeddings of a main run (encoders load only on a cache miss) it writes, into
the Hydra output dir:
  explain_q<query>.json/.png  the anchor pairs behind the prediction and the runner-up (Fig. 5)
  abstain.csv/.png            accuracy against coverage as the "unknown" threshold moves
  anchor_usage.csv/.png       how many queries use each anchor; pruning never-used anchors
  model/                      the (edited) model as a directory, with `save_model=true`
  explain_results.json        the numbers, the edit and the resolved config
`edit.*` removes anchor pairs before anything is computed; `model_dir=...` loads a saved model
instead of building one from `anchors`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf
from PIL import Image

from asif_exp.cli import run_cli, user_errors_in_one_line
from asif_exp.config import (
    AnchorsConfig,
    AsifConfig,
    BenchmarkConfig,
    DataConfig,
    EncoderConfig,
    LoggerConfig,
    PathsConfig,
    RunConfig,
)
from asif_exp.data import AnchorSet, Benchmark, CaptionedBenchmark, load_anchors, load_benchmark
from asif_exp.errors import ConfigError, DataError
from asif_exp.memory import (
    AsifModel,
    Prompts,
    anchor_usage,
    coverage_curve,
    explain,
    load_model,
    prune_unused,
    usage_summary,
)
from asif_exp.memory.figures import render_coverage, render_explanation, render_usage, write_csv
from asif_exp.methods.asif import asif_options, grid_values
from asif_exp.options import as_list, check_config, single
from asif_exp.pipeline import (
    Embedder,
    class_prompt_targets,
    embed_anchors,
    encoder_identities,
    readable_prefixes,
)
from asif_exp.results import write_json_atomic

log = logging.getLogger("asif_exp.explain")
EXPLAIN_FORMAT = 1


# ----------------------------------------------------------------------------- config


@dataclass
class EditConfig:
    """Anchor pairs removed before anything is computed (any criterion selects a pair)."""

    remove_indices: list[int] = field(default_factory=list)  # positions among the n anchors
    remove_ids: list[str] = field(default_factory=list)  # image ids (all captions of an image)
    remove_caption_contains: str | None = None  # substring, case-sensitive
    remove_caption_regex: str | None = None  # Python regex, re.search


@dataclass
class AbstainConfig:
    threshold: float | None = None  # operating point reported in explain_results.json
    num_thresholds: int = 50  # points on the accuracy-coverage curve


@dataclass
class ExplainConfig(RunConfig):
    """The main config plus the fields below. conf/explain.yaml merges this schema after
    `config`, so every inherited field is MISSING here: the main config's values stand."""

    encoder: EncoderConfig = MISSING
    anchors: AnchorsConfig = MISSING
    benchmark: BenchmarkConfig = MISSING
    asif: AsifConfig = MISSING
    logger: LoggerConfig = MISSING
    paths: PathsConfig = MISSING
    data: DataConfig = MISSING
    device: str = MISSING
    seed: int = MISSING
    cache: bool = MISSING
    progress: bool = MISSING
    sweep_name: str | None = MISSING
    skip_existing: bool = MISSING

    query: Any = 0  # benchmark index, or a list of them
    top_anchors: int = 6  # anchor pairs drawn per class in the figure
    edit: EditConfig = field(default_factory=EditConfig)
    abstain: AbstainConfig = field(default_factory=AbstainConfig)
    usage: bool = True  # anchor usage over the benchmark, and pruning never-used anchors
    model_dir: str | None = None  # a saved model to use instead of building one from anchors
    save_model: bool = False  # write the (edited) model to <output_dir>/model


ConfigStore.instance().store(name="explain_schema", node=ExplainConfig)


# ----------------------------------------------------------------------------- workspace


@dataclass
class Workspace:
    """A model and a benchmark, embedded (from the cache when it can)."""

    model: AsifModel
    prompts: Prompts
    image_embeddings: torch.Tensor
    labels: torch.Tensor
    benchmark: Benchmark
    kept: list[int]  # benchmark index of each embedded image (unreadable ones are skipped)
    anchors: AnchorSet | None  # None for a model loaded from model_dir
    from_cache: dict[str, bool]

    def row_of(self, query: int) -> int:
        """Row of benchmark image `query` in the embeddings."""
        if not 0 <= query < len(self.benchmark.labels):
            raise ConfigError(
                f"query={query}: benchmark {self.benchmark.name} has images 0.."
                f"{len(self.benchmark.labels) - 1}"
            )
        try:
            return self.kept.index(query)
        except ValueError:
            raise DataError(
                f"query={query}: image {self.benchmark.images.ids[query]!r} was skipped "
                "as unreadable"
            ) from None

    @cached_property
    def _anchor_position(self) -> dict[str, int]:
        return {image_id: i for i, image_id in enumerate(self.anchors.images.ids)}

    def anchor_image(self, anchor_id: str) -> Image.Image | None:
        """The anchor's image, or None when only its embedding is known (a loaded model)."""
        if self.anchors is None:
            return None
        return self.anchors.images.load(self._anchor_position[anchor_id])


def _encoders(cfg: DictConfig) -> dict:
    # as a saved model holds them (tuples as lists)
    return json.loads(json.dumps(encoder_identities(cfg)))


def load_workspace(cfg: DictConfig) -> Workspace:
    embedder = Embedder(cfg)
    anchors = None
    if cfg.model_dir:  # checked before anything is encoded
        model = load_model(cfg.model_dir, device=cfg.device)
        if model.encoders != _encoders(cfg):
            raise ConfigError(
                f"model_dir={cfg.model_dir} was built with encoders {model.encoders}, but the "
                f"config's are {_encoders(cfg)}: its anchors and these queries are not comparable"
            )
    else:
        anchors = load_anchors(cfg.anchors, cfg.paths.data_root)
        # bad n, k or p fail before any encoding
        ns, ks, ps = grid_values(cfg, len(anchors.captions))
        k, p = single("asif.k", ks), single("asif.p", ps)
        n = None if cfg.asif.n is None else single("asif.n", ns)
        embedded = embed_anchors(embedder, anchors)
        kept = embedded.kept
        # n counts listed pairs (as in a run): the readable ones among the first n are used
        n = len(kept) if n is None else readable_prefixes([n], kept)[n]
        model = AsifModel(
            embedded.images[:n],
            embedded.texts[:n],
            [anchors.images.ids[i] for i in kept[:n]],
            [anchors.captions[i] for i in kept[:n]],
            k,
            p,
            asif_options(cfg),
            _encoders(cfg),
        )
    benchmark = load_benchmark(cfg.benchmark, cfg.paths.data_root)
    if isinstance(benchmark, CaptionedBenchmark):
        raise ValueError(
            f"benchmark={benchmark.name} is image-caption pairs (a retrieval benchmark); "
            "explain needs labelled images (e.g. benchmark=cifar10)"
        )
    images, kept, _ = embedder.images(benchmark.images, f"benchmark {benchmark.name}")
    targets = class_prompt_targets(embedder, benchmark)
    prompts = Prompts(targets.embeddings, targets.groups, targets.group_names, targets.texts)
    labels = torch.tensor(benchmark.labels)[kept]
    return Workspace(model, prompts, images, labels, benchmark, kept, anchors, embedder.cached)


# ----------------------------------------------------------------------------- the job


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - start


def _edit(cfg: DictConfig, ws: Workspace) -> tuple[AsifModel, dict | None]:
    edit = cfg.edit
    if not (
        edit.remove_indices
        or edit.remove_ids
        or edit.remove_caption_contains
        or edit.remove_caption_regex
    ):
        return ws.model, None
    before = ws.model.evaluate(ws.image_embeddings, ws.labels, ws.prompts)
    selection = dict(
        indices=list(edit.remove_indices),
        ids=list(edit.remove_ids),
        caption_contains=edit.remove_caption_contains,
        caption_regex=edit.remove_caption_regex,
    )
    removed = ws.model.matching(**selection)
    edited, edit_s = _timed(ws.model.remove, **selection)
    after, evaluate_s = _timed(edited.evaluate, ws.image_embeddings, ws.labels, ws.prompts)
    report = {
        **OmegaConf.to_container(edit),
        "removed": int(removed.sum()),
        "removed_captions": [ws.model.anchor_captions[i] for i in removed.nonzero().flatten()[:10]],
        "n_before": ws.model.n,
        "n_after": edited.n,
        "top1_before": before["top1"],
        "top1_after": after["top1"],
        "predictions_changed": int((before["predictions"] != after["predictions"]).sum()),
        "edit_s": edit_s,
        "evaluate_s": evaluate_s,
    }
    return edited, report


def _explain_query(
    cfg, ws: Workspace, model: AsifModel, query: int, row: int, output_dir: Path
) -> dict:
    explanation = explain(model, ws.image_embeddings[row], ws.prompts, int(ws.labels[row]))
    payload = {"query": query, "image_id": ws.benchmark.images.ids[query], **explanation.to_dict()}
    write_json_atomic(output_dir / f"explain_q{query}.json", payload)
    render_explanation(
        explanation,
        ws.benchmark.images.load(query),
        ws.anchor_image,
        output_dir / f"explain_q{query}.png",
        cfg.top_anchors,
        title=f"{ws.benchmark.name} #{query}",
    )
    winner = explanation.classes[0]
    return {
        "query": query,
        "label": explanation.label,
        "predicted": explanation.predicted,
        "runner_up": explanation.runner_up,
        "score": winner.score,
        "anchors_shared_with_winner": len(winner.contributions),
        "top_anchor": winner.contributions[0].caption if winner.contributions else None,
    }


def _abstain(cfg, ws: Workspace, model: AsifModel, output_dir: Path) -> dict:
    scores = model.scores(ws.image_embeddings, ws.prompts)
    rows = coverage_curve(scores, ws.labels, num=cfg.abstain.num_thresholds)
    threshold = cfg.abstain.threshold
    at = coverage_curve(scores, ws.labels, [threshold])[0] if threshold is not None else None
    if at is not None:
        rows = [rows[0], *sorted([*rows[1:], at], key=lambda r: r["threshold"])]
    write_csv(rows, output_dir / "abstain.csv")
    render_coverage(rows, output_dir / "abstain.png", at)
    return {"no_threshold": rows[0], "at_threshold": at}


def _usage(ws: Workspace, model: AsifModel, output_dir: Path) -> dict:
    usage = anchor_usage(model, ws.image_embeddings, ws.prompts)
    write_csv(
        [
            {
                "anchor": i,
                "id": model.anchor_ids[i],
                "caption": model.anchor_captions[i],
                "image_topk": int(usage.image_topk[i]),
                "explanation": int(usage.explanation[i]),
                "prompt_topk": int(usage.prompt_topk[i]),
            }
            for i in range(model.n)
        ],
        output_dir / "anchor_usage.csv",
    )
    render_usage(
        {"in a query's top-k": usage.image_topk, "in an explanation": usage.explanation},
        output_dir / "anchor_usage.png",
    )
    before = model.evaluate(ws.image_embeddings, ws.labels, ws.prompts)
    pruned = prune_unused(model, usage.image_topk)
    after = pruned.evaluate(ws.image_embeddings, ws.labels, ws.prompts)
    # The honest version: count usage on half the queries, measure on the other half.
    fit, held_out = torch.arange(0, len(ws.labels), 2), torch.arange(1, len(ws.labels), 2)
    report = {
        **usage.summary(),
        "prune_never_in_topk": {
            "n_before": model.n,
            "n_after": pruned.n,
            "memory_mb_before": model.memory_bytes() / 2**20,
            "memory_mb_after": pruned.memory_bytes() / 2**20,
            "top1_before": before["top1"],
            "top1_after": after["top1"],
        },
    }
    if len(held_out):
        fit_usage = anchor_usage(model, ws.image_embeddings[fit], ws.prompts)
        pruned_fit = prune_unused(model, fit_usage.image_topk)
        evaluate = [
            m.evaluate(ws.image_embeddings[held_out], ws.labels[held_out], ws.prompts)
            for m in (model, pruned_fit)
        ]
        report["prune_held_out"] = {
            "usage_from": "even-indexed queries",
            "measured_on": "odd-indexed queries",
            "n_after": pruned_fit.n,
            "unused_in_fit": usage_summary(fit_usage.image_topk)["unused"],
            "top1_before": evaluate[0]["top1"],
            "top1_after": evaluate[1]["top1"],
        }
    return report


def _queries(cfg: DictConfig) -> list[int]:
    try:
        return [int(q) for q in as_list(cfg.query)]
    except (TypeError, ValueError):
        raise ConfigError(
            f"query={cfg.query!r}: expected a benchmark index or a list of them"
        ) from None


def explain_main(cfg: DictConfig, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The whole job as a plain function (Hydra only composes the config). `overrides`: the
    command line's, to refuse options a saved model (`model_dir`) would ignore."""
    check_config(cfg, overrides)
    output_dir = Path(cfg.paths.output_dir)
    queries = _queries(cfg)  # a typo fails before any work
    ws = load_workspace(cfg)
    rows = [ws.row_of(q) for q in queries]  # every query checked before anything is written
    model, edit_report = _edit(cfg, ws)
    base = model.evaluate(ws.image_embeddings, ws.labels, ws.prompts)
    results: dict = {
        "format_version": EXPLAIN_FORMAT,
        "model": {
            "n": model.n,
            "k": model.k,
            "p": model.p,
            "options": model.options.to_dict(),
            "encoders": model.encoders,
            "memory_mb": model.memory_bytes() / 2**20,
        },
        "benchmark": {
            "name": ws.benchmark.name,
            "images_used": len(ws.kept),
            "class_names": ws.benchmark.class_names,
        },
        "top1": base["top1"],
        "top5": base["top5"],
        "no_overlap_fraction": base["no_overlap_fraction"],
        "embeddings_from_cache": ws.from_cache,
        "edit": edit_report,
        "queries": [
            _explain_query(cfg, ws, model, q, row, output_dir)
            for q, row in zip(queries, rows, strict=True)
        ],
        "abstain": _abstain(cfg, ws, model, output_dir),
        "usage": _usage(ws, model, output_dir) if cfg.usage else None,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if cfg.save_model:
        results["model_dir"] = str(model.save(output_dir / "model", overwrite=True))
    write_json_atomic(output_dir / "explain_results.json", results)
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="explain")
def main(cfg: DictConfig) -> None:
    with user_errors_in_one_line():
        results = explain_main(cfg, list(HydraConfig.get().overrides.task))
    for q in results["queries"]:
        names = results["benchmark"]["class_names"]
        log.info(
            "query %d: true %s, predicted %s (runner-up %s), %d anchors shared; top anchor: %s",
            q["query"],
            names[q["label"]],
            names[q["predicted"]],
            names[q["runner_up"]] if q["runner_up"] is not None else "-",
            q["anchors_shared_with_winner"],
            q["top_anchor"],
        )
    log.info("top-1 %.4f; outputs in %s", results["top1"], cfg.paths.output_dir)


if __name__ == "__main__":
    run_cli(main)

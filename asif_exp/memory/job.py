"""The explain job (`python -m asif_exp.explain`) as a plain function: explain, edit, abstain and
count anchor usage on the problem a run would embed, for any task.

The workspace (`memory/workspace.py`) is the problem the run embeds. What is task-specific
comes from the task (`tasks/`): its metrics and its query directions (`Task.directions`: images
query classes; images query captions and captions query images). It writes, into
`paths.output_dir`:

  explain_q<query>.json/.png  the anchor pairs behind a query's best answers (Fig. 5)
  abstain.csv/.png            top-1 right on the answered queries against coverage, per direction
  anchor_usage.csv/.png       how many queries use each anchor; pruning never-used anchors
  model/                      the (edited) model as a directory, with `save_model=true`
  explain_results.json        the metrics (before and after an edit), the edit, the resolved config
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from asif_exp.errors import ConfigError
from asif_exp.memory.explanation import explain, explain_match
from asif_exp.memory.figures import (
    render_coverage,
    render_explanation,
    render_match_explanation,
    render_usage,
    write_csv,
)
from asif_exp.memory.model import AsifModel
from asif_exp.memory.usage import (
    coverage_rows,
    explanation_counts,
    prune_unused,
    topk_counts,
    usage_summary,
)
from asif_exp.memory.workspace import Workspace, load_workspace
from asif_exp.methods.asif import ModelScores
from asif_exp.options import as_list
from asif_exp.pipeline import check_run_config
from asif_exp.results import write_json_atomic
from asif_exp.tasks.base import QueryDirection, Task, load_task

log = logging.getLogger("asif_exp.explain")
EXPLAIN_FORMAT = 2  # 2: any task; metrics under the task's own names; abstain per direction
MISSES = "misses"


# ----------------------------------------------------------------------------- the job


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - start


def _scalars(metrics: dict) -> dict:
    """The task's single-number metrics (not per-class lists)."""
    return {k: v for k, v in metrics.items() if v is None or isinstance(v, (int, float))}


def _before_after(before: dict, after: dict) -> dict:
    return {
        **{f"{name}_before": value for name, value in before.items()},
        **{f"{name}_after": value for name, value in after.items()},
    }


def _edit(
    cfg: DictConfig, ws: Workspace, scored: ModelScores, directions: list[QueryDirection]
) -> tuple[AsifModel, ModelScores, dict | None]:
    edit = cfg.edit
    if not (
        edit.remove_indices
        or edit.remove_ids
        or edit.remove_caption_contains
        or edit.remove_caption_regex
    ):
        return ws.model, scored, None
    selection = dict(
        indices=list(edit.remove_indices),
        ids=list(edit.remove_ids),
        caption_contains=edit.remove_caption_contains,
        caption_regex=edit.remove_caption_regex,
    )
    try:
        removed = ws.model.matching(**selection)
        edited, edit_s = _timed(ws.model.remove, **selection)
    except (IndexError, KeyError, ValueError) as error:  # a selection that cannot be right
        raise ConfigError(f"edit: {error}") from None
    start = time.perf_counter()
    after = edited.score(ws.problem.images, ws.prompts)
    after_metrics = _scalars(ws.task.metrics(after.scores, ws.problem))
    evaluate_s = time.perf_counter() - start
    report = {
        **OmegaConf.to_container(edit),
        "removed": int(removed.sum()),
        "removed_captions": [ws.model.anchor_captions[i] for i in removed.nonzero().flatten()[:10]],
        "n_before": ws.model.n,
        "n_after": edited.n,
        **_before_after(_scalars(ws.task.metrics(scored.scores, ws.problem)), after_metrics),
        # queries whose top-1 answer changed, per direction
        "predictions_changed": {
            d.name: int((d.view(scored.scores).argmax(1) != d.view(after.scores).argmax(1)).sum())
            for d in directions
        },
        "edit_s": edit_s,
        "evaluate_s": evaluate_s,
    }
    return edited, after, report


def _explain_query(
    cfg, ws: Workspace, model: AsifModel, scored: ModelScores, direction: QueryDirection, row: int
) -> dict:
    """Write explain_q<query>.json/.png; a summary for explain_results.json and the log."""
    query = ws.index_of(direction.query_kind, row)
    paths = [Path(cfg.paths.output_dir) / f"explain_q{query}.{ext}" for ext in ("json", "png")]
    if direction.candidate_kind == "class":
        return _explain_class_query(cfg, ws, model, query, row, *paths)
    return _explain_match_query(cfg, ws, model, scored, direction, query, row, *paths)


def _explain_class_query(cfg, ws, model, query, row, json_path, png_path) -> dict:
    label = int(ws.problem.truth[row])
    explanation = explain(model, ws.problem.images[row], ws.prompts, label)
    image_id = ws.benchmark.images.ids[query]
    write_json_atomic(json_path, {"query": query, "image_id": image_id, **explanation.to_dict()})
    render_explanation(
        explanation,
        ws.benchmark.images.load(query),
        ws.anchor_image,
        png_path,
        cfg.top_anchors,
        title=f"{ws.benchmark.name} #{query}",
    )
    winner, names = explanation.classes[0], ws.prompts.class_names
    runner_up = explanation.runner_up
    top_anchor = winner.contributions[0].caption if winner.contributions else None
    log.info(
        "query %d: true %s, predicted %s (runner-up %s), %d anchors shared; top anchor: %s",
        query,
        names[label],
        names[explanation.predicted],
        names[runner_up] if runner_up is not None else "-",
        len(winner.contributions),
        top_anchor,
    )
    return {
        "query": query,
        "label": explanation.label,
        "predicted": explanation.predicted,
        "runner_up": runner_up,
        "score": winner.score,
        "anchors_shared_with_winner": len(winner.contributions),
        "top_anchor": top_anchor,
    }


def _explain_match_query(
    cfg, ws, model, scored, direction, query, row, json_path, png_path
) -> dict:
    query_kind, candidate_kind = direction.query_kind, direction.candidate_kind
    explanation = explain_match(
        model,
        scored,
        direction,
        row,
        query,
        ws.names(query_kind)[row],
        [ws.index_of(candidate_kind, c) for c in range(direction.right.shape[1])],
        ws.names(candidate_kind),
        cfg.top_candidates,
    )
    write_json_atomic(json_path, explanation.to_dict())
    render_match_explanation(
        explanation,
        ws.benchmark.images.load,
        ws.anchor_image,
        png_path,
        cfg.top_anchors,
        title=f"{ws.benchmark.name} #{query}",
    )
    best = explanation.explained[0]
    contributions = best.contributions
    top_anchor = contributions[0].caption if contributions else None
    log.info(
        "query %d (%s): R@1 %s; best %r (%s, score %.4f), %d anchors shared; top anchor: %s",
        query,
        direction.name,
        "hit" if explanation.hit_at_1 else "miss",
        best.candidate.name,
        "right" if best.candidate.right else "wrong",
        best.candidate.score,
        len(contributions),
        top_anchor,
    )
    return {
        "query": query,
        "direction": direction.name,
        "hit_at_1": explanation.hit_at_1,
        "best": best.candidate.index,
        "best_right_rank": explanation.best_right_rank,
        "score": best.candidate.score,
        "anchors_shared_with_best": len(contributions),
        "top_anchor": top_anchor,
    }


def _abstain(cfg, scored: ModelScores, directions: list[QueryDirection], output_dir: Path) -> dict:
    """Per direction: top-1 right on the answered queries against coverage as the threshold on
    the best score moves; a query with no anchor shared with any candidate never answers."""
    curves, points = {}, {}
    threshold = cfg.abstain.threshold
    for d in directions:
        view = d.view(scored.scores)
        args = view.max(dim=1).values, d.hits(scored.scores), (view == 0).all(dim=1)
        rows = coverage_rows(*args, num=cfg.abstain.num_thresholds)
        if threshold is not None:
            points[d.name] = coverage_rows(*args, [threshold])[0]
            rows = [rows[0], *sorted([*rows[1:], points[d.name]], key=lambda r: r["threshold"])]
        curves[d.name] = rows
    write_csv(
        [{"direction": d, **r} for d, rows in curves.items() for r in rows],
        output_dir / "abstain.csv",
    )
    render_coverage(curves, output_dir / "abstain.png", points, "top-1 right (accuracy, R@1)")
    return {
        name: {"no_threshold": rows[0], "at_threshold": points.get(name)}
        for name, rows in curves.items()
    }


def _usage(
    ws: Workspace,
    model: AsifModel,
    scored: ModelScores,
    directions: list[QueryDirection],
    output_dir: Path,
) -> dict:
    """Which anchors the queries use, and what pruning the never-used ones does."""
    target_word = "prompt" if ws.problem.targets.groups is not None else "caption"
    representations = {
        "image": scored.image_rr,
        "text": model.prompt_representations(ws.prompts.embeddings),
    }
    topk = {kind: topk_counts(rr) for kind, rr in representations.items()}
    explained = {d.name: explanation_counts(scored, d.by_column) for d in directions}
    first, *others = directions
    columns = {
        "image_topk": topk["image"],
        "explanation": explained[first.name],
        f"{target_word}_topk": topk["text"],
        **{f"explanation_{d.name}": explained[d.name] for d in others},
    }
    write_csv(
        [
            {
                "anchor": i,
                "id": model.anchor_ids[i],
                "caption": model.anchor_captions[i],
                **{name: int(counts[i]) for name, counts in columns.items()},
            }
            for i in range(model.n)
        ],
        output_dir / "anchor_usage.csv",
    )
    render_usage(
        {
            "in an image's top-k": topk["image"],
            **{f"in a {d.name} explanation": explained[d.name] for d in directions},
        },
        output_dir / "anchor_usage.png",
    )
    report = {
        "queries": first.right.shape[0],
        **{name: usage_summary(counts) for name, counts in columns.items()},
        f"used_by_images_or_{target_word}s": int(((topk["image"] + topk["text"]) > 0).sum()),
    }
    # Never used: in no query's top-k, the queries being images (and captions, for retrieval).
    query_kinds = sorted({d.query_kind for d in directions})
    used = sum(topk[kind] for kind in query_kinds)
    before = _scalars(ws.task.metrics(scored.scores, ws.problem))
    pruned = prune_unused(model, used)
    pruned_scores = _scores_of(pruned, model, scored, ws)
    report["prune_never_in_topk"] = {
        "queries": query_kinds,
        "n_before": model.n,
        "n_after": pruned.n,
        "memory_mb_before": model.memory_bytes() / 2**20,
        "memory_mb_after": pruned.memory_bytes() / 2**20,
        "max_score_change": float((pruned_scores - scored.scores).abs().max()),
        **_before_after(before, _scalars(ws.task.metrics(pruned_scores, ws.problem))),
    }
    # The honest version: count usage on half the queries, measure on the other half.
    halves = {d.name: torch.arange(d.right.shape[0]) for d in directions}
    if all(len(q) > 1 for q in halves.values()):
        fit = {kind: torch.zeros(model.n, dtype=torch.long) for kind in query_kinds}
        for d in directions:
            fit[d.query_kind] += topk_counts(representations[d.query_kind], halves[d.name][0::2])
        fit_used = sum(fit.values())
        pruned_fit = prune_unused(model, fit_used)
        fit_scores = _scores_of(pruned_fit, model, scored, ws)
        held_out = {
            f"{d.hit_metric}_{when}": float(d.hits(s)[halves[d.name][1::2]].float().mean())
            for when, s in (("before", scored.scores), ("after", fit_scores))
            for d in directions
        }
        report["prune_held_out"] = {
            "usage_from": "even-indexed queries",
            "measured_on": "odd-indexed queries",
            "n_after": pruned_fit.n,
            "unused_in_fit": usage_summary(fit_used)["unused"],
            **held_out,
        }
    return report


def _scores_of(pruned: AsifModel, model: AsifModel, scored: ModelScores, ws: Workspace):
    """The pruned model's scores; the model's own when pruning removed nothing."""
    if pruned.n == model.n:
        return scored.scores
    return pruned.scores(ws.problem.images, ws.prompts)


def _query_rows(cfg, ws: Workspace, scored: ModelScores, direction: QueryDirection) -> list[int]:
    """Rows of the queries asked for (every one checked before anything is written)."""
    if str(cfg.query) == MISSES:
        misses = (~direction.hits(scored.scores)).nonzero().flatten()[: cfg.num_misses].tolist()
        if not misses:
            log.info("query=misses: every %s query is right at 1", direction.name)
        return misses
    return [ws.row_of(direction.query_kind, q) for q in _queries(cfg)]


def _queries(cfg: DictConfig) -> list[int]:
    if str(cfg.query) == MISSES:
        if cfg.num_misses < 1:
            raise ConfigError(f"num_misses={cfg.num_misses}: expected a positive integer")
        return []
    values = as_list(cfg.query)
    if not all(isinstance(q, int) and not isinstance(q, bool) for q in values):
        raise ConfigError(f"query={cfg.query!r}: expected an index, a list of them, or {MISSES}")
    return values


def _direction_index(cfg: DictConfig, task: Task) -> int:
    """Which of the task's directions `direction` names (null: the first)."""
    if cfg.direction is None:
        return 0
    if cfg.direction not in task.direction_names:
        names = ", ".join(task.direction_names)
        raise ConfigError(f"direction={cfg.direction}: task={task.name} has {names}")
    return task.direction_names.index(cfg.direction)


def explain_main(cfg: DictConfig, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The whole job as a plain function (Hydra only composes the config). `overrides`: the
    command line's, to refuse options a saved model (`model_dir`) would ignore."""
    started = time.perf_counter()
    check_run_config(cfg, overrides)
    output_dir = Path(cfg.paths.output_dir)
    _queries(cfg)  # a typo fails before any work
    task = load_task(cfg)
    chosen = _direction_index(cfg, task)
    ws = load_workspace(cfg, task)
    timings = {"workspace_s": time.perf_counter() - started}
    directions = task.directions(ws.problem)
    direction = directions[chosen]
    scored, timings["score_s"] = _timed(ws.model.score, ws.problem.images, ws.prompts)
    rows = _query_rows(cfg, ws, scored, direction)
    model, scored, edit_report = _edit(cfg, ws, scored, directions)
    if edit_report is not None and str(cfg.query) == MISSES:
        rows = _query_rows(cfg, ws, scored, direction)  # the edited model's misses
    metrics = task.metrics(scored.scores, ws.problem)
    mark = time.perf_counter()
    results: dict = {
        "format_version": EXPLAIN_FORMAT,
        "task": task.name,
        "direction": direction.name,
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
            "targets_used": len(ws.problem.targets.texts),
            "class_names": ws.problem.targets.group_names,
        },
        **_scalars(metrics),
        "embeddings_from_cache": ws.from_cache,
        "edit": edit_report,
        "queries": [_explain_query(cfg, ws, model, scored, direction, row) for row in rows],
    }
    timings["queries_s"] = time.perf_counter() - mark
    abstain, timings["abstain_s"] = _timed(_abstain, cfg, scored, directions, output_dir)
    results["abstain"] = {"direction": direction.name, **abstain[direction.name]}
    results["abstain"]["by_direction"] = abstain
    results["usage"], timings["usage_s"] = (
        _timed(_usage, ws, model, scored, directions, output_dir) if cfg.usage else (None, 0.0)
    )
    results["config"] = OmegaConf.to_container(cfg, resolve=True)
    if cfg.save_model:
        results["model_dir"] = str(model.save(output_dir / "model", overwrite=True))
    timings["total_s"] = time.perf_counter() - started
    results["timings"] = timings  # the edit's own: edit.edit_s, edit.evaluate_s
    write_json_atomic(output_dir / "explain_results.json", results)
    primary = task.primary_metric
    log.info("%s %.4f; outputs in %s", primary, metrics[primary], output_dir)
    return results

"""Explain, edit, abstain, anchor usage, model artifact: asif_exp.memory and asif_exp.explain."""

import json
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from conftest import EXPLAIN_RUN_OUTPUTS, assert_written
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

import asif_exp.explain  # noqa: F401  (registers the explain schema)
from asif_exp.config import ExplainRunConfig, RunConfig
from asif_exp.errors import ModelFormatError
from asif_exp.memory import (
    UNKNOWN,
    AsifModel,
    Prompts,
    abstain,
    anchor_usage,
    coverage_curve,
    explain,
    load_model,
    prune_unused,
    usage_summary,
)
from asif_exp.methods.asif import (
    AUTHORS_OPTIONS,
    AUTHORS_UNCLAMPED_OPTIONS,
    AsifOptions,
)
from asif_exp.pipeline import run
from asif_exp.tasks.classification_grid import evaluate_grid

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
OPTION_SETS = [
    {},
    AUTHORS_OPTIONS,
    AUTHORS_UNCLAMPED_OPTIONS,
    dict(normalize="none", template_aggregation="max"),
]


def random_setup(seed=0, images=30, anchors=120, classes=4, templates=3, k=10, p=3.0, **options):
    g = torch.Generator().manual_seed(seed)
    model = AsifModel(
        anchor_image_embeddings=torch.randn(anchors, 12, generator=g),
        anchor_text_embeddings=torch.randn(anchors, 10, generator=g),
        anchor_ids=[f"img{i // 2}" for i in range(anchors)],  # two captions per image
        anchor_captions=[f"caption {i} {'dog' if i % 7 == 0 else 'cat'}" for i in range(anchors)],
        k=k,
        p=p,
        options=AsifOptions(device="cpu", **options),
    )
    prompts = Prompts(
        torch.randn(classes * templates, 10, generator=g),
        torch.arange(classes).repeat_interleave(templates),
        [f"class{c}" for c in range(classes)],
        [f"prompt {t} of class{c}" for c in range(classes) for t in range(templates)],
    )
    image_embeddings = torch.randn(images, 12, generator=g)
    labels = torch.randint(0, classes, (images,), generator=g)
    return model, prompts, image_embeddings, labels


def grid_scores(anchor_images, anchor_texts, model, prompts, image_embeddings, labels):
    """The engine's own answer on the given anchors ("a model built from scratch")."""
    cells, _ = evaluate_grid(
        image_embeddings,
        anchor_images,
        prompts.embeddings,
        anchor_texts,
        labels,
        prompts.prompt_class,
        prompts.num_classes,
        [len(anchor_images)],
        [model.k],
        [model.p],
        model.options,
        keep_scores=True,
        progress=False,
    )
    return cells[0]


# ----------------------------------------------------------------------------- scoring and explain


@pytest.mark.parametrize("options", OPTION_SETS)
def test_model_scores_are_the_engine_scores(options):
    model, prompts, images, labels = random_setup(**options)
    cell = grid_scores(
        model.anchor_image_embeddings, model.anchor_text_embeddings, model, prompts, images, labels
    )
    torch.testing.assert_close(model.scores(images, prompts), cell.scores)
    assert model.evaluate(images, labels, prompts)["top1"] == pytest.approx(cell.top1)


@pytest.mark.parametrize("options", OPTION_SETS)
def test_explanation_contributions_sum_to_the_scores(options):
    model, prompts, images, labels = random_setup(**options)
    scores = model.scores(images, prompts)
    for query in range(10):
        e = explain(model, images[query], prompts, int(labels[query]))
        ranked = scores[query].sort(descending=True, stable=True).indices.tolist()
        assert (e.predicted, e.runner_up) == (ranked[0], ranked[1])
        shown = [c.class_index for c in e.classes]
        assert shown[:2] == ranked[:2] and int(labels[query]) in shown
        image_top = set(
            model.image_representations(images[query : query + 1]).col_indices().tolist()
        )
        for explained in e.classes:
            total = sum(c.contribution for c in explained.contributions)
            assert total == pytest.approx(float(scores[query, explained.class_index]), abs=1e-6)
            assert len(explained.contributions) <= model.k
            for c in explained.contributions:
                assert c.anchor in image_top
                assert c.contribution == pytest.approx(c.image_value * c.class_value)
                assert (c.id, c.caption) == (
                    model.anchor_ids[c.anchor],
                    model.anchor_captions[c.anchor],
                )
            values = [c.contribution for c in explained.contributions]
            assert values == sorted(values, reverse=True)
        if model.options.template_aggregation == "max":  # the target is the class's best prompt
            assert e.classes[0].target in prompts.texts


# ----------------------------------------------------------------------------- edit


@pytest.mark.parametrize("options", OPTION_SETS[:2])
def test_removing_pairs_equals_a_model_built_without_them(options):
    model, prompts, images, labels = random_setup(**options)
    edited = model.remove(indices=[0, 5, 77], ids=["img30"], caption_regex=r"\bdog\b")
    removed = model.matching(indices=[0, 5, 77], ids=["img30"], caption_regex=r"\bdog\b")
    assert edited.n == model.n - int(removed.sum()) and removed[[0, 5, 77, 60, 61, 14]].all()
    assert not any("dog" in c for c in edited.anchor_captions)
    keep = ~removed
    scratch = grid_scores(
        model.anchor_image_embeddings[keep],
        model.anchor_text_embeddings[keep],
        model,
        prompts,
        images,
        labels,
    )
    torch.testing.assert_close(edited.scores(images, prompts), scratch.scores)
    assert torch.equal(edited.predict(images, prompts), scratch.predictions)


def test_adding_pairs_equals_a_model_built_with_them():
    full, prompts, images, labels = random_setup()
    base = full.keep(torch.arange(full.n) < 90)
    grown = base.add(
        full.anchor_image_embeddings[90:],
        full.anchor_text_embeddings[90:],
        full.anchor_ids[90:],
        full.anchor_captions[90:],
    )
    assert grown.anchor_captions == full.anchor_captions
    torch.testing.assert_close(grown.scores(images, prompts), full.scores(images, prompts))
    with pytest.raises(ValueError, match="already in the model"):
        grown.add(
            full.anchor_image_embeddings[:1],
            full.anchor_text_embeddings[:1],
            full.anchor_ids[:1],
            full.anchor_captions[:1],
        )
    with pytest.raises(ValueError, match="the model's are 12-d"):
        base.add(torch.randn(2, 5), torch.randn(2, 10), ["x", "y"], ["a", "b"])


def test_edit_mistakes_are_clear_errors():
    model, *_ = random_setup(anchors=20, k=10)
    with pytest.raises(ValueError, match="no anchor pair matches"):
        model.remove(caption_contains="zebra")
    with pytest.raises(ValueError, match="caption regex"):
        model.remove(caption_regex="(unclosed")
    with pytest.raises(ValueError, match="leaves 9 anchor pairs, fewer than k=10"):
        model.remove(indices=list(range(11)))
    with pytest.raises(IndexError, match="out of range"):
        model.remove(indices=[20])
    with pytest.raises(KeyError, match="nope"):
        model.remove(ids=["nope"])


# ----------------------------------------------------------------------------- abstain


def test_abstain_when_nothing_overlaps_or_under_threshold():
    # Images sit near the first 10 anchors, prompts near the last 10: with k=5 they share
    # no anchor, every score is 0, and the model must say "unknown".
    e = torch.eye(4)
    anchor_images = torch.cat([e[0].repeat(10, 1), e[1].repeat(10, 1)]) + 0.01 * torch.randn(20, 4)
    anchor_texts = torch.cat([e[2].repeat(10, 1), e[3].repeat(10, 1)]) + 0.01 * torch.randn(20, 4)
    model = AsifModel(
        anchor_images,
        anchor_texts,
        [str(i) for i in range(20)],
        [f"c{i}" for i in range(20)],
        k=5,
        p=1.0,
        options=AsifOptions(device="cpu"),
    )
    prompts = Prompts(torch.stack([e[3], e[3] + 0.1 * e[2]]), torch.tensor([0, 1]), ["a", "b"])
    images = torch.stack([e[0], e[1], e[1] + 0.05 * e[0]])
    scores = model.scores(images, prompts)
    assert (scores[0] == 0).all() and (scores[1:] > 0).any(dim=1).all()
    assert abstain(scores)[0] == UNKNOWN and (abstain(scores)[1:] != UNKNOWN).all()
    assert explain(model, images[0], prompts).no_overlap
    best = scores.max(dim=1).values
    assert (abstain(scores, threshold=float(best[1:].max()) + 1) == UNKNOWN).all()


def test_coverage_curve():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.6], [0.3, 0.25], [0.0, 0.0], [0.05, 0.5]])
    labels = torch.tensor([0, 1, 1, 0, 0])
    rows = coverage_curve(scores, labels)
    first = rows[0]
    assert first["threshold"] is None and first["coverage"] == pytest.approx(
        0.8
    )  # row 3: no overlap
    assert first["accuracy"] == pytest.approx(2 / 4) and first["accuracy_all"] == pytest.approx(
        2 / 5
    )
    coverage = [r["coverage"] for r in rows[1:]]
    assert coverage == sorted(coverage, reverse=True)
    (at,) = coverage_curve(scores, labels, [0.55])
    assert (at["answered"], at["correct"]) == (2, 2) and at["accuracy"] == 1.0
    (none,) = coverage_curve(scores, labels, [5.0])
    assert none["answered"] == 0 and none["accuracy"] is None


# ----------------------------------------------------------------------------- anchor usage


def test_anchor_usage_counts_match_a_brute_force_count():
    model, prompts, images, labels = random_setup(k=8)
    usage = anchor_usage(model, images, prompts)
    image_rr = model.image_representations(images).to_dense()
    prompt_rr = model.prompt_representations(prompts.embeddings).to_dense()
    assert torch.equal(usage.image_topk, (image_rr != 0).sum(0))
    assert torch.equal(usage.prompt_topk, (prompt_rr != 0).sum(0))
    expected = torch.zeros(model.n, dtype=torch.long)
    for query in range(len(images)):
        winner = explain(model, images[query], prompts).classes[0]
        for c in winner.contributions:
            expected[c.anchor] += 1
    assert torch.equal(usage.explanation, expected)
    # Anchors no image and no prompt selects can go without changing a single score.
    pruned = prune_unused(model, usage.image_topk + usage.prompt_topk)
    assert pruned.n < model.n and pruned.memory_bytes() < model.memory_bytes()
    torch.testing.assert_close(pruned.scores(images, prompts), model.scores(images, prompts))


def test_usage_summary():
    summary = usage_summary(torch.tensor([0, 0, 0, 1, 3, 0, 0, 0, 0, 0]))
    assert (summary["used"], summary["unused"], summary["total_uses"], summary["max"]) == (
        2,
        8,
        4,
        3,
    )
    assert summary["top10pct_share"] == pytest.approx(0.75)
    assert 0.8 < summary["gini"] < 1
    assert usage_summary(torch.full((5,), 2))["gini"] == pytest.approx(0.0)


# ----------------------------------------------------------------------------- model artifact


def test_model_artifact_round_trip(tmp_path):
    model, prompts, images, _ = random_setup(**AUTHORS_OPTIONS)
    model.encoders = {"vision": {"name": "v"}, "text": {"name": "t"}}
    path = model.save(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging left behind
    loaded = load_model(path)
    assert (loaded.k, loaded.p, loaded.options, loaded.encoders) == (
        model.k,
        model.p,
        model.options,
        model.encoders,
    )
    assert loaded.anchor_ids == model.anchor_ids and loaded.anchor_captions == model.anchor_captions
    assert torch.equal(loaded.scores(images, prompts), model.scores(images, prompts))
    with pytest.raises(FileExistsError):
        model.save(path)
    smaller = model.remove(indices=[0])
    smaller.save(path, overwrite=True)
    assert load_model(path).n == model.n - 1 and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def _edit_meta(path, **changes):
    meta = json.loads((path / "model.json").read_text())
    meta.update(changes)
    (path / "model.json").write_text(json.dumps(meta))


DAMAGES = {
    "no model.json": (lambda p: (p / "model.json").unlink(), "no model.json"),
    "not json": (lambda p: (p / "model.json").write_text("{"), "not valid JSON"),
    "other format": (lambda p: _edit_meta(p, format="something"), "format 'something'"),
    "newer version": (lambda p: _edit_meta(p, format_version=99), "format version 99"),
    "tensors missing": (
        lambda p: (p / "anchors.safetensors").unlink(),
        "anchors.safetensors is missing",
    ),
    "tensors truncated": (
        lambda p: (p / "anchors.safetensors").write_bytes(
            (p / "anchors.safetensors").read_bytes()[:100]
        ),
        "anchors.safetensors does not match",
    ),
    "caption edited": (
        lambda p: (p / "anchors.jsonl").write_text(
            (p / "anchors.jsonl").read_text().replace("cat", "cow")
        ),
        "anchors.jsonl does not match",
    ),
    "count disagrees": (
        lambda p: _edit_meta(p, n=3),
        r"shape \(40, 12\), model.json says \(3, 12\)",
    ),
    "k above n": (lambda p: _edit_meta(p, k=41), "k=41"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_model_directory_is_a_clear_error(tmp_path, damage):
    model, *_ = random_setup(anchors=40)
    path = model.save(tmp_path / "m")
    change, message = DAMAGES[damage]
    change(path)
    with pytest.raises(ModelFormatError, match=message):
        load_model(path)


# ----------------------------------------------------------------------------- the explain config


@pytest.mark.parametrize("overrides", [[], ["asif=authors", "anchors=coco_mini", "progress=false"]])
def test_explain_config_is_the_main_config_plus_its_own_fields(tmp_path, overrides):
    # explain.yaml swaps its schema in for the run's, in the same place of the defaults list:
    # config.yaml (and any override) still sets every value of the run, so explain describes
    # the same model even when RunConfig gains a field with a default.
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        main = compose("config", [*overrides, f"paths.output_dir={tmp_path}"])
        explain_cfg = compose("explain", [*overrides, f"paths.output_dir={tmp_path}"])
        choices = compose("explain", return_hydra_config=True).hydra.runtime.choices
    assert choices.schema == "explain"
    assert OmegaConf.get_type(explain_cfg) is ExplainRunConfig
    main_values = OmegaConf.to_container(main, resolve=True)
    explain_values = OmegaConf.to_container(explain_cfg, resolve=True)
    assert {k: explain_values[k] for k in main_values} == main_values
    own = {f.name for f in fields(ExplainRunConfig)} - {f.name for f in fields(RunConfig)}
    assert set(explain_values) - set(main_values) == own
    assert own >= {"query", "direction", "edit", "abstain", "usage", "model_dir", "save_model"}


# ----------------------------------------------------------------------------- the real pipeline


def test_explain_entry_point_on_the_real_pipeline(tmp_path):
    """Real encoders, tiny data: run the main job, then explain from its cache."""

    overrides = [
        "anchors.num_samples=40",
        "benchmark.num_samples=20",
        "anchors.image_size=64",
        "benchmark.image_size=64",
        "encoder.vision.crop_size=64",
        "encoder.vision.resize_size=64",
        "asif.k=5",
        "asif.n=40",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "progress=false",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        main_cfg = compose("config", [*overrides, f"paths.output_dir={tmp_path / 'run'}"])
        explain_cfg = compose(
            "explain",
            [
                *overrides,
                f"paths.output_dir={tmp_path / 'explain'}",
                "query=[3,7]",
                "save_model=true",
                "abstain.threshold=0.2",
                "edit.remove_caption_contains=star",
            ],
        )
    main = run(main_cfg)
    results = asif_exp.explain.explain_main(explain_cfg)
    assert all(results["embeddings_from_cache"].values())  # nothing encoded again
    out = tmp_path / "explain"
    assert_written(
        out,
        [
            "explain_q3.json",
            "explain_q3.png",
            "explain_q7.png",
            *EXPLAIN_RUN_OUTPUTS,
        ],
    )
    assert Image.open(out / "explain_q3.png").size[0] > 500
    edit = results["edit"]
    assert edit["removed"] > 0 and edit["n_after"] == 40 - edit["removed"] == results["model"]["n"]
    assert edit["top1_before"] == pytest.approx(main["top1"])
    explanation = json.loads((out / "explain_q3.json").read_text())
    for explained in explanation["classes"]:
        assert sum(c["contribution"] for c in explained["contributions"]) == pytest.approx(
            explained["score"], abs=1e-5
        )
        assert not any("star" in c["caption"] for c in explained["contributions"])
    assert results["abstain"]["at_threshold"]["threshold"] == 0.2
    # The saved model answers like the edited one, and is refused under other encoders.
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        reload_cfg = compose(
            "explain",
            [
                *overrides,
                f"paths.output_dir={tmp_path / 'again'}",
                f"model_dir={out / 'model'}",
                "query=3",
                "usage=false",
            ],
        )
        other_cfg = compose(
            "explain",
            [
                *overrides,
                f"paths.output_dir={tmp_path / 'other'}",
                f"model_dir={out / 'model'}",
                "encoder.vision.crop_size=56",
            ],
        )
    again = asif_exp.explain.explain_main(reload_cfg)
    assert again["top1"] == pytest.approx(results["top1"])
    assert again["queries"][0] == results["queries"][0]
    with pytest.raises(ValueError, match="not comparable"):
        asif_exp.explain.explain_main(other_cfg)
    shutil.rmtree(tmp_path / "cache")

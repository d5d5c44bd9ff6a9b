"""The memory tools on retrieval: explanations in both directions against a plain dense
reference, edits against a model rebuilt without the pairs, usage and abstention per direction,
and `asif_exp.explain` end to end on a pairs-file benchmark with the fake encoders."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import EXPLAIN_RUN_OUTPUTS, assert_written
from fakes import config
from PIL import Image
from reference import dense_asif

import asif_exp.explain
from asif_exp.errors import ConfigError
from asif_exp.memory import AsifModel, Prompts, load_model
from asif_exp.memory.explanation import explain_match
from asif_exp.memory.usage import coverage_rows, explanation_counts, prune_unused, topk_counts
from asif_exp.methods.asif import AUTHORS_OPTIONS, AsifMethod, AsifOptions
from asif_exp.methods.base import MethodReport
from asif_exp.pipeline import run
from asif_exp.problem import EmbeddedProblem, Targets
from asif_exp.tasks.classification import Classification
from asif_exp.tasks.retrieval import Retrieval

OPTION_SETS = [{}, AUTHORS_OPTIONS, dict(clamp_negative=False, normalize="none")]


def retrieval_setup(seed=0, images=10, per_image=3, anchors=60, k=8, p=3.0, **options):
    """A random retrieval problem (captions shuffled) and an ASIF model on its anchors."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.arange(images).repeat_interleave(per_image)
    truth = truth[torch.randperm(len(truth), generator=g)]
    problem = EmbeddedProblem(
        anchor_images=torch.randn(anchors, 12, generator=g),
        anchor_texts=torch.randn(anchors, 10, generator=g),
        images=torch.randn(images, 12, generator=g),
        targets=Targets(
            [f"caption {j}" for j in range(len(truth))],
            torch.randn(len(truth), 10, generator=g),
        ),
        truth=truth,
    )
    model = AsifModel(
        problem.anchor_images,
        problem.anchor_texts,
        [f"img{i // 2}" for i in range(anchors)],
        [f"anchor {i} {'dog' if i % 5 == 0 else 'cat'}" for i in range(anchors)],
        k,
        p,
        AsifOptions(device="cpu", **options),
    )
    return model, problem, Prompts.of_targets(problem.targets)


def dense_reference(model: AsifModel, problem: EmbeddedProblem) -> torch.Tensor:
    """(images x captions) scores of the plain dense ASIF, each caption its own target."""
    captions = len(problem.truth)
    return dense_asif(
        problem.images,
        model.anchor_image_embeddings,
        problem.targets.embeddings,
        model.anchor_text_embeddings,
        torch.arange(captions),
        captions,
        model.n,
        model.k,
        model.p,
        model.options.clamp_negative,
        model.options.normalize,
        model.options.template_aggregation,
    ).float()


def test_directions_are_what_the_tasks_name():
    model, problem, _ = retrieval_setup()
    assert [d.name for d in Retrieval().directions(problem)] == list(Retrieval.direction_names)
    classes = EmbeddedProblem(
        problem.anchor_images,
        problem.anchor_texts,
        problem.images,
        Targets(["a", "b"], torch.randn(2, 10), torch.tensor([0, 1]), ["a", "b"]),
        torch.tensor([0, 1] * 5),
    )
    [direction] = Classification().directions(classes)
    assert direction.name == Classification.direction_names[0]


@pytest.mark.parametrize("options", OPTION_SETS)
def test_contributions_sum_to_the_dense_reference_score_both_ways(options):
    model, problem, prompts = retrieval_setup(**options)
    reference = dense_reference(model, problem)
    scored = model.score(problem.images, prompts)
    torch.testing.assert_close(scored.scores, reference, rtol=1e-4, atol=1e-6)
    task = Retrieval()
    metrics = task.metrics(scored.scores, problem)
    captions = [f"caption {j}" for j in range(len(problem.truth))]
    images = [f"image {i}" for i in range(len(problem.images))]
    for direction in task.directions(problem):
        view = direction.view(reference)
        names = captions if direction.candidate_kind == "text" else images
        hits = direction.hits(scored.scores)
        assert float(hits.float().mean()) == pytest.approx(metrics[direction.hit_metric])
        for query in range(6):
            e = explain_match(
                model, scored, direction, query, 100 + query, "q", list(range(len(names))), names, 4
            )
            assert e.query == 100 + query and e.hit_at_1 == bool(hits[query])
            order = view[query].argsort(descending=True, stable=True).tolist()
            assert [c.index for c in e.candidates] == order[:4]
            right = direction.right[query]
            assert [c.right for c in e.candidates] == [bool(right[c]) for c in order[:4]]
            best_right = next(c for c in order if right[c])
            whys = [m.why for m in e.explained]
            assert e.explained[0].candidate.index == order[0]
            if right[order[0]]:
                assert whys == ["best", "best wrong"]
            else:
                assert whys == ["best", "best right"]
                assert e.explained[1].candidate.index == best_right
            assert e.best_right_rank == order.index(best_right) + 1
            for match in e.explained:
                c = match.candidate.index
                total = sum(x.contribution for x in match.contributions)
                assert total == pytest.approx(float(view[query, c]), rel=1e-4, abs=1e-6)
                assert match.candidate.score == pytest.approx(float(view[query, c]), abs=1e-6)
                assert len(match.contributions) <= model.k
                for x in match.contributions:
                    assert x.contribution == pytest.approx(x.image_value * x.caption_value)
                    assert x.caption == model.anchor_captions[x.anchor]
                values = [x.contribution for x in match.contributions]
                assert values == sorted(values, reverse=True)


@pytest.mark.parametrize("options", OPTION_SETS[:2])
def test_removing_pairs_equals_a_model_rebuilt_without_them_on_retrieval(options):
    model, problem, prompts = retrieval_setup(**options)
    selection = dict(indices=[1, 7], ids=["img12"], caption_regex=r"\bdog\b")
    edited = model.remove(**selection)
    keep = ~model.matching(**selection)
    rebuilt = EmbeddedProblem(
        problem.anchor_images[keep],
        problem.anchor_texts[keep],
        problem.images,
        problem.targets,
        problem.truth,
        cache_keys=("rebuilt without", repr(options)),  # the grid memoises top-k passes by these
    )
    [cell] = AsifMethod([model.k], [model.p], model.options, progress=False).score(
        rebuilt, [int(keep.sum())], MethodReport()
    )
    scores = edited.scores(problem.images, prompts)
    torch.testing.assert_close(scores, cell.scores)
    task = Retrieval()
    assert task.metrics(scores, problem) == task.metrics(cell.scores, problem)


def test_usage_counts_both_ways_match_the_explanations():
    model, problem, prompts = retrieval_setup(anchors=200, k=4)  # 40 queries leave some unused
    scored = model.score(problem.images, prompts)
    names = [str(j) for j in range(len(problem.truth))]
    for direction in Retrieval().directions(problem):
        expected = torch.zeros(model.n, dtype=torch.long)
        candidates = direction.right.shape[1]
        for query in range(direction.right.shape[0]):
            best = explain_match(
                model, scored, direction, query, query, "", list(range(candidates)), names
            ).explained[0]
            for x in best.contributions:
                expected[x.anchor] += 1
        assert torch.equal(explanation_counts(scored, direction.by_column), expected)
    # Anchors no image and no caption holds in its top-k change no score when pruned.
    captions_rr = model.prompt_representations(prompts.embeddings)
    used = topk_counts(scored.image_rr) + topk_counts(captions_rr)
    assert torch.equal(topk_counts(captions_rr), (captions_rr.to_dense() != 0).sum(0))
    pruned = prune_unused(model, used)
    assert pruned.n < model.n
    torch.testing.assert_close(pruned.scores(problem.images, prompts), scored.scores)


def test_a_query_sharing_no_anchor_always_abstains():
    best = torch.tensor([0.0, 0.5, 0.2, 0.9])
    correct = torch.tensor([True, True, False, True])
    unknown = torch.tensor([True, False, False, False])
    first, *_ = coverage_rows(best, correct, unknown)
    assert (first["answered"], first["correct"], first["no_overlap"]) == (3, 2, 1)
    (at,) = coverage_rows(best, correct, unknown, [0.0])
    assert at["answered"] == 3  # a threshold of 0 still leaves it out
    (high,) = coverage_rows(best, correct, unknown, [0.6])
    assert (high["answered"], high["accuracy"]) == (1, 1.0)


# ----------------------------------------------------------------------------- the command


def _pairs(folder, images: int) -> str:
    """A pairs file of `images` coloured squares, three captions each."""
    folder.mkdir(parents=True)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    rows = []
    for i in range(images):
        name, rgb = list(colours.items())[i % 3]
        shade = tuple(min(255, c + 10 * (i // 3)) for c in rgb)
        Image.new("RGB", (20, 20), shade).save(folder / f"{i}.png")
        for caption in (f"a {name} square", f"{name} colour number {i}", f"plain {name}"):
            rows.append(json.dumps({"image": f"{i}.png", "caption": caption}))
    (folder / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    return str(folder / "pairs.jsonl")


RETRIEVAL = [
    "task=retrieval",
    "benchmark=flickr8k",
    "benchmark.splits=null",
    "benchmark.image_root=null",
]


def test_explain_on_retrieval_end_to_end(tmp_path):
    bench = [*RETRIEVAL, f"benchmark.path={_pairs(tmp_path / 'data' / 'bench', 9)}"]
    main = run(config(tmp_path, *bench))
    cfg = config(
        tmp_path,
        *bench,
        "query=[0,7]",
        "save_model=true",
        "abstain.threshold=0.1",
        "edit.remove_indices=[0,1]",
        name="explain",
        output="explain",
    )
    results = asif_exp.explain.explain_main(cfg)
    assert all(results["embeddings_from_cache"].values())  # nothing encoded again
    out = tmp_path / "explain"
    assert_written(
        out,
        [
            "explain_q0.json",
            "explain_q0.png",
            "explain_q7.json",
            "explain_q7.png",
            *EXPLAIN_RUN_OUTPUTS,
        ],
    )
    assert Image.open(out / "explain_q0.png").size[0] > 500
    edit = results["edit"]
    recalls = [key for key in main if ".R@" in key]
    assert len(recalls) == 6
    for key in recalls:  # every recall before (the run's) and after
        assert edit[f"{key}_before"] == pytest.approx(main[key])
        assert edit[f"{key}_after"] == pytest.approx(results[key])
    assert edit["n_after"] == 28 == results["model"]["n"] and edit["edit_s"] >= 0
    q7 = json.loads((out / "explain_q7.json").read_text())
    assert q7["direction"] == "image_to_text" and q7["query"] == 7
    assert {c["right"] for c in q7["candidates"]} <= {True, False}
    for match in q7["explained"]:
        total = sum(x["contribution"] for x in match["contributions"])
        assert total == pytest.approx(match["candidate"]["score"], abs=1e-5)
    abstain = results["abstain"]["by_direction"]
    assert set(abstain) == {"image_to_text", "text_to_image"}
    assert abstain["text_to_image"]["at_threshold"]["threshold"] == 0.1
    csv_lines = (out / "abstain.csv").read_text().splitlines()
    assert csv_lines[0].startswith("direction,threshold,coverage,accuracy")
    usage = results["usage"]
    assert usage["prune_never_in_topk"]["queries"] == ["image", "text"]
    assert usage["prune_never_in_topk"]["max_score_change"] == pytest.approx(0.0, abs=1e-6)
    header = (out / "anchor_usage.csv").read_text().splitlines()[0]
    assert header.endswith("image_topk,explanation,caption_topk,explanation_text_to_image")

    # text_to_image and misses, from the saved model (both tasks can save and load one)
    again = config(
        tmp_path,
        *bench,
        f"model_dir={out / 'model'}",
        "direction=text_to_image",
        "query=misses",
        "num_misses=2",
        "usage=false",
        name="explain",
        output="again",
    )
    reloaded = asif_exp.explain.explain_main(again)
    assert load_model(out / "model").n == 28
    for key in recalls:
        assert reloaded[key] == pytest.approx(results[key])
    misses = [q["query"] for q in reloaded["queries"]]
    assert all(not q["hit_at_1"] for q in reloaded["queries"]) and len(misses) == 2
    for q in misses:
        explanation = json.loads((tmp_path / "again" / f"explain_q{q}.json").read_text())
        assert explanation["direction"] == "text_to_image" and not explanation["hit_at_1"]


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (["direction=sideways"], ConfigError, "direction=sideways: task=retrieval has image_to"),
        (["query=27"], ConfigError, "query=27: benchmark flickr8k has images 0..8"),
        (
            ["direction=text_to_image", "query=27"],
            ConfigError,
            "query=27: benchmark flickr8k has captions 0..26",
        ),
        (["query=sometimes"], ConfigError, "query='sometimes': expected an index"),
        (["edit.remove_indices=[99]"], ConfigError, "edit: anchor index 99 out of range"),
    ],
)
def test_explain_mistakes_are_clear_errors(tmp_path, overrides, error, message):
    bench = [*RETRIEVAL, f"benchmark.path={_pairs(tmp_path / 'data' / 'bench', 9)}"]
    with pytest.raises(error, match=message):
        asif_exp.explain.explain_main(config(tmp_path, *bench, *overrides, name="explain"))
    assert not list(tmp_path.glob("out/explain_*"))


def test_classification_has_one_direction(tmp_path):
    cfg = config(tmp_path, "direction=text_to_image", name="explain")
    with pytest.raises(ConfigError, match="direction=text_to_image: task=classification has"):
        asif_exp.explain.explain_main(cfg)
    assert not (tmp_path / "cache").exists()  # refused before anything was encoded


def test_misses_on_classification_are_wrong_predictions(tmp_path):
    cfg = config(tmp_path, "query=misses", "num_misses=2", "usage=false", name="explain")
    results = asif_exp.explain.explain_main(cfg)
    queries = results["queries"]
    assert len(queries) == 2 and all(q["predicted"] != q["label"] for q in queries)
    assert [q["query"] for q in queries] == sorted(q["query"] for q in queries)
    assert results["abstain"]["direction"] == "image_to_class"

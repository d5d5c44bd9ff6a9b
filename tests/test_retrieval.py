"""Zero-shot retrieval: Recall@K against a plain loop, the grid against a dense reference per
cell, the pairs-file benchmark, and real runs (a synthetic pairs file; a Flickr8k test slice)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import CONF_DIR, TINY, compose_config, require_shared_data, shapes_pairs_file
from fake_results import write_results
from hydra import compose, initialize_config_dir
from reference import dense_asif

from asif_exp.data import load_benchmark
from asif_exp.data.synthetic import render, sample
from asif_exp.errors import DataError
from asif_exp.methods.asif import AsifMethod, AsifOptions
from asif_exp.methods.base import MethodReport
from asif_exp.pipeline import run, summary_table
from asif_exp.problem import EmbeddedProblem, Targets
from asif_exp.reports import build_table1, figure4, load_cells
from asif_exp.results import CellResult, DataSummary, RunResults
from asif_exp.tasks.retrieval import Retrieval, retrieval_metrics

KS = (1, 2, 3, 5)


def loop_recalls(scores: list[list[float]], caption_image: list[int], k: int) -> tuple:
    """Recall@k both ways by ranking every candidate, ties broken against the query (wrong
    candidates first): the definition, with no counting shortcut."""
    images, captions = len(scores), len(caption_image)
    image_hits = 0
    for i in range(images):
        ranked = sorted(range(captions), key=lambda j: (-scores[i][j], caption_image[j] == i))
        image_hits += any(caption_image[j] == i for j in ranked[:k])
    text_hits = 0
    for j in range(captions):
        ranked = sorted(range(images), key=lambda i: (-scores[i][j], i == caption_image[j]))
        text_hits += caption_image[j] in ranked[:k]
    return image_hits / images, text_hits / captions


@pytest.mark.parametrize("seed", range(4))
def test_recall_matches_a_plain_loop_with_ties_and_several_captions_per_image(seed):
    rng = random.Random(seed)
    images = 9
    # 1 to 4 captions per image, shuffled; scores from a few levels, so ties are everywhere.
    caption_image = [i for i in range(images) for _ in range(rng.randint(1, 4))]
    rng.shuffle(caption_image)
    scores = [[float(rng.randint(0, 3)) for _ in caption_image] for _ in range(images)]
    scores[4] = [0.0] * len(caption_image)  # an image sharing no anchor with any caption
    metrics = retrieval_metrics(torch.tensor(scores), torch.tensor(caption_image), KS)
    for k in KS:
        image_recall, text_recall = loop_recalls(scores, caption_image, k)
        assert metrics[f"retrieval.image_to_text.R@{k}"] == pytest.approx(image_recall)
        assert metrics[f"retrieval.text_to_image.R@{k}"] == pytest.approx(text_recall)
    recalls = [v for key, v in metrics.items() if ".R@" in key]
    assert metrics["retrieval.mean_recall"] == pytest.approx(sum(recalls) / len(recalls))
    assert metrics["retrieval.image_no_overlap_fraction"] == pytest.approx(1 / images)


def test_ties_count_against_the_query():
    # Image 0 owns caption 0, image 1 owns captions 1 and 2.
    caption_image = torch.tensor([0, 1, 1])
    scores = torch.tensor([[0.5, 0.5, 0.1], [0.0, 0.0, 0.0]])
    metrics = retrieval_metrics(scores, caption_image, (1, 2, 3))
    # image 0: caption 1 (wrong) ties with its own: a hit at 2, not at 1; image 1: all tied, its
    # two own captions behind the one wrong caption: a hit at 2.
    assert metrics["retrieval.image_to_text.R@1"] == 0.0
    assert metrics["retrieval.image_to_text.R@2"] == 1.0
    # caption 0: image 0 alone on top (hit at 1); captions 1 and 2: image 1 ties with or is
    # beaten by image 0: hits at 2 only.
    assert metrics["retrieval.text_to_image.R@1"] == pytest.approx(1 / 3)
    assert metrics["retrieval.text_to_image.R@2"] == 1.0
    assert metrics["retrieval.image_no_overlap_fraction"] == 0.5


def test_an_image_without_captions_is_an_error():
    with pytest.raises(ValueError, match=r"images without a caption \(first: \[1\]\)"):
        retrieval_metrics(torch.rand(2, 3), torch.tensor([0, 0, 0]), (1,))


def _random_problem(seed: int, images=12, captions_per_image=3, anchors=40, d=8):
    g = torch.Generator().manual_seed(seed)
    caption_image = torch.arange(images).repeat_interleave(captions_per_image)
    caption_image = caption_image[torch.randperm(len(caption_image), generator=g)]
    texts = torch.randn(len(caption_image), d, generator=g)
    problem = EmbeddedProblem(
        anchor_images=torch.randn(anchors, d, generator=g),
        anchor_texts=torch.randn(anchors, d, generator=g),
        images=torch.randn(images, d, generator=g),
        targets=Targets([f"caption {j}" for j in range(len(texts))], texts),
        truth=caption_image,
    )
    return problem


@pytest.mark.parametrize(
    "options",
    [
        AsifOptions(device="cpu"),  # clean: both sides normalised
        AsifOptions(normalize="prompt", template_aggregation="max", device="cpu"),  # authors
        AsifOptions(clamp_negative=False, normalize="none", device="cpu"),
    ],
    ids=["clean", "authors", "unclamped_unnormalised"],
)
def test_the_grid_equals_a_dense_computation_per_cell(options):
    problem = _random_problem(seed=7)
    ns, ks, ps = [10, 25, 40], [3, 10], [1.0, 2.0, 3.0]
    method = AsifMethod(ks, ps, options, progress=False)
    task = Retrieval()
    cells = list(method.score(problem, ns, MethodReport()))
    assert len(cells) == len(ns) * len(ks) * len(ps)
    captions = len(problem.truth)
    for cell in cells:
        reference = dense_asif(
            problem.images,
            problem.anchor_images,
            problem.targets.embeddings,
            problem.anchor_texts,
            torch.arange(captions),  # each caption its own target
            captions,
            cell.params["n"],
            cell.params["k"],
            cell.params["p"],
            options.clamp_negative,
            options.normalize,
            options.template_aggregation,
        ).float()
        torch.testing.assert_close(cell.scores, reference, rtol=1e-4, atol=1e-5)
        assert task.metrics(cell.scores, problem) == task.metrics(reference, problem)


def _write_pairs(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_any_pairs_file_is_a_retrieval_benchmark(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        render(sample(0, len(name)), 32).save(tmp_path / name)
    rows = [
        {"image": "b.png", "caption": "first of b", "split": "test"},
        {"image": "a.png", "caption": "first of a", "split": "test"},
        {"image": "b.png", "caption": "second of b", "split": "test"},
        {"image": "c.png", "caption": "held out", "split": "train"},
        {"image": "b.png", "caption": "first of b", "split": "test"},  # a repeated pair: kept
    ]
    _write_pairs(tmp_path / "pairs.jsonl", rows)
    cfg = compose_config(["benchmark=flickr8k", "benchmark.path=pairs.jsonl"]).benchmark
    cfg.image_root = None  # the file's folder
    bench = load_benchmark(cfg, str(tmp_path))
    assert bench.images.ids == ["b.png", "a.png"]  # first appearance, in file order
    assert bench.captions == ["first of b", "first of a", "second of b", "first of b"]
    assert bench.caption_image == [0, 1, 0, 0]
    assert bench.repeated_pairs == 1
    cfg.splits = ["tset"]
    with pytest.raises(DataError, match=r"benchmark.splits \['tset'\] not found"):
        load_benchmark(cfg, str(tmp_path))
    cfg.splits, cfg.subset = None, 2
    with pytest.raises(DataError, match=r"benchmark.subset=2: applies to labelled images"):
        load_benchmark(cfg, str(tmp_path))


def test_flickr8k_test_split_is_1000_images_with_5_captions_each():
    data = require_shared_data("flickr8k", "captions.jsonl")
    bench = load_benchmark(compose_config(["benchmark=flickr8k"]).benchmark, str(data.parents[1]))
    assert len(bench.images) == 1000 and len(bench.captions) == 5000
    assert bench.caption_image == [i for i in range(1000) for _ in range(5)]  # file order
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    test = [r for r in rows if r["split"] == "test"]
    assert bench.captions == [r["caption"] for r in test]
    assert bench.images.ids[0] == test[0]["image"] and bench.images.ids[-1] == test[-1]["image"]
    anchor_images = {r["image"] for r in rows if r["split"] in ("train", "dev")}
    assert not anchor_images & set(bench.images.ids)  # anchors=flickr8k never sees them


def test_a_retrieval_run_end_to_end(tmp_path, tiny_cache_dir):
    images = 20
    shapes_pairs_file(tmp_path / "bench", images)
    overrides = [
        *TINY,
        f"paths.cache_dir={tiny_cache_dir}",
        "task=retrieval",
        "benchmark=flickr8k",
        f"benchmark.path={tmp_path / 'bench' / 'pairs.jsonl'}",
        "benchmark.image_root=null",
        "benchmark.splits=null",
        "asif.n=[50,150]",
        "asif.k=[5,20]",
    ]
    results = run(compose_config(overrides, tmp_path / "out"))
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["task"] == "retrieval" and on_disk["primary_metric"] == "retrieval.mean_recall"
    assert on_disk["benchmark"]["images_used"] == images
    assert on_disk["benchmark"]["captions_used"] == 2 * images
    assert len(on_disk["cells"]) == 4
    for cell in on_disk["cells"]:
        for direction in ("image_to_text", "text_to_image"):
            r1, r5, r10 = (cell[f"retrieval.{direction}.R@{k}"] for k in (1, 5, 10))
            assert 0 <= r1 <= r5 <= r10 <= 1
    # Chance image->text R@5 is about 1 - (38/40)(37/39)...(34/36) = 0.24 (2 own of 40
    # captions); shape and colour are what the captions say and ASIF picks them up.
    best = max(c["retrieval.image_to_text.R@5"] for c in on_disk["cells"])
    assert best > 0.5
    assert "retrieval.text_to_image.R@10" in on_disk  # the headline cell, at the top level
    table = summary_table(results)
    assert "40 captions" in table and "text_to_image.R@10" in table


def test_task_and_benchmark_must_fit_before_anything_is_encoded(tmp_path):
    shapes_pairs_file(tmp_path / "bench", 2)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="task=retrieval needs a benchmark of image-caption pairs"):
        run(compose_config([*TINY, "task=retrieval", f"paths.cache_dir={cache}"], tmp_path / "a"))
    pairs = [
        "benchmark=flickr8k",
        f"benchmark.path={tmp_path / 'bench' / 'pairs.jsonl'}",
        "benchmark.splits=null",
        "benchmark.image_root=null",
    ]
    with pytest.raises(ValueError, match="image-caption pairs: use task=retrieval"):
        run(compose_config([*TINY, *pairs, f"paths.cache_dir={cache}"], tmp_path / "b"))
    assert not cache.exists()
    with pytest.raises(ValueError, match=r"task.recall_at=\[0\]"):
        run(compose_config([*TINY, *pairs, "task=retrieval", "task.recall_at=[0]"], tmp_path))


@pytest.mark.slow
def test_a_flickr8k_test_slice_against_flickr8k_anchors(tmp_path, tiny_cache_dir):
    data = require_shared_data("flickr8k", "captions.jsonl").parents[1]
    overrides = [
        f"paths.data_root={data}",
        f"paths.cache_dir={tiny_cache_dir}",
        "task=retrieval",
        "anchors=flickr8k",
        "anchors.limit=300",
        "benchmark=flickr8k",
        "benchmark.limit=40",  # the first 8 test images, 5 captions each
        "asif.k=[10,50]",
        "asif.p=[1,4]",
        "progress=false",
    ]
    results = run(compose_config(overrides, tmp_path))
    assert results["benchmark"]["images_used"] == 8 and results["benchmark"]["captions_used"] == 40
    assert results["anchors"]["pairs_used"] == 300 and len(results["cells"]) == 4
    assert all(0 <= c["retrieval.text_to_image.R@1"] <= 1 for c in results["cells"])


def _retrieval_results(folder, ns=(100, 200), ks=(10, 50), ps=(1.0, 2.0)):
    cells = []
    for n in ns:
        for k in ks:
            for p in ps:
                recalls = {
                    f"retrieval.{d}.R@{r}": min(1.0, n / 1000 + r / 20 + (k == 50) * 0.1 - p / 100)
                    for d in ("image_to_text", "text_to_image")
                    for r in (1, 5, 10)
                }
                recalls["retrieval.mean_recall"] = sum(recalls.values()) / len(recalls)
                cells.append(CellResult({"n": n, "k": k, "p": p}, recalls))
    summary = DataSummary("flickr8k", 1000, 1000, [], {"captions": 5000, "captions_used": 5000})
    record = RunResults(
        method="asif",
        task="retrieval",
        options={"preset": "clean", "normalize": "both"},
        anchors=DataSummary("flickr8k", 30000, 30000),
        benchmark=summary,
        encoders={"vision": {"model_name": "v"}, "text": {"model_name": "t"}},
        cells=cells,
        headline=cells[-1],
        primary_metric="retrieval.mean_recall",
        config={"benchmark": {}},
    )
    record.write(folder / "results.json")
    return record


def test_reports_read_retrieval_results_beside_classification(tmp_path):
    record = _retrieval_results(tmp_path / "retrieval")
    write_results(tmp_path / "classification")
    cells = load_cells([tmp_path])
    assert set(cells["task"]) == {"classification", "retrieval"}
    retrieval = cells[cells["task"] == "retrieval"]
    assert len(retrieval) == len(record.cells) and retrieval["top1"].isna().all()
    table = build_table1(cells)  # classification only
    assert set(table.long["benchmark"]) == {"cifar10"}
    written = figure4(cells, tmp_path / "fig", metric="retrieval.text_to_image.R@10")
    assert [p.name for p in written] == [
        "fig4_v_t_flickr8k_flickr8k_text_to_image-R10.png",
        "fig4_v_t_flickr8k_flickr8k_text_to_image-R10.pdf",
    ]
    by_default = {p.name for p in figure4(cells, tmp_path / "fig") if p.suffix == ".png"}
    assert "fig4_v_t_flickr8k_flickr8k_mean_recall.png" in by_default  # the task's own metric
    assert len(by_default) == 2  # and classification's top-1


def _compose_sweep(*overrides):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_the_flickr8k_sweeps_compose_with_the_papers_k_and_p():
    paper = _compose_sweep("+sweep=fig4_paper")
    fig4 = _compose_sweep("+sweep=fig4_flickr8k", "benchmark=flickr8k", "task=retrieval")
    assert (list(fig4.asif.k), list(fig4.asif.p)) == (list(paper.asif.k), list(paper.asif.p))
    assert (fig4.anchors.name, fig4.task.name, fig4.sweep_name) == (
        "flickr8k",
        "retrieval",
        "fig4_flickr8k",
    )
    table = _compose_sweep("+sweep=table1_mini_flickr8k")
    assert set(table.hydra.sweeper.params) == {"benchmark", "benchmark.authors_split"}
    data = require_shared_data("flickr8k", "captions.jsonl")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    pairs = sum(r["split"] in fig4.anchors.splits for r in rows)
    assert max(fig4.asif.n) <= pairs  # the largest n is the whole anchor set


def test_wandb_mirrors_retrieval_cells_and_curves(tmp_path):
    from asif_exp.tracking import WandbTracker

    class Run:  # what the tracker uses of a wandb run
        def __init__(self):
            self.logged, self.summary = [], {}

        def log(self, data, step):
            self.logged.append(data)

    run = Run()
    record = _retrieval_results(tmp_path)
    WandbTracker(run).log_results(record)
    cells = run.logged[: len(record.cells)]
    assert [c["retrieval.text_to_image.R@10"] for c in cells] == [
        c.metrics["retrieval.text_to_image.R@10"] for c in record.cells
    ]
    assert {"results", "fig4_k_curves", "fig4_p_curves"} <= set(run.logged[-1])
    assert run.summary["best_retrieval.mean_recall"] == max(
        c.metrics["retrieval.mean_recall"] for c in record.cells
    )

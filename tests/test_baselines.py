"""Baselines fitted on the same anchors (ridge, procrustes, cca, csa, dense_rr): each against a
plain or library reference on synthetic data where the answer is known, the anchor prefix,
and each end to end through the pipeline on the tiny embedded default."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY, compose_config
from hydra.errors import ConfigCompositionException
from reference import dense_asif
from scipy.linalg import orthogonal_procrustes
from scipy.stats import ortho_group
from sklearn.cross_decomposition import CCA
from sklearn.linear_model import Ridge

from asif_exp.errors import ConfigError
from asif_exp.methods.base import MethodReport, load_method
from asif_exp.methods.cca import canonical_fits
from asif_exp.methods.dense_rr import relative_space
from asif_exp.methods.procrustes import procrustes_map
from asif_exp.methods.ridge import ridge_maps
from asif_exp.methods.shared_space import prefix_moments, shared_space_scores
from asif_exp.options import check_config
from asif_exp.pipeline import run
from asif_exp.problem import EmbeddedProblem, Targets

BASELINES = ["ridge", "procrustes", "cca", "csa", "dense_rr"]


def unit(x):
    return torch.nn.functional.normalize(torch.as_tensor(x, dtype=torch.float64), dim=1)


def moments_of(images, texts, n=None):
    n = n or images.shape[0]
    return next(prefix_moments(images, texts, [n]))


def centred(x):
    return x - x.mean(0)


# ----------------------------------------------------------------------------- the maps


@pytest.mark.parametrize("dx, dy", [(16, 16), (8, 16)])
def test_procrustes_recovers_the_rotation(dx, dy):
    """Texts = images rotated (or embedded isometrically when dy > dx) plus noise."""
    rotation = torch.as_tensor(ortho_group.rvs(dy, random_state=0)[:dx])  # orthonormal rows
    g = torch.Generator().manual_seed(0)
    images = unit(torch.randn(2000, dx, generator=g, dtype=torch.float64))
    texts = images @ rotation + 0.01 * torch.randn(2000, dy, generator=g, dtype=torch.float64)
    recovered = procrustes_map(moments_of(images, texts))
    assert recovered.shape == (dx, dy)
    assert torch.allclose(recovered, rotation, atol=0.02)
    assert not torch.allclose(
        procrustes_map(moments_of(images, unit(texts[torch.randperm(2000)]))), rotation, atol=0.2
    )


def test_procrustes_with_fewer_text_dimensions_is_padded_procrustes():
    """dx > dy: the semi-orthogonal map equals scipy's orthogonal Procrustes on texts
    zero-padded to dx, restricted to the text dimensions."""
    g = torch.Generator().manual_seed(1)
    images = unit(torch.randn(500, 12, generator=g))
    texts = unit(images[:, :5] + 0.3 * torch.randn(500, 5, generator=g, dtype=torch.float64))
    padded = torch.cat([centred(texts), torch.zeros(500, 7, dtype=torch.float64)], 1)
    full, _ = orthogonal_procrustes(centred(images).numpy(), padded.numpy())
    ours = procrustes_map(moments_of(images, texts))
    assert np.allclose(ours.numpy(), full[:, :5], atol=1e-8)
    assert torch.allclose(ours.T @ ours, torch.eye(5, dtype=torch.float64), atol=1e-10)


def test_ridge_is_the_closed_form_and_sklearns_ridge():
    g = torch.Generator().manual_seed(2)
    images = unit(torch.randn(300, 10, generator=g))
    texts = unit(images @ torch.randn(10, 6, generator=g, dtype=torch.float64) + 0.5)
    alphas = [0.01, 1.0, 30.0]
    maps = dict(ridge_maps(moments_of(images, texts), alphas))
    xc, yc = centred(images), centred(texts)
    for alpha in alphas:
        closed = torch.linalg.solve(
            xc.T @ xc + alpha * torch.eye(10, dtype=torch.float64), xc.T @ yc
        )
        assert torch.allclose(maps[alpha], closed, atol=1e-10)
        library = Ridge(alpha=alpha, fit_intercept=True).fit(images.numpy(), texts.numpy())
        assert np.allclose(maps[alpha].numpy(), library.coef_.T, atol=1e-8)
    assert not torch.allclose(maps[0.01], maps[30.0], atol=1e-3)


def correlated_views(seed, n=3000, dx=7, dy=5, shared=3):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, shared, generator=g, dtype=torch.float64)
    images = latent @ torch.randn(shared, dx, generator=g, dtype=torch.float64)
    texts = latent @ torch.randn(shared, dy, generator=g, dtype=torch.float64)
    images = unit(images + torch.randn(n, dx, generator=g, dtype=torch.float64) + 2)
    texts = unit(texts + torch.randn(n, dy, generator=g, dtype=torch.float64) - 1)
    return images, texts


def sklearn_cca(images, texts, r):
    model = CCA(n_components=r, scale=False, max_iter=20_000, tol=1e-14)
    x_scores, y_scores = model.fit_transform(images.numpy(), texts.numpy())
    correlations = [np.corrcoef(x_scores[:, i], y_scores[:, i])[0, 1] for i in range(r)]
    return np.array(correlations), x_scores, y_scores, model


def test_cca_correlations_match_sklearn():
    images, texts = correlated_views(3)
    expected, *_ = sklearn_cca(images, texts, 4)
    [(params, fit)] = canonical_fits(moments_of(images, texts), [4], [0.0])
    assert params == {"r": 4, "regularization": 0.0}
    assert np.allclose(fit.correlations.numpy(), expected, atol=1e-6)
    assert np.allclose(fit.anchor_correlations.numpy(), expected, atol=1e-6)
    assert expected[0] > 0.5 > expected[3]  # a data set with structure in it


def test_cca_and_csa_scores_are_sklearns_canonical_variates_compared():
    """cca: cosine of the canonical variates (standardised on the anchors); csa: the same with
    each dimension's product weighted by its correlation (CSA's weighted_corr_sim)."""
    images, texts = correlated_views(4)
    correlations, x_scores, y_scores, model = sklearn_cca(images, texts, 3)
    queries, captions = images[:40], texts[:60]
    qx, cy = model.transform(queries.numpy(), captions.numpy())
    qx, cy = qx / x_scores.std(0), cy / y_scores.std(0)  # unit variance, as CCA's variates
    qx /= np.linalg.norm(qx, axis=1, keepdims=True)
    cy /= np.linalg.norm(cy, axis=1, keepdims=True)
    targets = Targets([""] * 60, captions.float())
    for name, weights in [("cca", np.ones(3)), ("csa", correlations)]:
        problem = EmbeddedProblem(images.float(), texts.float(), queries.float(), targets, None)
        method = load_method(
            compose_config([f"method={name}", "method.r=3", "method.regularization=0"])
        )
        [cell] = list(method.score(problem, [3000], MethodReport()))
        assert cell.params == {"n": 3000, "r": 3, "regularization": 0.0}
        assert np.allclose(cell.scores.numpy(), (qx * weights) @ cy.T, atol=1e-4), name


def test_cca_skips_cells_beyond_the_rank_or_singular():
    images, texts = correlated_views(5, n=5)
    fits = dict(
        ((p["r"], p["regularization"]), f)
        for p, f in canonical_fits(moments_of(images, texts), [2, 5], [0.0, 0.5])
    )
    assert "singular" in fits[(2, 0.0)]  # n = 5 <= d_image = 7: needs regularization
    assert "exceeds" in fits[(5, 0.5)]  # rank min(7, 5, n - 1) = 4
    assert not isinstance(fits[(2, 0.5)], str)


def test_csa_with_fewer_anchors_than_dimensions_gives_finite_correlations_and_scores():
    # n < d: many canonical directions have no variance on the anchors; their correlation was
    # 0/0 (NaN) and, after a clamp, 1e308 (inf in float32): every score NaN, every recall 1.0.
    g = torch.Generator().manual_seed(0)
    images, texts = unit(torch.randn(40, 64, generator=g)), unit(torch.randn(40, 48, generator=g))
    for _, fit in canonical_fits(moments_of(images, texts), [30], [0.1, 0.9]):
        assert torch.isfinite(fit.anchor_correlations).all()
        assert float(fit.anchor_correlations.abs().max()) <= 1.0
    cfg = compose_config([*TINY, "method=csa", "method.r=[30]", "method.regularization=[0.1]"])
    problem = EmbeddedProblem(
        images.float(),
        texts.float(),
        images[:10].float(),
        Targets(["t"] * 10, texts[:10].float()),
        truth=torch.arange(10),
    )
    cells = list(load_method(cfg).score(problem, [40], MethodReport()))
    assert cells and all(torch.isfinite(c.scores).all() for c in cells)


def test_cells_with_non_finite_scores_are_skipped_never_measured(caplog):
    from asif_exp.methods.base import ScoredCell
    from asif_exp.pipeline import score_and_measure
    from asif_exp.tasks.retrieval import build as retrieval_task

    class Broken:
        name = "broken"

        def score(self, problem, ns, report):
            yield ScoredCell({"n": 4, "c": 0}, torch.full((2, 2), float("nan")))
            yield ScoredCell({"n": 4, "c": 1}, torch.eye(2))

    problem = EmbeddedProblem(
        torch.randn(4, 3), torch.randn(4, 3), torch.randn(2, 3),
        Targets(["a", "b"], torch.randn(2, 3)), truth=torch.tensor([0, 1]),
    )  # fmt: skip
    report = MethodReport()
    cfg = compose_config([*TINY, "task=retrieval"])
    cells = score_and_measure(Broken(), retrieval_task(cfg), problem, [4], report)
    assert [c.params["c"] for c in cells] == [1]
    assert report.skipped == [{"n": 4, "c": 0, "reason": "non-finite scores"}]


@pytest.mark.parametrize("n", [20, 60])
@pytest.mark.parametrize("aggregation", ["mean", "max"])
def test_dense_rr_is_dense_asif_with_k_n_p_1(n, aggregation):
    g = torch.Generator().manual_seed(6)
    anchor_images, anchor_texts = torch.randn(60, 12, generator=g), torch.randn(60, 9, generator=g)
    images, prompts = torch.randn(15, 12, generator=g), torch.randn(12, 9, generator=g)
    prompt_class = torch.arange(4).repeat_interleave(3)
    space = relative_space(moments_of(anchor_images, anchor_texts, n))
    ours = shared_space_scores(
        space, images, Targets([""] * 12, prompts, prompt_class, list("abcd")), aggregation
    )
    expected = dense_asif(
        images,
        anchor_images,
        prompts,
        anchor_texts,
        prompt_class,
        4,
        n,
        n,
        1,
        False,
        "both",
        aggregation,
    )
    assert torch.allclose(ours, expected.float(), atol=1e-5)
    # retrieval: every prompt its own target
    ours = shared_space_scores(space, images, Targets([""] * 12, prompts), "mean")
    expected = dense_asif(
        images,
        anchor_images,
        prompts,
        anchor_texts,
        torch.arange(12),
        12,
        n,
        n,
        1,
        False,
        "both",
        "max",
    )
    assert torch.allclose(ours, expected.float(), atol=1e-5)


# ----------------------------------------------------------------------------- the anchors used


@pytest.mark.parametrize("name", BASELINES)
def test_each_cell_is_fitted_on_exactly_the_first_n_pairs(name):
    """Scores at n from the full anchor set equal those from the first n pairs alone, and the
    pairs after n change nothing (while they do change the fit at a larger n)."""
    g = torch.Generator().manual_seed(7)
    anchor_images, anchor_texts = torch.randn(80, 10, generator=g), torch.randn(80, 6, generator=g)
    targets = Targets(
        [""] * 8, torch.randn(8, 6, generator=g), torch.arange(4).repeat(2), list("abcd")
    )
    images = torch.randn(12, 10, generator=g)
    method = load_method(
        compose_config([f"method={name}", *(["method.r=[2,4]"] if name in ("cca", "csa") else [])])
    )

    def cells(anchors_i, anchors_t, ns):
        problem = EmbeddedProblem(anchors_i, anchors_t, images, targets, None)
        return {
            tuple(c.params.items()): c.scores for c in method.score(problem, ns, MethodReport())
        }

    full = cells(anchor_images, anchor_texts, [40, 80])
    prefix = cells(anchor_images[:40], anchor_texts[:40], [40])
    assert prefix and all(torch.allclose(full[key], prefix[key], atol=1e-5) for key in prefix)
    at_80 = [key for key in full if key[0] == ("n", 80)]
    assert any(
        not torch.allclose(full[key], prefix[((("n", 40),) + key[1:])], atol=1e-3) for key in at_80
    )


# ----------------------------------------------------------------------------- config mistakes


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=ridge", "+method.alpah=1"], "method.alpah: not an option of method=ridge"),
        (["method=ridge", "method.alpha=[1,-1]"], "method.alpha"),
        (["method=cca", "method.r=[0]"], "method.r"),
        (["method=csa", "method.regularization=1.5"], "method.regularization"),
        (["method=dense_rr", "method.template_aggregation=median"], "template_aggregation"),
        (["method=cca", "~method.r"], r"~method.r"),
        (["method=ridge", "method.alpah=1"], r"method.alpah"),
        (["method=cca", "method.r=0"], r"method.r=0: must be at least 1"),
        (["method=cca", "method.regularization=2"], r"method.regularization=2"),
    ],
)
def test_option_mistakes_are_one_line_errors_naming_the_key(overrides, message):
    """Each method's options have a schema (a typo fails at composition, or in check_config for
    a `+key` Hydra lets through) and their values are checked before any work."""
    with pytest.raises((ConfigError, ConfigCompositionException), match=message):
        check_config(compose_config(overrides))


# ----------------------------------------------------------------------------- end to end


HYPER = {
    "ridge": ["alpha"],
    "procrustes": [],
    "cca": ["r", "regularization"],
    "csa": ["r", "regularization"],
    "dense_rr": [],
}


@pytest.mark.parametrize("name", BASELINES)
def test_end_to_end_on_the_embedded_default(name, tmp_path, tiny_cache_dir):
    overrides = [*TINY, f"paths.cache_dir={tiny_cache_dir}", f"method={name}", "asif.n=[50,150]"]
    if name in ("cca", "csa"):
        overrides += ["method.r=[4,16]", "method.regularization=[0.1,0.5]"]
    results = run(compose_config(overrides, tmp_path))
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["method"] == name and on_disk["task"] == "classification"
    assert on_disk["headline_params"] == ["n", *HYPER[name], "n_used"]
    grid = {"ridge": 4, "cca": 4, "csa": 4}.get(name, 1)
    assert len(on_disk["cells"]) == 2 * grid
    assert {c["n"] for c in on_disk["cells"]} == {50, 150}
    for cell in on_disk["cells"]:
        assert 0 <= cell["top1"] <= cell["top5"] <= 1 and len(cell["per_class_accuracy"]) == 5
    assert on_disk["options"]["template_aggregation"] == "mean"
    assert on_disk["notes"]["skipped_cells"] == []
    assert on_disk["n"] == 150 and results["top1"] == on_disk["top1"]


# ----------------------------------------------------------------------------- sweep and report


def test_sweep_runs_every_method_over_the_same_prefixes(tmp_path):
    from conftest import CONF_DIR
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["+sweep=baselines", "task=classification", "benchmark=cifar10"],
            return_hydra_config=True,
        )
    assert set(cfg.hydra.sweeper.params["method"].split(",")) == {"asif", *BASELINES}
    assert cfg.anchors.name == "flickr8k" and len(cfg.asif.n) > 3


def write_record(root, method, params_and_top1, task="classification"):
    from asif_exp.results import CellResult, DataSummary, RunResults

    cells = [CellResult(params, {"top1": top1, "top5": 0.9}) for params, top1 in params_and_top1]
    RunResults(
        method=method,
        task=task,
        options={},
        anchors=DataSummary("flickr8k", 400, 400),
        benchmark=DataSummary("cifar10", 100, 100, details={"class_names": list("abcdefghij")}),
        encoders={"vision": {"model_name": "tf_efficientnet_lite0"}, "text": {"model_name": "m"}},
        cells=cells,
        headline=cells[-1],
        primary_metric="top1",
    ).write(root / method / "results.json")


def test_comparison_builder_keeps_the_best_setting_per_method_and_n(tmp_path):
    import subprocess
    import sys

    import pandas as pd
    from conftest import PROJECT_ROOT, subprocess_env

    write_record(
        tmp_path,
        "ridge",
        [
            ({"n": n, "alpha": a}, top1)
            for n, a, top1 in [(100, 1.0, 0.3), (100, 10.0, 0.4), (400, 1.0, 0.6), (400, 10.0, 0.5)]
        ],
    )
    write_record(
        tmp_path, "asif", [({"n": n, "k": 50, "p": 8.0}, 0.1 * n / 100) for n in (100, 400)]
    )
    out = tmp_path / "report" / "cmp"
    subprocess.run(
        [
            sys.executable,
            str(PROJECT_ROOT / "experiments/baselines/build.py"),
            str(tmp_path),
            "--out",
            str(out),
        ],
        check=True,
        env=subprocess_env(),
        capture_output=True,
    )
    table = pd.read_csv(out.with_suffix(".csv"))
    chosen = {(r.method, r.n): (r.setting, r.primary) for r in table.itertuples()}
    assert chosen == {
        ("asif", 100): ("k=50, p=8", 0.1),
        ("asif", 400): ("k=50, p=8", 0.4),
        ("ridge", 100): ("alpha=10", 0.4),
        ("ridge", 400): ("alpha=1", 0.6),
    }
    markdown = out.with_suffix(".md").read_text()
    assert "| 400 | 0.400 | 0.600 |" in markdown  # n against the methods, asif first
    assert (out.parent / "cmp_classification_cifar10.png").stat().st_size > 0


def test_a_job_is_named_by_its_own_methods_grid():
    from asif_exp.pipeline import job_name

    ridge = compose_config([*TINY, "method=ridge", "asif.n=[50,150]", "method.alpha=[0.1,10]"])
    assert job_name(ridge, load_method(ridge)) == (
        "synthetic_shapes-synthetic_shapes-ridge-n[50, 150]-alpha[0.1,10]"
    )
    asif = compose_config([*TINY, "asif.k=[5,20]"])
    assert (
        job_name(asif, load_method(asif))
        == "synthetic_shapes-synthetic_shapes-asif-nNone-k[5,20]-p2"
    )
    procrustes = compose_config([*TINY, "method=procrustes"])
    assert job_name(procrustes, load_method(procrustes)).endswith("-procrustes-nNone")

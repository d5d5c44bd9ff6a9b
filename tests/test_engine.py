"""The engine against a plain dense reference written here, on random inputs."""

import pytest
import torch
from reference import random_embeddings, reference_for_cell

from asif_exp.methods.asif import (
    AUTHORS_OPTIONS,
    AUTHORS_UNCLAMPED_OPTIONS,
    AsifOptions,
    class_representation,
    class_scores,
    cpu_kernels,
    layouts,
    relative_representation,
    scoring,
    select_topk,
    sparse_scores,
    streaming_topk,
    topk,
)
from asif_exp.methods.base import max_over_groups
from asif_exp.tasks.classification_grid import evaluate_grid
from asif_exp.tensors import unit_rows


def random_problem(seed, images=40, anchors=300, classes=5, templates=3, d_image=16, d_text=12):
    g = torch.Generator().manual_seed(seed)
    return random_embeddings(g, images, anchors, classes, templates, d_image, d_text)


OPTION_SETS = [
    {},
    AUTHORS_OPTIONS,
    AUTHORS_UNCLAMPED_OPTIONS,
    dict(clamp_negative=True, normalize="none", template_aggregation="max"),
    dict(clamp_negative=False, normalize="both", template_aggregation="mean"),
]


@pytest.mark.parametrize("option_set", OPTION_SETS)
@pytest.mark.parametrize("seed", [0, 1])
def test_grid_matches_dense_reference(option_set, seed):
    problem = random_problem(seed)
    # A tiny budget forces row blocks and many anchor chunks: chunked must equal unchunked.
    options = AsifOptions(memory_budget_mb=0.01, device="cpu", **option_set)
    cells, timings = evaluate_grid(
        **problem,
        ns=[50, 120, 300],
        ks=[5, 20, 60],
        ps=[1, 3, 8],
        options=options,
        keep_scores=True,
        progress=False,
    )
    assert timings["skipped"] == [[50, 60]]  # k > n cells are skipped, 3 values of p each
    assert len(cells) == 3 * 3 * 3 - 3
    for cell in cells:
        expected = reference_for_cell(problem, cell, options)
        torch.testing.assert_close(cell.scores, expected, rtol=1e-4, atol=1e-6)
        assert torch.equal(cell.predictions, expected.argmax(1))
        assert cell.top1 == pytest.approx(
            float((expected.argmax(1) == problem["labels"]).float().mean())
        )


def test_exactly_k_nonzeros_and_unit_norm():
    g = torch.Generator().manual_seed(3)
    queries, anchors = (
        unit_rows(torch.randn(30, 8, generator=g)),
        unit_rows(torch.randn(200, 8, generator=g)),
    )
    top = streaming_topk(queries, anchors, [200], 25, AsifOptions(device="cpu"), progress=False)[
        200
    ]
    rr = relative_representation(top, 25, 4, clamp_negative=False, normalize=True).to_dense()
    assert ((rr != 0).sum(1) == 25).all()
    torch.testing.assert_close(rr.norm(dim=1), torch.ones(30))


def test_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(4)
    queries, anchors = (
        unit_rows(torch.randn(64, 8, generator=g)),
        unit_rows(torch.randn(500, 8, generator=g)),
    )
    ns = [100, 333, 500]
    big = streaming_topk(queries, anchors, ns, 40, AsifOptions(device="cpu"), progress=False)
    small = streaming_topk(
        queries, anchors, ns, 40, AsifOptions(device="cpu", memory_budget_mb=0.005), progress=False
    )
    for n in ns:
        assert torch.equal(big[n].indices, small[n].indices)
        torch.testing.assert_close(big[n].values, small[n].values)


def test_ties_go_to_lower_anchor_id():
    values = torch.tensor([[1.0, 0.5, 0.5, 0.5, 0.2], [0.25, 0.25, 0.25, 0.25, 0.25]])
    ids = torch.tensor([[9, 7, 3, 5, 1], [4, 2, 8, 0, 6]])
    top_values, top_ids = select_topk(values, ids, 3)
    assert top_ids.tolist() == [[9, 3, 5], [0, 2, 4]]
    assert top_values.tolist() == [[1.0, 0.5, 0.5], [0.25, 0.25, 0.25]]


def test_duplicate_anchors_give_deterministic_topk():
    g = torch.Generator().manual_seed(5)
    anchors = unit_rows(torch.randn(50, 6, generator=g)).repeat(4, 1)  # every anchor 4 times
    queries = unit_rows(torch.randn(10, 6, generator=g))
    a = streaming_topk(queries, anchors, [200], 7, AsifOptions(device="cpu"), progress=False)[200]
    b = streaming_topk(
        queries,
        anchors,
        [200],
        7,
        AsifOptions(device="cpu", memory_budget_mb=0.001),
        progress=False,
    )[200]
    assert torch.equal(a.indices, b.indices)
    # A copy is chosen only if every lower copy of the same anchor is chosen too.
    chosen = [set(row) for row in a.indices.tolist()]
    assert all(i < 50 or i - 50 in row for row in chosen for i in row)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(ns=[301]), "anchors available"),
        (dict(ks=[500], ns=[300]), "k must be <= n"),
        (dict(num_classes=0), "class list is empty"),
        (dict(anchor_text_embeddings=torch.randn(299, 12)), "anchor pairs mismatch"),
        (dict(image_embeddings=torch.full((40, 16), float("nan"))), "NaN or inf"),
        (dict(ps=[0]), "must be positive"),
    ],
)
def test_bad_input_is_a_clear_error(change, message):
    problem = random_problem(0)
    grid = dict(ns=[300], ks=[10], ps=[2])
    grid.update({k: v for k, v in change.items() if k in grid})
    problem.update({k: v for k, v in change.items() if k not in grid})
    with pytest.raises(ValueError, match=message):
        evaluate_grid(**problem, **grid, options=AsifOptions(device="cpu"), progress=False)


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="normalize"):
        AsifOptions(normalize="images")
    with pytest.raises(ValueError, match="template_aggregation"):
        AsifOptions(template_aggregation="median")


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 3, 8, 20, 24])
def test_select_topk_matches_a_full_sort_under_heavy_ties(seed, k):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 6, (50, 24), generator=g).float()  # many exact ties
    ids = torch.stack([torch.randperm(1000, generator=g)[:24] for _ in range(50)])
    by_id = ids.argsort(dim=1)
    ref_values, ref_ids = values.gather(1, by_id), ids.gather(1, by_id)
    by_value = ref_values.argsort(dim=1, descending=True, stable=True)
    ref_values, ref_ids = ref_values.gather(1, by_value)[:, :k], ref_ids.gather(1, by_value)[:, :k]
    top_values, top_ids = select_topk(values, ids, k)
    assert torch.equal(top_ids, ref_ids)
    assert torch.equal(top_values, ref_values)


@pytest.mark.parametrize("option_set", OPTION_SETS)
@pytest.mark.parametrize("path_cost", [0.0, 1e12], ids=["sparse", "dense"])
def test_dense_and_sparse_scoring_paths_match_the_reference(option_set, path_cost, monkeypatch):
    # The per-cell choice between a dense GEMM and a sparse product must not change results.
    monkeypatch.setitem(layouts.SPARSE_MAC_COST, "cpu", path_cost)
    problem = random_problem(7)
    options = AsifOptions(device="cpu", **option_set)
    cells, _ = evaluate_grid(
        **problem,
        ns=[120, 300],
        ks=[5, 60],
        ps=[1, 8],
        options=options,
        keep_scores=True,
        progress=False,
    )
    for cell in cells:
        expected = reference_for_cell(problem, cell, options)
        torch.testing.assert_close(cell.scores, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("compiled", [True, False], ids=["cpu-kernel", "pytorch-path"])
@pytest.mark.parametrize("order", ["random", "increasing"])
def test_threshold_filter_and_its_overflow_match_topk(order, compiled, monkeypatch):
    # Random order: later tiles are filtered by the running k-th value and their few candidates
    # appended to the pool. Anchors in increasing similarity to every query: every entry of a
    # tile beats the running top-k; the PyTorch path (the GPU's) finds more than its pool holds
    # and selects from the tile directly, the compiled CPU path always has room for a tile.
    # Both must give the dense top-k either way.
    monkeypatch.setattr(cpu_kernels, "USE_CPU_KERNELS", compiled)
    direct, kernel_calls = [], []
    original = topk.CandidatePool.select
    monkeypatch.setattr(
        topk.CandidatePool,
        "select",
        lambda self, values=None, ids=None: (
            direct.append(values is not None and self.held > 0) or original(self, values, ids)
        ),
    )
    append_above = topk.append_above
    monkeypatch.setattr(topk, "append_above", lambda *a: kernel_calls.append(1) or append_above(*a))
    g = torch.Generator().manual_seed(8)
    direction = unit_rows(torch.randn(1, 8, generator=g))
    queries = unit_rows(direction + 0.01 * torch.randn(20, 8, generator=g))
    anchors = unit_rows(torch.randn(20_000, 8, generator=g))
    if order == "increasing":
        anchors = anchors[(anchors @ direction.T).flatten().argsort()]
    top = streaming_topk(
        queries,
        anchors,
        [20_000],
        30,
        AsifOptions(device="cpu", memory_budget_mb=0.05),
        progress=False,
    )[20_000]
    values, ids = (queries @ anchors.T).topk(30, dim=1)
    assert torch.equal(top.indices, ids)
    torch.testing.assert_close(top.values, values)
    assert any(direct) == (order == "increasing" and not compiled)
    assert bool(kernel_calls) == compiled


def test_public_class_representation_and_sparse_scores_match_dense():
    g = torch.Generator().manual_seed(9)
    queries = unit_rows(torch.randn(12, 6, generator=g))
    anchors = unit_rows(torch.randn(80, 6, generator=g))
    prompts = unit_rows(torch.randn(9, 6, generator=g))
    prompt_class = torch.tensor([2, 0, 1, 2, 0, 1, 1, 0, 2])  # not grouped by class
    options = AsifOptions(device="cpu")
    image_rr = relative_representation(
        streaming_topk(queries, anchors, [80], 10, options, progress=False)[80], 10, 2, True, True
    )
    prompt_rr = relative_representation(
        streaming_topk(prompts, anchors, [80], 10, options, progress=False)[80], 10, 2, True, True
    )
    classes = class_representation(prompt_rr, prompt_class, 3, normalize=True).to_dense()
    dense = prompt_rr.to_dense()
    expected = torch.nn.functional.normalize(
        torch.stack([dense[prompt_class == c].mean(0) for c in range(3)]), dim=1
    )
    torch.testing.assert_close(classes, expected)
    torch.testing.assert_close(
        sparse_scores(image_rr, prompt_rr, options), image_rr.to_dense() @ dense.T
    )
    scores = class_scores(
        image_rr, prompt_rr, prompt_class, 3, AsifOptions(device="cpu", template_aggregation="max")
    )
    products = image_rr.to_dense() @ dense.T
    torch.testing.assert_close(
        scores, torch.stack([products[:, prompt_class == c].amax(1) for c in range(3)], dim=1)
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_path_matches_the_dense_reference(dtype):
    """The same code on the GPU: float32 GEMMs give the CPU's predictions; bf16 GEMMs (float32
    outputs) may move near-tied similarities, so nearly all predictions must agree."""
    problem = random_problem(0, images=200, anchors=2000)
    options = AsifOptions(device="cuda", compute_dtype=dtype, memory_budget_mb=0.5)
    cells, _ = evaluate_grid(
        **problem, ns=[500, 2000], ks=[10, 50], ps=[1, 8], options=options, progress=False
    )
    for cell in cells:
        expected = reference_for_cell(problem, cell, options).argmax(1)
        agreement = (cell.predictions.cpu() == expected).float().mean()
        assert agreement == 1.0 if dtype == "float32" else agreement > 0.95


@pytest.mark.parametrize("grouped", [True, False], ids=["contiguous", "interleaved"])
def test_max_over_groups_is_each_groups_best_text(grouped):
    scores = torch.randn(7, 12, generator=torch.Generator().manual_seed(3))
    groups = torch.arange(4).repeat_interleave(3) if grouped else torch.arange(12) % 4
    expected = torch.stack([scores[:, groups == g].amax(1) for g in range(4)], dim=1)
    assert torch.equal(max_over_groups(scores, groups, 4), expected)


@pytest.mark.parametrize("budget_mb", [0.02, 1.0], ids=["many-tiles", "few-tiles"])
def test_compiled_cpu_path_and_pytorch_path_give_the_same_top_k(budget_mb, monkeypatch):
    # The GPU runs the PyTorch path; on the CPU the compiled loops replace it. Same snapshots,
    # value for value and id for id, with ties (duplicated anchors) and nested n.
    g = torch.Generator().manual_seed(11)
    queries = unit_rows(torch.randn(37, 16, generator=g))
    anchors = unit_rows(torch.randn(3000, 16, generator=g))
    anchors[1500:1600] = anchors[100:200]  # exact ties, broken by id
    options = AsifOptions(device="cpu", memory_budget_mb=budget_mb)
    snapshots = {}
    for compiled in (True, False):
        monkeypatch.setattr(cpu_kernels, "USE_CPU_KERNELS", compiled)
        snapshots[compiled] = streaming_topk(
            queries, anchors, [50, 90, 700, 3000], 80, options, progress=False
        )
    dense = queries @ anchors.T
    for n in (50, 90, 700, 3000):  # n = 50 < k: the snapshot holds all 50
        assert torch.equal(snapshots[True][n].indices, snapshots[False][n].indices)
        assert torch.equal(snapshots[True][n].values, snapshots[False][n].values)
        reference = select_topk(dense[:, :n], torch.arange(n).expand(37, n), min(n, 80))
        assert torch.equal(snapshots[True][n].indices, reference[1])


@pytest.mark.parametrize("option_set", OPTION_SETS)
def test_compiled_scoring_gives_the_pytorch_paths_scores_bit_for_bit(option_set, monkeypatch):
    # On the CPU several p share one compiled walk over the sparsity patterns; the GPU (and a
    # lone p) take one PyTorch/MKL product per p. The sums run in the same order (anchors
    # ascending), so the scores are equal bit for bit. The budget holds two p's scores:
    # batches of two p, then a lone one.
    monkeypatch.setitem(layouts.SPARSE_MAC_COST, "cpu", 0.0)  # every cell sparse
    problem = random_problem(3, images=60, anchors=400)
    options = AsifOptions(device="cpu", memory_budget_mb=2 * 60 * 5 * 4 / 2**20, **option_set)
    widths = []
    kernel = scoring.grouped_products
    monkeypatch.setattr(
        scoring, "grouped_products", lambda *a: widths.append(len(a[2])) or kernel(*a)
    )
    grids = {}
    for compiled in (True, False):
        monkeypatch.setattr(cpu_kernels, "USE_CPU_KERNELS", compiled)
        grids[compiled], _ = evaluate_grid(
            **problem,
            ns=[100, 400],
            ks=[10, 50],
            ps=[1, 2, 5],
            options=options,
            keep_scores=True,
            progress=False,
        )
    assert widths == [2] * 4  # one batch of two p per (n, k); the third p alone
    for fast, plain in zip(grids[True], grids[False], strict=True):
        assert (fast.n, fast.k, fast.p) == (plain.n, plain.k, plain.p)
        assert torch.equal(fast.scores, plain.scores)


def test_densify_writes_every_entry_of_a_csr_matrix():
    dense = torch.rand(7, 9, generator=torch.Generator().manual_seed(4))
    dense[dense < 0.6] = 0
    dense[3] = 0  # an empty row
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(layouts.densify(dense.to_sparse_csr(), dtype), dense.to(dtype))


def test_cost_model_builds_dense_blocks_only_where_the_gemm_repays_them():
    # Measured on the CPU (experiments/bench/calibrate_scoring.py): at high density a dense GEMM
    # wins with 1,000 targets; with 10 it does not repay building the dense image blocks.
    cpu, budget = torch.device("cpu"), 2**28
    assert layouts.use_dense(5000, 1000, 1000, 800, 800, budget, cpu)
    assert not layouts.use_dense(5000, 10, 1000, 800, 1000, budget, cpu)
    assert not layouts.use_dense(5000, 1000, 16000, 800, 800, budget, cpu)  # sparse enough
    assert not layouts.use_dense(5000, 1000, 1000, 800, 800, 1000 * 1000 - 1, cpu)  # no room

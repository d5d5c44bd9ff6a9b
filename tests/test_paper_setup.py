"""The paper's configs: benchmarks (ImageNet folders, the authors' split), anchors, sweeps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

import asif_exp.config  # noqa: F401  (registers the config schemas)
from asif_exp.data import authors_split_indices, load_benchmark
from asif_exp.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def _compose(*overrides: str, config: str = "config"):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(config, overrides=list(overrides))


def test_authors_split_is_their_seeded_permutation():
    val, test = authors_split_indices(50_000, "val"), authors_split_indices(50_000, "test")
    # their code: torch.randperm(50_000, generator=torch.Generator().manual_seed(42))[:25_000]
    permutation = torch.randperm(50_000, generator=torch.Generator().manual_seed(42))
    assert val == sorted(permutation[:25_000].tolist())
    assert test == sorted(permutation[-25_000:].tolist())
    assert len(authors_split_indices(7, "val")) == 3 and len(authors_split_indices(7, "test")) == 4
    assert set(authors_split_indices(7, "val")).isdisjoint(authors_split_indices(7, "test"))
    with pytest.raises(DataError, match="val or test"):
        authors_split_indices(10, "train")


def _folders(root: Path, names: list[str], per_class: int = 2) -> None:
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / name / f"{i}.JPEG")


def test_imagenet_wnid_folders_and_imagenet_v2_index_folders(tmp_path, monkeypatch):
    import asif_exp.data.registry as registry

    monkeypatch.setattr(registry, "load_class_names", lambda name: ["tench", "goldfish", "shark"])
    _folders(tmp_path / "in" / "val", ["n01443537", "n01440764", "n01484850"])
    cfg = _compose("benchmark=imagenet", f"paths.data_root={tmp_path}", "benchmark.root=in/val")
    bench = load_benchmark(cfg.benchmark, cfg.paths.data_root)
    assert bench.labels == [0, 0, 1, 1, 2, 2]  # sorted wnids are the class order
    assert bench.images.ids[0].startswith("n01440764/")

    _folders(tmp_path / "v2", ["0", "1", "10"])  # 10 is no class of three
    cfg = _compose("benchmark=imagenet_v2", f"paths.data_root={tmp_path}", "benchmark.root=v2")
    with pytest.raises(DataError, match="not class indices"):
        load_benchmark(cfg.benchmark, cfg.paths.data_root)
    (tmp_path / "v2" / "10").rename(tmp_path / "v2" / "2")
    bench = load_benchmark(cfg.benchmark, cfg.paths.data_root)
    assert bench.labels == [0, 0, 1, 1, 2, 2]  # numeric, not lexicographic, order

    (tmp_path / "in" / "val" / "n01440764").rename(tmp_path / "stray")
    cfg = _compose("benchmark=imagenet", f"paths.data_root={tmp_path}", "benchmark.root=in/val")
    bench = load_benchmark(cfg.benchmark, cfg.paths.data_root)
    assert bench.labels == [1, 1, 2, 2]  # a subset keeps each wnid's own label
    cfg.benchmark.folder_labels = "sorted"
    with pytest.raises(DataError, match="one folder per class"):
        load_benchmark(cfg.benchmark, cfg.paths.data_root)
    (tmp_path / "in" / "val" / "n99999999").mkdir()
    cfg.benchmark.folder_labels = "ids"
    with pytest.raises(DataError, match=r"\['n99999999'\] .* are not class ids of imagenet1k"):
        load_benchmark(cfg.benchmark, cfg.paths.data_root)


def test_split_of_a_subset_names_both_in_its_fingerprint(tmp_path):
    _folders(tmp_path / "b", ["cat", "dog"], per_class=10)
    common = ["benchmark=image_folder", f"benchmark.root={tmp_path / 'b'}", "benchmark.subset=10"]
    halves = {}
    for seed in (0, 1):
        for split in ("val", "test"):
            cfg = _compose(
                *common, f"benchmark.subset_seed={seed}", f"benchmark.authors_split={split}"
            )
            bench = load_benchmark(cfg.benchmark, "")
            halves[seed, split] = bench
            assert len(bench.labels) == 5
    assert set(halves[0, "val"].images.ids).isdisjoint(halves[0, "test"].images.ids)
    # the same split positions of two different subsets are different images: different keys
    assert halves[0, "val"].images.fingerprint != halves[1, "val"].images.fingerprint


@pytest.mark.parametrize(
    "benchmark, names, templates, size",
    [
        ("imagenet", "imagenet1k", "imagenet7", 1000),
        ("imagenet_v2", "imagenet1k", "imagenet7", 1000),
        ("cifar100", "cifar100", "cifar18", 100),
        ("oxford_pets", "oxford_pets_asif", "pets3", 37),
    ],
)
def test_paper_benchmarks_compose(benchmark, names, templates, size):
    from asif_exp.data.prompts import load_class_names, load_templates

    cfg = _compose(f"benchmark={benchmark}")
    assert (cfg.benchmark.class_names, cfg.benchmark.templates) == (names, templates)
    assert len(load_class_names(names)) == size and load_templates(templates)


def test_missing_torchvision_files_are_a_clear_error(tmp_path):
    cfg = _compose("benchmark=cifar100", f"paths.data_root={tmp_path}")
    with pytest.raises(DataError, match="CIFAR100 not found under"):
        load_benchmark(cfg.benchmark, cfg.paths.data_root)


def test_paper_anchors_and_sweeps_compose():
    cfg = _compose("anchors=cc12m")
    assert (cfg.anchors.loader, cfg.anchors.limit) == ("parquet", 1_600_000)
    for sweep, params in {
        "table1_mini": {"encoder/vision", "benchmark", "benchmark.authors_split"},
        "fig4_mini": {"encoder/vision", "benchmark"},
        "table1_paper": {"encoder/vision", "benchmark", "asif"},
        "fig4_paper": {"encoder/vision", "asif"},
    }.items():
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[f"+sweep={sweep}"], return_hydra_config=True)
        assert cfg.sweep_name == sweep and cfg.logger.group is None  # logger=none by default
        assert set(cfg.hydra.sweeper.params) == params
        assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    paper = _compose("+sweep=table1_paper", "logger=wandb")
    assert paper.logger.group == "table1_paper"
    assert (paper.anchors.name, paper.encoder.text.model_name) == (
        "cc12m",
        "sentence-transformers/sentence-t5-base",
    )


@pytest.mark.parametrize(
    "launcher, plugin, target",
    [
        ("local_gpus", "hydra_plugins.hydra_joblib_launcher", "JoblibLauncher"),
        ("slurm_gpu", "hydra_plugins.hydra_submitit_launcher", "SlurmLauncher"),
    ],
)
def test_launcher_configs_compose(launcher, plugin, target):
    pytest.importorskip(plugin, reason="pip install -e '.[launchers]'")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("extract", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    assert cfg.hydra.job.name == "extract"


def test_twenty_imagenet_wnid_folders_evaluate_against_all_1000_classes(tmp_path):
    """Real ImageNet images in 20 of the 1,000 wnid folders: each keeps its standard label
    (labels.csv of imagenet_mini, not our code, is the truth) and the run scores all 1,000."""
    import csv
    import shutil

    from conftest import SHARED_DATA, require_shared_data
    from test_robustness import config

    from asif_exp.pipeline import run

    require_shared_data("imagenet_mini", "labels.csv")
    with (SHARED_DATA / "imagenet_mini" / "labels.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["source"] != "one_per_class_sample"]
    by_wnid: dict[str, list[dict]] = {}
    for row in rows:
        by_wnid.setdefault(row["wnid"], []).append(row)
    wnids = sorted(by_wnid)[::36][:20]  # spread over the class order, not its first 20
    truth = {}
    for wnid in wnids:
        (tmp_path / "data" / "val" / wnid).mkdir(parents=True)
        for row in by_wnid[wnid]:
            name = Path(row["file"]).name
            shutil.copy(
                SHARED_DATA / "imagenet_mini" / row["file"], tmp_path / "data" / "val" / wnid
            )
            truth[f"{wnid}/{name}"] = int(row["label"])
    cfg = config(tmp_path, "benchmark=imagenet", "benchmark.root=val")
    bench = load_benchmark(cfg.benchmark, cfg.paths.data_root)
    assert len(bench.class_names) == 1000 and len({*bench.labels}) == 20
    assert dict(zip(bench.images.ids, bench.labels, strict=True)) == truth
    assert max(truth.values()) > 900  # labels are not the folders' positions among the 20
    results = run(cfg)
    assert len(results["benchmark"]["class_names"]) == 1000
    assert len(results["per_class_accuracy"]) == 1000
    assert results["benchmark"]["images_used"] == len(truth)

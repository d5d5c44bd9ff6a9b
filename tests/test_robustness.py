"""Bad input gives a clear error or a documented skip-and-report, and never leaves a corrupt
cache entry or a partial results.json.

Tiny fake encoders (tests/fakes.py) stand in for the real ones: the point here is the
plumbing, and they make every run take well under a second.
"""

import json
from pathlib import Path

import pytest
import torch
from fakes import config, write_pairs
from hydra.errors import ConfigCompositionException
from PIL import Image

import asif_exp.explain
import asif_exp.methods.asif.method
from asif_exp.data import (
    AnchorSet,
    ImageFiles,
    apply_repeated_pairs_policy,
    load_anchors,
    load_benchmark,
)
from asif_exp.embeddings import EmbeddingCache
from asif_exp.errors import ConfigError, DataError
from asif_exp.memory import AsifModel
from asif_exp.methods.asif import AsifOptions
from asif_exp.pipeline import run
from asif_exp.tasks.classification_grid import evaluate_grid
from asif_exp.tensors import check_embeddings


def assert_cache_is_whole(cache_dir: Path) -> None:
    """Every cache entry loads as recorded, and no staging directory is left behind."""
    root = cache_dir / "embeddings"
    if not root.exists():
        return
    assert not list(root.glob(".staging-*"))
    cache = EmbeddingCache(cache_dir)
    for entry in root.iterdir():
        identity = json.loads((entry / "meta.json").read_text())["identity"]
        assert cache.load(identity) is not None, entry


# ----------------------------------------------------------------------------- images


def test_unreadable_images_are_skipped_and_reported_or_raise(tmp_path):
    good_png = (tmp_path / "probe.png").open("wb")
    Image.new("RGB", (20, 20)).save(good_png, format="PNG")
    good_png.close()
    truncated = (tmp_path / "probe.png").read_bytes()[:40]
    write_pairs(tmp_path / "data" / "pairs", 12, bad={3: b"not an image at all", 7: truncated})
    pairs = ["anchors=pairs_file", "anchors.path=pairs/pairs.jsonl"]

    results = run(config(tmp_path, *pairs))
    skipped = results["anchors"]["skipped_images"]
    assert [s["id"] for s in skipped] == ["3.png", "7.png"] and all(s["error"] for s in skipped)
    assert results["anchors"]["pairs_used"] == 10
    assert json.loads((tmp_path / "out" / "results.json").read_text())["anchors"]["skipped_images"]

    raising = config(tmp_path, *pairs, "data.on_bad_image=raise", "cache=false", output="raise")
    with pytest.raises(ValueError, match="unreadable image '3.png'"):
        run(raising)
    assert not (tmp_path / "raise").exists()  # no partial results.json
    assert_cache_is_whole(tmp_path / "cache")


def test_cache_written_from_one_data_location_is_reused_from_another(tmp_path):
    write_pairs(tmp_path / "data" / "pairs", 12)
    pairs = ["anchors=pairs_file", "anchors.path=pairs/pairs.jsonl"]
    first = run(config(tmp_path, *pairs))
    assert not first["embeddings_from_cache"]["anchors pairs_file"]
    (tmp_path / "data").rename(tmp_path / "moved")  # another folder, as on another machine
    moved = [*pairs, f"paths.data_root={tmp_path / 'moved'}"]
    again = run(config(tmp_path, *moved, output="again"))
    assert all(again["embeddings_from_cache"].values()), again["embeddings_from_cache"]
    assert again["cells"] == first["cells"]


def test_unreadable_benchmark_image_is_reported_and_cannot_be_explained(tmp_path):
    for name, count in [("circle", 3), ("square", 3)]:
        folder = tmp_path / "data" / "bench" / name
        folder.mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (20, 20), (60 * i, 20, 200)).save(folder / f"{i}.png")
    (tmp_path / "data" / "bench" / "square" / "1.png").write_bytes(b"\x89PNG broken")
    bench = ["benchmark=image_folder", "benchmark.root=bench", "benchmark.templates=shapes"]
    results = run(config(tmp_path, *bench))
    assert [s["id"] for s in results["benchmark"]["skipped_images"]] == ["square/1.png"]
    assert results["benchmark"]["images_used"] == 5
    cfg = config(tmp_path, *bench, "query=4", name="explain", output="explain")
    with pytest.raises(DataError, match=r"query=4: image 'square/1.png' was skipped as unreadable"):
        asif_exp.explain.explain_main(cfg)
    with pytest.raises(ConfigError, match=r"query=6: benchmark image_folder has images 0\.\.5"):
        asif_exp.explain.explain_main(config(tmp_path, *bench, "query=6", name="explain"))
    assert not (tmp_path / "explain" / "explain_results.json").exists()


# ----------------------------------------------------------------------------- captions


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"image": "0.png", "caption": ""}\n', r"pairs.jsonl, line 1: caption .* is empty"),
        (b'{"image": "0.png", "caption": "   "}\n', r"pairs.jsonl, line 1: caption .* is empty"),
        (b'{"image": "0.png", "caption": null}\n', r"pairs.jsonl, line 1: .*not text: None"),
        (b'{"image": "0.png", "caption": "ok"}\n{"image": "1.png", "caption": 7}\n', "line 2"),
        (b'{"image": "0.png", "caption": "caf\xe9"}\n', r"pairs.jsonl: not valid UTF-8"),
    ],
)
def test_bad_captions_name_the_file_and_record(tmp_path, content, message):
    write_pairs(tmp_path, 2)
    (tmp_path / "pairs.jsonl").write_bytes(content)
    cfg = config(tmp_path, "anchors=pairs_file", f"anchors.path={tmp_path / 'pairs.jsonl'}")
    with pytest.raises(DataError, match=message):
        load_anchors(cfg.anchors, str(tmp_path))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"image,caption\n0.png,a dot\n1.png,\n", r"pairs.csv, line 3: caption of pair 1"),
        (b"image,caption\n0.png\n", r"pairs.csv, line 2: 1 fields, the header has 2"),
        (b"image,caption\n0.png,\xff\xfe\n", r"pairs.csv: not valid UTF-8"),
    ],
)
def test_bad_csv_captions_name_the_file_and_record(tmp_path, content, message):
    write_pairs(tmp_path, 2)
    (tmp_path / "pairs.csv").write_bytes(content)
    cfg = config(
        tmp_path, "anchors=pairs_file", "anchors.loader=csv", f"anchors.path={tmp_path}/pairs.csv"
    )
    with pytest.raises(DataError, match=message):
        load_anchors(cfg.anchors, str(tmp_path))


# ----------------------------------------------------------------------------- embeddings


def test_nan_or_inf_embeddings_are_refused(tmp_path):
    bad = torch.randn(6, 4)
    bad[2, 1], bad[4, 0] = float("nan"), float("inf")
    with pytest.raises(
        ValueError, match=r"queries: 2 rows contain NaN or inf \(first rows: \[2, 4\]\)"
    ):
        check_embeddings("queries", bad)
    with pytest.raises(ValueError, match="anchor text embeddings: 2 rows contain NaN"):
        AsifModel(torch.randn(6, 3), bad, list("abcdef"), list("abcdef"), k=2, p=1.0)
    # From an encoder, through the whole job: a clear error, no results.json.
    with pytest.raises(ValueError, match="NaN or inf"):
        run(config(tmp_path, "encoder.vision.name=test_nan_pixels"))
    assert not (tmp_path / "out" / "results.json").exists()
    assert_cache_is_whole(tmp_path / "cache")


# ----------------------------------------------------------------------------- duplicates


def test_duplicate_pairs_and_ids(tmp_path):
    write_pairs(tmp_path, 3)
    images = ImageFiles(tmp_path, ["0.png", "0.png", "1.png"])
    # One image with several captions is how COCO is built: accepted.
    AnchorSet("coco-like", images, ["a dog", "a brown dog", "a cat"])
    repeated = AnchorSet("dup", images, ["a dog", "a dog", "a cat"])
    assert repeated.repeated_pairs() == [(0, 1)]
    with pytest.raises(
        DataError, match=r"pairs 0 and 1 are the same \(image '0.png', caption 'a dog'\)"
    ):
        apply_repeated_pairs_policy(repeated, "error")
    (tmp_path / "labels.csv").write_text("file,label\n0.png,0\n1.png,1\n0.png,1\n")
    cfg = config(
        tmp_path,
        "benchmark=imagenet_mini",
        f"benchmark.root={tmp_path}",
        "benchmark.class_names=cifar10",
    )
    with pytest.raises(DataError, match=r"image id '0.png' repeats \(at 2\)"):
        load_benchmark(cfg.benchmark, str(tmp_path))


# ----------------------------------------------------------------------------- grid


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["asif.n=10", "asif.k=20"], "k=20 exceeds"),
        (["asif.n=31"], "between 1 and the 30 anchors available"),
        (["asif.k=31"], "k=31 exceeds every n"),
    ],
)
@pytest.mark.parametrize("entry", ["config", "explain"])
def test_k_or_n_out_of_range_fails_before_encoding(tmp_path, overrides, message, entry):
    cfg = config(tmp_path, *overrides, name=entry)
    job = run if entry == "config" else asif_exp.explain.explain_main
    with pytest.raises(ValueError, match=message):
        job(cfg)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_anchor_counts_mismatched(tmp_path):
    write_pairs(tmp_path, 3)
    with pytest.raises(DataError, match="3 images but 2 captions"):
        AnchorSet("x", ImageFiles(tmp_path, ["0.png", "1.png", "2.png"]), ["a", "b"])
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="anchor pairs mismatch: 20 image embeddings but 19 text"):
        evaluate_grid(
            torch.randn(4, 6, generator=g),
            torch.randn(20, 6, generator=g),
            torch.randn(2, 5),
            torch.randn(19, 5),
            torch.tensor([0, 1, 0, 1]),
            torch.tensor([0, 1]),
            2,
            [19],
            [3],
            [1.0],
            AsifOptions(device="cpu"),
            progress=False,
        )
    with pytest.raises(ValueError, match="anchor pairs mismatch: 20 image embeddings, 19 text"):
        AsifModel(torch.randn(20, 6), torch.randn(19, 5), ["i"] * 20, ["c"] * 20, k=3, p=1.0)


# ----------------------------------------------------------------------------- cache and sweeps


def test_truncated_cache_entry_is_detected_and_recomputed(tmp_path):
    first = run(config(tmp_path))
    entries = list((tmp_path / "cache" / "embeddings").iterdir())
    victim = next(
        e
        for e in entries
        if json.loads((e / "meta.json").read_text())["shapes"]["embeddings"][0] == 30
        and json.loads((e / "meta.json").read_text())["identity"]["kind"] == "image"
    )
    tensor_file = victim / "chunk-00000.safetensors"
    tensor_file.write_bytes(tensor_file.read_bytes()[: tensor_file.stat().st_size // 2])
    second = run(config(tmp_path, output="again"))
    assert second["embeddings_from_cache"] == {
        "anchors synthetic_shapes": False,  # recomputed, the rest reused
        "anchor captions synthetic_shapes": True,
        "benchmark synthetic_shapes": True,
        "prompts synthetic_shapes": True,
    }
    assert second["cells"] == first["cells"]
    assert_cache_is_whole(tmp_path / "cache")


def test_sweep_killed_halfway_resumes_with_skip_existing(tmp_path, monkeypatch):
    jobs = [(f"job{i}", f"asif.k={k}") for i, k in enumerate([3, 5, 8])]
    real_grid, calls = asif_exp.methods.asif.method.score_grid, []

    def killed_on_second_job(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the sweep is killed in the middle of job 1
        return real_grid(*args, **kwargs)

    monkeypatch.setattr(asif_exp.methods.asif.method, "score_grid", killed_on_second_job)
    with pytest.raises(KeyboardInterrupt):
        for name, override in jobs:
            run(config(tmp_path, override, "skip_existing=true", output=f"sweep/{name}"))
    done = tmp_path / "sweep" / "job0" / "results.json"
    assert done.exists() and not (tmp_path / "sweep" / "job1" / "results.json").exists()
    assert not list((tmp_path / "sweep").rglob("*.tmp"))
    finished_before = done.read_bytes()

    calls.clear()
    monkeypatch.setattr(
        asif_exp.methods.asif.method,
        "score_grid",
        lambda *a, **kw: (calls.append(1), real_grid(*a, **kw))[1],
    )
    resumed = [run(config(tmp_path, o, "skip_existing=true", output=f"sweep/{n}")) for n, o in jobs]
    assert len(calls) == 2  # only the two unfinished jobs ran
    assert done.read_bytes() == finished_before
    assert [r["k"] for r in resumed] == [3, 5, 8]


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "entry, override",
    [
        ("config", "asif.kk=3"),
        ("config", "data.on_bad_imag=skip"),
        ("config", "anchors.num_sample=3"),
        ("explain", "qurey=3"),
        ("explain", "edit.remove_caption=dog"),
        ("explain", "abstain.treshold=0.1"),
        ("explain", "usage=sometimes"),
    ],
)
def test_misspelt_or_mistyped_keys_fail_at_composition(tmp_path, entry, override):
    with pytest.raises(ConfigCompositionException):
        config(tmp_path, override, name=entry)

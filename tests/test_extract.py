"""Sharded anchors (webdataset / img2dataset parquet) and resumable, fanned-out extraction,
on a few synthetic images written to tmp_path."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env
from hydra import compose, initialize_config_dir
from PIL import Image

import asif_exp.config  # noqa: F401  (registers the config schemas)
from asif_exp.data import MissingImage, load_anchors
from asif_exp.embeddings import EmbeddingCache
from asif_exp.errors import DataError
from asif_exp.extract import ChunkEncoder, anchor_image_identity, run_extract

ROOT = Path(__file__).resolve().parents[1]


class Killed(BaseException):
    """Stands for the job being killed (SIGTERM/SIGKILL) in the middle of a chunk."""


TINY = ["encoder.vision.resize_size=64", "encoder.vision.crop_size=64"]  # cheap on a CPU
TARS = ["anchors=cc12m", "anchors.loader=webdataset", "anchors.caption_column=txt"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]


def _jpeg(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def _is(image: Image.Image, colour: str) -> bool:
    from PIL import ImageColor

    expected = ImageColor.getrgb(colour)
    return all(abs(a - b) < 40 for a, b in zip(image.getpixel((20, 20)), expected, strict=True))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, shards: int = 2, per_shard: int = 5) -> list[str]:
    """img2dataset-like tars; pair 3 has no image (failed download), pair 6 a corrupt one."""
    folder.mkdir(parents=True, exist_ok=True)
    captions = []
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(per_shard):
                index = shard * per_shard + i
                key, caption = f"{index:09d}", f"a {COLOURS[index % 8]} square, number {index}"
                captions.append(caption)
                if index == 6:
                    _add(tar, f"{key}.jpg", b"not a jpeg")
                elif index != 3:
                    _add(tar, f"{key}.jpg", _jpeg(COLOURS[index % 8]))
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", json.dumps({"key": key}).encode())
    return captions


def compose_extract(tmp_path: Path, *overrides: str, config: str = "extract"):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(
            config,
            overrides=[
                *TARS,
                f"anchors.path={tmp_path / 'shards'}",
                f"paths.data_root={tmp_path}",
                f"paths.cache_dir={tmp_path / 'cache'}",
                f"paths.output_dir={tmp_path / 'out'}",
                "progress=false",
                "device=cpu",
                *TINY,
                *overrides,
            ],
        )


def test_webdataset_pairs_in_order_with_missing_reported(tmp_path):
    captions = write_shards(tmp_path / "shards")
    cfg = compose_extract(tmp_path)
    anchors = load_anchors(cfg.anchors, cfg.paths.data_root)
    assert anchors.captions == captions
    assert anchors.images.ids[:2] == ["00000.tar/000000000", "00000.tar/000000001"]
    assert _is(anchors.images.load(0), "red")
    with pytest.raises(MissingImage, match="no .jpg"):
        anchors.images.load(3)
    assert [i for i, _ in anchors.images.missing] == ["00000.tar/000000003"]
    # limit: the first pairs in shard order; later shards are neither read nor fingerprinted
    cfg.anchors.limit = 4
    limited = load_anchors(cfg.anchors, cfg.paths.data_root)
    assert limited.captions == captions[:4]
    assert limited.images.fingerprint["files"] == ["00000.tar"]
    cfg.anchors.path = str(tmp_path / "shards" / "{00000..00001}.tar")
    cfg.anchors.limit = None
    assert load_anchors(cfg.anchors, cfg.paths.data_root).captions == captions


def test_webdataset_errors_are_clear(tmp_path):
    cfg = compose_extract(tmp_path)
    with pytest.raises(DataError, match="no .tar files"):
        load_anchors(cfg.anchors, cfg.paths.data_root)
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "00000.tar", "w") as tar:
        _add(tar, "000.jpg", _jpeg("red"))  # an image without its caption
    with pytest.raises(DataError, match="no .txt member"):
        load_anchors(cfg.anchors, cfg.paths.data_root)


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)


def test_img2dataset_parquet_with_tars_and_failed_downloads(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    rows = []
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i in range(7):
            ok = i != 2
            rows.append(
                {
                    "url": f"http://x/{i}.jpg",
                    "caption": f"caption {i}",
                    "key": f"{i:09d}",
                    "status": "success" if ok else "failed_to_download",
                    "error_message": None if ok else "HTTP 404",
                }
            )
            if ok:
                _add(tar, f"{i:09d}.jpg", _jpeg(COLOURS[i]))
                _add(tar, f"{i:09d}.txt", f"caption {i}".encode())
    _write_parquet(folder / "00000.parquet", rows)
    cfg = compose_extract(tmp_path, "anchors.loader=parquet", "anchors.caption_column=caption")
    anchors = load_anchors(cfg.anchors, cfg.paths.data_root)
    assert anchors.captions == [f"caption {i}" for i in range(7)]
    assert _is(anchors.images.load(5), "orange")
    with pytest.raises(MissingImage, match="failed_to_download: HTTP 404"):
        anchors.images.load(2)


def test_parquet_with_embedded_images(tmp_path):
    (tmp_path / "shards").mkdir()
    rows = [
        {"key": f"{i}", "caption": f"c {i}", "status": "success", "jpg": _jpeg(COLOURS[i])}
        for i in range(5)
    ]
    _write_parquet(tmp_path / "shards" / "00000.parquet", rows)
    cfg = compose_extract(tmp_path, "anchors.loader=parquet", "anchors.caption_column=caption")
    anchors = load_anchors(cfg.anchors, cfg.paths.data_root)
    assert _is(anchors.images.load(4), "purple")  # row group 2 (3 rows a group)
    assert _is(anchors.images.load(1), "green")  # row group 1


def test_hf_files_parquet(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    (tmp_path / "shards").mkdir()
    rows = [
        {"caption": f"c {i}", "image": {"bytes": _jpeg(COLOURS[i]), "path": None}} for i in range(4)
    ]
    _write_parquet(tmp_path / "shards" / "part-0.parquet", rows)
    cfg = compose_extract(
        tmp_path,
        "anchors.loader=hf_files",
        "anchors.path=parquet",
        f"anchors.data_files={tmp_path / 'shards' / '*.parquet'}",
        "anchors.image_column=image",
        "anchors.caption_column=caption",
    )
    anchors = load_anchors(cfg.anchors, cfg.paths.data_root)
    assert anchors.captions == [f"c {i}" for i in range(4)]
    assert _is(anchors.images.load(0), "red")


def test_extract_resumes_after_an_interrupted_chunk_and_feeds_run(tmp_path, monkeypatch):
    write_shards(tmp_path / "shards")
    cfg = compose_extract(tmp_path, "extract.chunk_size=4")
    original, calls, killed = ChunkEncoder.__call__, [], []

    def interrupted(self, start, stop, label):
        calls.append(start)
        if start == 4 and not killed:
            killed.append(start)
            raise Killed  # killed inside the second chunk, the first time only
        return original(self, start, stop, label)

    monkeypatch.setattr(ChunkEncoder, "__call__", interrupted)
    with pytest.raises(Killed):
        run_extract(cfg)
    assert calls == [0, 4]
    calls.clear()
    report = run_extract(cfg)  # the same command again: resumes
    assert calls == [4, 8]  # chunk [0, 4) came from the cache
    assert report["chunks_cached"] == [0] and report["chunks_encoded"] == [1, 2]
    assert report["merged"] and report["pairs_kept"] == 8
    failed = {f["id"]: f["error"] for f in report["failures"]}
    assert set(failed) == {"00000.tar/000000003", "00001.tar/000000006"}
    assert "MissingImage" in failed["00000.tar/000000003"]
    assert json.loads((tmp_path / "out" / "extract.json").read_text())["failed_images"] == 2

    # the merged entries equal one uninterrupted pass, and are what an evaluation job reads
    monkeypatch.setattr(ChunkEncoder, "__call__", original)
    fresh = compose_extract(  # DataLoader workers read the shards too
        tmp_path,
        "extract.chunk_size=100",
        "extract.num_workers=2",
        f"paths.cache_dir={tmp_path / 'c2'}",
    )
    run_extract(fresh)
    anchors = load_anchors(cfg.anchors, cfg.paths.data_root)
    resumed = EmbeddingCache(cfg.paths.cache_dir).load(anchor_image_identity(cfg, anchors))
    single = EmbeddingCache(fresh.paths.cache_dir).load(anchor_image_identity(fresh, anchors))
    assert torch.equal(resumed[0]["kept"], single[0]["kept"])
    assert torch.allclose(resumed[0]["embeddings"], single[0]["embeddings"], atol=1e-4)

    from asif_exp.pipeline import run

    bench = tmp_path / "bench"
    for colour in ("red", "blue"):
        (bench / colour).mkdir(parents=True)
        Image.new("RGB", (40, 40), colour).save(bench / colour / "0.png")
    job = compose_extract(
        tmp_path,
        "benchmark=image_folder",
        f"benchmark.root={bench}",
        "asif.k=3",
        "asif.p=1",
        config="config",
    )
    results = run(job)
    assert results["embeddings_from_cache"]["anchors cc12m"] is True
    assert results["embeddings_from_cache"]["anchor captions cc12m"] is True
    assert results["anchors"]["pairs_used"] == 8
    assert len(results["anchors"]["skipped_images"]) == 2


def test_merge_before_every_chunk_is_encoded_fails_clearly(tmp_path):
    write_shards(tmp_path / "shards")
    cfg = compose_extract(
        tmp_path,
        "extract.chunk_size=4",
        "extract.num_shards=3",
        "extract.shard=1",
        "extract.stage=encode",
    )
    report = run_extract(cfg)
    assert report["chunks_encoded"] == [1] and not report["merged"]
    cfg.extract.stage = "merge"
    with pytest.raises(RuntimeError, match="2 of 3 chunks are not encoded"):
        run_extract(cfg)
    # merging with another chunk size than the encode jobs': the message names the right one
    cfg.extract.chunk_size = 5
    with pytest.raises(RuntimeError, match="the encode jobs used extract.chunk_size=4; merge with"):
        run_extract(cfg)


@pytest.mark.slow  # three fresh Python processes importing torch: ~15 s on an idle 2-core CPU
def test_fan_out_as_hydra_jobs_with_joblib(tmp_path):
    """Two shards as a joblib multirun, then the merge, as a user would type them."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    write_shards(tmp_path / "shards")
    common = [
        *TARS,
        f"anchors.path={tmp_path / 'shards'}",
        f"paths.data_root={tmp_path}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "progress=false",
        "device=cpu",
        "extract.chunk_size=3",
        *TINY,
    ]
    env = subprocess_env(HYDRA_FULL_ERROR="1")
    fan_out = subprocess.run(
        [
            sys.executable,
            "-m",
            "asif_exp.extract",
            "-m",
            "hydra/launcher=local_gpus",
            "hydra.launcher.n_jobs=2",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            *common,
            "extract.stage=encode",
            "extract.num_shards=2",
            "extract.shard=0,1",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert fan_out.returncode == 0, fan_out.stderr[-3000:]
    reports = [
        json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/extract.json"))
    ]
    assert [r["chunks_encoded"] for r in reports] == [[0, 2], [1, 3]]
    merge = subprocess.run(
        [
            sys.executable,
            "-m",
            "asif_exp.extract",
            f"hydra.run.dir={tmp_path / 'merge'}",
            *common,
            "extract.stage=merge",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert merge.returncode == 0, merge.stderr[-3000:]
    merged = json.loads((tmp_path / "merge" / "extract.json").read_text())
    assert merged["merged"] and merged["pairs_kept"] == 8 and merged["failed_images"] == 2

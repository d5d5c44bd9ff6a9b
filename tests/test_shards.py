"""Sharded anchors as img2dataset writes them: dataset order whatever the download order, one
definition of n with failed downloads, errors that name the file, skip_failed_downloads.

`write_img2dataset_output` imitates img2dataset 1.47: per shard a .parquet listing every input
row with its status and, with output_format=webdataset, a .tar with only the successful
downloads (output_format=parquet: the image bytes in the parquet's jpg column), all in
download-completion order; keys are shard * 10**5 + row in shard, zero-padded.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf
from PIL import Image

from asif_exp.data import MissingImage, load_anchors, readable_in_prefixes
from asif_exp.embeddings import encode_images
from asif_exp.errors import DataError

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
PER_SHARD = 4
FAILED = 2  # input row without an image (HTTP 404)
# Download-completion order of each shard's rows: not the input order.
COMPLETION = {0: [2, 0, 3, 1], 1: [3, 1, 0, 2]}


def _jpeg(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 20), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset_output(folder: Path, output_format: str = "webdataset") -> list[str]:
    """Two shards, shard 1 written first, rows in completion order; input row FAILED failed.
    Returns the captions of the input rows, in input order."""
    tars = output_format == "webdataset"
    folder.mkdir(parents=True, exist_ok=True)
    captions = [f"a {COLOURS[row]} square, row {row}" for row in range(2 * PER_SHARD)]
    for shard in (1, 0):
        rows = []
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:  # empty without tars
            for in_shard in COMPLETION[shard]:
                row = shard * PER_SHARD + in_shard
                key = f"{shard * 10**5 + in_shard:09d}"
                ok = row != FAILED
                rows.append(
                    {
                        "url": f"http://127.0.0.1/{row}.jpg",
                        "caption": captions[row],
                        "key": key,
                        "status": "success" if ok else "failed_to_download",
                        "error_message": None if ok else "HTTP Error 404",
                        **({} if tars else {"jpg": _jpeg(COLOURS[row]) if ok else None}),
                    }
                )
                if ok and tars:
                    _add(tar, f"{key}.jpg", _jpeg(COLOURS[row]))
                    _add(tar, f"{key}.txt", captions[row].encode())
                    _add(tar, f"{key}.json", json.dumps({"key": key}).encode())
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard:05d}.parquet")
        if not tars:
            (folder / f"{shard:05d}.tar").unlink()
    return captions


def _colour(image: Image.Image) -> str:
    from PIL import ImageColor

    pixel = image.getpixel((10, 10))
    return min(
        COLOURS,
        key=lambda c: sum(abs(a - b) for a, b in zip(pixel, ImageColor.getrgb(c), strict=True)),
    )


def anchors_cfg(folder: Path, loader: str, **changes):
    node = compose_config(["anchors=cc12m"]).anchors
    base = {"path": str(folder), "loader": loader, "limit": None}
    if loader == "webdataset":
        base["caption_column"] = "txt"
    if loader == "hf_files":
        kind = changes.pop("kind", "parquet")
        suffix = ".parquet" if kind == "parquet" else ".tar"
        base.update(path=kind, data_files=str(folder / f"*{suffix}"))
        base["caption_column"] = "caption" if kind == "parquet" else "txt"
    return OmegaConf.merge(node, base, changes)


def readable_pairs(anchors) -> list[tuple[str, str]]:
    pairs = []
    for i, caption in enumerate(anchors.captions):
        try:
            pairs.append((caption, _colour(anchors.images.load(i))))
        except MissingImage:
            continue
    return pairs


@pytest.mark.parametrize(
    ("output_format", "loader", "kind"),
    [
        ("webdataset", "parquet", None),
        ("parquet", "parquet", None),
        ("webdataset", "webdataset", None),
        ("webdataset", "hf_files", "webdataset"),
        ("parquet", "hf_files", "parquet"),
    ],
)
def test_shards_give_pairs_in_dataset_order(tmp_path, monkeypatch, output_format, loader, kind):
    if loader == "hf_files":
        pytest.importorskip("datasets")
        monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    captions = write_img2dataset_output(tmp_path / "shards", output_format)
    changes = {"kind": kind} if kind else {}
    anchors = load_anchors(anchors_cfg(tmp_path / "shards", loader, **changes), str(tmp_path))
    expected = [(c, COLOURS[row]) for row, c in enumerate(captions) if row != FAILED]
    assert readable_pairs(anchors) == expected
    if output_format == "parquet" or loader == "parquet":  # every input row listed, in place
        assert anchors.captions == captions
        with pytest.raises(MissingImage):
            anchors.images.load(FAILED)
    else:  # a failed download is in no tar
        assert anchors.captions == [c for c, _ in expected]


def test_limit_is_a_prefix_in_dataset_order(tmp_path):
    captions = write_img2dataset_output(tmp_path / "shards")
    for loader in ("parquet", "webdataset"):
        cfg = anchors_cfg(tmp_path / "shards", loader, limit=3)
        anchors = load_anchors(cfg, str(tmp_path))
        listed = captions if loader == "parquet" else [c for r, c in enumerate(captions) if r != 2]
        assert anchors.captions == listed[:3]
        assert anchors.images.fingerprint["files"][0].startswith("00000.")  # shard 1 not read


def test_the_same_shards_downloaded_in_another_order_give_the_same_fingerprint(tmp_path):
    write_img2dataset_output(tmp_path / "a")
    COMPLETION[0].reverse()
    try:
        write_img2dataset_output(tmp_path / "b")
    finally:
        COMPLETION[0].reverse()
    fingerprints = [
        load_anchors(anchors_cfg(tmp_path / name, "parquet"), str(tmp_path)).images.fingerprint
        for name in ("a", "b")
    ]
    assert fingerprints[0]["ids_sha"] == fingerprints[1]["ids_sha"]


def test_shard_files_out_of_dataset_order_are_refused(tmp_path):
    write_img2dataset_output(tmp_path / "shards")
    for suffix in (".tar", ".parquet"):  # name shard 0 so that it sorts after shard 1
        (tmp_path / "shards" / f"00000{suffix}").rename(tmp_path / "shards" / f"00002{suffix}")
    for loader in ("parquet", "webdataset"):
        with pytest.raises(DataError, match=r"keys of 00002\.\w+ .* do not follow .*00001"):
            load_anchors(anchors_cfg(tmp_path / "shards", loader), str(tmp_path))


def test_damaged_shards_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    write_img2dataset_output(tmp_path / "shards")
    for suffix in (".parquet", ".tar"):
        path = tmp_path / "shards" / f"00001{suffix}"
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # killed mid-write
    with pytest.raises(DataError, match=r"00001\.parquet is not a readable parquet file"):
        load_anchors(anchors_cfg(tmp_path / "shards", "parquet"), str(tmp_path))
    with pytest.raises(DataError, match=r"00001\.tar is not a complete uncompressed tar"):
        load_anchors(anchors_cfg(tmp_path / "shards", "webdataset"), str(tmp_path))
    pytest.importorskip("datasets")
    with pytest.raises(DataError, match=r"00001\.parquet is not a readable parquet file"):
        load_anchors(anchors_cfg(tmp_path / "shards", "hf_files"), str(tmp_path))


class _MeanColour:
    """A stand-in encoder: an image's mean colour."""

    class preprocessing:  # noqa: N801 (stands in for ImageEncoder.preprocessing)
        @staticmethod
        def crop(image):
            return torch.from_numpy(np.array(image.resize((1, 1))))

    @staticmethod
    def encode_batches(batches):
        yield from batches


def test_skip_failed_downloads_skips_listed_failures_but_not_corrupt_bytes(tmp_path):
    write_img2dataset_output(tmp_path / "shards")
    anchors = load_anchors(anchors_cfg(tmp_path / "shards", "parquet"), str(tmp_path))
    _, kept, failures = encode_images(
        _MeanColour(), anchors.images, 4, 0, "skip_failed_downloads", "anchors", False
    )
    assert kept == [i for i in range(2 * PER_SHARD) if i != FAILED]
    assert [f["id"] for f in failures] == ["00000.parquet/000000002"]
    with pytest.raises(DataError, match="unreadable image '00000.parquet/000000002'"):
        encode_images(_MeanColour(), anchors.images, 4, 0, "raise", "anchors", False)
    # corrupt bytes in place of row 5's image: skip accepts them, skip_failed_downloads does not
    tar_path = tmp_path / "shards" / "00001.tar"
    data = tar_path.read_bytes()
    jpeg = _jpeg(COLOURS[5])
    start = data.index(jpeg)
    tar_path.write_bytes(data[:start] + b"\0" * len(jpeg) + data[start + len(jpeg) :])
    anchors = load_anchors(anchors_cfg(tmp_path / "shards", "parquet"), str(tmp_path))
    _, kept, failures = encode_images(_MeanColour(), anchors.images, 4, 0, "skip", "a", False)
    assert len(failures) == 2 and 5 not in kept
    with pytest.raises(DataError, match=r"'00001.parquet/000100001' \(not a failed download\)"):
        encode_images(_MeanColour(), anchors.images, 4, 0, "skip_failed_downloads", "a", False)
    with pytest.raises(ValueError, match=r"data.on_bad_image='rasie': expected one of"):
        encode_images(_MeanColour(), anchors.images, 4, 0, "rasie", "a", False)


def test_n_counts_listed_pairs():
    kept = [0, 1, 3, 4, 5, 7]  # pairs 2 and 6 failed to download
    assert readable_in_prefixes([1, 2, 3, 4, 8], kept) == [1, 2, 2, 3, 6]
    assert readable_in_prefixes([8], list(range(8))) == [8]  # nothing failed: n is n


def test_a_grid_up_to_the_listed_count_runs_and_records_both_counts(tmp_path):
    from test_robustness import config

    from asif_exp.pipeline import run

    write_img2dataset_output(tmp_path / "data" / "shards")
    for colour in ("red", "blue", "green"):
        (tmp_path / "data" / "bench" / colour).mkdir(parents=True)
        Image.new("RGB", (20, 20), colour).save(tmp_path / "data" / "bench" / colour / "0.png")
    cfg = config(
        tmp_path,
        "anchors=cc12m",
        "anchors.path=shards",
        "benchmark=image_folder",
        "benchmark.root=bench",
        "asif.n=[4,8]",
        "asif.k=[2,4]",
        "data.on_bad_image=skip_failed_downloads",
    )
    results = run(cfg)
    assert results["anchors"]["pairs"] == 2 * PER_SHARD and results["anchors"]["pairs_used"] == 7
    cells = {(c["n"], c["k"]): c["n_used"] for c in results["cells"]}
    assert cells == {(4, 2): 3, (8, 2): 7, (8, 4): 7}  # n = 4 holds the failed row 2
    # 3 readable among the first 4: k = 4 > n_used
    assert results["notes"]["skipped_cells"] == [{"n": 4, "n_used": 3, "k": 4, "reason": "k > n"}]
    assert results["n"] == 8 and results["n_used"] == 7
    assert results["anchors"]["n_counts"].startswith("listed pairs")

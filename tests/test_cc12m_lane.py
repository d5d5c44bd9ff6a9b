"""The CC12M lane's download step (experiments/table1/cc12m.py) and the committed real
img2dataset output (tests/fixtures/img2dataset/, made by make_img2dataset_fixture.py)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "img2dataset"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
ROWS, SHARD_SIZE = 8, 4  # as make_img2dataset_fixture.py made it


def _load(name: str):
    path = ROOT / "experiments" / "table1" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"table1_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


recipe = _load("cc12m")


def _listed_keys() -> list[str]:
    return [
        k for p in sorted(FIXTURE.glob("*.parquet")) for k in pq.read_table(p)["key"].to_pylist()
    ]


def test_fixture_is_a_real_download_out_of_key_order_with_failures():
    keys = _listed_keys()
    assert len(keys) == ROWS and keys != sorted(keys)  # what the loaders must undo
    statuses = [s for p in sorted(FIXTURE.glob("*.parquet")) for s in pq.read_table(p)["status"]]
    assert {str(s) for s in statuses} == {"success", "failed_to_download", "failed_to_resize"}
    assert recipe.check_shards(FIXTURE, ROWS, SHARD_SIZE) == {
        "shards": 2,
        "rows": ROWS,
        "downloaded": sum(r["kind"] == "ok" for r in EXPECTED),
        "failed": sum(r["kind"] != "ok" for r in EXPECTED),
    }


def test_the_fixture_holds_the_served_captions_and_bytes():
    rehearsal = _load("rehearsal")
    counts = rehearsal.verify(FIXTURE, FIXTURE, ROWS)  # captions with `"`, bytes not re-encoded
    assert counts["out_of_key_order"] > 0


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "00001_stats.json").unlink(), "00001_stats.json: missing, shard 00001"),
        (lambda f: (f / "00000.tar").unlink(), "00000.tar: missing although 00000_stats.json"),
        (lambda f: (f / "00001.parquet").write_bytes(b"PAR1"), "00001.parquet: unreadable"),
        (lambda f: shutil.copy(f / "00000_stats.json", f / "00002_stats.json"), "beyond the 2"),
    ],
)
def test_check_names_the_unfinished_or_damaged_shard(tmp_path, damage, message):
    folder = tmp_path / "cc12m"
    shutil.copytree(FIXTURE, folder)
    damage(folder)
    with pytest.raises(recipe.RecipeError, match=message):
        recipe.check_shards(folder, ROWS, SHARD_SIZE)


def test_check_refuses_a_folder_made_for_other_rows():
    with pytest.raises(recipe.RecipeError, match="the shard should have 2"):
        recipe.check_shards(FIXTURE, 6, SHARD_SIZE)
    with pytest.raises(recipe.RecipeError, match="00002_stats.json: missing"):
        recipe.check_shards(FIXTURE, 10, SHARD_SIZE)


def test_tsv_to_parquet_keeps_quotes_and_the_first_rows(tmp_path):
    captions = ['"Quoted" start', 'inner "quote', '"', "plain, with a comma", "not asked for"]
    tsv = tmp_path / "cc12m.tsv"
    tsv.write_text("".join(f"http://x/{i}.jpg\t{c}\r\n" for i, c in enumerate(captions)))
    out = tmp_path / "list.parquet"
    assert recipe.tsv_to_parquet(tsv, 4, out)
    table = pq.read_table(out).to_pydict()
    assert table["caption"] == captions[:4]
    assert table["url"] == [f"http://x/{i}.jpg" for i in range(4)]
    assert not recipe.tsv_to_parquet(tsv, 4, out)  # resumes: already there
    assert recipe.tsv_to_parquet(tsv, 5, out)  # other rows: rewritten
    assert pq.read_table(out)["caption"].to_pylist() == captions


def test_tsv_errors_name_the_file_and_line(tmp_path):
    tsv = tmp_path / "cc12m.tsv"
    tsv.write_text("http://x/0.jpg\tfine\nno tab on this line\n")
    with pytest.raises(recipe.RecipeError, match=r"cc12m.tsv, line 2: expected 'url<TAB>caption'"):
        recipe.tsv_to_parquet(tsv, 2, tmp_path / "list.parquet")
    short = tmp_path / "short.tsv"
    short.write_text("http://x/0.jpg\tfine\n")
    with pytest.raises(recipe.RecipeError, match="short.tsv: 1 rows, fewer than the 5 asked for"):
        recipe.tsv_to_parquet(short, 5, tmp_path / "list.parquet")
    assert not (tmp_path / "list.parquet").exists()  # nothing half-written


def test_the_recipe_keeps_downloaded_jpegs_and_reads_parquet_input():
    flags = recipe.IMG2DATASET_FLAGS
    value = dict(zip(flags[::2], flags[1::2], strict=True))
    assert value["--skip_reencode"] == "True" and value["--input_format"] == "parquet"
    assert value["--incremental_mode"] == "incremental"  # img2dataset's resume


# ----------------------------------------------------------------------------- loaders, real shards


def _anchors(tmp_path, *overrides: str):
    from conftest import compose_config

    from asif_exp.data import load_anchors

    cfg = compose_config(["anchors=cc12m", f"anchors.path={FIXTURE}", *overrides])
    return load_anchors(cfg.anchors, str(tmp_path))


def test_parquet_loader_gives_the_dataset_order_with_failed_rows_in_place(tmp_path):
    anchors = _anchors(tmp_path)
    assert anchors.captions == [r["caption"] for r in EXPECTED]  # 8 listed rows, key order
    failed = [i for i, r in enumerate(EXPECTED) if r["kind"] != "ok"]
    assert [anchors.images.ids.index(i) for i, _ in anchors.images.missing] == failed
    for index, row in enumerate(EXPECTED):
        if row["kind"] == "ok":
            assert anchors.images.load(index).size == (32, 32)


@pytest.mark.parametrize(
    "overrides",
    [
        ["anchors.loader=webdataset", "anchors.caption_column=txt"],
        [
            "anchors.loader=hf_files",
            "anchors.path=webdataset",
            f"anchors.data_files={FIXTURE}/*.tar",
            "anchors.caption_column=txt",
        ],
    ],
    ids=["webdataset", "hf_files"],
)
def test_tar_loaders_give_the_downloaded_pairs_in_dataset_order(tmp_path, monkeypatch, overrides):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    anchors = _anchors(tmp_path, *overrides)
    assert anchors.captions == [r["caption"] for r in EXPECTED if r["kind"] == "ok"]
    assert anchors.images.load(0).size == (32, 32)

"""Table 1 and Figure 4 builders on hand-made results.json files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env
from fake_results import fake_top1, write_results

from asif_exp.reports import (
    build_table1,
    figure4,
    load_cells,
    paper_numbers,
    paper_rows,
    paper_table1,
    select_cells,
    write_table1,
)

ROOT = Path(__file__).resolve().parents[1]
VIT, VIT_AUGREG = "vit_base_patch16_224_miil.in21k", "vit_base_patch16_224.augreg_in21k"


def test_tuned_on_val_reported_on_test(tmp_path):
    # val prefers k=50, p=2 at n=400; test is offset, so its own best would be the same cell
    write_results(tmp_path, split="val")
    write_results(tmp_path, split="test", offset=-0.05)
    selected = select_cells(load_cells([tmp_path]))
    assert len(selected) == 1
    row = selected.iloc[0]
    assert (row.n, row.k, row.p, row.split) == (400, 50, 2.0, "test")
    assert row.top1 == pytest.approx(fake_top1(400, 50, 2.0, -0.05))
    assert "tuned on the val half" in row.selection


def test_fixed_cell_and_optimistic_best(tmp_path):
    write_results(tmp_path)
    cells = load_cells([tmp_path])
    fixed = select_cells(cells, k=200, p=4.0).iloc[0]
    assert (fixed.n, fixed.k, fixed.p) == (400, 200, 4.0)
    assert fixed.selection == "the configured cell"
    best = select_cells(cells).iloc[0]
    assert (best.k, best.p) == (50, 2.0) and "optimistic" in best.selection


def test_newest_duplicate_wins(tmp_path):
    import json
    import os
    import time

    old = write_results(tmp_path / "a", offset=0.0)
    new = write_results(tmp_path / "b", offset=0.1)
    os.utime(old, (time.time() - 100, time.time() - 100))
    cells = load_cells([tmp_path])
    assert len(cells) == len(json.loads(new.read_text())["cells"])  # one copy of each cell
    assert set(cells.path) == {str(new)}


def test_table1_against_both_paper_versions(tmp_path):
    for benchmark in ("imagenet", "cifar100", "oxford_pets", "imagenet_v2"):
        write_results(tmp_path, vision=VIT, anchors="cc12m", benchmark=benchmark, classes=100)
    table = build_table1(load_cells([tmp_path]), k=50, p=2.0)
    ours = fake_top1(400, 50, 2.0) * 100
    long = table.long.set_index("benchmark")
    assert long.loc["imagenet", "paper_arxiv_v1__2022"] == 55.4
    assert long.loc["imagenet", "paper_neurips_2023"] == 60.9
    assert long.loc["oxford_pets", "diff_neurips_2023"] == pytest.approx(
        round(ours - 81.5, 2), abs=0.01
    )
    assert list(table.wide.columns) == ["ImageNet", "CIFAR-100", "Pets", "ImageNet-v2"]
    labels = list(table.wide.index)
    assert any("paper, NeurIPS 2023" in label for label in labels)
    assert any("ours, cc12m" in label for label in labels)
    assert any(
        label.strip().startswith("Δ ours − paper, arXiv v1 (2022) (ASIF ViT") for label in labels
    )
    # the DINO row is only shown where a DINO run is; CLIP and LiT rows always
    assert not any("DINO" in label for label in labels)
    clip = table.wide.loc["CLIP (400M private pairs) — paper"]
    assert list(clip) == ["68.6", "68.7", "88.9", "—"]
    assert table.wide.loc["ASIF ViT-B/16 sup. (1.6M pairs) — paper, arXiv v1 (2022)"].iloc[0] == (
        "55.4*"
    )
    assert paper_numbers()["tuned_on_val_note"] in table.notes
    paths = write_table1(table, tmp_path / "out" / "table1")
    markdown, latex, csv = (p.read_text() for p in paths)
    assert "| zero-shot top-1 (%) | ImageNet |" in markdown and "60.9" in markdown
    assert "\\begin{tabular}" in latex and "55.4" in latex
    assert "diff_neurips_2023" in csv.splitlines()[0]


def test_paper_numbers_as_published():
    published = {
        ("CLIP (400M private pairs)", ""): (68.6, 68.7, 88.9, None),
        ("CLIP (15M public pairs)", ""): (31.3, None, None, None),
        ("LiT (10M public pairs)", ""): (66.9, None, None, None),
        ("CLIP (901M pairs, Zhai et al.)", ""): (50.6, 47.9, 70.3, 43.3),
        ("LiT (901M pairs)", ""): (70.1, 70.9, 88.1, 61.7),
        ("ASIF ViT-B/16 sup. (1.6M pairs)", "arXiv v1 (2022)"): (55.4, 63.3, 71.5, 45.6),
        ("ASIF ViT-B/16 sup. (1.6M pairs)", "NeurIPS 2023"): (60.9, 50.2, 81.5, 52.2),
        ("ASIF DINO ViT-S/8 unsup. (1.6M pairs)", ""): (53.0, 46.5, 74.7, 45.9),
    }
    benchmarks = ("imagenet", "cifar100", "oxford_pets", "imagenet_v2")
    assert {
        (r.method, r.version): tuple(r.top1.get(b) for b in benchmarks) for r in paper_rows()
    } == published
    # the paper's asterisk: its first-version ASIF ImageNet figures were tuned on ImageNet val
    assert {(r.method, r.version) for r in paper_rows() if r.starred == ("imagenet",)} == {
        ("ASIF ViT-B/16 sup. (1.6M pairs)", "arXiv v1 (2022)"),
        ("ASIF DINO ViT-S/8 unsup. (1.6M pairs)", ""),
    }


def test_both_in21k_vits_are_compared_with_the_papers_row(tmp_path):
    for vision in (VIT, VIT_AUGREG):
        write_results(tmp_path, vision=vision, anchors="cc12m", benchmark="imagenet", classes=100)
    table = build_table1(load_cells([tmp_path]), k=50, p=2.0)
    assert table.long["paper_arxiv_v1__2022"].tolist() == [55.4, 55.4]
    assert sum(label.lstrip().startswith("Δ") for label in table.wide.index) == 4
    (note,) = [n for n in table.notes if "compared with the paper's" in n]
    assert "(AugReg)" in note and note.endswith(VIT)


def test_committed_paper_reference_is_the_builders_output(tmp_path):
    """experiments/table1/paper_reference.* are rebuilt from paper_table1.json beside them,
    never edited by hand."""
    title = "Table 1 of the paper (its numbers only)"
    for path in write_table1(paper_table1(), tmp_path / "paper_reference", title):
        committed = ROOT / "experiments" / "table1" / path.name
        assert committed.read_text() == path.read_text(), f"rebuild {committed} (see README)"
    assert (
        "| LiT (901M pairs) — paper | 70.1 | 70.9 | 88.1 | 61.7 |"
        in path.with_suffix(".md").read_text()
    )


def test_mini_table_has_no_paper_rows(tmp_path):
    write_results(tmp_path, benchmark="cifar10", subset=2000)
    write_results(tmp_path, vision="efficientnet_lite2", benchmark="imagenet_mini", classes=1000)
    table = build_table1(load_cells([tmp_path]))
    assert list(table.wide.columns) == ["CIFAR-10 (2,000 subset)", "ImageNet-mini"]
    assert len(table.wide) == 2 and all("ours" in label for label in table.wide.index)


def test_figure4_files(tmp_path):
    write_results(tmp_path)
    written = figure4(load_cells([tmp_path]), tmp_path / "fig")
    assert sorted(p.suffix for p in written) == [".pdf", ".png"]
    assert all(p.stat().st_size > 5000 for p in written)
    assert "coco_mini_cifar10" in written[0].name


def test_figure4_needs_several_n(tmp_path):
    write_results(tmp_path, ns=(400,))
    with pytest.raises(ValueError, match="several n"):
        figure4(load_cells([tmp_path]), tmp_path / "fig")


def test_missing_results_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_cells([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no results.json"):
        load_cells([tmp_path / "empty"])


def test_build_scripts(tmp_path):
    write_results(tmp_path / "res", split="val")
    write_results(tmp_path / "res", split="test")
    results = str(tmp_path / "res")

    def run(script: str, *args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(ROOT / script), *args]
        return subprocess.run(
            command, capture_output=True, text=True, cwd=tmp_path, env=subprocess_env()
        )

    for script, args in (
        ("experiments/table1/build_table.py", [results, "--out", str(tmp_path / "t" / "table1")]),
        ("experiments/table1/build_table.py", ["--paper-only", "--out", str(tmp_path / "p")]),
        ("experiments/fig4/build_figure.py", [results, "--out", str(tmp_path / "f")]),
    ):
        done = run(script, *args)
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "t" / "table1.md").exists() and (tmp_path / "t" / "table1.tex").exists()
    assert "LiT (901M pairs)" in (tmp_path / "p.md").read_text()
    assert len(list((tmp_path / "f").glob("fig4_*.png"))) == 2  # val and test halves
    done = run("experiments/table1/build_table.py", results, "--paper-only", "--out", "x")
    assert done.returncode == 2 and "--paper-only without them" in done.stderr

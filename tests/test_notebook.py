"""notebooks/plots.ipynb runs top to bottom on local results.json files (offline, via nbclient)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from fake_results import write_results
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def test_plots_notebook_redraws_table1_and_figure4(tmp_path, monkeypatch):
    results = tmp_path / "results"
    write_results(results, split="val")
    write_results(results, split="test", offset=-0.02)
    write_results(results, vision="efficientnet_lite2", benchmark="imagenet_mini", classes=1000)
    monkeypatch.setenv("ASIF_RESULTS_DIR", str(results))
    monkeypatch.setenv("ASIF_FIGURES_DIR", str(tmp_path / "figures"))
    notebook = nbformat.read(ROOT / "notebooks" / "plots.ipynb", as_version=4)
    NotebookClient(
        notebook,
        timeout=180,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "\n".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/markdown", "")) for o in outputs
    )
    assert "| zero-shot top-1 (%) | CIFAR-10 | ImageNet-mini |" in text
    assert "tuned on the val half" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the figures are shown
    assert len(list((tmp_path / "figures").glob("fig4_*.png"))) == 3  # val, test, imagenet_mini

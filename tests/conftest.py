"""Shared fixtures: the real Hydra config composed with tiny sizes, and the local data folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import asif_exp.config  # noqa: F401  (registers the schemas)

# Tests never reach a model or dataset hub, and W&B never uploads.
for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(variable, "1")
os.environ.setdefault("WANDB_MODE", "offline")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"
SHARED_DATA = Path(os.environ.get("ASIF_DATA_ROOT", PROJECT_ROOT.parent / "shared" / "data"))

# The embedded default at a size that encodes in seconds on a 2-core CPU.
TINY = [
    "anchors.num_samples=150",
    "benchmark.num_samples=60",
    "anchors.image_size=96",
    "benchmark.image_size=96",
    "encoder.vision.resize_size=96",
    "encoder.vision.crop_size=96",
    "asif.k=20",
    "asif.p=2",
    "progress=false",
]


def compose_config(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """The real config from conf/, as `python -m asif_exp <overrides>` would compose it."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


def require_shared_data(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"local data not found at {path} (set ASIF_DATA_ROOT to the shared data folder)"
        )
    return path


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory) -> Path:
    """One embedding cache for the whole session, so each tiny dataset is encoded once."""
    return tmp_path_factory.mktemp("cache")


# what `python -m asif_exp.explain` writes beside explain_q<i>.json/.png, with abstain and usage on
EXPLAIN_RUN_OUTPUTS = [
    "abstain.csv",
    "abstain.png",
    "anchor_usage.csv",
    "anchor_usage.png",
    "explain_results.json",
]


def assert_written(folder: Path, names: list[str]) -> None:
    """Each of `names` is a non-empty file in `folder`."""
    for name in names:
        assert (folder / name).stat().st_size > 0, name


def subprocess_env(**extra: str) -> dict:
    """The environment for a child Python: it imports this checkout's asif_exp (not whichever
    copy the virtual environment was installed from, e.g. another git worktree)."""
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def shapes_pairs_file(folder: Path, images: int = 20) -> Path:
    """A retrieval benchmark of drawn shapes, two captions per image, in a pairs file."""
    from asif_exp.data.synthetic import render, sample

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(images):
        item = sample(seed=0, index=2_000_000 + i)  # disjoint from the synthetic anchors
        render(item, 96).save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": item.caption})
        rows.append({"image": f"{i}.png", "caption": f"a {item.colour} {item.shape}"})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path

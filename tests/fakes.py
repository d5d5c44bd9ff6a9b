"""Tiny fake encoders (registered on import) and the config that uses them: the point of the
tests that use them is the plumbing, and they make every job take well under a second.

`python tests/fakes.py <overrides>` is `python -m asif_exp <overrides>` with these encoders
registered, for subprocess tests (real multiruns) that must not load a real model.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from PIL import Image

import asif_exp.explain  # noqa: F401  (registers the explain schema)
from asif_exp.encoders import register_image_model, register_text_model

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


class _PooledPixels(torch.nn.Module):
    """A 48-d "image encoder": the mean colour of a 4 x 4 grid of cells."""

    def forward(self, pixels):
        return torch.nn.functional.adaptive_avg_pool2d(pixels, 4).flatten(1)


class _NanPixels(torch.nn.Module):
    def forward(self, pixels):
        return torch.full((len(pixels), 8), float("nan"))


class _HashedWords:
    """A 32-d "text encoder": hashed bag of words."""

    max_seq_length = 128

    def encode(self, texts, batch_size=None, convert_to_tensor=True, show_progress_bar=False):
        out = torch.full((len(texts), 32), 1e-3)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                out[row, zlib.crc32(word.encode()) % 32] += 1
        return out


register_image_model("test_pooled_pixels")(lambda cfg, with_classifier=False: _PooledPixels())
register_image_model("test_nan_pixels")(lambda cfg, with_classifier=False: _NanPixels())
register_text_model("test_hashed_words")(lambda cfg, device: _HashedWords())

FAKE = [
    "encoder.vision.name=test_pooled_pixels",
    "encoder.vision.model_name=pool4",
    "encoder.vision.weights=none",
    "encoder.vision.resize_size=16",
    "encoder.vision.crop_size=16",
    "encoder.text.name=test_hashed_words",
    "encoder.text.model_name=words32",
    "anchors.num_samples=30",
    "benchmark.num_samples=12",
    "anchors.image_size=32",
    "benchmark.image_size=32",
    "asif.k=5",
    "asif.p=2",
    "progress=false",
]


def config(tmp_path: Path, *overrides: str, name: str = "config", output: str = "out"):
    """The real config with the fake encoders, everything under `tmp_path`."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            name,
            [
                *FAKE,
                f"paths.cache_dir={tmp_path / 'cache'}",
                f"paths.output_dir={tmp_path / output}",
                f"paths.data_root={tmp_path / 'data'}",
                *overrides,
            ],
        )


def write_pairs(folder: Path, count: int, bad: dict[int, bytes] | None = None) -> Path:
    """`count` tiny PNGs with captions in pairs.jsonl; `bad` replaces some files' bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        Image.new("RGB", (20, 20), (40 * (i % 6), 200 - 20 * (i % 9), 90)).save(folder / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "caption": f"shade {i} of a colour"}))
    for i, content in (bad or {}).items():
        (folder / f"{i}.png").write_bytes(content)
    (folder / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    return folder / "pairs.jsonl"


if __name__ == "__main__":
    import runpy

    runpy.run_module("asif_exp", run_name="__main__", alter_sys=True)

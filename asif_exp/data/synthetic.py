"""The embedded default: seeded, procedurally drawn shapes (asif_exp/synthetic.py)."""

from __future__ import annotations

from PIL import Image

from asif_exp.data.common import AnchorSet, sha_of
from asif_exp.data.registry import anchor_loader, benchmark_loader
from asif_exp.synthetic import SyntheticShapes


class SyntheticImages:
    def __init__(self, shapes: SyntheticShapes):
        self.shapes = shapes
        self.ids = shapes.ids
        self.fingerprint = {
            "source": "synthetic_shapes",
            "seed": shapes.seed,
            "image_size": shapes.image_size,
            "ids_sha": sha_of(self.ids),
        }

    def __len__(self) -> int:
        return len(self.shapes)

    def load(self, index: int) -> Image.Image:
        return self.shapes.load(index)


@anchor_loader("synthetic")
def synthetic_anchors(cfg, data_root: str) -> AnchorSet:
    shapes = SyntheticShapes(cfg.seed, cfg.start, cfg.num_samples, cfg.image_size, "shape")
    return AnchorSet(cfg.name, SyntheticImages(shapes), shapes.captions)


@benchmark_loader("synthetic")
def synthetic_benchmark(cfg, data_root: str, class_names):
    shapes = SyntheticShapes(
        cfg.seed, cfg.start, cfg.num_samples, cfg.image_size, cfg.label_attribute
    )
    return SyntheticImages(shapes), shapes.labels, class_names or shapes.class_names

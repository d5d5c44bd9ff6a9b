"""The embedded default dataset: seeded, procedurally drawn shapes with generated captions, and
its loaders (`anchors.loader=synthetic`, `benchmark.loader=synthetic`).

Sample i is a pure function of (seed, i), so anchors and benchmark take disjoint index ranges
of the same generator and never share an image. Nothing is read from disk or the network.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from asif_exp.data.common import AnchorSet, sha_of
from asif_exp.data.registry import anchor_loader, benchmark_loader

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
    "black": (15, 15, 15),
}
BACKGROUNDS = {"white": (250, 250, 250), "grey": (170, 170, 170), "beige": (235, 220, 190)}
SIZES = {"small": 0.22, "medium": 0.34, "large": 0.46}
POSITIONS = {
    "on the left": (0.33, 0.5),
    "on the right": (0.67, 0.5),
    "at the top": (0.5, 0.33),
    "at the bottom": (0.5, 0.67),
    "in the centre": (0.5, 0.5),
}
CAPTION_FORMS = (
    "a {size} {colour} {shape} {position} on a {background} background",
    "a picture of a {colour} {shape} {position}",
    "there is a {size} {shape} in {colour} {position}",
    "a {colour} {shape}",
    "a drawing of a {size} {colour} {shape}",
    "{background} background with a {colour} {shape} {position}",
)


@dataclass(frozen=True)
class ShapeSample:
    shape: str
    colour: str
    background: str
    size: str
    position: str
    rotation: float
    caption: str


def sample(seed: int, index: int) -> ShapeSample:
    rng = random.Random(f"asif-shapes-{seed}-{index}")
    attributes = dict(
        shape=rng.choice(SHAPES),
        colour=rng.choice(list(COLOURS)),
        background=rng.choice(list(BACKGROUNDS)),
        size=rng.choice(list(SIZES)),
        position=rng.choice(list(POSITIONS)),
    )
    caption = rng.choice(CAPTION_FORMS).format(**attributes)
    return ShapeSample(rotation=rng.uniform(-25, 25), caption=caption, **attributes)


def _polygon(shape: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple]:
    if shape == "square":
        corners = [(r, r), (-r, r), (-r, -r), (r, -r)]
        points = [(x * 0.8, y * 0.8) for x, y in corners]
    elif shape == "triangle":
        points = [
            (r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    elif shape == "star":
        points = [
            (
                (r if i % 2 == 0 else 0.42 * r) * math.cos(-math.pi / 2 + i * math.pi / 5),
                (r if i % 2 == 0 else 0.42 * r) * math.sin(-math.pi / 2 + i * math.pi / 5),
            )
            for i in range(10)
        ]
    elif shape == "cross":
        a, b = r, 0.33 * r
        points = [
            (b, a),
            (-b, a),
            (-b, b),
            (-a, b),
            (-a, -b),
            (-b, -b),
            (-b, -a),
            (b, -a),
            (b, -b),
            (a, -b),
            (a, b),
            (b, b),
        ]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    theta = math.radians(rotation)
    return [
        (
            cx + x * math.cos(theta) - y * math.sin(theta),
            cy + x * math.sin(theta) + y * math.cos(theta),
        )
        for x, y in points
    ]


def render(item: ShapeSample, image_size: int = 224) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[item.background])
    draw = ImageDraw.Draw(image)
    fx, fy = POSITIONS[item.position]
    cx, cy, r = fx * image_size, fy * image_size, SIZES[item.size] * image_size / 2
    colour = COLOURS[item.colour]
    if item.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon(_polygon(item.shape, cx, cy, r, item.rotation), fill=colour)
    return image


class SyntheticShapes:
    """Indices [start, start + count) of the seeded generator, as images plus captions/labels."""

    def __init__(self, seed: int, start: int, count: int, image_size: int, label_attribute: str):
        if label_attribute not in ("shape", "colour"):
            raise ValueError(f"label_attribute={label_attribute!r}: expected 'shape' or 'colour'")
        self.seed, self.image_size = seed, image_size
        self.samples = [sample(seed, i) for i in range(start, start + count)]
        self.ids = [f"shapes-{seed}-{i}" for i in range(start, start + count)]
        self.class_names = list(SHAPES if label_attribute == "shape" else COLOURS)
        self.labels = [self.class_names.index(getattr(s, label_attribute)) for s in self.samples]
        self.captions = [s.caption for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        return render(self.samples[index], self.image_size)


# ----------------------------------------------------------------------------- loaders


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

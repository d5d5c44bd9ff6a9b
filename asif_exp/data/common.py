"""What every loader shares: the error type, content hashes, images on disk, subsets, and the
two things loaders produce, an AnchorSet (image-caption pairs) and a Benchmark (labelled images,
class names, templates).

Every image source exposes `ids` (stable, unique, in order), `load(i) -> PIL.Image` and a
`fingerprint` dict: what identifies its content for the embedding cache.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import os
import random
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from asif_exp.config import REPEATED_PAIRS_POLICIES
from asif_exp.data.file_hashes import content_hashes
from asif_exp.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def sha_of(items) -> str:
    return hashlib.sha256("\n".join(map(str, items)).encode()).hexdigest()


class MissingImage(RuntimeError):
    """A listed pair without an image (failed download, no image in its shard).

    Loading it raises this, so the encoder reports the pair as a skipped image (with this
    message) instead of the pair silently disappearing.
    """


# ----------------------------------------------------------------------------- image sources


# Pixel modes whose values are 16-bit (PIL reads a 16-bit greyscale PNG as "I;16"; "I" is
# 32-bit storage, as older Pillows read those files): scaled to 8 bits, not clipped (PIL's own
# conversion clips them, turning a 16-bit image white).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Modes refused by name: their pixel values have no standard range.
REFUSED_MODES = {"F": "32-bit floating-point pixels have no standard range"}


def to_rgb(image: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB: every PIL mode converted with its own range, or refused
    (a ValueError naming the mode, reported as an unreadable image)."""
    if image.mode in REFUSED_MODES:
        raise ValueError(
            f"image mode {image.mode!r}: {REFUSED_MODES[image.mode]}; save it as 8 or 16 bits"
        )
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(image).astype(np.int64)
        if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise ValueError(
                f"image mode {image.mode!r} with values outside 0..65535: bit depth unknown"
            )
        # round(v * 255 / 65535), in integers
        image = Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8), "L")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(
            f"image mode {image.mode!r} cannot be converted to RGB ({error})"
        ) from None


# Characters that draw nothing but are neither whitespace nor format characters (Hangul fillers,
# the blank braille pattern): a caption made only of these is empty.
BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Cn", "Zs", "Zl", "Zp"})


def is_blank(text: str) -> bool:
    """True for a text that shows nothing: empty, whitespace, zero-width or control characters
    (U+200B, U+200D, U+FEFF, ...) and blank letters only."""
    return all(
        c.isspace() or c in BLANK_LETTERS or unicodedata.category(c) in INVISIBLE_CATEGORIES
        for c in text
    )


class ImageFiles:
    """Images on disk; ids are paths relative to `root`."""

    def __init__(self, root: Path, relative_paths: list[str]):
        self.root = root
        self.ids = list(relative_paths)
        folder = str(root)
        for rel in self.ids:
            if not os.path.isfile(os.path.join(folder, rel)):
                raise DataError(f"image file not found: {root / rel}")

    @functools.cached_property
    def fingerprint(self) -> dict:
        """Content, not location: the same files under another folder (or machine) share the
        cache. The names of the files and the sha256 of every file's bytes (remembered per file
        status in the hash index: only new or changed files are read, see `file_hashes`)."""
        distinct = list(dict.fromkeys(self.ids))
        root = os.path.abspath(self.root)
        paths = [os.path.normpath(os.path.join(root, rel)) for rel in distinct]
        hashes = dict(zip(distinct, content_hashes(paths), strict=True))
        return {
            "source": "files",
            "ids_sha": sha_of(self.ids),
            "content_sha": sha_of(hashes[rel] for rel in self.ids),
        }

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> Image.Image:
        with Image.open(self.root / self.ids[index]) as image:
            return to_rgb(image)


class Subset:
    """A subset of another source, in the given order."""

    def __init__(self, source, indices: list[int]):
        if isinstance(source, Subset):  # flatten, so the fingerprint names the original images
            indices, source = [source.indices[i] for i in indices], source.source
        self.source, self.indices = source, list(indices)
        self.ids = [source.ids[i] for i in self.indices]

    @functools.cached_property
    def fingerprint(self) -> dict:
        return {**self.source.fingerprint, "subset_sha": sha_of(self.indices)}

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> Image.Image:
        return self.source.load(self.indices[index])


# ----------------------------------------------------------------------------- sets


@dataclass
class AnchorSet:
    name: str
    images: object  # an image source; images[i] pairs with captions[i]
    captions: list[str]
    repeats: dict | None = None  # what apply_repeated_pairs_policy found and did

    def __post_init__(self) -> None:
        if len(self.images) != len(self.captions):
            raise DataError(
                f"anchors {self.name}: {len(self.images)} images but {len(self.captions)} captions"
            )
        if len(self.captions) == 0:
            raise DataError(f"anchors {self.name}: no image-caption pairs")
        for i, caption in enumerate(self.captions):
            if not isinstance(caption, str) or is_blank(caption):
                raise DataError(
                    f"anchors {self.name}: caption of pair {i} ({self.images.ids[i]}) is empty"
                )

    def repeated_pairs(self) -> list[tuple[int, int]]:
        """(first, repeat) positions of every pair whose image and caption both occurred before.

        One image with several captions is legitimate (COCO has 5); the same pair twice is a
        repeat (Flickr8k has 8).
        """
        first: dict[tuple[str, str], int] = {}
        repeats = []
        for i, pair in enumerate(zip(self.images.ids, self.captions, strict=True)):
            if pair in first:
                repeats.append((first[pair], i))
            else:
                first[pair] = i
        return repeats


def apply_repeated_pairs_policy(anchors: AnchorSet, policy: str) -> tuple[AnchorSet, dict]:
    """Keep, drop (all but the first occurrence) or refuse repeated pairs; report what was found.

    The report (policy, count, first examples) goes to the log and to results.json.
    """
    if policy not in REPEATED_PAIRS_POLICIES:
        raise DataError(
            f"anchors.repeated_pairs={policy!r}: expected one of {REPEATED_PAIRS_POLICIES}"
        )
    repeats = anchors.repeated_pairs()
    examples = [
        {"first": a, "repeat": b, "image": anchors.images.ids[b], "caption": anchors.captions[b]}
        for a, b in repeats[:5]
    ]
    report = {"policy": policy, "count": len(repeats), "examples": examples}
    if repeats and policy == "error":
        a, b = repeats[0]
        raise DataError(
            f"anchors {anchors.name}: {len(repeats)} repeated pairs, the first: pairs {a} and {b} "
            f"are the same (image {anchors.images.ids[b]!r}, caption {anchors.captions[b]!r}); "
            "set anchors.repeated_pairs=keep or drop"
        )
    if repeats and policy == "drop":
        dropped = {b for _, b in repeats}
        kept = [i for i in range(len(anchors.captions)) if i not in dropped]
        anchors = AnchorSet(
            anchors.name, Subset(anchors.images, kept), [anchors.captions[i] for i in kept]
        )
    return anchors, report


@dataclass
class Benchmark:
    name: str
    images: object
    labels: list[int]
    class_names: list[str]
    templates: list[str]

    def __post_init__(self) -> None:
        if not self.class_names:
            raise DataError(f"benchmark {self.name}: the class list is empty")
        if len(self.images) == 0:
            raise DataError(f"benchmark {self.name}: no images")
        if len(self.labels) != len(self.images):
            raise DataError(
                f"benchmark {self.name}: {len(self.images)} images but {len(self.labels)} labels"
            )
        seen: set[str] = set()
        for i, image_id in enumerate(self.images.ids):
            if image_id in seen:
                raise DataError(f"benchmark {self.name}: image id {image_id!r} repeats (at {i})")
            seen.add(image_id)
        bad = [y for y in self.labels if not 0 <= y < len(self.class_names)]
        if bad:
            raise DataError(
                f"benchmark {self.name}: labels {sorted(set(bad))[:5]} outside "
                f"0..{len(self.class_names) - 1}"
            )

    def prompts(self) -> tuple[list[str], list[int]]:
        """Class-major prompts (class c, template t at c * T + t) and each prompt's class."""
        texts = [t.format(name) for name in self.class_names for t in self.templates]
        classes = [c for c in range(len(self.class_names)) for _ in self.templates]
        return texts, classes


@dataclass
class CaptionedBenchmark:
    """A retrieval benchmark: images, each with its captions (Flickr8k test: 1,000 x 5).

    Images are the distinct images of the pairs in order of first appearance; captions are every
    pair's caption in pair order; `caption_image[j]` is the index of caption j's image.
    """

    name: str
    images: object  # an image source, one entry per distinct image
    captions: list[str]
    caption_image: list[int]
    repeated_pairs: int = 0  # pairs listed twice (kept: each is a caption to retrieve)


def captioned_benchmark(pairs: AnchorSet) -> CaptionedBenchmark:
    """Any image-caption pairs as a retrieval benchmark, grouping the pairs by image id."""
    position: dict[str, int] = {}
    first: list[int] = []  # the first pair of each distinct image
    caption_image = []
    for i, image_id in enumerate(pairs.images.ids):
        if image_id not in position:
            position[image_id] = len(first)
            first.append(i)
        caption_image.append(position[image_id])
    images = pairs.images if len(first) == len(pairs.captions) else Subset(pairs.images, first)
    return CaptionedBenchmark(
        pairs.name, images, list(pairs.captions), caption_image, len(pairs.repeated_pairs())
    )


def resolve_path(path: str | None, data_root: str, what: str) -> Path:
    if not path:
        raise DataError(f"{what}: no path configured")
    resolved = Path(path.format(data_root=data_root)).expanduser()
    if not resolved.is_absolute():
        resolved = Path(data_root) / resolved
    if not resolved.exists():
        raise DataError(
            f"{what}: {resolved} does not exist (data_root={data_root}; set paths.data_root "
            f"or the ASIF_DATA_ROOT environment variable)"
        )
    return resolved


def balanced_subset(labels: list[int], size: int, seed: int) -> list[int]:
    """`size` indices spread evenly over classes (seeded), in ascending order."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[label].append(index)
    rng = random.Random(seed)
    for members in by_class.values():
        rng.shuffle(members)
    chosen, round_index = [], 0
    while len(chosen) < min(size, len(labels)):
        for label in sorted(by_class):
            if round_index < len(by_class[label]) and len(chosen) < size:
                chosen.append(by_class[label][round_index])
        round_index += 1
    return sorted(chosen)


def authors_split_indices(size: int, split: str, seed: int = 42) -> list[int]:
    """The ASIF authors' split: `torch.randperm(size)` from a generator seeded with `seed`;
    "val" is its first half (where k and p are tuned) and "test" the rest. Sorted indices."""
    import torch

    if split not in ("val", "test"):
        raise DataError(f"benchmark.authors_split={split!r}: expected null, val or test")
    permutation = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    half = size // 2
    return sorted(permutation[:half] if split == "val" else permutation[half:])


def apply_authors_split(images, labels: list[int], split: str, seed: int):
    indices = authors_split_indices(len(labels), split, seed)
    if isinstance(images, Subset):
        # Index the original source, so the cache fingerprint names both selections.
        images = Subset(images.source, [images.indices[i] for i in indices])
    else:
        images = Subset(images, indices)
    return images, [labels[i] for i in indices]


def readable_in_prefixes(ns: list[int], kept: list[int]) -> list[int]:
    """How many readable pairs each anchor prefix holds.

    `asif.n` counts listed pairs, as `anchors.limit` does: n = 400 is the first 400 pairs of
    the dataset, whatever failed to download among them, so a grid's n does not depend on
    which downloads failed. `kept` lists the positions of the readable pairs, ascending.
    """
    return [bisect.bisect_left(kept, n) for n in ns]

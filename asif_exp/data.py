"""Anchor sets (image-caption pairs) and benchmarks (labelled images, class names, templates).

Every image source exposes `ids` (stable, unique, in order), `load(i) -> PIL.Image` and a
`fingerprint` dict: what identifies its content for the embedding cache.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from asif_exp.prompts import load_class_names, load_templates
from asif_exp.synthetic import SyntheticShapes

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def sha_of(items) -> str:
    return hashlib.sha256("\n".join(map(str, items)).encode()).hexdigest()


class DataError(ValueError):
    """Missing or malformed data, with where it was looked for."""


# ----------------------------------------------------------------------------- image sources


class ImageFiles:
    """Images on disk; ids are paths relative to `root`."""

    def __init__(self, root: Path, relative_paths: list[str]):
        self.root = root
        self.ids = list(relative_paths)
        sizes = []
        for rel in self.ids:
            path = root / rel
            if not path.is_file():
                raise DataError(f"image file not found: {path}")
            sizes.append(path.stat().st_size)
        self.fingerprint = {
            "source": "files",
            "root": str(root.resolve()),
            "ids_sha": sha_of(self.ids),
            "sizes_sha": sha_of(sizes),
        }

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> Image.Image:
        with Image.open(self.root / self.ids[index]) as image:
            return image.convert("RGB")


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


class HFImages:
    """An image column of a Hugging Face `datasets.Dataset`."""

    def __init__(self, dataset, column: str, description: str):
        if column not in dataset.column_names:
            raise DataError(f"{description}: no column {column!r}; columns: {dataset.column_names}")
        self.dataset, self.column = dataset, column
        self.ids = [f"{i}" for i in range(len(dataset))]
        self.fingerprint = {
            "source": "hf",
            "description": description,
            "hf_fingerprint": getattr(dataset, "_fingerprint", None),
            "ids_sha": sha_of(self.ids),
        }

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> Image.Image:
        image = self.dataset[index][self.column]
        if isinstance(image, (str, Path)):
            with Image.open(image) as opened:
                return opened.convert("RGB")
        return image.convert("RGB")


class Subset:
    """A subset of another source, in the given order."""

    def __init__(self, source, indices: list[int]):
        self.source, self.indices = source, list(indices)
        self.ids = [source.ids[i] for i in self.indices]
        self.fingerprint = {**source.fingerprint, "subset_sha": sha_of(self.indices)}

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

    def __post_init__(self) -> None:
        if len(self.images) != len(self.captions):
            raise DataError(
                f"anchors {self.name}: {len(self.images)} images but {len(self.captions)} captions"
            )
        if len(self.captions) == 0:
            raise DataError(f"anchors {self.name}: no image-caption pairs")
        for i, caption in enumerate(self.captions):
            if not isinstance(caption, str) or not caption.strip():
                raise DataError(
                    f"anchors {self.name}: caption of pair {i} ({self.images.ids[i]}) is empty"
                )
        # One image with several captions is legitimate (COCO has 5); the same pair twice is not.
        first: dict[tuple[str, str], int] = {}
        for i, pair in enumerate(zip(self.images.ids, self.captions, strict=True)):
            if pair in first:
                raise DataError(
                    f"anchors {self.name}: pairs {first[pair]} and {i} are the same "
                    f"(image {pair[0]!r}, caption {pair[1]!r}); remove the duplicate"
                )
            first[pair] = i


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


def _resolve(path: str | None, data_root: str, what: str) -> Path:
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


def _read_pairs_file(path: Path, cfg) -> list[dict]:
    rows = []
    try:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as handle:
                for line_number, line in enumerate(handle, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as error:
                            raise DataError(f"{path}, line {line_number}: {error}") from None
        else:
            with path.open(encoding="utf-8", newline="") as handle:
                rows = list(csv.DictReader(handle))
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 ({error})") from None
    for i, row in enumerate(rows):
        for column in (cfg.image_column, cfg.caption_column):
            if column not in row:
                raise DataError(f"{path}, record {i + 1}: no {column!r} field")
        caption = row[cfg.caption_column]
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(
                f"{path}, record {i + 1}: caption of pair {i} ({row[cfg.image_column]}) is empty "
                f"or not text: {caption!r}"
            )
    return rows


def load_anchors(cfg, data_root: str) -> AnchorSet:
    if cfg.loader == "synthetic":
        shapes = SyntheticShapes(cfg.seed, cfg.start, cfg.num_samples, cfg.image_size, "shape")
        anchors = AnchorSet(cfg.name, SyntheticImages(shapes), shapes.captions)
    elif cfg.loader in ("jsonl", "csv"):
        path = _resolve(cfg.path, data_root, f"anchors {cfg.name}")
        rows = _read_pairs_file(path, cfg)
        if cfg.limit is not None:
            rows = rows[: cfg.limit]
        image_root = _resolve(cfg.image_root, data_root, f"anchors {cfg.name} images") if cfg.image_root else path.parent
        images = ImageFiles(image_root, [str(r[cfg.image_column]) for r in rows])
        anchors = AnchorSet(cfg.name, images, [str(r[cfg.caption_column]) for r in rows])
    elif cfg.loader == "hf":
        dataset = _load_hf(cfg.path, cfg.hf_config, cfg.split, data_root, f"anchors {cfg.name}")
        if cfg.limit is not None:
            dataset = dataset.select(range(min(cfg.limit, len(dataset))))
        images = HFImages(dataset, cfg.image_column, f"{cfg.path}:{cfg.split}")
        if cfg.caption_column not in dataset.column_names:
            raise DataError(f"anchors {cfg.name}: no column {cfg.caption_column!r}")
        anchors = AnchorSet(cfg.name, images, [str(c) for c in dataset[cfg.caption_column]])
    else:
        raise DataError(f"anchors.loader={cfg.loader!r}: expected synthetic, jsonl, csv or hf")
    return anchors


def _load_hf(path: str | None, config: str | None, split: str, data_root: str, what: str):
    import datasets

    if not path:
        raise DataError(f"{what}: set the HF dataset name or local directory in `path`/`root`")
    local = Path(path.format(data_root=data_root)).expanduser()
    if local.exists():
        if local.is_dir() and (local / "dataset_info.json").exists():
            return datasets.load_from_disk(str(local))
        return datasets.load_dataset(str(local), config, split=split)
    if local.is_absolute() or path.startswith((".", "~", "{data_root}")):
        raise DataError(f"{what}: {local} does not exist")
    try:  # a hub name: needs a network (or a warm HF cache)
        return datasets.load_dataset(path, config, split=split)
    except Exception as error:
        raise DataError(f"{what}: could not load Hugging Face dataset {path!r}: {error}") from error


def _balanced_subset(labels: list[int], size: int, seed: int) -> list[int]:
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


def load_benchmark(cfg, data_root: str) -> Benchmark:
    what = f"benchmark {cfg.name}"
    class_names = load_class_names(cfg.class_names) if cfg.class_names else None
    if cfg.loader == "synthetic":
        shapes = SyntheticShapes(cfg.seed, cfg.start, cfg.num_samples, cfg.image_size, cfg.label_attribute)
        images, labels, class_names = SyntheticImages(shapes), shapes.labels, class_names or shapes.class_names
    elif cfg.loader == "image_folder":
        root = _resolve(cfg.root, data_root, what)
        folders = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not folders:
            raise DataError(f"{what}: no class sub-folders in {root}")
        if class_names is None:
            class_names = [f.replace("_", " ") for f in folders]
            folder_label = {f: i for i, f in enumerate(folders)}
        else:
            normalised = {name.lower().replace("_", " "): i for i, name in enumerate(class_names)}
            unknown = [f for f in folders if f.lower().replace("_", " ") not in normalised]
            if unknown:
                raise DataError(f"{what}: folders {unknown[:5]} in {root} match no class of {cfg.class_names}")
            folder_label = {f: normalised[f.lower().replace("_", " ")] for f in folders}
        paths, labels = [], []
        for folder in folders:
            for file in sorted((root / folder).iterdir()):
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    paths.append(f"{folder}/{file.name}")
                    labels.append(folder_label[folder])
        images = ImageFiles(root, paths)
    elif cfg.loader == "labels_csv":
        root = _resolve(cfg.root, data_root, what)
        labels_file = _resolve(cfg.labels_file, str(root), f"{what} labels")
        with labels_file.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        if rows and ("file" not in rows[0] or "label" not in rows[0]):
            raise DataError(f"{labels_file}: expected columns 'file' and 'label'")
        images, labels = ImageFiles(root, [r["file"] for r in rows]), [int(r["label"]) for r in rows]
    elif cfg.loader == "hf":
        dataset = _load_hf(cfg.root, cfg.hf_config, cfg.split, data_root, what)
        images = HFImages(dataset, cfg.image_column, f"{cfg.root}:{cfg.split}")
        labels = [int(y) for y in dataset[cfg.label_column]]
        if class_names is None:
            feature = dataset.features.get(cfg.label_column)
            class_names = list(getattr(feature, "names", None) or [])
    elif cfg.loader == "torchvision":
        images, labels, class_names = _torchvision_benchmark(cfg, data_root, class_names)
    else:
        raise DataError(
            f"benchmark.loader={cfg.loader!r}: expected synthetic, image_folder, labels_csv, hf or torchvision"
        )
    if cfg.subset is not None and cfg.subset < len(labels):
        indices = _balanced_subset(labels, cfg.subset, cfg.subset_seed)
        images, labels = Subset(images, indices), [labels[i] for i in indices]
    return Benchmark(cfg.name, images, list(labels), list(class_names or []), load_templates(cfg.templates))


class _TorchvisionImages:
    def __init__(self, dataset, description: str):
        self.dataset = dataset
        self.ids = [f"{i}" for i in range(len(dataset))]
        self.fingerprint = {"source": "torchvision", "description": description, "ids_sha": sha_of(self.ids)}

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> Image.Image:
        return self.dataset[index][0].convert("RGB")


def _torchvision_benchmark(cfg, data_root: str, class_names):
    import inspect

    import torchvision.datasets as tvd

    if not cfg.torchvision_class or not hasattr(tvd, cfg.torchvision_class):
        raise DataError(f"benchmark {cfg.name}: unknown torchvision_class {cfg.torchvision_class!r}")
    klass = getattr(tvd, cfg.torchvision_class)
    root = Path((cfg.root or "{data_root}").format(data_root=data_root))
    parameters = inspect.signature(klass).parameters
    kwargs = {"train": cfg.split == "train"} if "train" in parameters else {"split": cfg.split}
    try:
        dataset = klass(str(root), download=False, **kwargs)
    except RuntimeError as error:
        raise DataError(f"benchmark {cfg.name}: {cfg.torchvision_class} not found under {root}: {error}") from None
    targets = getattr(dataset, "targets", None) or getattr(dataset, "_labels", None)
    if targets is None:
        targets = [dataset[i][1] for i in range(len(dataset))]
    names = class_names or list(getattr(dataset, "classes", []))
    return _TorchvisionImages(dataset, f"{cfg.torchvision_class}:{cfg.split}:{root}"), [int(t) for t in targets], names

"""Anchor sets (image-caption pairs) and benchmarks (labelled images, class names, templates).

Every image source exposes `ids` (stable, unique, in order), `load(i) -> PIL.Image` and a
`fingerprint` dict: what identifies its content for the embedding cache.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
import os
import random
import re
import tarfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from asif_exp.prompts import load_class_names, load_templates
from asif_exp.synthetic import SyntheticShapes

log = logging.getLogger(__name__)
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
        # Content, not location: the same files under another folder (or machine) share the
        # cache. Names and sizes of every file, and the bytes of a spread-out sample of them.
        self.fingerprint = {
            "source": "files",
            "ids_sha": sha_of(self.ids),
            "sizes_sha": sha_of(sizes),
            "sample_sha": _sample_sha(root, self.ids),
        }

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> Image.Image:
        with Image.open(self.root / self.ids[index]) as image:
            return image.convert("RGB")


def _sample_sha(root: Path, ids: list[str], samples: int = 32) -> str:
    """sha256 of the bytes of up to `samples` distinct files spread evenly over `ids`."""
    distinct = list(dict.fromkeys(ids))
    step = max(1, len(distinct) // samples)
    digest = hashlib.sha256()
    for rel in distinct[::step][:samples]:
        digest.update(rel.encode() + b"\0" + (root / rel).read_bytes())
    return digest.hexdigest()


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
        if isinstance(source, Subset):  # flatten, so the fingerprint names the original images
            indices, source = [source.indices[i] for i in indices], source.source
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
    repeats: dict | None = None  # what apply_repeated_pairs_policy found and did

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


REPEATED_PAIRS_POLICIES = ("keep", "drop", "error")


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


def _select_splits(rows: list[dict], splits: list[str], column: str, path: Path) -> list[dict]:
    """The rows whose `column` is one of `splits`, in file order."""
    found = set()
    for i, row in enumerate(rows):
        if column not in row:
            raise DataError(
                f"{path}, record {i + 1}: no {column!r} field (anchors.splits={splits} needs it)"
            )
        found.add(row[column])
    unknown = sorted(set(splits) - found)
    if unknown:
        raise DataError(f"{path}: anchors.splits {unknown} not found; the file has {sorted(found)}")
    return [row for row in rows if row[column] in splits]


def load_anchors(cfg, data_root: str) -> AnchorSet:
    if cfg.loader == "synthetic":
        shapes = SyntheticShapes(cfg.seed, cfg.start, cfg.num_samples, cfg.image_size, "shape")
        anchors = AnchorSet(cfg.name, SyntheticImages(shapes), shapes.captions)
    elif cfg.loader in ("jsonl", "csv"):
        path = _resolve(cfg.path, data_root, f"anchors {cfg.name}")
        rows = _read_pairs_file(path, cfg)
        if cfg.splits is not None:
            rows = _select_splits(rows, list(cfg.splits), cfg.split_column, path)
        if cfg.limit is not None:
            rows = rows[: cfg.limit]
        image_root = (
            _resolve(cfg.image_root, data_root, f"anchors {cfg.name} images")
            if cfg.image_root
            else path.parent
        )
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
    elif cfg.loader == "webdataset":
        anchors = _webdataset_anchors(cfg, data_root)
    elif cfg.loader == "parquet":
        anchors = _parquet_anchors(cfg, data_root)
    elif cfg.loader == "hf_files":
        anchors = _hf_files_anchors(cfg, data_root)
    else:
        raise DataError(
            f"anchors.loader={cfg.loader!r}: expected synthetic, jsonl, csv, hf, hf_files, "
            "webdataset or parquet"
        )
    anchors, report = apply_repeated_pairs_policy(anchors, cfg.repeated_pairs)
    anchors.repeats = report
    if report["count"]:
        first = report["examples"][0]
        log.warning(
            "anchors %s: %d repeated image-caption pairs (%s; first: pair %d repeats pair %d, "
            "image %r)",
            anchors.name,
            report["count"],
            report["policy"],
            first["repeat"],
            first["first"],
            first["image"],
        )
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
        shapes = SyntheticShapes(
            cfg.seed, cfg.start, cfg.num_samples, cfg.image_size, cfg.label_attribute
        )
        images, labels, class_names = (
            SyntheticImages(shapes),
            shapes.labels,
            class_names or shapes.class_names,
        )
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
                raise DataError(
                    f"{what}: folders {unknown[:5]} in {root} match no class of {cfg.class_names}"
                )
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
        images, labels = (
            ImageFiles(root, [r["file"] for r in rows]),
            [int(r["label"]) for r in rows],
        )
    elif cfg.loader == "hf":
        dataset = _load_hf(cfg.root, cfg.hf_config, cfg.split, data_root, what)
        images = HFImages(dataset, cfg.image_column, f"{cfg.root}:{cfg.split}")
        labels = [int(y) for y in dataset[cfg.label_column]]
        if class_names is None:
            feature = dataset.features.get(cfg.label_column)
            class_names = list(getattr(feature, "names", None) or [])
    elif cfg.loader == "torchvision":
        images, labels, class_names = _torchvision_benchmark(cfg, data_root, class_names)
    elif cfg.loader == "class_index_folder":
        images, labels = _class_index_folder(cfg, data_root, class_names)
    else:
        raise DataError(
            f"benchmark.loader={cfg.loader!r}: expected synthetic, image_folder, labels_csv, hf, "
            "torchvision or class_index_folder"
        )
    if cfg.subset is not None and cfg.subset < len(labels):
        indices = _balanced_subset(labels, cfg.subset, cfg.subset_seed)
        images, labels = Subset(images, indices), [labels[i] for i in indices]
    if cfg.get("authors_split"):
        split, seed = cfg.authors_split, cfg.authors_split_seed
        images, labels = _apply_authors_split(images, labels, split, seed)
    return Benchmark(
        cfg.name, images, list(labels), list(class_names or []), load_templates(cfg.templates)
    )


class _TorchvisionImages:
    def __init__(self, dataset, description: str):
        self.dataset = dataset
        self.ids = [f"{i}" for i in range(len(dataset))]
        self.fingerprint = {
            "source": "torchvision",
            "description": description,
            "ids_sha": sha_of(self.ids),
        }

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> Image.Image:
        return self.dataset[index][0].convert("RGB")


def _torchvision_benchmark(cfg, data_root: str, class_names):
    import inspect

    import torchvision.datasets as tvd

    if not cfg.torchvision_class or not hasattr(tvd, cfg.torchvision_class):
        raise DataError(
            f"benchmark {cfg.name}: unknown torchvision_class {cfg.torchvision_class!r}"
        )
    klass = getattr(tvd, cfg.torchvision_class)
    root = Path((cfg.root or "{data_root}").format(data_root=data_root))
    parameters = inspect.signature(klass).parameters
    kwargs = {"train": cfg.split == "train"} if "train" in parameters else {"split": cfg.split}
    try:
        dataset = klass(str(root), download=False, **kwargs)
    except RuntimeError as error:
        raise DataError(
            f"benchmark {cfg.name}: {cfg.torchvision_class} not found under {root}: {error}"
        ) from None
    targets = getattr(dataset, "targets", None) or getattr(dataset, "_labels", None)
    if targets is None:
        targets = [dataset[i][1] for i in range(len(dataset))]
    names = class_names or list(getattr(dataset, "classes", []))
    return (
        _TorchvisionImages(dataset, f"{cfg.torchvision_class}:{cfg.split}:{root}"),
        [int(t) for t in targets],
        names,
    )


# ----------------------------------------------------------------------------- ImageNet folders


def _class_index_folder(cfg, data_root: str, class_names: list[str] | None):
    """Class folders whose names are not class names: ImageNet's wnids or ImageNet-v2's indices."""
    what = f"benchmark {cfg.name}"
    if not class_names:
        raise DataError(f"{what}: loader class_index_folder needs class_names (e.g. imagenet1k)")
    root = _resolve(cfg.root, data_root, what)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if cfg.folder_labels == "sorted":
        # The i-th wnid in sorted order is class i only when every class has its folder.
        if len(folders) != len(class_names):
            raise DataError(
                f"{what}: {len(folders)} class folders in {root}, but {cfg.class_names} has "
                f"{len(class_names)} classes; folder_labels=sorted needs one folder per class"
            )
        folder_label = {folder: i for i, folder in enumerate(folders)}
    elif cfg.folder_labels == "int":
        bad = [f for f in folders if not f.isdigit() or int(f) >= len(class_names)]
        if bad:
            raise DataError(
                f"{what}: folders {bad[:5]} in {root} are not class indices "
                f"0..{len(class_names) - 1}"
            )
        folder_label = {folder: int(folder) for folder in folders}
    else:
        raise DataError(f"{what}: folder_labels={cfg.folder_labels!r}: expected sorted or int")
    paths, labels = [], []
    for folder in sorted(folders, key=folder_label.__getitem__):
        for file in sorted((root / folder).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(f"{folder}/{file.name}")
                labels.append(folder_label[folder])
    if not paths:
        raise DataError(f"{what}: no images in the class folders of {root}")
    return ImageFiles(root, paths), labels


def authors_split_indices(size: int, split: str, seed: int = 42) -> list[int]:
    """The ASIF authors' split: `torch.randperm(size)` from a generator seeded with `seed`;
    "val" is its first half (where k and p are tuned) and "test" the rest. Sorted indices."""
    import torch

    if split not in ("val", "test"):
        raise DataError(f"benchmark.authors_split={split!r}: expected null, val or test")
    permutation = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    half = size // 2
    return sorted(permutation[:half] if split == "val" else permutation[half:])


def _apply_authors_split(images, labels: list[int], split: str, seed: int):
    indices = authors_split_indices(len(labels), split, seed)
    if isinstance(images, Subset):
        # Index the original source, so the cache fingerprint names both selections.
        images = Subset(images.source, [images.indices[i] for i in indices])
    else:
        images = Subset(images, indices)
    return images, [labels[i] for i in indices]


# ----------------------------------------------------------------------------- sharded anchors


class MissingImage(RuntimeError):
    """A listed pair without an image (failed download, no image in its shard).

    Loading it raises this, so the encoder reports the pair as a skipped image (with this
    message) instead of the pair silently disappearing.
    """


def _expand_braces(pattern: str) -> list[str]:
    """webdataset-style ranges: `cc12m/{00000..00159}.tar`, zero-padded as written."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    first, last = match.group(1), match.group(2)
    expanded = []
    for number in range(int(first), int(last) + 1):
        filled = f"{pattern[: match.start()]}{number:0{len(first)}d}{pattern[match.end() :]}"
        expanded.extend(_expand_braces(filled))
    return expanded


def shard_files(path: str | None, data_root: str, suffix: str, what: str) -> list[Path]:
    """Shard files in order: a folder (its `*suffix` files, sorted), a glob or a brace range."""
    if not path:
        raise DataError(f"{what}: no path configured")
    pattern = str(Path(path.replace("{data_root}", data_root)).expanduser())
    if not Path(pattern).is_absolute():
        pattern = str(Path(data_root) / pattern)
    if re.search(r"\{\d+\.\.\d+\}", pattern):
        files = [Path(p) for p in _expand_braces(pattern)]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise DataError(f"{what}: {len(absent)} shard files missing, e.g. {absent[:3]}")
    elif any(ch in pattern for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(pattern))
    elif Path(pattern).is_dir():
        files = sorted(p for p in Path(pattern).iterdir() if p.name.endswith(suffix))
    else:
        files = [Path(pattern)] if Path(pattern).is_file() else []
    if not files:
        raise DataError(
            f"{what}: no {suffix} files at {pattern} (data_root={data_root}; set paths.data_root "
            "or the ASIF_DATA_ROOT environment variable)"
        )
    return files


def _split_member_name(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def scan_tar(path: Path, caption_extension: str | None, what: str) -> dict[str, dict]:
    """Samples of one uncompressed tar, in member order: key -> {extension: (offset, size)},
    plus the decoded caption under "__caption__" when `caption_extension` is given."""
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as tar:  # uncompressed, so members can be read by offset
            for member in tar:
                if not member.isfile():
                    continue
                key, extension = _split_member_name(member.name)
                entry = samples.setdefault(key, {})
                entry[extension] = (member.offset_data, member.size)
                if extension == caption_extension:
                    raw = tar.extractfile(member).read()
                    try:
                        entry["__caption__"] = raw.decode("utf-8")
                    except UnicodeDecodeError as error:
                        message = f"{what}: {path}, {member.name}: not UTF-8 ({error})"
                        raise DataError(message) from None
    except tarfile.ReadError as error:
        raise DataError(f"{what}: {path} is not an uncompressed tar ({error})") from None
    return samples


class ShardImages:
    """Images inside shard files, by location: ("tar", file, offset, size),
    ("parquet", file, row_group, row, column) or ("missing", reason).

    File handles are opened lazily in each process, so DataLoader workers never share one.
    The fingerprint names files by name and size (not by folder), so a cache computed on a
    cluster stays valid where the same shards sit elsewhere.
    """

    def __init__(self, kind: str, files: list[Path], ids: list[str], locations: list[tuple]):
        self.files, self.ids, self.locations = files, ids, locations
        self.missing = [(ids[i], loc[1]) for i, loc in enumerate(locations) if loc[0] == "missing"]
        self.fingerprint = {
            "source": kind,
            "files": [f.name for f in files],
            "file_bytes_sha": sha_of([f.stat().st_size for f in files]),
            "ids_sha": sha_of(ids),
            "missing": len(self.missing),
        }
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pid": None, "_handles": {}, "_groups": {}}

    def _local(self) -> None:
        if self._pid != os.getpid():
            self._pid, self._handles, self._groups = os.getpid(), {}, {}

    def _bytes(self, location: tuple) -> bytes | None:
        self._local()
        if location[0] == "tar":
            _, file_index, offset, size = location
            if file_index not in self._handles:
                self._handles[file_index] = open(self.files[file_index], "rb")  # noqa: SIM115
            handle = self._handles[file_index]
            handle.seek(offset)
            return handle.read(size)
        _, file_index, group, row, column = location
        if (file_index, group) not in self._groups:
            import pyarrow.parquet as pq

            if len(self._groups) >= 2:  # rows are read in order: keep the latest groups only
                self._groups.pop(next(iter(self._groups)))
            table = pq.ParquetFile(self.files[file_index]).read_row_group(group, columns=[column])
            self._groups[(file_index, group)] = table.column(0).to_pylist()
        value = self._groups[(file_index, group)][row]
        return value.get("bytes") if isinstance(value, dict) else value  # HF image structs

    def load(self, index: int) -> Image.Image:
        location = self.locations[index]
        if location[0] == "missing":
            raise MissingImage(location[1])
        data = self._bytes(location)
        if not data:
            raise MissingImage(f"{self.ids[index]}: empty image")
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")


def _image_extensions(cfg) -> list[str]:
    # webdataset style: "jpg;png;webp" tries each extension in turn
    return [e.strip().lower() for e in str(cfg.image_column).split(";") if e.strip()]


def _webdataset_anchors(cfg, data_root: str) -> AnchorSet:
    """Pairs from webdataset tars (img2dataset's output): `<key>.jpg` + `<key>.txt` members,
    in shard order then member order. A key without an image is kept and reported as missing."""
    what = f"anchors {cfg.name}"
    extensions, caption_extension = _image_extensions(cfg), str(cfg.caption_column).lower()
    files, ids, locations, captions = [], [], [], []
    for shard in shard_files(cfg.path, data_root, ".tar", what):
        if cfg.limit is not None and len(ids) >= cfg.limit:
            break  # later shards are not read, nor part of the fingerprint
        files.append(shard)
        for key, members in scan_tar(shard, caption_extension, what).items():
            if cfg.limit is not None and len(ids) >= cfg.limit:
                break
            if "__caption__" not in members:
                raise DataError(
                    f"{what}: sample {key!r} in {shard} has no .{caption_extension} member"
                )
            extension = next((e for e in extensions if e in members), None)
            ids.append(f"{shard.name}/{key}")
            captions.append(members["__caption__"])
            locations.append(
                ("tar", len(files) - 1, *members[extension])
                if extension
                else ("missing", f"no .{'/.'.join(extensions)} member for {key} in {shard.name}")
            )
    return AnchorSet(cfg.name, ShardImages("webdataset", files, ids, locations), captions)


def _parquet_anchors(cfg, data_root: str) -> AnchorSet:
    """Pairs listed in img2dataset parquet files, in file then row order.

    Images come from the parquet's own image column when it has one (img2dataset
    output_format=parquet), else from the .tar of the same name (output_format=webdataset)
    by key. Rows whose status is not "success" (failed downloads) are kept and reported.
    """
    import pyarrow.parquet as pq

    what = f"anchors {cfg.name}"
    extensions = _image_extensions(cfg)
    files, ids, locations, captions = [], [], [], []
    for parquet_path in shard_files(cfg.path, data_root, ".parquet", what):
        if cfg.limit is not None and len(ids) >= cfg.limit:
            break
        parquet = pq.ParquetFile(parquet_path)
        names = parquet.schema_arrow.names
        image_column = next((e for e in extensions if e in names), None)
        status_column = cfg.status_column if cfg.status_column in names else None
        wanted = [cfg.caption_column, cfg.key_column, status_column, "error_message"]
        absent = [c for c in wanted[:2] if c not in names]
        if absent:
            raise DataError(f"{what}: {parquet_path} has no column {absent}; columns: {names}")
        table = parquet.read(columns=[c for c in wanted if c and c in names]).to_pydict()
        files.append(parquet_path)
        parquet_index, members, tar_index = len(files) - 1, {}, None
        tar_name = parquet_path.with_suffix(".tar").name
        if image_column is None:
            tar_path = parquet_path.with_suffix(".tar")
            if tar_path.is_file():
                members = scan_tar(tar_path, None, what)
                files.append(tar_path)
                tar_index = len(files) - 1
        row_groups = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        group, row_in_group = 0, 0
        for row in range(len(table[cfg.key_column])):
            while row_in_group >= row_groups[group]:
                group, row_in_group = group + 1, 0
            if cfg.limit is not None and len(ids) >= cfg.limit:
                break
            key = str(table[cfg.key_column][row])
            status = table[status_column][row] if status_column else "success"
            if status != "success":
                error = (table.get("error_message") or [None] * (row + 1))[row]
                location = ("missing", f"{status}: {error}" if error else str(status))
            elif image_column is not None:
                location = ("parquet", parquet_index, group, row_in_group, image_column)
            else:
                extension = next((e for e in extensions if e in members.get(key, {})), None)
                location = (
                    ("tar", tar_index, *members[key][extension])
                    if extension
                    else ("missing", f"{key}: listed as downloaded, no image in {tar_name}")
                )
            ids.append(f"{parquet_path.name}/{key}")
            captions.append(table[cfg.caption_column][row])
            locations.append(location)
            row_in_group += 1
    return AnchorSet(cfg.name, ShardImages("parquet", files, ids, locations), captions)


class _HFFileImages(HFImages):
    """Also reads undecoded cells: raw bytes, or {"bytes", "path"} structs (plain parquet)."""

    def load(self, index: int) -> Image.Image:
        value = self.dataset[index][self.column]
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if value is None:
            raise MissingImage(f"pair {index}: no image in column {self.column!r}")
        if isinstance(value, bytes):
            with Image.open(io.BytesIO(value)) as image:
                return image.convert("RGB")
        if isinstance(value, (str, Path)):
            with Image.open(value) as image:
                return image.convert("RGB")
        return value.convert("RGB")


def _hf_files_anchors(cfg, data_root: str) -> AnchorSet:
    """`datasets.load_dataset(path, data_files=...)` with a packaged builder ("parquet",
    "webdataset"): HF's own readers, at the cost of an Arrow copy in its cache."""
    import datasets

    what = f"anchors {cfg.name}"
    if not cfg.path or not cfg.data_files:
        raise DataError(f"{what}: hf_files needs path (parquet, webdataset, ...) and data_files")
    patterns = [cfg.data_files] if isinstance(cfg.data_files, str) else list(cfg.data_files)
    data_files = []
    for pattern in patterns:
        resolved = Path(str(pattern).replace("{data_root}", data_root)).expanduser()
        data_files.extend(shard_files(str(resolved), data_root, "", what))
    files = [str(f) for f in data_files]
    dataset = datasets.load_dataset(cfg.path, data_files=files, split=cfg.split)
    if cfg.limit is not None:
        dataset = dataset.select(range(min(cfg.limit, len(dataset))))
    if cfg.caption_column not in dataset.column_names:
        columns = dataset.column_names
        raise DataError(f"{what}: no column {cfg.caption_column!r}; columns: {columns}")
    images = _HFFileImages(dataset, cfg.image_column, f"{cfg.path}:{[f.name for f in data_files]}")
    return AnchorSet(cfg.name, images, [str(c) for c in dataset[cfg.caption_column]])

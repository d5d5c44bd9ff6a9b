"""Labelled images on disk: one folder per class (named by class, by ImageNet wnid or by class
index), or a folder with a labels CSV (file,label)."""

from __future__ import annotations

import csv

from asif_exp.data.common import IMAGE_SUFFIXES, DataError, ImageFiles, resolve_path
from asif_exp.data.registry import benchmark_loader


@benchmark_loader("image_folder")
def image_folder_benchmark(cfg, data_root: str, class_names):
    what = f"benchmark {cfg.name}"
    root = resolve_path(cfg.root, data_root, what)
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
    return ImageFiles(root, paths), labels, class_names


@benchmark_loader("labels_csv")
def labels_csv_benchmark(cfg, data_root: str, class_names):
    what = f"benchmark {cfg.name}"
    root = resolve_path(cfg.root, data_root, what)
    labels_file = resolve_path(cfg.labels_file, str(root), f"{what} labels")
    with labels_file.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and ("file" not in rows[0] or "label" not in rows[0]):
        raise DataError(f"{labels_file}: expected columns 'file' and 'label'")
    images, labels = (
        ImageFiles(root, [r["file"] for r in rows]),
        [int(r["label"]) for r in rows],
    )
    return images, labels, class_names


@benchmark_loader("class_index_folder")
def class_index_folder_benchmark(cfg, data_root: str, class_names: list[str] | None):
    """Class folders whose names are not class names: ImageNet's wnids or ImageNet-v2's indices."""
    what = f"benchmark {cfg.name}"
    if not class_names:
        raise DataError(f"{what}: loader class_index_folder needs class_names (e.g. imagenet1k)")
    root = resolve_path(cfg.root, data_root, what)
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
    return ImageFiles(root, paths), labels, class_names

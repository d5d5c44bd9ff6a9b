"""Labelled images on disk: one folder per class (named by class, by a class id such as
ImageNet's wnid, or by class index), or a folder with a labels CSV (file,label).

Hidden folders and files (`.ipynb_checkpoints/`, `._x.jpg`) are not data; a class folder
without images is an error, since it would add a class nobody can predict correctly.
"""

from __future__ import annotations

import csv
from pathlib import Path

from asif_exp.data.common import IMAGE_SUFFIXES, ImageFiles, resolve_path
from asif_exp.data.prompts import load_class_ids
from asif_exp.data.registry import benchmark_loader
from asif_exp.errors import DataError


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _class_folders(root: Path, what: str) -> list[str]:
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p))
    if not folders:
        raise DataError(f"{what}: no class sub-folders in {root}")
    return folders


def _folder_images(
    root: Path, folders: list[str], folder_label: dict[str, int], what: str
) -> tuple[ImageFiles, list[int]]:
    """The images of each folder, folder by folder in the given order, sorted by name."""
    paths, labels = [], []
    for folder in folders:
        files = [
            f.name
            for f in sorted((root / folder).iterdir())
            if _visible(f) and f.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not files:
            raise DataError(
                f"{what}: class folder {root / folder} holds no images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}); remove it or add its images"
            )
        paths.extend(f"{folder}/{name}" for name in files)
        labels.extend([folder_label[folder]] * len(files))
    return ImageFiles(root, paths), labels


@benchmark_loader("image_folder")
def image_folder_benchmark(cfg, data_root: str, class_names):
    what = f"benchmark {cfg.name}"
    root = resolve_path(cfg.root, data_root, what)
    folders = _class_folders(root, what)
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
    images, labels = _folder_images(root, folders, folder_label, what)
    return images, labels, class_names


@benchmark_loader("labels_csv")
def labels_csv_benchmark(cfg, data_root: str, class_names):
    what = f"benchmark {cfg.name}"
    root = resolve_path(cfg.root, data_root, what)
    labels_file = resolve_path(cfg.labels_file, str(root), f"{what} labels")
    with labels_file.open(encoding="utf-8-sig", newline="") as handle:
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
    """Class folders whose names are not class names: ImageNet's wnids or ImageNet-v2's indices.

    folder_labels: "ids" (the folder name is the class's id in the built-in list
    prompts/class_ids/<class_names>.txt, so any subset of classes works), "int" (the name is
    the class index) or "sorted" (the i-th folder is class i: needs every class's folder).
    """
    what = f"benchmark {cfg.name}"
    if not class_names:
        raise DataError(f"{what}: loader class_index_folder needs class_names (e.g. imagenet1k)")
    root = resolve_path(cfg.root, data_root, what)
    folders = _class_folders(root, what)
    if cfg.folder_labels == "ids":
        try:
            index = {class_id: i for i, class_id in enumerate(load_class_ids(cfg.class_names))}
        except ValueError as error:
            raise DataError(f"{what}: folder_labels=ids: {error}") from None
        unknown = [f for f in folders if f not in index]
        if unknown:
            raise DataError(
                f"{what}: folders {unknown[:5]} in {root} are not class ids of "
                f"{cfg.class_names} (asif_exp/data/prompts/class_ids/{cfg.class_names}.txt)"
            )
        folder_label = {folder: index[folder] for folder in folders}
    elif cfg.folder_labels == "sorted":
        # The i-th wnid in sorted order is class i only when every class has its folder.
        if len(folders) != len(class_names):
            raise DataError(
                f"{what}: {len(folders)} class folders in {root}, but {cfg.class_names} has "
                f"{len(class_names)} classes; folder_labels=sorted needs one folder per class "
                "(folder_labels=ids takes any subset)"
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
        raise DataError(f"{what}: folder_labels={cfg.folder_labels!r}: expected ids, int or sorted")
    ordered = sorted(folders, key=folder_label.__getitem__)
    images, labels = _folder_images(root, ordered, folder_label, what)
    return images, labels, class_names

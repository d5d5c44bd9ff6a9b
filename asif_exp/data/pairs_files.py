"""Image-caption pairs listed in a .jsonl or .csv file, images on disk."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from asif_exp.data.common import AnchorSet, DataError, ImageFiles, resolve_path
from asif_exp.data.registry import anchor_loader


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


@anchor_loader("jsonl", "csv")
def pairs_file_anchors(cfg, data_root: str) -> AnchorSet:
    path = resolve_path(cfg.path, data_root, f"anchors {cfg.name}")
    rows = _read_pairs_file(path, cfg)
    if cfg.splits is not None:
        rows = _select_splits(rows, list(cfg.splits), cfg.split_column, path)
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    image_root = (
        resolve_path(cfg.image_root, data_root, f"anchors {cfg.name} images")
        if cfg.image_root
        else path.parent
    )
    images = ImageFiles(image_root, [str(r[cfg.image_column]) for r in rows])
    return AnchorSet(cfg.name, images, [str(r[cfg.caption_column]) for r in rows])

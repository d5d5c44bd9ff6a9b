"""Image-caption pairs listed in a .jsonl or .csv file, images on disk: anchors, or a retrieval
benchmark."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from asif_exp.data.common import (
    AnchorSet,
    CaptionedBenchmark,
    ImageFiles,
    captioned_benchmark,
    is_blank,
    resolve_path,
)
from asif_exp.data.registry import anchor_loader, captioned_benchmark_loader
from asif_exp.errors import DataError


def _jsonl_records(path: Path, handle) -> list[tuple[int, dict]]:
    records = []
    for line_number, line in enumerate(handle, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {line_number}: {error}") from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path}, line {line_number}: expected a JSON object, found "
                f"{type(record).__name__} {line.strip()[:60]}"
            )
        records.append((line_number, record))
    return records


def _csv_records(path: Path, handle) -> list[tuple[int, dict]]:
    """Records of a CSV with a header, one a line: a record spanning lines (an unbalanced quote
    swallows the rows after it; or a caption with a line break) is an error naming its line."""
    reader = csv.reader(handle, strict=True)
    records, header, last_line = [], None, 0

    def spanning(first_line: int, detail: str = "") -> DataError:
        return DataError(
            f"{path}, line {first_line}: the record runs on to line {reader.line_num} (an "
            f"unbalanced quote, or a line break inside a field){detail}; one record a line"
        )

    while True:
        first_line = last_line + 1
        try:
            row = next(reader)
        except StopIteration:
            return records
        except csv.Error as error:
            if reader.line_num > first_line:
                raise spanning(first_line, f": {error}") from None
            raise DataError(f"{path}, line {first_line}: {error}") from None
        if reader.line_num != first_line:
            raise spanning(first_line)
        last_line = reader.line_num
        if not row:
            continue
        if header is None:
            header = row
        elif len(row) != len(header):
            raise DataError(
                f"{path}, line {first_line}: {len(row)} fields, the header has {len(header)}"
            )
        else:
            records.append((first_line, dict(zip(header, row, strict=True))))


JSON_LINES_SUFFIXES = (".jsonl", ".ndjson", ".json")


def _pairs_reader(path: Path, handle):
    """JSON Lines or CSV, decided by the content (a first record starting with `{` is JSON),
    whatever the file's name says; a JSON array is refused, not misread as CSV."""
    start = handle.read(4096).lstrip()
    handle.seek(0)
    if start.startswith("["):
        raise DataError(
            f"{path}: a JSON array; pairs files are JSON Lines (one object a line) or CSV"
        )
    if start.startswith("{") or path.suffix.lower() in JSON_LINES_SUFFIXES:
        return _jsonl_records
    return _csv_records


def _read_pairs_file(path: Path, cfg) -> list[tuple[int, dict]]:
    """(line number, record) of every pair; a UTF-8 byte-order mark is allowed."""
    if path.is_dir():
        raise DataError(f"{path}: a folder; expected a pairs file (.jsonl or .csv)")
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            records = _pairs_reader(path, handle)(path, handle)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 ({error})") from None
    for i, (line, row) in enumerate(records):
        for column in (cfg.image_column, cfg.caption_column):
            if column not in row:
                raise DataError(f"{path}, line {line}: no {column!r} field; fields: {list(row)}")
        caption = row[cfg.caption_column]
        if not isinstance(caption, str) or is_blank(caption):
            raise DataError(
                f"{path}, line {line}: caption of pair {i} ({row[cfg.image_column]}) is empty "
                f"or not text: {caption!r}"
            )
    return records


def _select_splits(
    records: list[tuple[int, dict]], splits: list[str], column: str, path: Path, group: str
) -> list[tuple[int, dict]]:
    """The records whose `column` is one of `splits`, in file order."""
    found = set()
    for line, row in records:
        if column not in row:
            raise DataError(
                f"{path}, line {line}: no {column!r} field ({group}.splits={splits} needs it)"
            )
        found.add(row[column])
    unknown = sorted(set(splits) - found)
    if unknown:
        raise DataError(f"{path}: {group}.splits {unknown} not found; the file has {sorted(found)}")
    return [(line, row) for line, row in records if row[column] in splits]


@anchor_loader("jsonl", "csv")
def pairs_file_anchors(cfg, data_root: str, group: str = "anchors") -> AnchorSet:
    """The pairs listed in a .jsonl/.csv file (`cfg.path`), `cfg.splits` only, in file order.

    `group` is the config group being read (anchors, or benchmark for a retrieval benchmark),
    so that errors name the right keys.
    """
    path = resolve_path(cfg.path, data_root, f"{group} {cfg.name}")
    rows = _read_pairs_file(path, cfg)
    if cfg.splits is not None:
        rows = _select_splits(rows, list(cfg.splits), cfg.split_column, path, group)
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    image_root = (
        resolve_path(cfg.image_root, data_root, f"{group} {cfg.name} images")
        if cfg.image_root
        else path.parent
    )
    if not image_root.is_dir():
        raise DataError(f"{group}.image_root={image_root}: a file; expected the images' folder")
    for line, row in rows:
        if not (image_root / str(row[cfg.image_column])).is_file():
            image = image_root / str(row[cfg.image_column])
            raise DataError(f"{path}, line {line}: image file not found: {image}")
    images = ImageFiles(image_root, [str(r[cfg.image_column]) for _, r in rows])
    return AnchorSet(cfg.name, images, [str(r[cfg.caption_column]) for _, r in rows])


@captioned_benchmark_loader("jsonl", "csv")
def pairs_file_benchmark(cfg, data_root: str) -> CaptionedBenchmark:
    """A pairs file read as anchors are (path, image_root, image/caption columns, splits,
    limit), as a retrieval benchmark."""
    for key in ("subset", "authors_split"):
        if cfg.get(key) is not None:
            raise DataError(
                f"benchmark.{key}={cfg[key]}: applies to labelled images; benchmark {cfg.name} is "
                "image-caption pairs (select them with benchmark.splits and benchmark.limit)"
            )
    return captioned_benchmark(pairs_file_anchors(cfg, data_root, group="benchmark"))

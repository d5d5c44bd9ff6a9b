"""Sharded image-caption pairs, as img2dataset writes them: webdataset tars, parquet files
(listing every input row with its download status), or either through `datasets`' own readers
(hf_files)."""

from __future__ import annotations

import glob
import io
import os
import re
import tarfile
from pathlib import Path

from PIL import Image

from asif_exp.data.common import AnchorSet, DataError, sha_of
from asif_exp.data.hf_torchvision import HFImages
from asif_exp.data.registry import anchor_loader


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


@anchor_loader("webdataset")
def webdataset_anchors(cfg, data_root: str) -> AnchorSet:
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


@anchor_loader("parquet")
def parquet_anchors(cfg, data_root: str) -> AnchorSet:
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


@anchor_loader("hf_files")
def hf_files_anchors(cfg, data_root: str) -> AnchorSet:
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

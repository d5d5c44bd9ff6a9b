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

from asif_exp.data.common import AnchorSet, MissingImage, sha_of, to_rgb
from asif_exp.data.hf_torchvision import HFImages
from asif_exp.data.registry import anchor_loader
from asif_exp.errors import DataError


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
    except (tarfile.TarError, EOFError, OSError) as error:  # also a truncated tar
        raise DataError(f"{what}: {path} is not a complete uncompressed tar ({error})") from None
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
        if data is None:
            raise MissingImage(f"{self.ids[index]}: no image bytes")
        if not data:  # listed as downloaded: damaged, not missing
            raise ValueError(f"{self.ids[index]}: empty image")
        with Image.open(io.BytesIO(data)) as image:
            return to_rgb(image)


def _image_extensions(cfg) -> list[str]:
    # webdataset style: "jpg;png;webp" tries each extension in turn
    return [e.strip().lower() for e in str(cfg.image_column).split(";") if e.strip()]


def _key_order(key: str) -> tuple:
    """Sort key of a sample key: img2dataset's keys are the input row number, zero-padded."""
    return (0, int(key), key) if key.isdigit() else (1, 0, key)


def _dataset_order(keys: list[str], where: str, what: str) -> list[int]:
    """Positions of `keys` sorted by key: img2dataset writes each sample when its download
    finishes, so file order depends on download timing; the key is the input row."""
    order = sorted(range(len(keys)), key=lambda i: _key_order(keys[i]))
    for before, after in zip(order, order[1:], strict=False):
        if keys[before] == keys[after]:
            raise DataError(f"{what}: key {keys[before]!r} appears twice in {where}")
    return order


class _ShardSequence:
    """Checks that each shard's keys follow the previous shard's, so that reading shards in
    file order and each in key order is the dataset's order (img2dataset names shard files by
    their block of input rows)."""

    def __init__(self, what: str):
        self.what, self.previous = what, None

    def follow(self, shard: Path, keys: list[str]) -> None:
        if not keys:
            return
        first, last = min(keys, key=_key_order), max(keys, key=_key_order)
        if self.previous and _key_order(first) <= _key_order(self.previous[1]):
            raise DataError(
                f"{self.what}: keys of {shard.name} (from {first!r}) do not follow those of "
                f"{self.previous[0].name} (up to {self.previous[1]!r}): the shard files are not "
                "in dataset order (name them by their first input row, as img2dataset does)"
            )
        self.previous = (shard, last)


@anchor_loader("webdataset")
def webdataset_anchors(cfg, data_root: str) -> AnchorSet:
    """Pairs from webdataset tars (img2dataset's output): `<key>.jpg` + `<key>.txt` members, in
    the dataset's order (shard files in order, each sorted by key). A failed download is not in
    the tars, so it is not listed; a key without an image is kept and reported as missing."""
    what = f"anchors {cfg.name}"
    extensions, caption_extension = _image_extensions(cfg), str(cfg.caption_column).lower()
    files, ids, locations, captions = [], [], [], []
    sequence = _ShardSequence(what)
    for shard in shard_files(cfg.path, data_root, ".tar", what):
        if cfg.limit is not None and len(ids) >= cfg.limit:
            break  # later shards are not read, nor part of the fingerprint
        files.append(shard)
        samples = scan_tar(shard, caption_extension, what)
        keys = list(samples)
        sequence.follow(shard, keys)
        for position in _dataset_order(keys, shard.name, what):
            if cfg.limit is not None and len(ids) >= cfg.limit:
                break
            key = keys[position]
            members = samples[key]
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


def _open_parquet(path: Path, what: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... without the file name
        raise DataError(
            f"{what}: {path} is not a readable parquet file (truncated or still being written? "
            f"img2dataset redoes a shard without its _stats.json): {error}"
        ) from None


@anchor_loader("parquet")
def parquet_anchors(cfg, data_root: str) -> AnchorSet:
    """Pairs listed in img2dataset parquet files, in the dataset's order (files in order, each
    sorted by key). Every input row is listed, with its download status.

    Images come from the parquet's own image column when it has one (img2dataset
    output_format=parquet), else from the .tar of the same name (output_format=webdataset)
    by key. Rows whose status is not "success" (failed downloads) are kept and reported.
    """
    what = f"anchors {cfg.name}"
    extensions = _image_extensions(cfg)
    files, ids, locations, captions = [], [], [], []
    sequence = _ShardSequence(what)
    for parquet_path in shard_files(cfg.path, data_root, ".parquet", what):
        if cfg.limit is not None and len(ids) >= cfg.limit:
            break
        parquet = _open_parquet(parquet_path, what)
        names = parquet.schema_arrow.names
        image_column = next((e for e in extensions if e in names), None)
        status_column = cfg.status_column if cfg.status_column in names else None
        wanted = [cfg.caption_column, cfg.key_column, status_column, "error_message"]
        absent = [c for c in wanted[:2] if c not in names]
        if absent:
            raise DataError(f"{what}: {parquet_path} has no column {absent}; columns: {names}")
        try:
            table = parquet.read(columns=[c for c in wanted if c and c in names]).to_pydict()
        except Exception as error:
            raise DataError(f"{what}: {parquet_path} could not be read: {error}") from None
        files.append(parquet_path)
        parquet_index, members, tar_index = len(files) - 1, {}, None
        tar_name = parquet_path.with_suffix(".tar").name
        if image_column is None:
            tar_path = parquet_path.with_suffix(".tar")
            if tar_path.is_file():
                members = scan_tar(tar_path, None, what)
                files.append(tar_path)
                tar_index = len(files) - 1
        # (row group, row within it) of every row, to read an embedded image by location
        cells = [
            (group, row)
            for group in range(parquet.num_row_groups)
            for row in range(parquet.metadata.row_group(group).num_rows)
        ]
        keys = [str(key) for key in table[cfg.key_column]]
        sequence.follow(parquet_path, keys)
        for row in _dataset_order(keys, parquet_path.name, what):
            if cfg.limit is not None and len(ids) >= cfg.limit:
                break
            key = keys[row]
            status = table[status_column][row] if status_column else "success"
            if status != "success":
                error = (table.get("error_message") or [None] * (row + 1))[row]
                location = ("missing", f"{status}: {error}" if error else str(status))
            elif image_column is not None:
                location = ("parquet", parquet_index, *cells[row], image_column)
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
                return to_rgb(image)
        if isinstance(value, (str, Path)):
            with Image.open(value) as image:
                return to_rgb(image)
        return to_rgb(value)


@anchor_loader("hf_files")
def hf_files_anchors(cfg, data_root: str) -> AnchorSet:
    """`datasets.load_dataset(path, data_files=...)` with a packaged builder ("parquet",
    "webdataset"): HF's own readers, at the cost of an Arrow copy in its cache.

    Rows are put in the dataset's order by their key (`key_column`, or webdataset's
    `__key__`) when there is one; the image column is the first of `image_column`'s
    `;`-separated names present (`jpg;jpeg;png;webp` finds webdataset's `jpg`).
    """
    import datasets

    what = f"anchors {cfg.name}"
    if not cfg.path or not cfg.data_files:
        raise DataError(f"{what}: hf_files needs path (parquet, webdataset, ...) and data_files")
    patterns = [cfg.data_files] if isinstance(cfg.data_files, str) else list(cfg.data_files)
    data_files = []
    for pattern in patterns:
        resolved = Path(str(pattern).replace("{data_root}", data_root)).expanduser()
        data_files.extend(shard_files(str(resolved), data_root, "", what))
    if cfg.path == "parquet":
        for file in data_files:  # a truncated file is then named, not a bare pyarrow error
            _open_parquet(file, what)
    files = [str(f) for f in data_files]
    try:
        dataset = datasets.load_dataset(cfg.path, data_files=files, split=cfg.split)
    except Exception as error:
        raise DataError(
            f"{what}: datasets.load_dataset({cfg.path!r}) could not read {len(files)} files "
            f"({', '.join(f.name for f in data_files[:3])}...): {type(error).__name__}: {error}"
        ) from None
    columns = dataset.column_names
    key_column = next((c for c in (cfg.key_column, "__key__") if c in columns), None)
    if key_column is not None:
        keys = [str(key) for key in dataset[key_column]]
        dataset = dataset.select(_dataset_order(keys, f"{len(files)} files", what))
    if cfg.limit is not None:
        dataset = dataset.select(range(min(cfg.limit, len(dataset))))
    if cfg.caption_column not in columns:
        raise DataError(f"{what}: no column {cfg.caption_column!r}; columns: {columns}")
    image_column = next((c for c in _image_extensions(cfg) if c in columns), None)
    if image_column is None:
        raise DataError(f"{what}: no image column among {cfg.image_column!r}; columns: {columns}")
    images = _HFFileImages(dataset, image_column, f"{cfg.path}:{[f.name for f in data_files]}")
    return AnchorSet(cfg.name, images, [str(c) for c in dataset[cfg.caption_column]])

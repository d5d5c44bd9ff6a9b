"""Encode once, cache by full identity, reuse everywhere.

A cache entry is a directory `<cache_dir>/embeddings/<key>/` holding `meta.json` (identity,
shapes, and each chunk file's size and sha256) and one or more chunk files (safetensors); each
tensor of the entry is the concatenation, along rows, of its part in every chunk. An entry of
the anchors of a chunked extraction is made of the extraction's own chunk files (hard links: no
copy, no merge in memory); `load_rows` gives its matrices as `ChunkedRows`, read tile by tile
from disk. Entries written before chunking (one `embeddings.safetensors`, no `chunks` in
meta.json) are read as entries of one chunk.

Floating tensors are stored in the dtype the user picks (`cache_dtype`: float32, float16 or
bfloat16; part of the identity unless float32) and read back as float32.

Integrity: every chunk is hashed once and its stat (size, mtime_ns, inode) recorded as a stamp
in `verified.json`; a later read re-hashes only the chunks whose stat changed (the writer, who
knows the hashes, writes the stamps; a read-only cache just re-hashes). An entry whose files do
not match its metadata is reported, moved aside, deleted and recomputed.

Entries are written once: each writer builds its own staging directory and renames it onto the
entry (atomic), so a reader sees a whole entry or none, and concurrent writers of one entry
(parallel sweeps sharing a cache) never disturb each other: when the entry is already there and
whole, the later writer discards its copy. Files are created with the permissions the umask
allows (a cache a group shares).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from queue import Full, Queue

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from asif_exp.config import ON_BAD_IMAGE
from asif_exp.data import MissingImage
from asif_exp.encoders import Preprocessing
from asif_exp.errors import ConfigError, DataError
from asif_exp.results import write_json_atomic
from asif_exp.rows import ChunkedRows, ChunkPart

log = logging.getLogger(__name__)
# Part of every identity key. The on-disk layout (chunks, in meta.json) changed without a new
# key: entries written before it are read as entries of one chunk.
FORMAT_VERSION = 1
OLD_TENSOR_FILE = "embeddings.safetensors"  # the single file of an entry written before chunks
STAMPS_FILE = "verified.json"

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# safetensors' dtype codes, as headers and meta.json hold them
_FROM_CODE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def storage_dtype(name: str) -> torch.dtype:
    if name not in STORAGE_DTYPES:
        raise ConfigError(f"cache_dtype={name!r}: expected one of {', '.join(STORAGE_DTYPES)}")
    return STORAGE_DTYPES[name]


def with_storage_dtype(identity: dict, name: str) -> dict:
    """The identity of embeddings stored as `name` (float32, the default, adds nothing: the
    entries written before the option stay valid)."""
    storage_dtype(name)
    return identity if name == "float32" else {**identity, "dtype": name}


def identity_key(identity: dict) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# The process's umask, read once at import (reading it means setting it, which is not
# thread-safe); files get the mode `open` would give them.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' `save_file`, with the file readable as the umask allows (it creates 0600)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    os.chmod(path, 0o666 & ~_UMASK)


def _stamp(path: Path, sha256: str) -> list:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino, sha256]


@dataclass
class Chunk:
    """One chunk file of an entry: the entry's tensor `name` is the file's `names[name]`."""

    file: Path
    bytes: int
    sha256: str
    rows: dict[str, int]
    names: dict[str, str]

    def record(self) -> dict:
        return {
            "file": self.file.name,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "rows": self.rows,
            "names": self.names,
        }


def _chunks(entry: Path, meta: dict) -> list[Chunk]:
    if "chunks" not in meta:  # written before chunks: one file, the tensors under their names
        shapes = meta["shapes"]
        return [
            Chunk(
                entry / OLD_TENSOR_FILE,
                meta["bytes"],
                meta["sha256"],
                {name: shape[0] if shape else 0 for name, shape in shapes.items()},
                {name: name for name in shapes},
            )
        ]
    return [
        Chunk(entry / c["file"], c["bytes"], c["sha256"], c["rows"], c["names"])
        for c in meta["chunks"]
    ]


def _header(path: Path) -> dict[str, tuple[list[int], str]]:
    """{tensor: (shape, dtype code)} of a safetensors file, from its header only."""
    with safe_open(str(path), framework="pt") as handle:
        return {
            name: (handle.get_slice(name).get_shape(), handle.get_slice(name).get_dtype())
            for name in handle.keys()  # noqa: SIM118 (a safe_open handle is not a dict)
        }


class CacheEntry:
    """A verified entry: its metadata and chunks."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = path, meta
        self.chunks = _chunks(path, meta)

    @property
    def extra(self) -> dict:
        return self.meta.get("extra", {})

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor `name` read whole; floating tensors as float32."""
        parts = []
        for chunk in self.chunks:
            with safe_open(str(chunk.file), framework="pt") as handle:
                parts.append(handle.get_tensor(chunk.names[name]))
        whole = parts[0] if len(parts) == 1 else torch.cat(parts)
        return whole.float() if whole.is_floating_point() else whole

    def rows(self, name: str) -> ChunkedRows:
        """Matrix `name`, lazily (read from disk as it is used)."""
        shape, code = self.meta["shapes"][name], self._dtype_code(name)
        parts = [ChunkPart(c.file, c.names[name], c.rows[name]) for c in self.chunks]
        return ChunkedRows([p for p in parts if p.rows], shape[1], _FROM_CODE[code])

    def _dtype_code(self, name: str) -> str:
        if "dtypes" in self.meta:
            return self.meta["dtypes"][name]
        return _header(self.chunks[0].file)[self.chunks[0].names[name]][1]

    def lazy(self, name: str) -> bool:
        shape = self.meta["shapes"][name]
        return len(shape) == 2 and self._dtype_code(name) in _FROM_CODE


# A staging or trash folder is named after its writer (`...-<pid>@<host>`): one whose writer
# is gone from this host is removed; one from another host, or older names, after this long.
STALE_SECONDS = 24 * 3600


def _writer_tag() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


def _writer_gone(name: str) -> bool:
    head, _, host = name.rpartition("@")
    pid = head.rpartition("-")[2]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


class EmbeddingCache:
    def __init__(self, root: str | Path, enabled: bool = True):
        self.root = Path(root) / "embeddings"
        self.enabled = enabled
        self._swept = False  # leftovers of killed writers removed (once per cache object)
        self._write_failed = False  # warned once that the cache cannot be written

    def remove_leftovers(self) -> list[Path]:
        """Remove the staging and trash folders of killed writers: on this host, those whose
        process is gone; any older than STALE_SECONDS. A live writer's folder is kept."""
        removed = []
        try:
            candidates = [
                p for p in self.root.iterdir() if p.name.startswith((".staging-", ".trash-"))
            ]
        except OSError:
            return removed
        for path in candidates:
            try:
                stale = time.time() - path.stat().st_mtime > STALE_SECONDS
            except OSError:
                continue
            if _writer_gone(path.name) or stale:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        if removed:
            log.info(
                "cache %s: removed %d folder(s) left by killed writers", self.root, len(removed)
            )
        return removed

    def path(self, identity: dict) -> Path:
        return self.root / identity_key(identity)

    def _open(self, entry: Path, identity: dict) -> CacheEntry:
        """The entry, verified; raises on any damage."""
        meta = json.loads((entry / "meta.json").read_text())
        if meta["identity_key"] != identity_key(identity):
            raise ValueError("identity does not match its key")
        opened = CacheEntry(entry, meta)
        self._verify(opened)
        return opened

    def _verify(self, entry: CacheEntry) -> None:
        """Each chunk's size, header and (unless its stamp says it was verified unchanged) its
        checksum; new stamps are recorded where the cache is writable."""
        stamps_file = entry.path / STAMPS_FILE
        try:
            stamps = json.loads(stamps_file.read_text())
        except (OSError, ValueError):
            stamps = {}
        new_stamps = {}
        totals: dict[str, int] = {}
        for chunk in entry.chunks:
            name = chunk.file.name
            if chunk.file.stat().st_size != chunk.bytes:
                raise ValueError(f"chunk {name} does not match its recorded size")
            if stamps.get(name) != _stamp(chunk.file, chunk.sha256):
                if file_sha256(chunk.file) != chunk.sha256:
                    raise ValueError(f"chunk {name} does not match its recorded checksum")
                new_stamps[name] = _stamp(chunk.file, chunk.sha256)
            header = _header(chunk.file)
            for tensor, stored in chunk.names.items():
                shape = header[stored][0] if stored in header else None
                expected = entry.meta["shapes"][tensor]
                if (
                    shape is None
                    or shape[1:] != expected[1:]
                    or (shape[:1] or [0])[0] != (chunk.rows[tensor])
                ):
                    raise ValueError(f"chunk {name}: tensor {stored} does not match the metadata")
                totals[tensor] = totals.get(tensor, 0) + chunk.rows[tensor]
        for tensor, shape in entry.meta["shapes"].items():
            if shape and totals.get(tensor, 0) != shape[0]:
                raise ValueError(f"tensor {tensor}: chunk rows do not add up to its shape")
        if new_stamps:
            try:
                write_json_atomic(stamps_file, {**stamps, **new_stamps})
            except OSError:  # a read-only cache: verified again next time
                pass

    def _discard(self, entry: Path) -> None:
        """Move the entry aside (atomic: no reader sees it half-deleted), then delete it."""
        trash = self.root / f".trash-{entry.name}-{uuid.uuid4().hex[:8]}-{_writer_tag()}"
        try:
            os.rename(entry, trash)
        except FileNotFoundError:  # another process moved it already
            return
        shutil.rmtree(trash, ignore_errors=True)

    def entry(self, identity: dict) -> CacheEntry | None:
        """The verified entry, or None if absent or not trustworthy (then deleted)."""
        entry = self.path(identity)
        if not self.enabled:
            return None
        try:
            if not entry.exists():
                return None
        except OSError as error:  # an unreadable cache folder: computed again
            log.warning("cache entry %s cannot be read (%s); recomputing", entry, error)
            return None
        try:
            return self._open(entry, identity)
        except Exception as error:  # any damage means: recompute, never use
            if entry.exists():  # (else another process moved it aside while it was read)
                log.warning(
                    "cache entry %s is corrupt (%s); deleting and recomputing", entry, error
                )
                self._discard(entry)
            return None

    def load(self, identity: dict) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The entry's tensors (read whole, floating ones as float32) and extra metadata, or
        None if absent or not trustworthy."""
        entry = self.entry(identity)
        if entry is None:
            return None
        return {name: entry.tensor(name) for name in entry.meta["shapes"]}, entry.extra

    def load_rows(self, identity: dict) -> tuple[dict, dict] | None:
        """As `load`, but matrices are `ChunkedRows`, read from disk as they are used."""
        entry = self.entry(identity)
        if entry is None:
            return None
        tensors = {
            name: entry.rows(name) if entry.lazy(name) else entry.tensor(name)
            for name in entry.meta["shapes"]
        }
        return tensors, entry.extra

    def save(
        self,
        identity: dict,
        tensors: dict[str, torch.Tensor],
        extra: dict,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Write an entry of one chunk; floating tensors stored as `dtype`."""
        if not self.enabled:
            return
        stored = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}

        def write(staging: Path) -> list[Chunk]:
            path = staging / "chunk-00000.safetensors"
            save_tensors(stored, path)
            rows = {k: (v.shape[0] if v.ndim else 0) for k, v in stored.items()}
            chunk = Chunk(path, path.stat().st_size, file_sha256(path), rows, {k: k for k in rows})
            return [chunk]

        self._write(identity, write, extra)

    def save_linked(self, identity: dict, sources: list[Chunk], extra: dict) -> None:
        """Write an entry made of existing (verified) chunk files, hard-linked (copied where
        links are impossible): an extraction's chunks become the anchors' entry."""
        if not self.enabled:
            return

        def write(staging: Path) -> list[Chunk]:
            chunks = []
            for number, source in enumerate(sources):
                path = staging / f"chunk-{number:05d}.safetensors"
                try:
                    os.link(source.file, path)
                except OSError:  # another file system, or no hard links: a copy
                    shutil.copyfile(source.file, path)
                    os.chmod(path, 0o666 & ~_UMASK)
                chunks.append(Chunk(path, source.bytes, source.sha256, source.rows, source.names))
            return chunks

        self._write(identity, write, extra)

    def _write(self, identity: dict, write: Callable[[Path], list[Chunk]], extra: dict) -> None:
        entry = self.path(identity)
        if not self._swept:
            self._swept = True
            self.remove_leftovers()
        staging = self.root / f".staging-{entry.name}-{uuid.uuid4().hex[:8]}-{_writer_tag()}"
        staging.mkdir(parents=True)
        try:
            chunks = write(staging)
            header = _header(chunks[0].file)
            names = chunks[0].names
            meta = {
                "identity_key": entry.name,
                "identity": identity,
                "shapes": {
                    name: [sum(c.rows[name] for c in chunks), *header[stored][0][1:]]
                    if header[stored][0]
                    else []
                    for name, stored in names.items()
                },
                "dtypes": {name: header[stored][1] for name, stored in names.items()},
                "chunks": [c.record() for c in chunks],
                "extra": extra,
            }
            # The writer knows every hash: its stamps spare the first reader a full read.
            stamps = {c.file.name: _stamp(c.file, c.sha256) for c in chunks}
            (staging / STAMPS_FILE).write_text(json.dumps(stamps, indent=1))
            (staging / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            self._publish(staging, entry, identity)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _publish(self, staging: Path, entry: Path, identity: dict, attempts: int = 5) -> None:
        """Rename `staging` onto `entry`, unless a whole entry is already there (then ours is
        redundant: the identity fixes the content). A damaged one is replaced."""
        for _ in range(attempts):
            try:
                os.rename(staging, entry)  # fails if the entry exists (it is never empty)
                return
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            try:
                self._open(entry, identity)
                return  # another writer's whole entry
            except Exception:  # damaged (or moved aside meanwhile): replace it
                self._discard(entry)
        raise OSError(f"cache entry {entry}: could not be written in {attempts} attempts")

    def get_or_compute(
        self,
        identity: dict,
        compute: Callable[[], tuple[dict[str, torch.Tensor], dict]],
        dtype: torch.dtype = torch.float32,
        lazy: bool = False,
    ) -> tuple[dict, dict, bool]:
        """(tensors, extra, was_cached); with `lazy`, a cached entry's matrices are
        `ChunkedRows`. A computed entry is returned as computed (float32), stored as `dtype`."""
        cached = self.load_rows(identity) if lazy else self.load(identity)
        if cached is not None:
            return cached[0], cached[1], True
        tensors, extra = compute()
        try:
            self.save(identity, tensors, extra, dtype)
        except OSError as error:  # not a folder, read-only, full: the run goes on uncached
            if not self._write_failed:
                self._write_failed = True
                log.warning(
                    "cache %s cannot be written (%s: %s); going on with the embeddings just "
                    "computed, which will be computed again next time",
                    self.root,
                    error.filename or self.root,
                    error.strerror or error,
                )
        if dtype != torch.float32:  # what a later run reads back: the stored values
            tensors = {
                k: v.to(dtype).float() if v.is_floating_point() else v for k, v in tensors.items()
            }
        return tensors, extra, False


# ----------------------------------------------------------------------------- encoding


def check_on_bad_image(mode: str) -> None:
    if mode not in ON_BAD_IMAGE:
        raise ValueError(f"data.on_bad_image={mode!r}: expected one of {', '.join(ON_BAD_IMAGE)}")


def refuse_bad_images(failures: list[dict], on_bad_image: str, description: str) -> None:
    """Raise for the first failure that `on_bad_image` does not accept (also for failures read
    back from the cache, which was filled under whichever mode ran first)."""
    check_on_bad_image(on_bad_image)
    for failure in failures:
        missing = failure["error"].startswith(f"{MissingImage.__name__}:")
        if on_bad_image == "raise" or (on_bad_image == "skip_failed_downloads" and not missing):
            hint = " (not a failed download)" if on_bad_image == "skip_failed_downloads" else ""
            raise DataError(
                f"{description}: unreadable image {failure['id']!r}{hint}: {failure['error']} "
                f"(data.on_bad_image={on_bad_image})"
            )


class _Pixels(Dataset):
    def __init__(self, source, indices: list[int], crop):
        self.source, self.indices, self.crop = source, indices, crop

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        try:
            return index, self.crop(self.source.load(index)), None
        except Exception as error:  # unreadable or corrupt image: reported by the caller
            return index, None, f"{type(error).__name__}: {error}"


def _collate(batch):
    """(indices of the readable images, their crops stacked (`Preprocessing.stack`) or None,
    [(index, error)]): the stacking is done where the images were read (a worker), not between
    two forward passes."""
    good = [(index, pixels) for index, pixels, error in batch if error is None]
    failed = [(index, error) for index, _, error in batch if error is not None]
    stacked = Preprocessing.stack([pixels for _, pixels in good]) if good else None
    return [index for index, _ in good], stacked, failed


def auto_num_workers(device: torch.device) -> int:
    """DataLoader worker processes for `encoder.vision.num_workers: null`. On CPU the model and
    the preprocessing share the cores: reading and cropping a Flickr8k image takes about a
    tenth of the core time EfficientNet-Lite0's forward pass does (1.9 against 18 ms), so one
    worker per 8 cores; below 8 none: a thread of this process preprocesses the next batch while
    the model runs (`prefetched`), on 2 cores as fast as a worker process or faster, with no
    process to start (experiments/bench/README.md). On GPU the CPU only decodes and resizes:
    every core but one, at most 16."""
    cores = len(os.sched_getaffinity(0))
    if device.type == "cuda":
        return max(1, min(cores - 1, 16))
    return cores // 8


class _Raised:
    """An exception of the producing thread, handed to the consumer to raise."""

    def __init__(self, error: BaseException):
        self.error = error


def prefetched(items: Iterable, depth: int = 2) -> Iterator:
    """`items` as a background thread produces them, up to `depth` ahead. Batches read and
    preprocessed by that thread (PIL's decoding and resizing and torch's kernels release the
    GIL) are ready when the model, in the calling thread, finishes the one before. An error in
    the thread is raised here; when the consumer stops early, the thread stops too."""
    iterator = iter(items)  # DataLoader workers fork here, in the calling thread
    queue: Queue = Queue(depth)
    stopped = threading.Event()
    end = object()

    def offer(item) -> bool:
        while not stopped.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterator:
                if not offer(item):
                    return
        except BaseException as error:  # noqa: BLE001 (re-raised in the consumer)
            offer(_Raised(error))
            return
        offer(end)

    thread = threading.Thread(target=produce, name="asif-prefetch", daemon=True)
    thread.start()
    try:
        while (item := queue.get()) is not end:
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stopped.set()
        thread.join()


def encode_images(
    encoder,
    source,
    batch_size: int,
    num_workers: int | None,
    on_bad_image: str,
    description: str,
    progress: bool = True,
) -> tuple[torch.Tensor, list[int], list[dict]]:
    """Features of every readable image of `source`, each distinct id encoded once; images are
    read, resized and cropped to bytes (`Preprocessing.crop`) by `num_workers` DataLoader
    workers (None: `auto_num_workers`; 0: a thread of this process), in pinned memory when the
    encoder is on a GPU, while the model encodes the batch before (`prefetched`); the encoder
    normalises each batch on its device.

    Returns (embeddings of the kept images, kept indices, failures [{id, error}]).
    """
    check_on_bad_image(on_bad_image)
    first_of_id: dict[str, int] = {}
    for index, image_id in enumerate(source.ids):
        first_of_id.setdefault(image_id, index)
    unique = sorted(first_of_id.values())
    device = getattr(encoder, "device", torch.device("cpu"))
    workers = auto_num_workers(device) if num_workers is None else num_workers
    loader = DataLoader(
        _Pixels(source, unique, encoder.preprocessing.crop),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        # fork on Linux, also inside a launcher's worker (joblib/loky start processes otherwise,
        # and then need the image source to pickle)
        multiprocessing_context="fork" if workers and sys.platform.startswith("linux") else None,
    )
    features: dict[int, torch.Tensor] = {}
    failures: list[dict] = []
    with tqdm(
        total=len(unique), desc=f"encoding {description}", unit="img", disable=not progress
    ) as bar:

        def readable():
            for indices, pixels, failed in prefetched(loader):
                for index, error in failed:
                    failure = {"id": source.ids[index], "error": error}
                    refuse_bad_images([failure], on_bad_image, description)
                    failures.append(failure)
                bar.update(len(failed))
                if indices:
                    yield indices, pixels

        for indices, encoded in encoder.encode_batches(readable()):
            features.update(zip(indices, encoded, strict=True))
            bar.update(len(indices))
    kept = [i for i, image_id in enumerate(source.ids) if first_of_id[image_id] in features]
    if not kept:
        raise ValueError(f"{description}: no readable image among {len(source)}")
    embeddings = torch.stack([features[first_of_id[source.ids[i]]] for i in kept])
    return embeddings, kept, failures

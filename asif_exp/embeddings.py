"""Encode once, cache by full identity, reuse everywhere.

A cache entry is a directory `<cache_dir>/embeddings/<key>/` holding `embeddings.safetensors`
and `meta.json` (identity, shape, sha256 of the tensor file). Entries are written once: each
writer builds its own staging directory and renames it onto the entry (atomic), so a reader sees
a whole entry or none, and concurrent writers of one entry (parallel sweeps sharing a cache)
never disturb each other: when the entry is already there and whole, the later writer discards
its copy. An entry whose file does not match its metadata is reported, moved aside, deleted and
recomputed. Files are created with the permissions the umask allows (a cache a group shares).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from asif_exp.data import DataError, MissingImage

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


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

    def _read(self, entry: Path, identity: dict) -> tuple[dict[str, torch.Tensor], dict]:
        """The entry's tensors and extra metadata; raises on any damage."""
        meta = json.loads((entry / "meta.json").read_text())
        tensor_file = entry / "embeddings.safetensors"
        if meta["identity_key"] != identity_key(identity):
            raise ValueError("identity does not match its key")
        if (
            tensor_file.stat().st_size != meta["bytes"]
            or file_sha256(tensor_file) != meta["sha256"]
        ):
            raise ValueError("tensor file does not match its recorded size and checksum")
        tensors = load_file(str(tensor_file))
        if {k: list(v.shape) for k, v in tensors.items()} != meta["shapes"]:
            raise ValueError("tensor shapes do not match the metadata")
        return tensors, meta.get("extra", {})

    def _discard(self, entry: Path) -> None:
        """Move the entry aside (atomic: no reader sees it half-deleted), then delete it."""
        trash = self.root / f".trash-{entry.name}-{uuid.uuid4().hex[:8]}-{_writer_tag()}"
        try:
            os.rename(entry, trash)
        except FileNotFoundError:  # another process moved it already
            return
        shutil.rmtree(trash, ignore_errors=True)

    def load(self, identity: dict) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The entry's tensors and extra metadata, or None if absent or not trustworthy."""
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
            return self._read(entry, identity)
        except Exception as error:  # any damage means: recompute, never use
            if entry.exists():  # (else another process moved it aside while it was read)
                log.warning(
                    "cache entry %s is corrupt (%s); deleting and recomputing", entry, error
                )
                self._discard(entry)
            return None

    def save(self, identity: dict, tensors: dict[str, torch.Tensor], extra: dict) -> None:
        if not self.enabled:
            return
        entry = self.path(identity)
        if not self._swept:
            self._swept = True
            self.remove_leftovers()
        staging = self.root / f".staging-{entry.name}-{uuid.uuid4().hex[:8]}-{_writer_tag()}"
        staging.mkdir(parents=True)
        try:
            tensor_file = staging / "embeddings.safetensors"
            save_tensors(tensors, tensor_file)
            meta = {
                "identity_key": entry.name,
                "identity": identity,
                "shapes": {k: list(v.shape) for k, v in tensors.items()},
                "bytes": tensor_file.stat().st_size,
                "sha256": file_sha256(tensor_file),
                "extra": extra,
            }
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
                self._read(entry, identity)
                return  # another writer's whole entry
            except Exception:  # damaged (or moved aside meanwhile): replace it
                self._discard(entry)
        raise OSError(f"cache entry {entry}: could not be written in {attempts} attempts")

    def get_or_compute(
        self, identity: dict, compute: Callable[[], tuple[dict[str, torch.Tensor], dict]]
    ) -> tuple[dict[str, torch.Tensor], dict, bool]:
        """(tensors, extra, was_cached)."""
        cached = self.load(identity)
        if cached is not None:
            return cached[0], cached[1], True
        tensors, extra = compute()
        try:
            self.save(identity, tensors, extra)
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
        return tensors, extra, False


# ----------------------------------------------------------------------------- encoding

# data.on_bad_image: what an image that cannot be loaded does. "skip_failed_downloads" skips
# only the pairs a shard lists without an image (MissingImage: a failed download) and stops at
# corrupt bytes; "skip" skips both; "raise" stops at the first.
ON_BAD_IMAGE = ("skip", "skip_failed_downloads", "raise")


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
    def __init__(self, source, indices: list[int], transform):
        self.source, self.indices, self.transform = source, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        try:
            return index, self.transform(self.source.load(index)), None
        except Exception as error:  # unreadable or corrupt image: reported by the caller
            return index, None, f"{type(error).__name__}: {error}"


def _collate(batch):
    return batch


def encode_images(
    encoder,
    source,
    batch_size: int,
    num_workers: int,
    on_bad_image: str,
    description: str,
    progress: bool = True,
) -> tuple[torch.Tensor, list[int], list[dict]]:
    """Features of every readable image of `source`, each distinct id encoded once.

    Returns (embeddings of the kept images, kept indices, failures [{id, error}]).
    """
    check_on_bad_image(on_bad_image)
    first_of_id: dict[str, int] = {}
    for index, image_id in enumerate(source.ids):
        first_of_id.setdefault(image_id, index)
    unique = sorted(first_of_id.values())
    loader = DataLoader(
        _Pixels(source, unique, encoder.transform),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    features: dict[int, torch.Tensor] = {}
    failures: list[dict] = []
    with tqdm(
        total=len(unique), desc=f"encoding {description}", unit="img", disable=not progress
    ) as bar:
        for batch in loader:
            good = [(i, pixels) for i, pixels, error in batch if error is None]
            for i, _, error in batch:
                if error is not None:
                    failure = {"id": source.ids[i], "error": error}
                    refuse_bad_images([failure], on_bad_image, description)
                    failures.append(failure)
            if good:
                encoded = encoder.encode_pixels(torch.stack([p for _, p in good]))
                features.update({i: f for (i, _), f in zip(good, encoded, strict=True)})
            bar.update(len(batch))
    kept = [i for i, image_id in enumerate(source.ids) if first_of_id[image_id] in features]
    if not kept:
        raise ValueError(f"{description}: no readable image among {len(source)}")
    embeddings = torch.stack([features[first_of_id[source.ids[i]]] for i in kept])
    return embeddings, kept, failures

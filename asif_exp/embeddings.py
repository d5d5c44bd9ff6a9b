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
import sys
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


class EmbeddingCache:
    def __init__(self, root: str | Path, enabled: bool = True):
        self.root = Path(root) / "embeddings"
        self.enabled = enabled

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
        trash = self.root / f".trash-{entry.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(entry, trash)
        except FileNotFoundError:  # another process moved it already
            return
        shutil.rmtree(trash, ignore_errors=True)

    def load(self, identity: dict) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The entry's tensors and extra metadata, or None if absent or not trustworthy."""
        entry = self.path(identity)
        if not self.enabled or not entry.exists():
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
        staging = self.root / f".staging-{entry.name}-{uuid.uuid4().hex[:8]}"
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
        self.save(identity, tensors, extra)
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
    """(indices of the readable images, their pixels stacked or None, [(index, error)]): the
    stacking is done where the images were read (a worker), not between two forward passes."""
    good = [(index, pixels) for index, pixels, error in batch if error is None]
    failed = [(index, error) for index, _, error in batch if error is not None]
    stacked = torch.stack([pixels for _, pixels in good]) if good else None
    return [index for index, _ in good], stacked, failed


def auto_num_workers(device: torch.device) -> int:
    """DataLoader workers for `encoder.vision.num_workers: null`. On CPU the model and the
    workers share the cores; preprocessing is a few % of the model's time on a free machine, but
    done in the main process it stalls the model, and on a busy one it gets a single thread's
    share (experiments/bench/README.md: 0.55x of the model alone without a worker, 0.96x with
    one, 2 cores): one worker per 8 cores, at least one. On GPU the CPU only decodes and resizes:
    every core but one, at most 16."""
    cores = len(os.sched_getaffinity(0))
    if device.type == "cuda":
        return max(1, min(cores - 1, 16))
    return max(1, cores // 8)


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
    read and preprocessed by `num_workers` DataLoader workers (None: `auto_num_workers`), in
    pinned memory when the encoder is on a GPU.

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
        _Pixels(source, unique, encoder.transform),
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
        for indices, pixels, failed in loader:
            for index, error in failed:
                failure = {"id": source.ids[index], "error": error}
                refuse_bad_images([failure], on_bad_image, description)
                failures.append(failure)
            if indices:
                encoded = encoder.encode_pixels(pixels)
                features.update(zip(indices, encoded, strict=True))
            bar.update(len(indices) + len(failed))
    kept = [i for i, image_id in enumerate(source.ids) if first_of_id[image_id] in features]
    if not kept:
        raise ValueError(f"{description}: no readable image among {len(source)}")
    embeddings = torch.stack([features[first_of_id[source.ids[i]]] for i in kept])
    return embeddings, kept, failures

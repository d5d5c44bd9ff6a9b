"""What an image set's cache identity costs: every file's sha256 (asif_exp/data/file_hashes.py)
against the former names + sizes + 32 sampled files, on a real image folder, in one run.

    python experiments/bench/bench_cache_identity.py            # ../shared/data/cifar10_test

Four timings of the same 10,000 files: the former fingerprint (stat of every file, 32 read);
the content identity with an empty hash index and the files evicted from the page cache
(`posix_fadvise(DONTNEED)`: read from disk, as on a first run); with an empty index and the
files in the page cache; with a filled index (every later run: one stat per file, no read).
Ratios are over the former fingerprint's time.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

from asif_exp.data import IMAGE_SUFFIXES, ImageFiles, file_hashes, sha_of

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "cifar10_test"


def former_fingerprint(root: Path, ids: list[str], samples: int = 32) -> dict:
    """Names and sizes of every file and the bytes of 32 of them (before issue 22), with the
    check that every file is there that ImageFiles makes in both versions."""
    assert all((root / rel).is_file() for rel in ids)
    sizes = [(root / rel).stat().st_size for rel in ids]
    step = max(1, len(ids) // samples)
    digest = hashlib.sha256()
    for rel in ids[::step][:samples]:
        digest.update(rel.encode() + b"\0" + (root / rel).read_bytes())
    return {"ids_sha": sha_of(ids), "sizes_sha": sha_of(sizes), "sample": digest.hexdigest()}


def evict(root: Path, ids: list[str]) -> None:
    for rel in ids:
        descriptor = os.open(root / rel, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    args = parser.parse_args()
    root = args.root.resolve()
    if not root.is_dir():
        sys.exit(f"error: {root}: not a folder (the shared data is not here)")
    ids = sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
    )
    megabytes = sum((root / rel).stat().st_size for rel in ids) / 2**20
    with tempfile.TemporaryDirectory() as index_folder:
        file_hashes.remember_in(index_folder)
        former = timed(lambda: former_fingerprint(root, ids))
        evict(root, ids)
        cold_disk = timed(lambda: ImageFiles(root, ids).fingerprint)
        (Path(index_folder) / file_hashes.INDEX_FILE).unlink()  # an empty index again
        cold_index = timed(lambda: ImageFiles(root, ids).fingerprint)
        warm = timed(lambda: ImageFiles(root, ids).fingerprint)
        file_hashes.remember_in(None)
    print(f"{len(ids):,} files, {megabytes:.1f} MiB, under {root}")
    print(f"{'former: names, sizes, 32 files read':<52} {former:7.3f} s   1.00x")
    for label, seconds in [
        ("sha256 of every file, empty index, files on disk", cold_disk),
        ("sha256 of every file, empty index, page cache", cold_index),
        ("sha256 of every file, filled index (later runs)", warm),
    ]:
        print(f"{label:<52} {seconds:7.3f} s  {seconds / former:5.2f}x")


if __name__ == "__main__":
    main()

"""sha256 of files' content, remembered in an index so that an unchanged file is read once.

An image set's cache identity holds the content hash of every one of its files, so that changing
any image's bytes (even keeping its name and size) changes the identity. Hashing 10,000 files at
every run would cost their reading; the index (`file_hashes.sqlite` in the cache folder) maps a
file's path and status, (path, device, inode, size, mtime_ns, ctime_ns), to its hash, so a file
whose status is unchanged is not read again. Any write to a file changes its mtime and ctime, a
rename or copy its inode or ctime (the ctime cannot be set back by a user), so a changed file
is always re-read.

A file modified within the same timestamp tick as its hashing would keep its status (git's
"racy" files): a hash is remembered only for files last changed `RACY_SECONDS` or more before
the hashing started; younger files are hashed again at each run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import time
from pathlib import Path

log = logging.getLogger(__name__)
INDEX_FILE = "file_hashes.sqlite"
RACY_SECONDS = 2  # FAT's timestamps have a 2 s resolution; most file systems' are finer
_BATCH = 500  # paths per SQL query (SQLite's parameter limit is 999 on old builds)
_index_folder: Path | None = None


def remember_in(folder: str | Path | None) -> None:
    """Where the index lives (the embedding cache's folder); None: hash every file every time."""
    global _index_folder
    _index_folder = None if folder is None else Path(folder)


def sha256_of_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _status(path: str | Path) -> tuple:
    stat = os.stat(path)
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _open_index() -> sqlite3.Connection | None:
    """The index, or None (and a warning) when it cannot be opened or created."""
    if _index_folder is None:
        return None
    path = _index_folder / INDEX_FILE
    try:
        _index_folder.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, timeout=60)
        connection.execute(
            "CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, dev INTEGER, "
            "ino INTEGER, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, sha256 TEXT)"
        )
        return connection
    except (OSError, sqlite3.Error) as error:
        log.warning("file hash index %s unusable (%s): every image is read to hash it", path, error)
        return None


def content_hashes(paths: list[str | Path]) -> list[str]:
    """sha256 of each file's bytes, in order; files whose status the index holds are not read.
    (Plain strings are faster than `Path` objects here, where there are many files.)"""
    started_ns = time.time_ns()
    absolute = [p if isinstance(p, str) and os.path.isabs(p) else os.path.abspath(p) for p in paths]
    statuses = [_status(p) for p in paths]
    connection = _open_index()
    try:
        known = _lookup(connection, absolute) if connection is not None else {}
        hashes, new_rows = [], []
        settled_ns = started_ns - RACY_SECONDS * 1_000_000_000
        for path, name, status in zip(paths, absolute, statuses, strict=True):
            entry = known.get(name)
            if entry is not None and entry[:5] == status:
                hashes.append(entry[5])
                continue
            hashes.append(sha256_of_file(path))
            if max(status[3], status[4]) < settled_ns:  # else racy: hashed again next time
                new_rows.append((name, *status, hashes[-1]))
        if connection is not None and new_rows:
            try:
                with connection:
                    connection.executemany(
                        "INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?, ?, ?)", new_rows
                    )
            except sqlite3.Error as error:  # read-only, full or locked: next run hashes again
                log.warning("file hash index in %s not updated (%s)", _index_folder, error)
        return hashes
    finally:
        if connection is not None:
            connection.close()


def _lookup(connection: sqlite3.Connection, paths: list[str]) -> dict[str, tuple]:
    """{path: (dev, ino, size, mtime_ns, ctime_ns, sha256)} of the indexed ones among `paths`."""
    known: dict[str, tuple] = {}
    try:
        for start in range(0, len(paths), _BATCH):
            batch = sorted(set(paths[start : start + _BATCH]))
            rows = connection.execute(
                "SELECT path, dev, ino, size, mtime_ns, ctime_ns, sha256 FROM hashes "
                f"WHERE path IN ({','.join('?' * len(batch))})",
                batch,
            )
            known.update((row[0], tuple(row[1:])) for row in rows)
    except sqlite3.Error as error:  # a damaged index: hash every file
        log.warning(
            "file hash index in %s unreadable (%s); hashing every file", _index_folder, error
        )
        return {}
    return known

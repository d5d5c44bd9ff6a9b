"""glibc's malloc tuned for batched inference on CPU (no effect off glibc).

By default glibc maps every block above 32 MiB (a batch's activations) fresh from the kernel
and unmaps it when freed, so each forward pass faults in and zeroes its activations again: on
2 cores a third of EfficientNet-Lite0's CPU time went to the kernel, and keeping the blocks
gives 1.07-1.45x its images/s (experiments/bench/README.md). `reused_allocations` keeps freed
blocks for the next batch while encoding. A thread allocates from its own arena, and an arena
other than the main one maps blocks above 64 MiB whatever the threshold, so `one_arena` makes
every thread use the main one; it must run before threads start (glibc fixes the arena count
once), so importing `asif_exp` calls it.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
KEPT_FOR_REUSE = 1 << 30  # bytes: above a batch's activations for the configured encoders
GLIBC_DYNAMIC_CEILING = 32 << 20  # the largest mmap threshold glibc's own adjustment reaches


def glibc() -> ctypes.CDLL | None:
    """The C library, when it is glibc (its mallopt parameters are glibc's)."""
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):  # not a POSIX system, or not glibc
        return None
    return ctypes.CDLL(None) if version.startswith("glibc") else None


def one_arena() -> None:
    """Every thread allocates from glibc's main arena (Python's GIL serialises most allocations
    anyway; torch's large blocks are few)."""
    libc = glibc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, 1)


@contextmanager
def reused_allocations() -> Iterator[None]:
    """Inside: freed blocks below 1 GiB kept for reuse (not unmapped, not trimmed). After:
    glibc's thresholds at its own adjustment's ceiling, and the freed memory given back."""
    libc = glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, KEPT_FOR_REUSE)
    libc.mallopt(M_TRIM_THRESHOLD, KEPT_FOR_REUSE)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, GLIBC_DYNAMIC_CEILING)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * GLIBC_DYNAMIC_CEILING)
        libc.malloc_trim(0)

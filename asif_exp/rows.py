"""Row matrices that stay on disk: an anchor set's embeddings read tile by tile, in any size.

A `ChunkedRows` is the concatenation (along rows) of one tensor from each of several
safetensors files (a chunked cache entry's chunks). Nothing is read until rows are asked for:
`rows(a, b)` reads rows [a, b) from the files' memory maps (page cache, not process memory),
crossing chunk borders, and returns them as float32. Slicing (`m[a:b]`) and row selection
(`m[index]`, e.g. the readable pairs) give new lazy views; `materialize()` reads everything, for
the consumers that need all rows at once (baselines, saved models). The ASIF engine streams it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor


@dataclass(frozen=True)
class ChunkPart:
    """Rows of tensor `name` in `file`: one chunk's share of a matrix."""

    file: Path
    name: str
    rows: int


class ChunkedRows:
    """A (rows x width) matrix stored as chunk files, read lazily (see the module docstring)."""

    ndim = 2

    def __init__(
        self,
        parts: list[ChunkPart],
        width: int,
        dtype: torch.dtype,
        selection: Tensor | None = None,
        span: tuple[int, int] | None = None,
    ):
        self.parts, self.width, self.dtype = parts, width, dtype  # dtype: as stored on disk
        self._offsets = [0]
        for part in parts:
            self._offsets.append(self._offsets[-1] + part.rows)
        # The view: base rows span[0] .. span[1], or the base rows listed in `selection`.
        self.selection = selection
        self.span = span or (0, self._offsets[-1])
        self._handles: dict[Path, object] = {}

    # -- shape
    @property
    def shape(self) -> torch.Size:
        rows = len(self.selection) if self.selection is not None else self.span[1] - self.span[0]
        return torch.Size((rows, self.width))

    def __len__(self) -> int:
        return self.shape[0]

    def numel(self) -> int:
        return self.shape[0] * self.width

    @property
    def nbytes(self) -> int:
        """Bytes of these rows as stored."""
        return self.numel() * self.dtype.itemsize

    def __repr__(self) -> str:
        return (
            f"ChunkedRows(shape={tuple(self.shape)}, dtype={self.dtype}, chunks={len(self.parts)})"
        )

    # -- views
    def _view(self, selection: Tensor | None, span: tuple[int, int] | None) -> ChunkedRows:
        return ChunkedRows(self.parts, self.width, self.dtype, selection, span)

    def __getitem__(self, index) -> ChunkedRows:
        """A lazy view: a slice of rows (step 1) or a selection (int list / int tensor)."""
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("ChunkedRows: slices with a step are not supported")
            stop = max(start, stop)
            if self.selection is not None:
                return self._view(self.selection[start:stop], None)
            return self._view(None, (self.span[0] + start, self.span[0] + stop))
        index = torch.as_tensor(index, dtype=torch.long).flatten()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise IndexError(f"ChunkedRows: row index out of range for {len(self)} rows")
        base = self.selection[index] if self.selection is not None else index + self.span[0]
        return self._view(base, None)

    # -- reading
    def rows(self, start: int, stop: int) -> Tensor:
        """Rows [start, stop) of this view as a float32 tensor."""
        start, stop = max(0, start), min(stop, len(self))
        if stop <= start:
            return torch.empty(0, self.width)
        if self.selection is None:
            return self._base_rows(self.span[0] + start, self.span[0] + stop)
        # Selected rows are ascending in practice (readable pairs in dataset order): read the
        # span they cover, then keep the selected ones.
        wanted = self.selection[start:stop]
        low, high = int(wanted.min()), int(wanted.max()) + 1
        return self._base_rows(low, high)[wanted - low]

    def materialize(self) -> Tensor:
        """Every row, as one float32 tensor in memory."""
        return self.rows(0, len(self))

    def _base_rows(self, start: int, stop: int) -> Tensor:
        pieces = []
        chunk = bisect.bisect_right(self._offsets, start) - 1
        while start < stop:
            first, last = self._offsets[chunk], self._offsets[chunk + 1]
            end = min(stop, last)
            pieces.append(self._slice(self.parts[chunk], start - first, end - first).float())
            start, chunk = end, chunk + 1
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _slice(self, part: ChunkPart, start: int, stop: int) -> Tensor:
        handle = self._handles.get(part.file)
        if handle is None:  # opened once, on first use (memory-mapped by safetensors)
            handle = self._handles[part.file] = safe_open(str(part.file), framework="pt")
        return handle.get_slice(part.name)[start:stop]

    def __getstate__(self) -> dict:  # file handles do not travel to other processes
        return {**self.__dict__, "_handles": {}}


def materialize(rows: Tensor | ChunkedRows) -> Tensor:
    """A tensor as is; a `ChunkedRows` read whole (float32)."""
    return rows.materialize() if isinstance(rows, ChunkedRows) else rows


def read_rows(matrix: Tensor | ChunkedRows, start: int, stop: int) -> Tensor:
    """Rows [start, stop): a view of a tensor, or read from disk as float32."""
    return matrix.rows(start, stop) if isinstance(matrix, ChunkedRows) else matrix[start:stop]

"""Running a :class:`~pm_em.chunks.kernel.ChunkKernel` over every chunk of the data,
in this process, and summing the results."""

from __future__ import annotations

import numpy as np

__all__ = ["LocalExecutor", "chunk_ranges"]


def chunk_ranges(n_rows: int, chunk_length: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each chunk: ``chunk_length`` rows, the last one shorter."""
    return [(s, min(s + chunk_length, n_rows)) for s in range(0, n_rows, chunk_length)]


def add_into(total: list | None, part: list) -> list:
    """Element-wise sum of two lists of arrays (None: nothing yet)."""
    if total is None:
        return [np.array(p, dtype=float, copy=True) for p in part]
    for t, p in zip(total, part):
        t += p
    return total


class LocalExecutor:
    """Chunks read and computed one after another in this process (no Dask client).

    Only one chunk is in memory at a time: each is read from its source (a view of
    an in-memory array, rows of a memory map, a computed Dask block) when needed.

    Parameters
    ----------
    kernel : ChunkKernel
    sources : list of DataSource
        In the kernel's input order, all with the same number of rows.
    """

    def __init__(self, kernel, sources):
        self.kernel = kernel
        self.sources = sources
        self.ranges = chunk_ranges(sources[0].n_rows, kernel.chunk_length)

    @property
    def n_chunks(self) -> int:
        return len(self.ranges)

    def level(self, level, values, totals, progress=None) -> list[np.ndarray]:
        """Level ``level``'s statistics summed over every chunk; ``progress(n)`` is
        called after each ``n`` chunks done."""
        total = None
        for start, stop in self.ranges:
            arrays = [source.read(start, stop) for source in self.sources]
            total = add_into(total, self.kernel(level, values, arrays, totals))
            if progress is not None:
                progress(1)
        return total

    def close(self) -> None:
        pass

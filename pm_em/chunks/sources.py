"""The full data, read a chunk of rows at a time: NumPy arrays, memory-mapped ``.npy``
files, Dask arrays and xarray DataArrays (backed by either).

A chunk is read when it is needed and dropped after: a memory map or a Dask array
is never loaded whole. :meth:`DataSource.loader` gives a small picklable recipe for
one chunk, so that a Dask worker reads its chunks itself (a memory map is reopened
by path, not sent).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np

__all__ = ["ChunkLoader", "DataSource"]


@dataclass(frozen=True)
class ChunkLoader:
    """Rows ``[start, stop)`` of one input, as a recipe: ``load()`` reads them.

    ``kind`` is ``"memmap"`` (``source`` is ``(path, dtype, shape, offset, order)``),
    ``"dask"`` (``source`` is the Dask array of those rows) or ``"array"``
    (``source`` holds the rows).
    """

    kind: str
    source: object
    start: int
    stop: int
    dtype: str

    def load(self) -> np.ndarray:
        if self.kind == "memmap":
            path, dtype, shape, offset, order = self.source
            mapped = np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset, order=order)
            rows = np.array(mapped[self.start : self.stop], dtype=self.dtype)
            del mapped
            return rows
        if self.kind == "dask":
            # Computed here, in one thread: inside a Dask worker, or in-process
            # without a client, only this chunk is materialized.
            return np.asarray(self.source.compute(scheduler="sync"), dtype=self.dtype)
        return np.asarray(self.source, dtype=self.dtype)


def _is_dask(array) -> bool:
    return type(array).__module__.startswith("dask.")


class DataSource:
    """One chunked input's full data.

    Parameters
    ----------
    name : str
        The model variable it is the data of (for messages).
    array : array-like
        ``np.ndarray``, ``np.memmap``, a Dask array, or an ``xarray.DataArray``
        wrapping either; rows along the first axis.
    row_shape : tuple of int
        The shape of one row in the model.
    dtype : str
        The model's dtype for it (chunks are cast to it).
    """

    def __init__(self, name: str, array, row_shape: tuple, dtype: str):
        if hasattr(array, "variable") and hasattr(array, "dims"):  # xarray.DataArray
            array = array.data
        if not (_is_dask(array) or isinstance(array, np.ndarray)):
            array = np.asarray(array)
        if tuple(array.shape[1:]) != tuple(row_shape) or array.ndim == 0:
            raise ValueError(
                f"data['{name}'] has shape {tuple(array.shape)}; rows of shape "
                f"{tuple(row_shape)} were expected, as in the model (declared on one chunk)."
            )
        self.name = name
        self.array = array
        self.dtype = dtype
        self.n_rows = int(array.shape[0])

    def loader(self, start: int, stop: int) -> ChunkLoader:
        """The recipe for rows ``[start, stop)``."""
        array = self.array
        if _is_dask(array):
            return ChunkLoader("dask", array[start:stop], start, stop, self.dtype)
        if (
            isinstance(array, np.memmap)
            and isinstance(array.base, mmap.mmap)
            and array.flags.c_contiguous
        ):
            # The map itself (not a view of it, whose offset NumPy does not track):
            # reopened by path where it is read.
            recipe = (array.filename, array.dtype.str, array.shape, array.offset, "C")
            return ChunkLoader("memmap", recipe, start, stop, self.dtype)
        return ChunkLoader("array", array[start:stop], start, stop, self.dtype)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)``, checked for missing values."""
        rows = self.loader(start, stop).load()
        check_rows(self.name, rows, start)
        return rows


def check_rows(name: str, rows: np.ndarray, start: int) -> None:
    """Refuse missing values: the routine was derived for fully observed rows."""
    if rows.dtype.kind == "f" and not np.isfinite(rows).all():
        bad = start + int(np.argwhere(~np.isfinite(rows))[0][0])
        raise ValueError(
            f"data['{name}'] has a missing or non-finite value at row {bad}: chunked fits "
            "need fully observed data (imputation needs the data in memory)."
        )

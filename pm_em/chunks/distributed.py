"""Chunks on the workers of a ``dask.distributed.Client``.

One :class:`ChunkWorker` actor per worker holds that worker's chunks (read once, by
the worker itself: a memory map is reopened by path, a Dask array's rows computed
there) and its own compiled copy of the kernel, for the whole fit. An iteration
sends only the current parameter values and the totals of earlier levels (a few
numbers) and gets back each worker's sum over its chunks.

Several starts may pass over the chunks at once, each from its own thread
(:func:`pm_em.fit.loop.run_starts`): an actor serves one call at a time, in the
order they arrive, and each call's result is that start's alone.

A worker lost during a fit (its process killed, its machine gone) loses its
chunks: they are given to the workers still alive, read again there, and that
level's statistics are computed again for them only. With no worker left,
:class:`WorkersLostError` stops the fit (the EM loop then returns the last
completed iteration, with a warning).
"""

from __future__ import annotations

import threading
import time

import numpy as np
from pymc.logprob.utils import ParameterValueError

from pm_em.chunks.executor import add_into, chunk_ranges
from pm_em.chunks.sources import check_rows
from pm_em.errors import ComputationLostError

__all__ = ["ChunkWorker", "DaskExecutor", "WorkersLostError"]

#: Seconds a failed call waits for the scheduler to drop its worker before the
#: failure counts as the computation's own (re-raised) rather than a lost worker.
_LOST_WAIT = 10.0


class WorkersLostError(ComputationLostError):
    """Every worker holding chunks of the fit was lost."""

    reason = "workers lost"


class ChunkWorker:
    """A Dask actor: the chunks of one worker and the kernel computing on them."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.chunks = {}

    def load(self, indices, loaders) -> int:
        """Read the chunks ``indices`` (``loaders[i]``: one recipe per input)."""
        for index, chunk_loaders in zip(indices, loaders):
            # Rows shipped in a message (an in-memory array's slice) can be
            # unaligned views of its buffer, which PyTensor's C code refuses.
            arrays = [np.require(loader.load(), requirements="A") for loader in chunk_loaders]
            for name, rows, loader in zip(self.kernel.names, arrays, chunk_loaders):
                check_rows(name, rows, loader.start)
            self.chunks[index] = arrays
        return len(self.chunks)

    def level(self, level, values, totals, indices):
        """Level ``level``'s statistics summed over this worker's chunks ``indices``."""
        # Arrays deserialized from a message can be unaligned views of its buffer,
        # which PyTensor's C code refuses: aligned copies (a few numbers).
        values = [np.array(v, copy=True) for v in values]
        totals = [[np.array(t, copy=True) for t in level_totals] for level_totals in totals]
        total = None
        for index in indices:
            total = add_into(total, self.kernel(level, values, self.chunks[index], totals))
        return total


class DaskExecutor:
    """The chunks spread over a Dask client's workers, round robin. Thread-safe:
    passes from several threads share the actors; who holds which chunk changes
    under a lock.

    Parameters
    ----------
    client : dask.distributed.Client
    kernel : ChunkKernel
    sources : list of DataSource
    """

    def __init__(self, client, kernel, sources):
        self.client = client
        self.kernel = kernel
        self.sources = sources
        self.ranges = chunk_ranges(sources[0].n_rows, kernel.chunk_length)
        workers = sorted(client.scheduler_info()["workers"])
        if not workers:
            raise ValueError("The Dask client has no workers.")
        self._lock = threading.Lock()
        self.actors = {}
        self.owned = {addr: [] for addr in workers}
        for index in range(len(self.ranges)):
            self.owned[workers[index % len(workers)]].append(index)
        for addr in workers:
            self.actors[addr] = client.submit(
                ChunkWorker, kernel, actor=True, workers=[addr], allow_other_workers=False
            ).result()
        self._load(self.owned)

    @property
    def n_chunks(self) -> int:
        return len(self.ranges)

    def _loaders(self, index):
        start, stop = self.ranges[index]
        return [source.loader(start, stop) for source in self.sources]

    def _load(self, assignment) -> None:
        calls = [
            self.actors[addr].load(indices, [self._loaders(i) for i in indices])
            for addr, indices in assignment.items()
            if indices
        ]
        for call in calls:
            call.result()

    def _alive(self) -> set:
        return set(self.client.scheduler_info()["workers"])

    def _lost(self, addr: str, wait: float = _LOST_WAIT) -> bool:
        """Whether worker ``addr`` left the cluster (the scheduler may take a moment
        to see a killed process go)."""
        deadline = time.monotonic() + wait
        while addr in self._alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def level(self, level, values, totals, progress=None):
        """Level ``level``'s statistics summed over every chunk, on the workers.

        The workers' sums are added in the order of their addresses, whichever
        thread asks: the same pass gives the same bits.
        """
        needed = range(self.n_chunks)
        total = None
        while needed:
            with self._lock:
                pending = self._assignment(needed)
            calls = {
                addr: (actor.level(level, values, totals, indices), indices)
                for addr, (actor, indices) in pending.items()
            }
            lost, failed = {}, []
            for addr, (call, indices) in calls.items():
                try:
                    part = call.result()
                except Exception as error:  # noqa: BLE001 - told apart just below
                    # The model refusing the values, or any failure while the worker
                    # is still there, is the computation's own.
                    if isinstance(error, ParameterValueError) or not self._lost(addr):
                        raise
                    lost[addr] = error
                    failed += indices
                    continue
                total = add_into(total, part)
                if progress is not None:
                    progress(len(indices))
            if lost:
                with self._lock:
                    self._drop(lost)
            needed = sorted(failed)
        return total

    def _assignment(self, needed) -> dict:
        """Worker address -> (its actor, the chunks of ``needed`` it holds), in
        address order. Call with the lock held."""
        wanted = set(needed)
        pending = {}
        for addr, indices in self.owned.items():
            mine = [i for i in indices if i in wanted]
            if mine:
                pending[addr] = (self.actors[addr], mine)
        held = sum(len(indices) for _, indices in pending.values())
        if held < len(wanted):
            raise WorkersLostError("Every Dask worker holding chunks was lost.")
        return pending

    def _drop(self, lost) -> None:
        """Give the chunks of the workers ``lost`` (those another thread has not
        already moved) to the live ones, which read them. Call with the lock held."""
        lost = {addr: error for addr, error in lost.items() if addr in self.owned}
        if not lost:
            return
        chunks = sorted(i for addr in lost for i in self.owned.pop(addr))
        for addr in lost:
            self.actors.pop(addr, None)
        alive = sorted(a for a in self._alive() if a in self.actors)
        if not alive:
            addr, error = next(iter(lost.items()))
            raise WorkersLostError(
                f"Every Dask worker holding chunks was lost (last: {addr}: {error!r})."
            ) from error
        moved = {addr: [] for addr in alive}
        for k, index in enumerate(chunks):
            moved[alive[k % len(alive)]].append(index)
        self._load(moved)
        for addr, indices in moved.items():
            self.owned[addr] = sorted(self.owned[addr] + indices)

    def close(self) -> None:
        self.actors.clear()

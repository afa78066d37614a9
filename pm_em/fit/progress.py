"""One rich progress bar across EM's starts and iterations (off with
``progressbar=False``), as PyMC's samplers show one across chains."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["EMProgress", "progress_reporter"]


class EMProgress:
    """Reports a fit's progress to a rich bar: ``start(restart)`` before each start
    (it returns the start's ``(iteration, logp)`` reporter, called after every
    iteration), ``finish(restart, logp)`` at its end. Starts may run side by side,
    each from its own thread.

    The bar's length is ``n_init * max_iter``; a start that converges early jumps to
    its share's end. With chunks (``chunks``), a second bar counts the chunks done in
    the current pass over the data.
    """

    def __init__(self, bar: Progress, task, max_iter: int, n_init: int, chunk_task=None):
        self._bar = bar
        self._task = task
        self._chunk_task = chunk_task
        self._max_iter = max_iter
        self._n_init = n_init
        self._done = {}  # restart -> iterations counted on the bar
        self._best = -np.inf
        self._lock = threading.Lock()

    def _show(self, restart: int, done: int, **fields) -> None:
        with self._lock:
            self._done[restart] = done
            self._bar.update(self._task, completed=sum(self._done.values()), **fields)

    def start(self, restart: int):
        self._show(restart, 0, description=f"EM start {restart + 1}/{self._n_init}")

        def iteration(iteration: int, logp: float) -> None:
            self._show(restart, iteration, logp=f"{logp:.6g}")

        return iteration

    def finish(self, restart: int, logp: float) -> None:
        with self._lock:
            if np.isfinite(logp) and logp > self._best:
                self._best = logp
            best = self._best
        self._show(restart, self._max_iter, best=f"{best:.6g}")

    def chunks(self, n_done: int) -> None:
        """``n_done`` more chunks computed (the chunk bar restarts with each pass)."""
        if self._chunk_task is None:
            return
        with self._lock:
            task = next(t for t in self._bar.tasks if t.id == self._chunk_task)
            if task.completed >= task.total:
                self._bar.reset(self._chunk_task, total=task.total)
            self._bar.advance(self._chunk_task, n_done)


@contextmanager
def progress_reporter(enabled: bool, max_iter: int, n_init: int = 1, chunks_per_pass=None):
    """Yield an :class:`EMProgress`, or None when disabled; with ``chunks_per_pass``
    (a chunked fit), with a bar of the chunks of the current pass too."""
    if not enabled:
        yield None
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("logp = {task.fields[logp]}"),
        TextColumn("best = {task.fields[best]}"),
        TimeElapsedColumn(),
        transient=False,
    )
    with bar:
        task = bar.add_task(f"EM start 1/{n_init}", total=max_iter * n_init, logp="-", best="-")
        chunk_task = None
        if chunks_per_pass is not None:
            chunk_task = bar.add_task("chunks of a pass", total=chunks_per_pass, logp="-", best="-")
        yield EMProgress(bar, task, max_iter, n_init, chunk_task)

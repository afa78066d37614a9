"""One rich progress bar across EM's starts and iterations (off with
``progressbar=False``), as PyMC's samplers show one across chains."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["EMProgress", "progress_reporter"]


class EMProgress:
    """Reports a fit's progress to a rich bar: ``start(restart)`` before each start,
    a call ``(iteration, logp)`` after every iteration, ``finish(logp)`` at its end.

    The bar's length is ``n_init * max_iter``; a start that converges early jumps to
    its share's end.
    """

    def __init__(self, bar: Progress, task, max_iter: int, n_init: int):
        self._bar = bar
        self._task = task
        self._max_iter = max_iter
        self._n_init = n_init
        self._restart = 0
        self._best = -np.inf

    def start(self, restart: int) -> None:
        self._restart = restart
        self._bar.update(
            self._task,
            completed=restart * self._max_iter,
            restart=f"{restart + 1}/{self._n_init}",
        )

    def __call__(self, iteration: int, logp: float) -> None:
        self._bar.update(
            self._task,
            completed=self._restart * self._max_iter + iteration,
            logp=f"{logp:.6g}",
        )

    def finish(self, logp: float) -> None:
        if np.isfinite(logp) and logp > self._best:
            self._best = logp
        self._bar.update(
            self._task,
            completed=(self._restart + 1) * self._max_iter,
            best=f"{self._best:.6g}",
        )


@contextmanager
def progress_reporter(enabled: bool, max_iter: int, n_init: int = 1):
    """Yield an :class:`EMProgress`, or None when disabled."""
    if not enabled:
        yield None
        return
    bar = Progress(
        TextColumn("EM start {task.fields[restart]}"),
        BarColumn(),
        TextColumn("logp = {task.fields[logp]}"),
        TextColumn("best = {task.fields[best]}"),
        TimeElapsedColumn(),
        transient=False,
    )
    with bar:
        task = bar.add_task(
            "em", total=max_iter * n_init, logp="-", best="-", restart=f"1/{n_init}"
        )
        yield EMProgress(bar, task, max_iter, n_init)

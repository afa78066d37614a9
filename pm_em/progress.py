"""A rich progress bar for EM iterations (off with ``progressbar=False``)."""

from __future__ import annotations

from contextlib import contextmanager

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["progress_reporter"]


@contextmanager
def progress_reporter(enabled: bool, total: int):
    """Yield a ``progress(iteration, logp)`` callable, or None when disabled."""
    if not enabled:
        yield None
        return
    bar = Progress(
        TextColumn("EM"),
        BarColumn(),
        TextColumn("{task.completed} it"),
        TextColumn("logp = {task.fields[logp]}"),
        TimeElapsedColumn(),
        transient=False,
    )
    with bar:
        task = bar.add_task("em", total=total, logp="-")

        def progress(iteration: int, logp: float) -> None:
            bar.update(task, completed=iteration, logp=f"{logp:.6g}")

        yield progress

"""Online (stepwise) EM over a stream of chunks: Cappé & Moulines (2009).

Each chunk updates a running average of the per-row statistics,
``s <- (1 - gamma_k) s + gamma_k s(chunk; theta)``, and the parameters are the
closed-form M-step of ``N s`` (``N`` rows in the full data, the priors counted
once), with step sizes ``gamma_k = (k + 1) ** -decay``, ``decay`` in (1/2, 1]
(the first chunk replaces the start's statistics). Statistics of a later level
(a scale's squared residuals about the means just updated) are taken on the same
chunk about the means of the running level-0 statistics. The result approaches
the batch MAP as the stream goes on; it is not the batch fit's iterate, and no
chunk needs to be seen twice.
"""

from __future__ import annotations

import numpy as np

from pm_em.chunks.executor import chunk_ranges
from pm_em.errors import UnsupportedModelError

__all__ = ["stepwise_em"]


def stepwise_em(routine, values, *, n_epochs: int = 1, decay: float = 0.6, progress=None):
    """Stepwise EM over the chunks of ``routine`` (a :class:`~pm_em.chunks.fit.ChunkedEM`
    built in-process), ``n_epochs`` times in order.

    Parameters
    ----------
    routine : ChunkedEM
    values : list of np.ndarray
        Start, unconstrained space.
    n_epochs : int, default 1
        Passes over the data (1: each chunk seen once, as from a stream).
    decay : float, default 0.6
        Step sizes ``(k + 1) ** -decay``; in (0.5, 1] for convergence.
    progress : callable, optional
        Called as ``progress(1)`` after each chunk.

    Returns
    -------
    values : list of np.ndarray
        The parameters after the last chunk.
    """
    if not 0.5 < decay <= 1.0:
        raise ValueError(f"decay must be in (0.5, 1], got {decay!r}.")
    if n_epochs < 1:
        raise ValueError(f"n_epochs must be at least 1, got {n_epochs!r}.")
    numeric = [p.name for p in routine.plan.numeric_params]
    if numeric:
        # Their Q is not a function of running statistics: it needs every chunk's
        # responsibilities at one point, which a stream never has.
        raise UnsupportedModelError(
            f"Parameters {numeric} have no closed-form M-step: stepwise (online) EM "
            "updates closed-form parameters only. Fit in chunks without online=."
        )
    kernel, mstep = routine.kernel, routine.mstep
    n_rows = routine.n_rows
    ranges = chunk_ranges(n_rows, kernel.chunk_length)
    averages = None  # per level, per statistic: the running average per row
    step = 0
    for _ in range(n_epochs):
        for start, stop in ranges:
            arrays = [source.read(start, stop) for source in routine.sources]
            gamma = 1.0 if averages is None else (step + 1) ** -decay
            rows = stop - start
            totals = []
            new_averages = []
            for level in range(kernel.n_levels):
                stats = kernel(level, values, arrays, totals)
                if level == 0:
                    # Neither the chunk's log-likelihood nor its counts are statistics.
                    stats = kernel.split_first(stats)[1]
                per_row = [np.asarray(s) / rows for s in stats]
                if averages is not None:
                    per_row = [
                        (1 - gamma) * a + gamma * s for a, s in zip(averages[level], per_row)
                    ]
                new_averages.append(per_row)
                # The next level's chunk statistics about the running means.
                totals.append([n_rows * a for a in per_row])
            averages = new_averages
            values = mstep(values, [[n_rows * a for a in level] for level in averages])
            step += 1
            if progress is not None:
                progress(1)
    return values

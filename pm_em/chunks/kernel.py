"""What one chunk computes: the compiled functions of a :class:`~pm_em.chunks.plan.ChunkPlan`.

A :class:`ChunkKernel` holds the plan's per-chunk graphs and compiles them on first
use, in the process that uses it: it pickles as graphs, so a Dask worker compiles
its own copy once and keeps it (the compiled functions never travel).
"""

from __future__ import annotations

import numpy as np
from pymc.logprob.utils import ParameterValueError

from pm_em.compile import compile_function
from pm_em.errors import UnsupportedModelError

__all__ = ["NUMERIC", "ChunkKernel", "MStep", "check_additive"]

#: The "level" of the numeric M-step's Q and gradient: ``values`` is then
#: ``[theta, *new values, *E-step values]`` and there are no totals.
NUMERIC = "numeric"


class ChunkKernel:
    """The statistics of one chunk, level by level.

    Parameters
    ----------
    plan : ChunkPlan
    compile_kwargs : dict, optional
    backend : {"c", "jax"}
    """

    def __init__(self, plan, compile_kwargs=None, backend="c"):
        self.chunk_length = plan.chunk_length
        self.names = plan.names
        self.dtypes = [v.type.dtype for v in plan.chunk_inputs]
        self.row_shapes = [tuple(v.type.shape[1:]) for v in plan.chunk_inputs]
        self._inputs = [*plan.values, *plan.chunk_inputs]
        self._totals = plan.totals
        first = [plan.chunk_logp, *(plan.levels[0] if plan.levels else []), *plan.counts]
        self._outputs = [first, *(list(stats) for stats in plan.levels[1:])]
        #: Level 0's statistics (after the log-likelihood, before the counts).
        self.n_first = len(plan.levels[0]) if plan.levels else 0
        self._numeric = (
            [plan.theta, *plan.values, *plan.estep_values, *plan.chunk_inputs],
            list(plan.chunk_q),
        )
        self._compile = (compile_kwargs, backend)
        self._fns = {}

    @property
    def n_levels(self) -> int:
        return len(self._outputs)

    def split_first(self, outputs) -> tuple:
        """Level 0's outputs (of a chunk, or totals) as ``(log-likelihood,
        statistics, expected counts per latent)``."""
        end = 1 + self.n_first
        return outputs[0], list(outputs[1:end]), list(outputs[end:])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fns"] = {}
        return state

    def _fn(self, level: int):
        fn = self._fns.get(level)
        if fn is None and level == NUMERIC:
            fn = self._fns[level] = compile_function(*self._numeric, *self._compile)
        elif fn is None:
            earlier = [t for totals in self._totals[:level] for t in totals]
            fn = compile_function([*self._inputs, *earlier], self._outputs[level], *self._compile)
            self._fns[level] = fn
        return fn

    def __call__(self, level, values, arrays, totals) -> list[np.ndarray]:
        """Level ``level``'s statistics of one chunk of ``m`` rows or fewer (at level 0,
        its log-likelihood first and the expected counts last: :meth:`split_first`).

        A short chunk (the last one) of ``r`` rows is padded to ``m`` rows with
        copies of its last row, whose contribution is then taken out: every
        statistic is a sum of per-row terms, so ``f(padded) - (m - r) / m *
        f(m copies of the last row)`` is the short chunk's own sum, with the one
        compiled routine (no second compilation for the remainder).

        At level :data:`NUMERIC`: ``[Q, dQ/dtheta]`` of the chunk, ``[-inf, nan]``
        where the model refuses ``theta`` (a point of zero density).
        """
        if level == NUMERIC:
            try:
                return self._sums(level, values, arrays, totals)
            except ParameterValueError:
                return [np.array(-np.inf), np.full(np.shape(values[0]), np.nan)]
        return self._sums(level, values, arrays, totals)

    def _sums(self, level, values, arrays, totals) -> list[np.ndarray]:
        fn = self._fn(level)
        # Only the levels before ``level`` are passed (none for the numeric block);
        # of level 0's, its statistics (the counts may follow them).
        if totals:
            totals = [list(totals[0])[: self.n_first], *totals[1:]]
        flat_totals = [t for level_totals in totals for t in level_totals]
        rows = len(arrays[0])
        m = self.chunk_length
        if rows == m:
            return [np.asarray(v) for v in fn(*values, *arrays, *flat_totals)]
        padded = [np.concatenate([a, np.repeat(a[-1:], m - rows, axis=0)]) for a in arrays]
        last = [np.repeat(a[-1:], m, axis=0) for a in arrays]
        full = fn(*values, *padded, *flat_totals)
        extra = fn(*values, *last, *flat_totals)
        share = (m - rows) / m
        return [np.asarray(f) - share * np.asarray(e) for f, e in zip(full, extra)]


def check_additive(kernel, values, arrays, rtol: float = 1e-7) -> None:
    """Check on one chunk that every statistic is a sum over its rows: the chunk's
    statistics equal those of its two halves added (each half computed as a short
    chunk), at every level.

    Raises
    ------
    UnsupportedModelError
        Naming the level and statistic that is not additive (a marked expression
        that mixes rows, e.g. normalizes over them): the chunked fit would be wrong.
    """
    rows = len(arrays[0])
    if rows < 2:
        return
    half = rows // 2
    totals = []
    for level in range(kernel.n_levels):
        whole = kernel(level, values, arrays, totals)
        first = kernel(level, values, [a[:half] for a in arrays], totals)
        second = kernel(level, values, [a[half:] for a in arrays], totals)
        for i, (w, a, b) in enumerate(zip(whole, first, second)):
            if not np.allclose(w, a + b, rtol=rtol, atol=1e-9 * (1 + np.max(np.abs(w)))):
                what = "the log-likelihood" if level == 0 and i == 0 else f"statistic {i}"
                raise UnsupportedModelError(
                    f"At level {level}, {what} of a chunk is not the sum of its halves' "
                    "(a marked sum mixes rows): this model cannot be fitted in chunks. Use "
                    "find_MAP on the data in memory."
                )
        totals.append(whole[1:] if level == 0 else whole)


class MStep:
    """The once-only part of an iteration: the priors' log-density, the
    closed-form M-step from the chunk totals, and the numeric block's terms counted
    once."""

    def __init__(self, plan, compile_kwargs=None, backend="c"):
        self.closed_index = plan.closed_index
        self._global_q = None
        if plan.numeric_params:
            self._global_q = compile_function(
                [plan.theta, *plan.values], plan.global_q, compile_kwargs, backend
            )
        self._global_logp = compile_function(
            plan.values, [plan.global_logp], compile_kwargs, backend
        )
        totals = [t for level in plan.totals for t in level]
        self._closed = compile_function(
            [*plan.values, *totals], plan.closed_step, compile_kwargs, backend
        )

    def global_logp(self, values) -> float:
        return float(self._global_logp(*values)[0])

    def global_q(self, theta, values) -> tuple[float, np.ndarray]:
        """The numeric block's ``Q`` and gradient from the terms read once (priors)."""
        q, grad = self._global_q(theta, *values)
        return float(q), np.asarray(grad, dtype=float)

    def __call__(self, values, totals) -> list[np.ndarray]:
        """The next values: the closed-form parameters updated, the rest kept."""
        flat = [t for level in totals for t in level]
        new = list(values)
        for index, value in zip(self.closed_index, self._closed(*values, *flat)):
            new[index] = np.asarray(value)
        return new

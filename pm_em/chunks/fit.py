"""EM over chunks of the data: the routine the EM loop drives, and the fit.

The model is declared on one chunk of the data (``m`` rows, the same dims as the
full data); the fit is given the full data. :class:`ChunkedEM` is an EM routine
(:class:`pm_em.fit.protocol.EMRoutine`) run by the same loop as in memory
(:func:`pm_em.fit.loop.run_em`: convergence, SQUAREM, callback, Ctrl-C, degenerate
solutions alike). Its E-step is one pass over the chunks (the log-likelihood, the
statistics of level 0, the expected counts per component); its M-step passes over
them once more per later level of statistics (a scale, whose residuals use the
means just updated, as the in-memory ECM M-step does), then runs the closed-form
M-step on the totals. A numeric block then maximizes ``Q`` by L-BFGS-B and Newton
polishing (:mod:`pm_em.routine.optimize`) given the closed-form parameters' new
values, as in memory: each evaluation of ``Q`` and its gradient is one more pass
over the chunks (the responsibilities recomputed there at the E-step point) plus the
priors once. The iterates are the in-memory fit's up to the rounding of sums taken
in another order.
"""

from __future__ import annotations

import logging
import threading
from typing import NamedTuple

import arviz as az
import numpy as np

from pm_em.chunks.distributed import DaskExecutor
from pm_em.chunks.executor import LocalExecutor
from pm_em.chunks.kernel import NUMERIC, ChunkKernel, MStep, check_additive
from pm_em.chunks.plan import plan_chunks
from pm_em.chunks.sources import DataSource
from pm_em.fit.loop import best_start, mode_spread, run_starts, warn_spread
from pm_em.fit.progress import progress_reporter
from pm_em.fit.protocol import ExpectedCounts
from pm_em.fit.starts import start_points
from pm_em.mstep.inputs import join_flat, split_flat
from pm_em.results.inference_data import build_chunked_inference_data
from pm_em.routine.em import cached_routine
from pm_em.routine.optimize import minimize_negative_q

__all__ = ["ChunkEStep", "ChunkedEM", "fit_chunked"]

_log = logging.getLogger("pm_em")


class ChunkEStep(NamedTuple):
    """What a chunked E-step leaves for the M-step at the same values.

    Attributes
    ----------
    totals : list of np.ndarray
        Level 0's statistics, summed over the chunks.
    counts : list of np.ndarray
        Per latent of :attr:`pm_em.chunks.plan.ChunkPlan.count_latents`, its
        expected count at each support value.
    """

    totals: list
    counts: list


class ChunkedEM:
    """The EM routine of a model declared on one chunk, over the full data in chunks:
    an :class:`~pm_em.fit.protocol.EMRoutine` for :func:`pm_em.fit.loop.run_em`.

    Parameters
    ----------
    em : pm_em.EM
        The routine of the model as declared (one chunk of ``m`` rows).
    data : dict
        Name of an observed variable or ``pm.Data`` container -> its full data
        (NumPy array, ``np.memmap``, Dask array, xarray.DataArray), rows first.
    client : dask.distributed.Client, optional
        Run the chunks on its workers (:mod:`pm_em.chunks.distributed`); in this
        process when None.
    concurrent_starts : bool, default True
        With ``client``: let several starts pass over the workers' chunks at once
        (:func:`pm_em.fit.loop.run_starts`). In this process starts always run one
        after another.
    on_chunks : callable, optional
        Called as ``on_chunks(n)`` after each ``n`` chunks computed (a progress bar).

    Raises
    ------
    UnsupportedModelError
        When the model cannot be fitted in chunks (:func:`pm_em.chunks.plan.plan_chunks`).
    """

    def __init__(self, em, data: dict, client=None, *, concurrent_starts=True, on_chunks=None):
        self.em = em
        names = list(data)
        self.plan = plan = plan_chunks(em, names)
        self.sources = [
            DataSource(name, data[name], v.type.shape[1:], v.type.dtype)
            for name, v in zip(names, plan.chunk_inputs)
        ]
        rows = {s.name: s.n_rows for s in self.sources}
        if len(set(rows.values())) != 1:
            raise ValueError(f"data: every input needs the same number of rows, got {rows}.")
        self.n_rows = self.sources[0].n_rows
        self.kernel = kernel = ChunkKernel(plan, em.compile_kwargs, em.backend)
        self.mstep = MStep(plan, em.compile_kwargs, em.backend)
        if client is None:
            self.executor = LocalExecutor(kernel, self.sources)
        else:
            self.executor = DaskExecutor(client, kernel, self.sources)
        #: See :class:`~pm_em.fit.protocol.EMRoutine`: starts side by side on a
        #: cluster, whose executor is thread-safe; the compiled functions run here
        #: (the M-step from totals, the priors) are called one thread at a time.
        self.concurrent_starts = client is not None and concurrent_starts
        self.on_chunks = on_chunks
        self._here = threading.Lock()
        #: The parameters (:class:`~pm_em.fit.protocol.EMRoutine`).
        self.params = em.params
        #: The in-memory fit's count of observed entries, for the same tolerance.
        self.n_observations = (
            em.structure.n_observations + (self.n_rows - plan.chunk_length) * plan.rows_observed
        )
        #: The precision the model computes in.
        self.float_eps = em.structure.float_eps

    @property
    def n_chunks(self) -> int:
        return self.executor.n_chunks

    @property
    def n_levels(self) -> int:
        return self.kernel.n_levels

    def check_additive(self, values) -> None:
        """Check on the first chunk, at ``values``, that every statistic is a sum
        over its rows (:func:`~pm_em.chunks.kernel.check_additive`)."""
        start, stop = self.executor.ranges[0]
        with self._here:
            check_additive(self.kernel, values, [s.read(start, stop) for s in self.sources])

    def e_step(self, values) -> tuple[float, ChunkEStep]:
        """Observed-data log-posterior at ``values``, with level 0's totals and the
        expected counts (one pass over the chunks)."""
        first = self.executor.level(0, values, [], self.on_chunks)
        chunk_logp, totals, counts = self.kernel.split_first(first)
        with self._here:
            logp = float(chunk_logp) + self.mstep.global_logp(values)
        return logp, ChunkEStep(totals, counts)

    def m_step(self, values, log_resp: ChunkEStep):
        """The next values, from the E-step at ``values`` and the later levels'
        totals."""
        totals = [log_resp.totals]
        for level in range(1, self.n_levels):
            totals.append(self.executor.level(level, values, totals, self.on_chunks))
        with self._here:
            new = self.mstep(values, totals)
        if self.plan.numeric_params:
            new = self._numeric_step(values, new)
        return new

    def _numeric_step(self, values, new):
        """The numeric block given the closed-form parameters' ``new`` values, with
        the responsibilities at ``values`` (:meth:`pm_em.routine.compiled.Routine.m_step`
        over chunks)."""
        numeric, index = self.plan.numeric_params, self.plan.numeric_index
        start = join_flat(numeric, {p.value.name: new[i] for p, i in zip(numeric, index)})
        # The in-memory scale: Q per observation of the full data.
        scale = 1.0 / self.n_observations

        def negative(theta):
            point = [theta, *new, *values]
            q_chunks, grad_chunks = self.executor.level(NUMERIC, point, [], self.on_chunks)
            with self._here:
                q_once, grad_once = self.mstep.global_q(theta, new)
            return -scale * (q_once + float(q_chunks)), -scale * (grad_once + grad_chunks)

        theta = minimize_negative_q(negative, start)
        if theta is None:
            return new
        new = list(new)
        solved = split_flat(numeric, theta)
        for p, i in zip(numeric, index):
            new[i] = solved[p.value.name]
        return new

    def constrained(self, values) -> list[np.ndarray]:
        """The parameters' constrained values (the declared model's routine)."""
        with self._here:
            return self.em.routine.constrained(values)

    def to_point(self, values) -> dict[str, np.ndarray]:
        """Constrained point by variable name."""
        with self._here:
            return self.em.to_point(values)

    def expected_counts(self, log_resp: ChunkEStep) -> list[ExpectedCounts]:
        """Each latent's expected counts over the full data, from the E-step."""
        return [
            ExpectedCounts(name, np.asarray(support), np.asarray(counts, dtype=float))
            for (name, support), counts in zip(self.plan.count_latents, log_resp.counts)
        ]

    def close(self) -> None:
        self.executor.close()


def fit_chunked(
    model=None,
    *,
    data: dict,
    client=None,
    latent_vars=None,
    initvals=None,
    n_init: int = 1,
    accelerate: str | None = "auto",
    tol: float = 1e-8,
    max_iter: int = 1000,
    random_seed=None,
    progressbar: bool = True,
    compile_kwargs: dict | None = None,
    backend: str | None = None,
    callback=None,
    concurrent_starts: bool = True,
) -> az.InferenceData:
    """MAP by EM over data too large for memory, a chunk at a time.

    Declare the model on one chunk of the data (the first ``m`` rows, same dims):
    its length is the chunk length. Pass the full data in ``data``. Each iteration
    computes, chunk by chunk, the sums over observations the closed-form M-step
    needs (:mod:`pm_em.chunks.plan`), and the M-step runs on their totals; a
    numeric block's ``Q`` and gradient are sums over the chunks too, one pass per
    evaluation. The loop is the in-memory one (:func:`pm_em.fit.loop.run_starts`).
    Called by :func:`pm_em.find_MAP` when it is given ``data``.

    Parameters
    ----------
    model : pm.Model, optional
        Declared on one chunk; by default the one of the ``with`` context.
    data : dict
        Name of an observed variable (or a ``pm.Data`` container) -> its full
        data: ``np.ndarray``, ``np.memmap`` (``np.load(path, mmap_mode="r")``), a
        Dask array, or an ``xarray.DataArray`` of either; rows along axis 0.
    client : dask.distributed.Client, optional
        Run the chunks on its workers, which read and keep their chunks and their
        compiled routine for the whole fit (:mod:`pm_em.chunks.distributed`).
        None: in this process, one chunk in memory at a time.
    latent_vars, accelerate, tol, max_iter, random_seed, progressbar, compile_kwargs, backend
        As in :func:`pm_em.find_MAP`. The starts are ``find_MAP``'s with
        ``init="jitter"`` (seeded by ``random_seed``), ``initvals`` set in each.
    n_init : int, default 1
        Starts, on the same chunks (and workers); the one with the highest
        log-posterior that did not collapse wins (``em_stats.attrs["best_restart"]``,
        every start's trace in ``restart_logp``; a ``MultimodalWarning`` when
        converged starts end at different modes, as in memory).
    callback : callable, optional
        As in :func:`pm_em.find_MAP`.
    concurrent_starts : bool, default True
        With ``client`` and ``n_init > 1``: run the starts side by side, one
        driver thread each, their passes served by the same workers. Each start's
        iterates are those it has alone. False: one after another.

    Returns
    -------
    az.InferenceData
        ``posterior``: the MAP point (chain = draw = 1). ``em_stats``: as
        :func:`pm_em.find_MAP` lays it out (``logp`` per iteration, ``n_iter``,
        ``n_e_steps``, ``converged``, ``restart_*``); attrs ``best_restart``,
        ``accelerate``, ``squarem_from``, ``stopped``, ``restarts_at_best``,
        ``restart_spread``, ``n_observations``,
        ``n_rows``, ``chunk_length``, ``n_chunks``. The responsibilities (rows x
        support) are not materialized: for the rows of one chunk,
        ``pm_em.EM(model).e_step(point)`` on a model declared on them.

    Raises
    ------
    UnsupportedModelError
        When the fit cannot be split over chunks exactly (a global latent, a Markov
        chain, a per-row input not in ``data``); the message names the variable.
    ValueError
        When the observed-data log-posterior is not finite at any start.

    Examples
    --------
    >>> x = np.load("x.npy", mmap_mode="r")  # doctest: +SKIP
    >>> with pm.Model() as model:  # doctest: +SKIP
    ...     w = pm.Dirichlet("w", np.ones(2))
    ...     mu = pm.Normal("mu", 0, 10, shape=2)
    ...     sigma = pm.HalfNormal("sigma", 5, shape=2)
    ...     z = pm.Categorical("z", w, shape=100_000)
    ...     pm.Normal("x", mu[z], sigma[z], observed=x[:100_000])
    >>> idata = pm_em.find_MAP(model, data={"x": x})  # doctest: +SKIP
    """
    if n_init < 1:
        raise ValueError(f"n_init must be at least 1, got {n_init!r}.")
    em = cached_routine(model, latent_vars, compile_kwargs, backend)
    # The starts find_MAP's init="jitter" gives, so that the fits are comparable.
    starts = start_points(em, "jitter", n_init, random_seed, fixed=initvals or {})
    if initvals:
        unknown = set(initvals) - set(starts[0])
        if unknown:
            raise ValueError(f"initvals: {sorted(unknown)} are not continuous free variables.")
        starts = [{**point, **{k: np.asarray(v) for k, v in initvals.items()}} for point in starts]
    starts = [em.to_values(point) for point in starts]
    routine = ChunkedEM(em, data, client=client, concurrent_starts=concurrent_starts)
    try:
        routine.check_additive(starts[0])
        per_pass = routine.n_chunks
        with progress_reporter(progressbar, max_iter, n_init, per_pass) as progress:
            routine.on_chunks = None if progress is None else progress.chunks
            states, histories = run_starts(
                routine,
                starts,
                tol=tol,
                max_iter=max_iter,
                accelerate=accelerate,
                progress=progress,
                callback=callback,
            )
    finally:
        routine.close()
    best = best_start(histories)
    at_best, compared, spread = mode_spread(routine, histories, tol)
    warn_spread(routine, at_best, compared, spread, n_init)
    state, history = states[best], histories[best]
    if not np.isfinite(state.logp):
        raise ValueError(
            f"The observed-data log-posterior is {state.logp} at every start: choose "
            "another start (initvals, random_seed)."
        )
    # The stop that ended the fit (one after another: the last start's).
    stopped = next((h.stopped for h in histories if h.stopped), "")
    if stopped == "interrupt":
        _log.warning(
            "Interrupted after %d of %d start(s): returning the best point so far (not converged).",
            len(histories),
            n_init,
        )
    return build_chunked_inference_data(
        em,
        routine.to_point(state.values),
        histories,
        best,
        tol=tol,
        max_iter=max_iter,
        options={
            "accelerate": str(accelerate),
            "squarem_from": -1 if history.squarem_from is None else history.squarem_from,
            "stopped": stopped,
            "restarts_at_best": at_best,
            "restart_spread": spread,
            "n_observations": routine.n_observations,
            "n_rows": routine.n_rows,
            "chunk_length": routine.plan.chunk_length,
            "n_chunks": routine.n_chunks,
            "log_posterior": state.logp,
        },
    )

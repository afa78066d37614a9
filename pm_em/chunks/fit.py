"""EM over chunks of the data: the loop and its result.

The model is declared on one chunk of the data (``m`` rows, the same dims as the
full data); the fit is given the full data. Each iteration passes over the chunks
once per level of statistics (one pass for weights, means and counts; a second one
for a scale, whose residuals use the means just updated, as the in-memory ECM
M-step does), then runs the closed-form M-step on the totals. A numeric block then
maximizes ``Q`` by L-BFGS-B and Newton polishing (:mod:`pm_em.routine.optimize`)
given the closed-form parameters' new values, as in memory: each evaluation of
``Q`` and its gradient is one more pass over the chunks (the responsibilities
recomputed there at the E-step point) plus the priors once. The iterates are the
in-memory fit's (plain EM steps, ``accelerate=None``) up to the rounding of sums
taken in another order.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import arviz as az
import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pm_em.chunks.distributed import DaskExecutor, WorkersLostError
from pm_em.chunks.executor import LocalExecutor
from pm_em.chunks.kernel import NUMERIC, ChunkKernel, MStep, check_additive
from pm_em.chunks.plan import plan_chunks
from pm_em.chunks.sources import DataSource
from pm_em.errors import EMConvergenceWarning
from pm_em.fit.loop import EMHistory, has_converged
from pm_em.fit.starts import start_points
from pm_em.mstep.inputs import join_flat, split_flat
from pm_em.results.inference_data import build_chunked_inference_data
from pm_em.routine.em import cached_routine
from pm_em.routine.optimize import minimize_negative_q

__all__ = ["ChunkedEM", "fit_chunked"]

# EM never decreases the log-posterior; a decrease beyond this (relative) is not rounding.
_DECREASE_TOLERANCE = 1e-8


class ChunkedEM:
    """The EM routine of a model declared on one chunk, over the full data in chunks.

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

    Raises
    ------
    UnsupportedModelError
        When the model cannot be fitted in chunks (:func:`pm_em.chunks.plan.plan_chunks`).
    """

    def __init__(self, em, data: dict, client=None):
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
        # The in-memory fit's count of observed entries, for the same tolerance.
        self.n_observations = (
            em.structure.n_observations + (self.n_rows - plan.chunk_length) * plan.rows_observed
        )

    @property
    def n_chunks(self) -> int:
        return self.executor.n_chunks

    @property
    def n_levels(self) -> int:
        return self.kernel.n_levels

    def e_step(self, values, progress=None):
        """Observed-data log-posterior at ``values`` and level 0's totals."""
        first = self.executor.level(0, values, [], progress)
        logp = float(first[0]) + self.mstep.global_logp(values)
        return logp, [first[1:]]

    def m_step(self, values, first_totals, progress=None):
        """The next values, from level 0's totals at ``values`` and the later levels'."""
        totals = list(first_totals)
        for level in range(1, self.n_levels):
            totals.append(self.executor.level(level, values, totals, progress))
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
            q_chunks, grad_chunks = self.executor.level(NUMERIC, point, [])
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

    def run(self, values, *, tol, max_iter, progress=None):
        """Plain EM steps from ``values`` to convergence (the in-memory loop's
        criterion: change of the log-posterior per observation below ``tol``).

        Before the first step, the statistics of the first chunk are checked to be
        sums over its rows (:func:`~pm_em.chunks.kernel.check_additive`).

        Returns the last values, their log-posterior and the :class:`EMHistory`.
        """
        start, stop = self.executor.ranges[0]
        check_additive(self.kernel, values, [s.read(start, stop) for s in self.sources])
        logp, totals = self.e_step(values, progress)
        history = EMHistory(logp=[logp], n_e_steps=1)
        if not np.isfinite(logp):
            raise ValueError(
                f"The observed-data log-posterior is {logp} at the start: choose another "
                "start (initvals, random_seed)."
            )
        for iteration in range(1, max_iter + 1):
            try:
                new_values = self.m_step(values, totals, progress)
                new_logp, new_totals = self.e_step(new_values, progress)
            except WorkersLostError as error:
                warnings.warn(
                    f"{error} Stopped after iteration {iteration - 1}: the result is that "
                    "iteration's point (not converged). Restart the fit from it (initvals) "
                    "once workers are back.",
                    EMConvergenceWarning,
                    stacklevel=3,
                )
                history.stopped = "workers lost"
                return values, logp, history
            history.n_e_steps += 1
            if not np.isfinite(new_logp):
                warnings.warn(
                    f"The log-posterior became {new_logp} at iteration {iteration} (a "
                    "degenerate solution, e.g. a component on one point): stopped at the "
                    "last finite point.",
                    EMConvergenceWarning,
                    stacklevel=3,
                )
                history.stopped = "degenerate"
                break
            if new_logp < logp - _DECREASE_TOLERANCE * max(1.0, abs(logp)):
                warnings.warn(
                    f"The observed-data log-posterior decreased at iteration {iteration} "
                    f"({logp:.10g} -> {new_logp:.10g}); EM should never decrease it.",
                    EMConvergenceWarning,
                    stacklevel=3,
                )
            history.logp.append(new_logp)
            history.converged = has_converged(logp, new_logp, tol, self.n_observations)
            values, logp, totals = new_values, new_logp, new_totals
            if progress is not None:
                progress.iteration(iteration, logp)
            if history.converged:
                break
        else:
            change = abs(history.logp[-1] - history.logp[-2]) / self.n_observations
            warnings.warn(
                f"EM did not converge in {max_iter} iterations (last change per observation "
                f"{change:.3g} > tol={tol:g}). Increase max_iter or loosen tol.",
                EMConvergenceWarning,
                stacklevel=3,
            )
        return values, logp, history

    def close(self) -> None:
        self.executor.close()


class _ChunkProgress:
    """A rich bar of the chunks done in the current iteration, with its log-posterior."""

    def __init__(self, bar: Progress, task, per_iteration: int):
        self._bar, self._task, self._per_iteration = bar, task, per_iteration
        self._done = 0

    def __call__(self, n_done: int) -> None:
        if self._done >= self._per_iteration:  # the next iteration's first chunks
            self._done = 0
            self._bar.reset(self._task, total=self._per_iteration)
        self._done += n_done
        self._bar.advance(self._task, n_done)

    def iteration(self, iteration: int, logp: float) -> None:
        self._bar.update(self._task, iteration=iteration, logp=f"{logp:.10g}")


def _progress_bar(per_iteration: int):
    bar = Progress(
        TextColumn("EM iteration {task.fields[iteration]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("chunks   logp = {task.fields[logp]}"),
        TimeElapsedColumn(),
        transient=False,
    )
    task = bar.add_task("em", total=per_iteration, iteration=0, logp="-")
    return bar, _ChunkProgress(bar, task, per_iteration)


def fit_chunked(
    model=None,
    *,
    data: dict,
    client=None,
    latent_vars=None,
    initvals=None,
    n_init: int = 1,
    tol: float = 1e-8,
    max_iter: int = 1000,
    random_seed=None,
    progressbar: bool = True,
    compile_kwargs: dict | None = None,
    backend: str | None = None,
) -> az.InferenceData:
    """MAP by EM over data too large for memory, a chunk at a time.

    Declare the model on one chunk of the data (the first ``m`` rows, same dims):
    its length is the chunk length. Pass the full data in ``data``. Each iteration
    computes, chunk by chunk, the sums over observations the closed-form M-step
    needs (:mod:`pm_em.chunks.plan`), and the M-step runs on their totals; a
    numeric block's ``Q`` and gradient are sums over the chunks too, one pass per
    evaluation. Called by :func:`pm_em.find_MAP` when it is given ``data``.

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
    latent_vars, tol, max_iter, random_seed, progressbar, compile_kwargs, backend
        As in :func:`pm_em.find_MAP`. The starts are ``find_MAP``'s with
        ``init="jitter"`` (seeded by ``random_seed``), ``initvals`` set in each.
    n_init : int, default 1
        Starts, run one after another on the same chunks (and workers); the one
        with the highest log-posterior wins (``em_stats.attrs["best_restart"]``,
        every start's trace in ``restart_logp``).

    Returns
    -------
    az.InferenceData
        ``posterior``: the MAP point (chain = draw = 1). ``em_stats``: ``logp``
        per iteration, ``n_iter``, ``n_e_steps``, ``converged`` (the best start's),
        ``restart_logp``, ``restart_converged``; attrs ``best_restart``, ``stopped``,
        ``n_observations``, ``n_rows``, ``chunk_length``, ``n_chunks``. The
        responsibilities (rows x support) are not materialized: for the rows of
        one chunk, ``pm_em.EM(model).e_step(point)`` on a model declared on them.

    Raises
    ------
    UnsupportedModelError
        When the fit cannot be split over chunks exactly (a global latent, a Markov
        chain, a per-row input not in ``data``); the message names the variable.

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
    routine = ChunkedEM(em, data, client=client)
    runs = []
    try:
        per_iteration = routine.n_chunks * routine.n_levels
        bar, progress = _progress_bar(per_iteration) if progressbar else (nullcontext(), None)
        with bar:
            # One start after the other on the same chunks (and workers).
            for point in starts:
                runs.append(
                    routine.run(em.to_values(point), tol=tol, max_iter=max_iter, progress=progress)
                )
    finally:
        routine.close()
    finals = [logp if history.stopped is None else -np.inf for _, logp, history in runs]
    best = int(np.argmax(finals)) if np.isfinite(max(finals)) else len(runs) - 1
    values, logp, history = runs[best]
    return build_chunked_inference_data(
        em,
        em.to_point(values),
        [history for _, _, history in runs],
        best,
        tol=tol,
        max_iter=max_iter,
        options={
            "stopped": history.stopped or "",
            "n_observations": routine.n_observations,
            "n_rows": routine.n_rows,
            "chunk_length": routine.plan.chunk_length,
            "n_chunks": routine.n_chunks,
            "log_posterior": logp,
        },
    )

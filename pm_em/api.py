"""``find_MAP``: the public entry point."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import nullcontext

import arviz as az
import numpy as np
from threadpoolctl import threadpool_limits

from pm_em.chunks.fit import fit_chunked
from pm_em.diagnostics import (
    check_observed_data,
    check_start_values,
    explain_nonfinite_logp,
    model_or_context,
)
from pm_em.fit.loop import ACCELERATIONS, best_start, mode_spread, run_starts, warn_spread
from pm_em.fit.progress import progress_reporter
from pm_em.fit.starts import resolve_init, start_points
from pm_em.results.fit_result import fit_result
from pm_em.results.inference_data import build_inference_data
from pm_em.results.laplace import laplace_idata
from pm_em.routine.em import EM, cached_routine

__all__ = ["find_MAP"]

_log = logging.getLogger("pm_em")


def _check_options(tol, max_iter, blas_cores=None, n_init=1, accelerate="auto") -> None:
    if not (isinstance(tol, int | float) and np.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}.")
    if not (isinstance(max_iter, int | np.integer) and max_iter >= 1):
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}.")
    if blas_cores is not None and not (
        isinstance(blas_cores, int | np.integer) and blas_cores >= 1
    ):
        raise ValueError(f"blas_cores must be None or an integer >= 1, got {blas_cores!r}.")
    if not (isinstance(n_init, int | np.integer) and n_init >= 1):
        raise ValueError(f"n_init must be an integer >= 1, got {n_init!r}.")
    if accelerate not in ACCELERATIONS:
        raise ValueError(f"accelerate must be one of {ACCELERATIONS}, got {accelerate!r}.")


def _apply_values(em: EM, point: dict, values: Mapping | None, label: str) -> dict:
    """``point`` with some parameters set by the user (``initvals`` or ``init``),
    checked: finite, and inside their priors' support."""
    if not values:
        return point
    names = {p.name for p in em.params}
    point = dict(point)
    for name, value in values.items():
        if name not in names:
            latent = {lat.name for lat in em.latents}
            why = (
                "it is a latent, which EM does not start from"
                if name in latent
                else ("it is not a continuous free variable of the model")
            )
            raise ValueError(f"{label}['{name}']: {why}. Parameters: {sorted(names)}.")
        point[name] = np.asarray(value, dtype=float)
    check_start_values(em, point, values, label)
    return point


def find_MAP(
    model=None,
    *,
    latent_vars=None,
    initvals=None,
    init="auto",
    n_init: int = 1,
    accelerate: str | None = "auto",
    tol: float = 1e-8,
    max_iter: int = 1000,
    random_seed=None,
    progressbar: bool = True,
    compile_kwargs: dict | None = None,
    backend: str | None = None,
    blas_cores: int | None = 1,
    laplace: bool = False,
    callback=None,
    var_names=None,
    data: Mapping | None = None,
    client=None,
) -> az.InferenceData:
    """MAP estimate of a PyMC model with finite discrete latents, by EM.

    The EM routine is derived from the model's graph: the E-step enumerates each
    latent's support in log space (its responsibilities), the M-step maximizes the
    expected complete-data log-posterior (priors included, no Jacobian) over the
    continuous free variables. Each iteration never decreases the observed-data
    log-posterior, ``log p(x | theta) + log p(theta)`` with the latents summed out.

    Parameters
    ----------
    model : pm.Model, optional
        The model; by default the one of the ``with`` context.
    latent_vars : list of str, optional
        Names of the latents; by default every discrete free variable.
    initvals : dict, optional
        Start values (constrained space) for some or all continuous free variables,
        applied to every start on top of ``init``.
    init : {"auto", "jitter", "prior", "kmeans"} or dict, default "auto"
        How each start is chosen. ``"jitter"``: the model's initial point with a
        uniform(-1, 1) jitter on the unconstrained space (it breaks the symmetry
        of the default point, where all components are equal). ``"prior"``: a draw
        from the prior of the continuous variables (Flat ones jittered).
        ``"kmeans"``: k-means++ seeding and Lloyd iterations on the data for
        every location parameter indexed by a latent on observed data (the ``mu``
        of ``x ~ Normal(mu[z], ...)`` or ``MvNormal(mu[z], ...)``; for a sum such as
        ``mu_g[group] + delta[z]``, on the data minus the other terms, which start
        at group means), then one M-step on the k-means labels for the other
        parameters. A dict: those values, jitter for the rest. ``"auto"`` is
        ``"kmeans"`` when the model has such a location parameter, ``"jitter"``
        otherwise; ``em_stats.attrs["init"]`` records the strategy used.
    n_init : int, default 1
        Number of starts, each seeded from ``random_seed`` (one seed per start, as
        PyMC seeds chains). The start with the highest observed-data log-posterior
        wins; starts stopped at a degenerate solution are skipped.
    accelerate : {"auto", "squarem", None}, default "auto"
        ``"squarem"``: SQUAREM (Varadhan & Roland, 2008) extrapolation on the
        unconstrained space, with a step-length safeguard and a fall-back to plain
        EM steps whenever the log-posterior would decrease, so it stays monotone.
        One iteration is then a cycle of three EM maps. ``"auto"``: plain EM steps,
        and SQUAREM cycles once a start has taken
        :data:`pm_em.fit.loop.AUTO_SQUAREM_AFTER` (30) steps without converging: a fit
        that converges quickly is exactly plain EM's, a slow one (a ridge of the
        likelihood) gets the acceleration. None: plain EM steps only.
    tol : float, default 1e-8
        Stop when the change of the observed-data log-posterior, per observation,
        falls below ``tol``.
    max_iter : int, default 1000
        Maximum number of iterations per start; reaching it warns
        (EMConvergenceWarning).
    random_seed : int, sequence or np.random.Generator, optional
        Seeds the starts.
    progressbar : bool, default True
        Show one progress bar across starts and iterations, with the current and
        the best log-posterior.
    compile_kwargs : dict, optional
        Passed to :func:`pytensor.function`.
    backend : {"c", "jax"}, optional
        What compiles the routine: ``"jax"`` (the default: JAX/XLA, a new model
        compiles in seconds) or ``"c"`` (PyTensor's C code, cached on disk, tens of
        seconds for a new model; the default when JAX cannot be imported).
        ``PM_EM_BACKEND`` in the environment sets the default. Recorded in
        ``em_stats.attrs["backend"]``.
    blas_cores : int or None, default 1
        Threads BLAS may use during the fit (as ``pm.sample``'s ``blas_cores``);
        None leaves the setting alone. EM's linear algebra is on small arrays, where
        BLAS threads only add synchronization: on a 2-core machine a multithreaded
        L-BFGS step or triangular solve was measured 10-25x slower than one thread.
    laplace : bool, default False
        Add a Laplace approximation at the mode (:func:`pm_em.fit_laplace` with its
        defaults: 1000 draws seeded by ``random_seed``, Jacobian included): the
        draws go to ``posterior`` (chain 1, 1000 draws), the MAP point to ``map``,
        the mean, covariance and standard errors to ``fit``.
    var_names : list of str, optional
        The variables to keep in ``posterior`` (and ``map``), as ``pm.sample``'s
        ``var_names``; by default all. A latent's name keeps its ``lp_`` table too,
        and an observed mixture's name its ``_component`` and ``lp_`` entries. The fit
        itself is unchanged (all parameters are estimated).
    callback : callable, optional
        Called after every iteration as ``callback(info)`` with an
        :class:`pm_em.EMIteration` (``restart``, ``iteration``, ``logp``, ``point``).
        Returning True, or raising StopIteration, stops the fit there: the best
        point so far is returned, marked not converged, with
        ``em_stats.attrs["stopped"] = "callback"``. Ctrl-C (KeyboardInterrupt) stops
        it the same way (``"interrupt"``), within one E- or M-step.
    data : dict, optional
        Fit on data larger than memory, a chunk at a time (:mod:`pm_em.chunks`):
        declare the model on one chunk (its first rows, same dims; their number is
        the chunk length) and give here each observed variable's (or ``pm.Data``
        container's) full data: a NumPy array, a memory map
        (``np.load(path, mmap_mode="r")``), a Dask array or an xarray.DataArray.
        The fit starts from ``initvals`` (else a jittered start,
        ``init="jitter"``), runs the same loop as in memory (``accelerate``,
        ``callback``, ``tol``, ``max_iter``, Ctrl-C alike) and returns ``posterior``
        (the MAP point) and ``em_stats`` only: no responsibilities, labels or
        pointwise log-likelihood (they are rows x support). ``n_init`` starts run
        one after another, or side by side on a Dask cluster (``client``);
        ``laplace``, ``var_names`` and ``init="kmeans"`` are not available.
    client : dask.distributed.Client, optional
        With ``data``: run the chunks on the client's workers, each keeping its
        chunks and compiled routine for the whole fit. Without: in this process.

    Returns
    -------
    az.InferenceData
        ``posterior``: each continuous free variable and Deterministic at the MAP,
        dims ``(chain=1, draw=1, *dims)``; for each latent ``z``, ``z`` (most
        probable value per element; the Viterbi path for a Markov chain) and
        ``lp_z`` (log responsibilities, trailing dim ``lp_z_dim`` over the support
        values). ``log_likelihood``: pointwise observed-data log-likelihood, latents
        summed out. ``em_stats``: the winning start's ``logp`` per iteration,
        ``n_iter``, ``n_e_steps`` (E-step evaluations) and ``converged``; every
        start's along dim ``restart`` as ``restart_logp`` (NaN-padded),
        ``restart_n_iter``, ``restart_n_e_steps``, ``restart_converged`` and
        ``restart_degenerate``, ``restart_squarem_from``; in its attrs the winning
        start's index (``best_restart``), ``tol``, ``max_iter``, ``init``,
        ``accelerate``, ``squarem_from`` (the winning start's plain EM steps before
        SQUAREM took over, -1 if it never did), ``stopped`` (``""``, ``"callback"``
        or ``"interrupt"``), ``restarts_at_best`` (converged starts that reached the
        best mode) and ``restart_spread`` (nats from the best to the lowest converged
        start when they ended at different modes, else 0).
        ``observed_data`` and ``constant_data`` as PyMC writes them.

    Raises
    ------
    UnsupportedModelError
        When a latent cannot be enumerated exactly (infinite support, dependents
        mixing its elements, imputed continuous data, ...).
    ValueError
        For invalid options or start values (NaN, outside a prior's support), or when
        the observed-data log-posterior is not finite at every start; the message
        names the variable and element (e.g. an observation impossible under every
        latent value).

    Warns
    -----
    EMConvergenceWarning
        When a start reaches ``max_iter`` before converging.
    DegenerateSolutionWarning
        When a start collapses (a scale running to 0: the log-posterior is unbounded
        there) or leaves a component empty.
    MultimodalWarning
        When converged starts end at different log-posteriors (further apart than
        1000 tol per observation): the likelihood has several modes; raise ``n_init``.

    Examples
    --------
    >>> with pm.Model() as model:  # doctest: +SKIP
    ...     w = pm.Dirichlet("w", a=np.ones(2))
    ...     mu = pm.Normal("mu", 0, 10, shape=2)
    ...     z = pm.Categorical("z", p=w, shape=len(x))
    ...     pm.Normal("x", mu=mu[z], sigma=1, observed=x)
    ...     idata = pm_em.find_MAP(n_init=5, random_seed=1)
    """
    model = model_or_context(model)
    _check_options(tol, max_iter, blas_cores, n_init, accelerate)
    if data is not None:
        _check_chunked_options(init, laplace, var_names)
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, got {callback!r}.")
        with threadpool_limits(limits=blas_cores) if blas_cores is not None else nullcontext():
            return fit_chunked(
                model,
                data=data,
                client=client,
                latent_vars=latent_vars,
                initvals=initvals,
                n_init=n_init,
                accelerate=accelerate,
                tol=tol,
                max_iter=max_iter,
                random_seed=random_seed,
                callback=callback,
                progressbar=progressbar,
                compile_kwargs=compile_kwargs,
                backend=backend,
            )
    if client is not None:
        raise ValueError("client is for chunked fits: give the full data in data= too.")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {callback!r}.")
    em = cached_routine(model, latent_vars, compile_kwargs, backend)
    check_observed_data(em.model)
    if var_names is not None:
        _check_var_names(em, var_names)
    strategy = resolve_init(init, em)
    starts = start_points(em, init, n_init, random_seed, fixed=initvals or {})
    if isinstance(init, Mapping):
        starts = [_apply_values(em, point, init, "init") for point in starts]
    starts = [_apply_values(em, point, initvals, "initvals") for point in starts]
    limits = threadpool_limits(limits=blas_cores) if blas_cores is not None else nullcontext()
    with limits, progress_reporter(progressbar, max_iter, n_init) as progress:
        states, histories = run_starts(
            em.routine,
            [em.to_values(point) for point in starts],
            tol=tol,
            max_iter=max_iter,
            accelerate=accelerate,
            progress=progress,
            callback=callback,
        )
    best = best_start(histories)
    at_best, compared, spread = mode_spread(em.routine, histories, tol)
    warn_spread(em.routine, at_best, compared, spread, n_init)
    state = states[best]
    if not np.isfinite(state.logp):
        raise ValueError(explain_nonfinite_logp(em.routine, state.values, state.logp))
    stopped = histories[-1].stopped or ""
    if stopped == "interrupt":
        _log.warning(
            "Interrupted after %d of %d start(s): returning the best point so far (not converged).",
            len(histories),
            n_init,
        )
    result = fit_result(em.routine, state, histories[best])
    result.restarts, result.best_restart = histories, best
    options = {
        "init": strategy,
        "accelerate": str(accelerate),
        "squarem_from": -1
        if histories[best].squarem_from is None
        else histories[best].squarem_from,
        "stopped": stopped,
        "restarts_at_best": at_best,
        "restart_spread": spread,
        "backend": em.backend,
    }
    idata = build_inference_data(em, result, tol=tol, max_iter=max_iter, options=options)
    if laplace:
        idata = laplace_idata(em, idata, random_seed=random_seed)
    if var_names is not None:
        idata = _select(idata, var_names)
    return idata


def _check_chunked_options(init, laplace, var_names) -> None:
    """Refuse the options a chunked fit (``data=``) does not have: a k-means start
    and a Laplace approximation need the data in memory, and its result holds the
    parameters only (nothing for ``var_names`` to select)."""
    refused = {
        "init": not (isinstance(init, str) and init in ("auto", "jitter")),
        "laplace": bool(laplace),
        "var_names": var_names is not None,
    }
    named = [name for name, bad in refused.items() if bad]
    if named:
        raise ValueError(
            f"{named} are not available with data= (a chunked fit): it starts from "
            "initvals or a jittered start, and returns the MAP point only. Leave them at "
            "their defaults."
        )


def _check_var_names(em: EM, var_names) -> None:
    """Before the fit: every name is a variable of the model (or a derived name)."""
    names = [var_names] if isinstance(var_names, str) else list(var_names)
    known = set(em.user_model.named_vars) | set(em.model.named_vars)
    for latent in em.latents:
        observed = em.implicit_labels.get(latent.name)
        known |= {f"lp_{latent.name}"} if observed is None else {f"lp_{observed}"}
        if observed is not None:
            known.add(f"{observed}_component")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"var_names: {unknown} are not variables of the model.")


def _select(idata: az.InferenceData, var_names) -> az.InferenceData:
    """Keep ``var_names`` (with their ``lp_`` and ``_component`` companions) in the
    groups holding the estimates."""
    names = [var_names] if isinstance(var_names, str) else list(var_names)
    available = {n for g in ("posterior", "map") if g in idata.groups() for n in idata[g].data_vars}
    keep = []
    for name in names:
        found = [n for n in (name, f"lp_{name}", f"{name}_component") if n in available]
        if not found:
            raise ValueError(
                f"var_names: '{name}' is not in the result. Available: {sorted(available)}."
            )
        keep += [n for n in found if n not in keep]
    for group in ("posterior", "map"):
        if group in idata.groups():
            dataset = idata[group]
            idata[group] = dataset[[n for n in keep if n in dataset.data_vars]]
    return idata

"""``EM``: a model's EM routine, a step at a time (the public step-by-step API)."""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import numpy as np

from pm_em.compile import resolve_backend
from pm_em.diagnostics import check_observed_data, explain_nonfinite_logp
from pm_em.fit.loop import EMHistory, EMState, run_starts
from pm_em.results.fit_result import FitResult, fit_result
from pm_em.routine.compiled import LogResponsibilities, Routine

__all__ = ["EM", "cached_routine"]

# Compiled routines per model, shared by every EM object and find_MAP call, so that
# repeated fits (restarts, other starts) never recompile. Keyed weakly: the cache
# goes with the model.
_ROUTINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _routine_key(model, latent_vars, compile_kwargs, backend) -> tuple:
    return (
        tuple(latent_vars) if latent_vars is not None else None,
        repr(sorted((compile_kwargs or {}).items())),
        backend,
        tuple(model.named_vars),
    )


def cached_routine(model, latent_vars=None, compile_kwargs=None, backend=None) -> EM:
    """The model's :class:`EM`: the one already built (by :class:`EM` or a previous
    fit) for these options, unless the data it was built for changed shape or
    structure (then a new one)."""
    backend = resolve_backend(backend, compile_kwargs)
    key = _routine_key(model, latent_vars, compile_kwargs, backend)
    em = _ROUTINES.get(model, {}).get(key)
    if em is None or em.data.refresh() is not None:
        em = EM(model, latent_vars=latent_vars, compile_kwargs=compile_kwargs, backend=backend)
    return em


class EM:
    """EM for the MAP of a PyMC model with finite discrete latent variables.

    The routine is derived from the model's graph and compiled once at construction;
    the methods run it a step at a time (as the EM lecture notes do by hand), and
    :func:`pm_em.find_MAP` runs it to convergence.

    Parameters
    ----------
    model : pm.Model, optional
        The model; by default the one of the ``with`` context.
    latent_vars : list of str, optional
        Names of the latents to enumerate; by default every discrete free variable.
    compile_kwargs : dict, optional
        Passed to :func:`pytensor.function`.
    backend : {"c", "jax"}, optional
        What compiles the routine: ``"jax"`` (the default: JAX/XLA, seconds for a new
        model) or ``"c"`` (PyTensor's C backend, cached on disk; the default when JAX
        cannot be imported). ``PM_EM_BACKEND`` in the environment sets the default.
    closed_form : bool, default True
        Update in closed form every parameter whose pattern is recognized (see
        :attr:`closed_form_params`); False sends all to the numeric M-step (slower,
        for checking).

    Raises
    ------
    UnsupportedModelError
        When a latent cannot be enumerated exactly; the message says why and what to do.

    Examples
    --------
    >>> em = pm_em.EM(model)  # doctest: +SKIP
    >>> point = em.initial_point(random_seed=1)  # doctest: +SKIP
    >>> for _ in range(50):  # doctest: +SKIP
    ...     point = em.m_step(point, em.e_step(point))
    """

    def __init__(
        self,
        model=None,
        *,
        latent_vars=None,
        compile_kwargs=None,
        backend=None,
        closed_form=True,
    ):
        #: The compiled routine (:class:`pm_em.routine.compiled.Routine`): the same steps on
        #: value-variable arrays, as the fit loop runs them.
        self.routine = routine = Routine(model, latent_vars, compile_kwargs, backend, closed_form)
        #: The model as given; ``model`` is the one EM runs on: the same, or a copy
        #: with the labels of observed mixture distributions written out.
        self.user_model = routine.user_model
        self.model = routine.model
        #: Label latent name -> the observed mixture variable it belongs to.
        self.implicit_labels = routine.implicit_labels
        #: The backend compiling every function of the routine (:mod:`pm_em.compile`).
        self.backend = routine.backend
        self.compile_kwargs = routine.compile_kwargs
        self.structure = routine.structure
        self.graphs = routine.graphs
        self.params = routine.params
        self.latents = routine.latents
        #: The data this routine was built for (:mod:`pm_em.model.data`).
        self.data = routine.data
        if closed_form:
            _ROUTINES.setdefault(self.user_model, {})[
                _routine_key(self.user_model, latent_vars, compile_kwargs, self.backend)
            ] = self

    @property
    def closed_form_params(self) -> list[str]:
        """Names of the parameters the M-step updates in closed form (the others are
        maximized numerically, given those)."""
        return self.routine.closed_form_params

    def to_values(self, point: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Constrained point (by variable name) -> value-variable arrays."""
        return self.routine.to_values(point)

    def to_point(self, values: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Value-variable arrays -> constrained point (by variable name)."""
        return self.routine.to_point(values)

    def initial_point(self, random_seed=None) -> dict[str, np.ndarray]:
        """A start for EM (:meth:`pm_em.routine.compiled.Routine.initial_point`): the model's
        initial point, jittered on the unconstrained space, reproducible from
        ``random_seed``."""
        return self.routine.initial_point(random_seed)

    def e_step(self, point: Mapping[str, np.ndarray]) -> LogResponsibilities:
        """Log responsibilities of every latent at ``point``.

        Returns
        -------
        LogResponsibilities
            Latent name -> array shaped ``latent.shape + (n_support,)`` (for a Markov
            chain: the log state marginals ``log p(s_t = k | data)``); its
            ``transition_counts`` attribute maps each chain to its expected transition
            counts ``(*batch, K, K)``, and ``joint`` holds the joint tables for
            :meth:`m_step`.
        """
        return self.routine.e_step(self.to_values(point))[1]

    def m_step(self, point: Mapping[str, np.ndarray], log_resp) -> dict[str, np.ndarray]:
        """The next point: the maximizer of the expected complete-data log-posterior.

        Parameters
        ----------
        point : dict
            Current point (warm start), constrained space.
        log_resp : LogResponsibilities or dict
            From :meth:`e_step`. A plain dict of marginals is accepted when every
            latent is enumerated on its own.
        """
        values = self.to_values(point)
        if not isinstance(log_resp, LogResponsibilities):
            log_resp = LogResponsibilities(log_resp, self.routine.joint_tables(log_resp))
        elif log_resp.at_values is None or not all(
            np.array_equal(a, b) for a, b in zip(values, log_resp.at_values)
        ):
            # Its closed-form blocks belong to the point of its E-step, not this one.
            log_resp = LogResponsibilities(
                log_resp, log_resp.joint, transitions=log_resp.transition_counts
            )
        return self.to_point(self.routine.m_step(values, log_resp))

    def logp(self, point: Mapping[str, np.ndarray]) -> float:
        """Observed-data log-posterior at ``point``: latents summed out, priors
        included, no Jacobian. EM never decreases it."""
        return self.routine.logp(self.to_values(point))

    def run(
        self,
        point: Mapping[str, np.ndarray],
        *,
        tol: float = 1e-8,
        max_iter: int = 1000,
        accelerate: str | None = "auto",
        callback=None,
    ) -> tuple[dict[str, np.ndarray], EMHistory]:
        """Iterate from ``point`` to convergence (what :func:`pm_em.find_MAP` does for
        each start).

        Parameters
        ----------
        point : dict
            Start, constrained space.
        tol, max_iter
            As in :func:`pm_em.find_MAP`.
        accelerate : {"auto", "squarem", None}, default "auto"
            As in :func:`pm_em.find_MAP`: ``"squarem"``, SQUAREM cycles instead of
            single EM steps (monotone); ``"auto"``, plain EM steps and SQUAREM once
            a run has taken 30 without converging; None, plain EM steps only.
        callback : callable, optional
            Called as ``callback(info)`` with an :class:`pm_em.EMIteration` after
            every iteration, as :func:`pm_em.find_MAP` calls it; returning True, or
            raising StopIteration, stops the run (``history.stopped == "callback"``).

        Returns
        -------
        point : dict
            The last point (constrained space).
        history : EMHistory
            ``logp`` per iteration, ``n_e_steps``, ``converged``, ``collapse``
            when the run stopped at a degenerate solution, ``stopped`` when the
            callback or Ctrl-C stopped it.

        Raises
        ------
        ValueError
            When the observed-data log-posterior is not finite at ``point``; the
            message names the variable and element responsible.
        """

        check_observed_data(self.model)
        (state,), (history,) = run_starts(
            self.routine,
            [self.to_values(point)],
            tol=tol,
            max_iter=max_iter,
            accelerate=accelerate,
            callback=callback,
        )
        if not np.isfinite(state.logp):
            raise ValueError(explain_nonfinite_logp(self.routine, state.values, state.logp))
        return self.to_point(state.values), history

    def finish(self, state: EMState, history: EMHistory) -> FitResult:
        """Package a final EM state (:func:`pm_em.results.fit_result.fit_result`)."""
        return fit_result(self.routine, state, history)

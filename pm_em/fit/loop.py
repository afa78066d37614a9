"""Running EM to convergence: pure steps over an immutable state
(:mod:`pm_em.fit.state`), the convergence decision made in one place, and the driver
over starts that :func:`pm_em.find_MAP` and :meth:`pm_em.EM.run` share."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from pm_em.errors import DegenerateSolutionWarning, EMConvergenceWarning
from pm_em.fit.degenerate import Collapse, find_collapse, find_empty_components
from pm_em.fit.precision import LoopTolerances, Settling, loop_tolerances
from pm_em.fit.squarem import squarem_cycle
from pm_em.fit.state import EMInfo, EMIteration, EMState, e_step_state, em_step

__all__ = [
    "ACCELERATIONS",
    "AUTO_SQUAREM_AFTER",
    "EMHistory",
    "EMIteration",
    "EMState",
    "run_em",
    "run_starts",
]

#: Accepted values of ``accelerate``.
ACCELERATIONS = (None, "auto", "squarem")
#: ``accelerate="auto"``: plain EM steps while a start converges within this many
#: iterations, SQUAREM cycles after. The seed mixture's fits take 22-30 steps at the
#: default tol and stay exactly plain EM's; a slow start (a ridge: 300 steps on the
#: K = 5 mixture of ``benchmarks/accelerate.py``) converges in a quarter of the
#: E-steps. Switching after 10 saved little more there (69 E-steps against 77;
#: after 20, 81) and changed the fast fits; after 50 gave up most of the gain (97).
AUTO_SQUAREM_AFTER = 30

# A decrease of the observed-data log-posterior beyond this (relative) size is not
# rounding: EM never decreases it.
_DECREASE_TOLERANCE = 1e-8
# Relative rounding of a log-posterior summed over the data. Both in float64: a
# float32 model (floatX="float32") gets allowances scaled to its precision instead
# (pm_em.fit.precision).
_ROUNDING = 1e-13


@dataclass
class EMHistory:
    """What happened during a run.

    Attributes
    ----------
    logp : list of float
        The log-posterior at the start and after every iteration (an EM step, or a
        SQUAREM cycle).
    converged : bool
    n_e_steps : int
        E-step evaluations (what acceleration saves).
    collapse : Collapse or None
        Set when the run was stopped at a degenerate solution.
    empty : list of str
        Components whose expected count fell to ~0 (reported, not stopped).
    stopped : {None, "callback", "interrupt"}
        Set when the user stopped the run: by the callback, or by Ctrl-C
        (KeyboardInterrupt).
    squarem_from : int or None
        The number of plain EM steps taken before SQUAREM cycles began (0 with
        ``accelerate="squarem"``); None when the run took plain EM steps only.
    """

    logp: list[float] = field(default_factory=list)
    converged: bool = False
    n_e_steps: int = 0
    collapse: Collapse | None = None
    empty: list[str] = field(default_factory=list)
    stopped: str | None = None
    squarem_from: int | None = None

    @property
    def n_iter(self) -> int:
        """Number of iterations taken."""
        return max(len(self.logp) - 1, 0)


def has_converged(
    previous: float,
    current: float,
    tol: float,
    n_observations: int,
    tolerances: LoopTolerances | None = None,
    moved: float = 0.0,
) -> bool:
    """The convergence criterion: change of the log-posterior per observation below
    tol.

    In float32 (``tolerances.blurred``) that change is blurred by rounding: below
    the rounding it counts as converged too, and either way the values must have
    settled (``moved``, from :class:`pm_em.fit.precision.Settling`).
    """
    change = abs(current - previous)
    if tolerances is None or not tolerances.blurred:
        return change / n_observations < tol
    within = change / n_observations < tol or change < tolerances.stall * max(1.0, abs(previous))
    return within and moved < tolerances.moved


def logp_rounding(em, logp: float) -> float:
    """The rounding of a computed log-posterior of size ``logp`` (absolute), in the
    float precision ``em``'s model computes in."""
    tolerances = loop_tolerances(em.structure.float_eps, _ROUNDING, _DECREASE_TOLERANCE)
    return tolerances.rounding * max(1.0, abs(logp))


def run_em(
    routine,
    values,
    *,
    tol,
    max_iter,
    accelerate=None,
    progress=None,
    warn=True,
    callback=None,
    restart: int = 0,
) -> tuple[EMState, EMHistory]:
    """Iterate from ``values`` until convergence, ``max_iter``, a degenerate point, or
    a stop by the user.

    Parameters
    ----------
    routine : Routine
        The compiled routine (:class:`pm_em.routine.compiled.Routine`).
    values : list of np.ndarray
        Start, on the unconstrained space.
    tol : float
        Stop when the change of the observed-data log-posterior per observation
        falls below ``tol``.
    max_iter : int
        Maximum number of iterations (EM steps, or SQUAREM cycles of three).
    accelerate : {None, "auto", "squarem"}
        None: plain EM steps. ``"squarem"``: SQUAREM cycles (:mod:`pm_em.fit.squarem`).
        ``"auto"``: plain EM steps, then SQUAREM cycles once `AUTO_SQUAREM_AFTER`
        steps have not converged.
    progress : callable, optional
        Called as ``progress(iteration, logp)`` after every iteration.
    warn : bool, default True
        Warn when the run ends without converging, or at a degenerate point.
    callback : callable, optional
        Called as ``callback(info)`` with an :class:`EMIteration` after every
        iteration; returning True, or raising StopIteration, stops the run
        (``history.stopped = "callback"``).
    restart : int, default 0
        The start's index, passed on to ``callback``.

    Returns
    -------
    state : EMState
        The last state; its responsibilities match its parameters (a final E-step).
        At a degenerate point, the last state before it. After Ctrl-C
        (KeyboardInterrupt; ``history.stopped = "interrupt"``), the last completed
        iteration's state: EM is monotone, so it is the best point of the run.
    history : EMHistory
    """
    if accelerate not in ACCELERATIONS:
        raise ValueError(f"accelerate must be one of {ACCELERATIONS}, got {accelerate!r}.")
    # No local name for the first responsibilities: it would keep that n x K table
    # alive for the whole run, beside the current state's.
    # A start the model refuses (e.g. a covariance not numerically positive definite)
    # is a non-finite start, explained by the caller, not a crash.
    state = e_step_state(routine, values)
    history = EMHistory(logp=[state.logp], n_e_steps=1)
    if not np.isfinite(state.logp):
        return state, history
    steps = _iterations(routine, state, history, tol, max_iter, accelerate, warn)
    completed = 0
    try:
        # ``state`` is rebound only once an iteration has completed, so an interrupt
        # anywhere inside one leaves the last completed state.
        for completed, state in steps:
            if progress is not None:
                progress(completed, state.logp)
            stop = callback is not None and _stop_requested(
                routine, callback, restart, completed, state
            )
            if stop:
                history.stopped = "callback"
                break
    except KeyboardInterrupt:
        history.stopped = "interrupt"
        # An iteration interrupted after it was recorded, but before it was handed
        # over, is dropped: the history ends at ``state``.
        history.logp = history.logp[: completed + 1]
        history.converged = False
    history.empty = find_empty_components(routine, state.log_resp)
    if warn and history.empty and history.collapse is None:
        warnings.warn(
            f"Empty component(s): {', '.join(history.empty)}. The fit is a mode on the "
            "boundary (a weight of 0); the parameters of an empty component are not "
            "determined by the data. Use fewer components if this is not intended.",
            DegenerateSolutionWarning,
            stacklevel=3,
        )
    if warn and not (history.converged or history.collapse or history.stopped):
        change = abs(history.logp[-1] - history.logp[-2]) / routine.structure.n_observations
        warnings.warn(
            f"EM did not converge in {max_iter} iterations (last change per observation "
            f"{change:.3g} > tol={tol:g}). Increase max_iter, loosen tol, or try another "
            "start (initvals, random_seed, n_init).",
            EMConvergenceWarning,
            stacklevel=3,
        )
    return state, history


def _stop_requested(routine, callback, restart: int, iteration: int, state: EMState) -> bool:
    """Call the user's ``callback`` with an :class:`EMIteration`; True (stop) when it
    returns True or raises StopIteration."""
    info = EMIteration(restart, iteration, float(state.logp), routine.to_point(state.values))
    try:
        return bool(callback(info))
    except StopIteration:
        return True


def run_starts(
    routine, starts, *, tol, max_iter, accelerate, progress=None, callback=None
) -> tuple[list[EMState], list[EMHistory]]:
    """:func:`run_em` from each start in turn (what :func:`pm_em.find_MAP` does, and
    :meth:`pm_em.EM.run` for one start); a start stopped by the user ends the fit.

    Parameters
    ----------
    routine : Routine
    starts : list of list of np.ndarray
        Each start's values, on the unconstrained space.
    tol, max_iter, accelerate, callback
        As in :func:`run_em`.
    progress : ProgressReporter, optional
        Told when each start begins and ends (:mod:`pm_em.fit.progress`).

    Returns
    -------
    states, histories : list
        Per start run (fewer than ``starts`` when the user stopped the fit).
    """
    states, histories = [], []
    for restart, values in enumerate(starts):
        if progress is not None:
            progress.start(restart)
        state, history = run_em(
            routine,
            values,
            tol=tol,
            max_iter=max_iter,
            accelerate=accelerate,
            progress=progress,
            callback=callback,
            restart=restart,
        )
        if progress is not None:
            progress.finish(history.logp[-1])
        states.append(state)
        histories.append(history)
        if history.stopped:
            break
    return states, histories


def _advance(routine, state: EMState, accelerated: bool, tolerance: float, converged_change):
    """One iteration: a SQUAREM cycle when ``accelerated``, else a plain EM step."""
    if accelerated:
        return squarem_cycle(routine, state, tolerance, converged_change)
    return em_step(routine, state)


def _iterations(routine, state, history, tol, max_iter, accelerate, warn):
    """Yield ``(iteration, state)`` after each completed iteration, recording it in
    ``history``; end at convergence, ``max_iter`` or a degenerate point."""
    start = state.values
    n_obs = routine.structure.n_observations
    tolerances = loop_tolerances(routine.structure.float_eps, _ROUNDING, _DECREASE_TOLERANCE)
    settling = Settling(routine, start) if tolerances.blurred else None
    # Plain EM steps before SQUAREM takes over (None: never).
    plain_steps = {None: None, "auto": AUTO_SQUAREM_AFTER, "squarem": 0}[accelerate]
    for iteration in range(1, max_iter + 1):
        previous = state.logp
        accelerated = plain_steps is not None and iteration > plain_steps
        # An extrapolated step is accepted only if it does not lower the
        # log-posterior beyond rounding (far below tol), which keeps the trace
        # monotone; otherwise SQUAREM falls back toward plain EM.
        tolerance = tolerances.rounding * max(1.0, abs(previous))
        new_state, info = _advance(routine, state, accelerated, tolerance, tol * n_obs)
        _record(history, iteration, info)
        collapse = find_collapse(routine, start, new_state.values, new_state.logp)
        if collapse is not None:
            history.collapse = collapse
            if warn:
                warnings.warn(collapse.message(), DegenerateSolutionWarning, stacklevel=4)
            return
        state = new_state
        logp = state.logp
        history.logp.append(logp)
        if logp < previous - tolerances.decrease * max(1.0, abs(previous)):
            warnings.warn(
                f"The observed-data log-posterior decreased at iteration {iteration} "
                f"({previous:.10g} -> {logp:.10g}); EM should never decrease it. This "
                "points to an M-step that failed to improve the expected log-posterior.",
                EMConvergenceWarning,
                stacklevel=4,
            )
        moved = settling.move(state.values) if settling is not None else 0.0
        history.converged = has_converged(previous, logp, tol, n_obs, tolerances, moved)
        yield iteration, state
        if history.converged:
            return


def _record(history: EMHistory, iteration: int, info: EMInfo) -> None:
    history.n_e_steps += info.n_e_steps
    if info.accelerated and history.squarem_from is None:
        history.squarem_from = iteration - 1

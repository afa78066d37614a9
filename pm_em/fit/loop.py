"""Running EM to convergence: pure steps over an immutable state
(:mod:`pm_em.fit.state`), the convergence decision made in one place, and the driver
over starts that :func:`pm_em.find_MAP`, :meth:`pm_em.EM.run` and the chunked fit
(:func:`pm_em.chunks.fit.fit_chunked`) share. A routine is anything following
:class:`pm_em.fit.protocol.EMRoutine`: the in-memory one, or the one over chunks."""

from __future__ import annotations

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from pm_em.errors import (
    ComputationLostError,
    DegenerateSolutionWarning,
    EMConvergenceWarning,
    MultimodalWarning,
)
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
    "StopSignal",
    "best_start",
    "mode_spread",
    "run_em",
    "run_starts",
    "warn_spread",
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

# Two converged starts are at the same mode when their final log-posteriors differ by
# less than this many times tol per observation: EM stops short of its mode by about
# tol * r / (1 - r) per observation (r its rate), and on a ridge r passes 0.99 (the
# K = 5 mixture of benchmarks/accelerate.py: 20-70 tol short, plain EM or SQUAREM);
# distinct modes of the benchmark mixtures differ by 1e5 tol and more
# (benchmarks/README.md). The same factor times the log-posterior's rounding covers
# float32, where that rounding is larger.
_SAME_MODE_FACTOR = 1000.0

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
    stopped : {None, "callback", "interrupt"} or str
        Set when the user stopped the run: by the callback, or by Ctrl-C
        (KeyboardInterrupt); or to :attr:`pm_em.errors.ComputationLostError.reason`
        when the routine could no longer compute (``"workers lost"``).
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


def logp_rounding(routine, logp: float) -> float:
    """The rounding of a computed log-posterior of size ``logp`` (absolute), in the
    float precision ``routine`` computes in."""
    tolerances = loop_tolerances(routine.float_eps, _ROUNDING, _DECREASE_TOLERANCE)
    return tolerances.rounding * max(1.0, abs(logp))


class StopSignal:
    """A flag that stops runs from outside (other threads): :func:`run_em` checks it
    after every iteration and ends there, with ``history.stopped = reason``."""

    def __init__(self):
        self._event = threading.Event()
        self.reason: str | None = None

    def set(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


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
    stop: StopSignal | None = None,
) -> tuple[EMState, EMHistory]:
    """Iterate from ``values`` until convergence, ``max_iter``, a degenerate point, or
    a stop by the user.

    Parameters
    ----------
    routine : EMRoutine
        The in-memory routine (:class:`pm_em.routine.compiled.Routine`) or the one
        over chunks (:class:`pm_em.chunks.fit.ChunkedEM`).
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
    stop : StopSignal, optional
        Checked after every iteration (after ``callback``): once set, the run ends
        there, not converged, with ``history.stopped = stop.reason``.

    Returns
    -------
    state : EMState
        The last state; its responsibilities match its parameters (a final E-step).
        At a degenerate point, the last state before it. After Ctrl-C
        (KeyboardInterrupt; ``history.stopped = "interrupt"``), the last completed
        iteration's state: EM is monotone, so it is the best point of the run. The
        same, with a warning, when the routine raises
        :class:`~pm_em.errors.ComputationLostError` (``history.stopped`` its
        ``reason``).
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
            stop_now = callback is not None and _stop_requested(
                routine, callback, restart, completed, state
            )
            if stop_now:
                history.stopped = "callback"
                break
            if stop is not None and stop.is_set() and not history.converged:
                history.stopped = stop.reason
                break
    except KeyboardInterrupt:
        _end_early(history, completed, "interrupt")
    except ComputationLostError as error:
        _end_early(history, completed, error.reason)
        warnings.warn(
            f"{error} Stopped after iteration {completed}: the result is that "
            "iteration's point (not converged). Restart the fit from it (initvals) "
            "once the computation is available again.",
            EMConvergenceWarning,
            stacklevel=3,
        )
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
        change = abs(history.logp[-1] - history.logp[-2]) / routine.n_observations
        warnings.warn(
            f"EM did not converge in {max_iter} iterations (last change per observation "
            f"{change:.3g} > tol={tol:g}). Increase max_iter, loosen tol, or try another "
            "start (initvals, random_seed, n_init).",
            EMConvergenceWarning,
            stacklevel=3,
        )
    return state, history


def _end_early(history: EMHistory, completed: int, reason: str) -> None:
    """Mark a run ended inside an iteration: an iteration interrupted after it was
    recorded, but before it was handed over, is dropped (the history ends at the
    last state handed over)."""
    history.stopped = reason
    history.logp = history.logp[: completed + 1]
    history.converged = False


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
    """:func:`run_em` from each start (what :func:`pm_em.find_MAP` does, and
    :meth:`pm_em.EM.run` for one start); a start stopped by the user ends the fit.

    The starts run one after another, or side by side (one thread each) when the
    routine allows it (``routine.concurrent_starts``: the chunked routine on a Dask
    cluster, whose workers serve every start's passes). Each start's iterates are
    the same either way: a start reads nothing another one writes.

    Parameters
    ----------
    routine : EMRoutine
    starts : list of list of np.ndarray
        Each start's values, on the unconstrained space.
    tol, max_iter, accelerate, callback
        As in :func:`run_em`. Side by side, ``callback`` is called from the starts'
        threads (one call at a time); once it stops one start, the others stop at
        the end of their iteration under way.
    progress : ProgressReporter, optional
        Told when each start begins and ends (:mod:`pm_em.fit.progress`).

    Returns
    -------
    states, histories : list
        Per start run, in the order of ``starts`` (one after another: fewer than
        ``starts`` when the user stopped the fit; side by side: every start, each
        stopped where the stop found it).
    """
    options = {"tol": tol, "max_iter": max_iter, "accelerate": accelerate}
    if len(starts) > 1 and routine.concurrent_starts:
        return _run_side_by_side(routine, starts, options, progress, callback)
    states, histories = [], []
    for restart, values in enumerate(starts):
        state, history = _run_start(routine, restart, values, options, progress, callback)
        states.append(state)
        histories.append(history)
        if history.stopped:
            break
    return states, histories


def _run_start(routine, restart, values, options, progress, callback, stop=None):
    """One start, reported to ``progress``."""
    iteration = progress.start(restart) if progress is not None else None
    state, history = run_em(
        routine,
        values,
        progress=iteration,
        callback=callback,
        restart=restart,
        stop=stop,
        **options,
    )
    if progress is not None:
        progress.finish(restart, history.logp[-1])
    return state, history


def _run_side_by_side(routine, starts, options, progress, callback):
    """Every start in its own thread. Ctrl-C reaches the main thread only: it stops
    each start at the end of its iteration under way (``stopped="interrupt"``)."""
    stop = StopSignal()
    lock = threading.Lock()

    def serialized(info):
        # One call at a time: the user's callback need not be thread-safe.
        with lock:
            return callback(info)

    def run(restart, values):
        state, history = _run_start(
            routine,
            restart,
            values,
            options,
            progress,
            None if callback is None else serialized,
            stop,
        )
        if history.stopped:
            stop.set(history.stopped)
        return state, history

    with ThreadPoolExecutor(len(starts), thread_name_prefix="pm_em-start") as pool:
        futures = [pool.submit(run, restart, values) for restart, values in enumerate(starts)]
        try:
            runs = [future.result() for future in futures]
        except KeyboardInterrupt:
            stop.set("interrupt")
            runs = [future.result() for future in futures]
        except BaseException:
            # The other starts stop at their next iteration's end, not at max_iter.
            stop.set("error")
            raise
    return [state for state, _ in runs], [history for _, history in runs]


def best_start(histories) -> int:
    """The start with the highest final log-posterior among those that did not
    collapse (among all, if every one did): the fit's result, in memory and in
    chunks."""
    finals = np.array([h.logp[-1] if h.logp else -np.inf for h in histories], dtype=float)
    finals = np.where(np.isnan(finals), -np.inf, finals)
    sound = np.array([h.collapse is None for h in histories])
    candidates = np.where(sound, finals, -np.inf) if sound.any() else finals
    return int(np.argmax(candidates))


def mode_spread(routine, histories, tol: float) -> tuple[int, int, float]:
    """How the converged, sound starts ended: ``(at_best, compared, spread)``, the
    number within the same-mode tolerance of the best of them, how many were
    compared, and how far (nats) the lowest ended below the best (0 when they agree).

    Starts stopped at a degenerate point, by ``max_iter`` or by the user are left out:
    they did not reach a mode (and are reported otherwise).
    """
    finals = np.array(
        [h.logp[-1] for h in histories if h.converged and h.collapse is None], dtype=float
    )
    finals = finals[np.isfinite(finals)]
    if finals.size < 2:
        return finals.size, finals.size, 0.0
    best = finals.max()
    same = _SAME_MODE_FACTOR * max(tol * routine.n_observations, logp_rounding(routine, best))
    at_best = int(np.sum(best - finals <= same))
    spread = float(best - finals.min())
    return at_best, finals.size, spread if at_best < finals.size else 0.0


def warn_spread(routine, at_best: int, compared: int, spread: float, n_init: int) -> None:
    """A :class:`MultimodalWarning` when the starts ended at different modes."""
    if at_best == compared:
        return
    n_obs = routine.n_observations
    warnings.warn(
        f"The starts ended at different modes: {at_best} of {compared} converged starts "
        f"reached the best log-posterior, the lowest ended {spread:.4g} nats below it "
        f"({spread / n_obs:.3g} per observation). EM climbs to the mode nearest its "
        f"start; raise n_init (e.g. n_init={max(2 * n_init, 10)}) to find the best mode "
        "more reliably. Every start's log-posterior is in em_stats['restart_logp'].",
        MultimodalWarning,
        stacklevel=3,
    )


def _advance(routine, state: EMState, accelerated: bool, tolerance: float, converged_change):
    """One iteration: a SQUAREM cycle when ``accelerated``, else a plain EM step."""
    if accelerated:
        return squarem_cycle(routine, state, tolerance, converged_change)
    return em_step(routine, state)


def _iterations(routine, state, history, tol, max_iter, accelerate, warn):
    """Yield ``(iteration, state)`` after each completed iteration, recording it in
    ``history``; end at convergence, ``max_iter`` or a degenerate point."""
    start = state.values
    n_obs = routine.n_observations
    tolerances = loop_tolerances(routine.float_eps, _ROUNDING, _DECREASE_TOLERANCE)
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

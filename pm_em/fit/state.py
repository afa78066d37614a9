"""What an EM run carries from one iteration to the next, and what each step
reports: immutable ``NamedTuple``\\ s, as blackjax's ``State`` and ``Info``."""

from __future__ import annotations

from typing import NamedTuple

from pymc.logprob.utils import ParameterValueError

__all__ = ["EMInfo", "EMIteration", "EMState", "e_step_state"]


class EMState(NamedTuple):
    """Where EM is: the parameters' values (unconstrained space), their
    observed-data log-posterior, with the responsibilities computed there.

    Attributes
    ----------
    values : list of np.ndarray
        In ``routine.params`` order.
    logp : float
    log_resp : LogResponsibilities or None
        None where the model refused ``values`` (``logp`` is then NaN).
    max_step : float
        SQUAREM's adaptive bound on its step length (:mod:`pm_em.fit.squarem`); it
        grows as large steps succeed.
    """

    values: list
    logp: float
    log_resp: object
    max_step: float = 1.0


class EMInfo(NamedTuple):
    """What one iteration did.

    Attributes
    ----------
    n_e_steps : int
        E-step evaluations it took.
    accelerated : bool
        Whether it was a SQUAREM cycle (else one plain EM step).
    """

    n_e_steps: int
    accelerated: bool


class EMIteration(NamedTuple):
    """What a ``callback`` (of :func:`pm_em.find_MAP` or :meth:`pm_em.EM.run`)
    receives after each iteration.

    Attributes
    ----------
    restart : int
        Index of the start (0 .. n_init - 1).
    iteration : int
        Iterations completed in this start (EM steps, or SQUAREM cycles).
    logp : float
        Observed-data log-posterior at ``point``.
    point : dict
        Continuous free variable name -> value (constrained space).
    """

    restart: int
    iteration: int
    logp: float
    point: dict


def e_step_state(routine, values, max_step: float = 1.0) -> EMState:
    """The state at ``values``: its E-step, or a NaN log-posterior where the model's
    own parameter checks refuse them (a scale of exactly 0 after a collapse raises in
    PyMC's log-probability)."""
    try:
        logp, log_resp = routine.e_step(values)
    except ParameterValueError:
        logp, log_resp = float("nan"), None
    return EMState(values, logp, log_resp, max_step)


def em_step(routine, state: EMState) -> tuple[EMState, EMInfo]:
    """One plain EM step from ``state``: the M-step, then the E-step there."""
    values = routine.m_step(state.values, state.log_resp)
    return e_step_state(routine, values, state.max_step), EMInfo(1, False)

"""Running EM to convergence: pure iteration over an immutable state, with the
convergence decision made in one place."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from pm_em.errors import EMConvergenceWarning

__all__ = ["EMHistory", "EMState", "run_em"]

# A decrease of the observed-data log-posterior beyond this (relative) size is not
# rounding: EM never decreases it.
_DECREASE_TOLERANCE = 1e-8


class EMState(NamedTuple):
    """Where EM is: the parameters' values (unconstrained space) and their
    observed-data log-posterior, with the responsibilities computed there."""

    values: list
    logp: float
    log_resp: object


@dataclass
class EMHistory:
    """What happened during a run: the log-posterior after every E-step."""

    logp: list[float] = field(default_factory=list)
    converged: bool = False

    @property
    def n_iter(self) -> int:
        """Number of M-steps taken."""
        return max(len(self.logp) - 1, 0)


def has_converged(previous: float, current: float, tol: float, n_observations: int) -> bool:
    """The convergence criterion: change of the log-posterior per observation below tol."""
    return abs(current - previous) / n_observations < tol


def run_em(em, values, *, tol, max_iter, progress=None) -> tuple[EMState, EMHistory]:
    """Iterate E- and M-steps from ``values`` until convergence or ``max_iter``.

    Parameters
    ----------
    em : EM
    values : list of np.ndarray
        Start, on the unconstrained space.
    tol : float
        Stop when the change of the observed-data log-posterior per observation
        falls below ``tol``.
    max_iter : int
        Maximum number of M-steps.
    progress : callable, optional
        Called as ``progress(iteration, logp)`` after every E-step.

    Returns
    -------
    state : EMState
        The last state; its responsibilities match its parameters (a final E-step).
    history : EMHistory
    """
    n_obs = em.structure.n_observations
    logp, log_resp = em._e_step_values(values)
    state = EMState(values, logp, log_resp)
    history = EMHistory(logp=[logp])
    if not np.isfinite(logp):
        return state, history
    for iteration in range(1, max_iter + 1):
        new_values = em._m_step_values(state.values, state.log_resp)
        logp, log_resp = em._e_step_values(new_values)
        previous = state.logp
        state = EMState(new_values, logp, log_resp)
        history.logp.append(logp)
        if progress is not None:
            progress(iteration, logp)
        if logp < previous - _DECREASE_TOLERANCE * max(1.0, abs(previous)):
            warnings.warn(
                f"The observed-data log-posterior decreased at iteration {iteration} "
                f"({previous:.10g} -> {logp:.10g}); EM should never decrease it. This "
                "points to an M-step that failed to improve the expected log-posterior.",
                EMConvergenceWarning,
                stacklevel=3,
            )
        if has_converged(previous, logp, tol, n_obs):
            history.converged = True
            break
    if not history.converged:
        warnings.warn(
            f"EM did not converge in {max_iter} iterations (last change per observation "
            f"{abs(history.logp[-1] - history.logp[-2]) / n_obs:.3g} > tol={tol:g}). "
            "Increase max_iter, loosen tol, or try another start (initvals, random_seed).",
            EMConvergenceWarning,
            stacklevel=3,
        )
    return state, history

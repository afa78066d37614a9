"""SQUAREM: squared extrapolation of the EM map (Varadhan & Roland, 2008).

EM converges linearly, slowly when much information is missing. SQUAREM takes two
EM steps from ``x0`` (``x1 = M(x0)``, ``x2 = M(x1)``), and with ``r = x1 - x0`` and
``v = x2 - 2 x1 + x0`` jumps to ``x0 - 2 a r + a**2 v`` (their scheme SqS3:
``a = -|r| / |v|``, never a smaller step than EM's, ``a <= -1``), then takes one EM step
from there to stabilize. Everything happens on the unconstrained space, where any
point is a valid parameter value.

The step-length safeguard: when the stabilized point's observed-data log-posterior is
lower than at ``x0`` (or not finite), the step is halved toward ``a = -1``, which is
exactly two EM steps (``x2``) followed by a third; so the monotone guarantee of EM
holds for every accepted cycle. The largest step allowed grows fourfold each time
it is used (their adaptive ``step.max``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pm_em.loop import EMState, safe_e_step

__all__ = ["SquaremStep", "squarem_cycle"]

# Halvings of a failed step before falling back to plain EM steps.
_MAX_BACKTRACKS = 3
_STEP_GROWTH = 4.0


@dataclass
class SquaremStep:
    """The adaptive state of SQUAREM across cycles: the largest step allowed."""

    max_step: float = 1.0


def _flat(values) -> np.ndarray:
    return np.concatenate([np.asarray(v, dtype=float).ravel() for v in values])


def _unflat(flat: np.ndarray, like) -> list[np.ndarray]:
    out, offset = [], 0
    for v in like:
        v = np.asarray(v)
        out.append(flat[offset : offset + v.size].reshape(v.shape).astype(v.dtype))
        offset += v.size
    return out


def squarem_cycle(
    em, state: EMState, step: SquaremStep, tolerance: float, converged_change: float = 0.0
) -> tuple[EMState, int]:
    """One SQUAREM cycle from ``state``.

    Parameters
    ----------
    em : EM
    state : EMState
        Current point with its E-step.
    step : SquaremStep
        Adaptive step bound, updated in place.
    tolerance : float
        Absolute decrease of the log-posterior tolerated as rounding.
    converged_change : float
        When the first EM map changes the log-posterior by less than this (EM's own
        convergence test), the cycle stops there: extrapolating a converged sequence
        only spends E-steps.

    Returns
    -------
    state : EMState
        The new point with its E-step; its log-posterior is not below ``state``'s
        (beyond ``tolerance``) unless plain EM steps themselves decrease it.
    n_e_steps : int
        E-steps evaluated.
    """
    x0 = state.values
    x1 = em._m_step_values(x0, state.log_resp)
    logp1, resp1 = safe_e_step(em, x1)
    n_e_steps = 1
    if not np.isfinite(logp1) or abs(logp1 - state.logp) < converged_change:
        # EM itself degenerates here, or has converged.
        return EMState(x1, logp1, resp1), n_e_steps
    x2 = em._m_step_values(x1, resp1)
    r = _flat(x1) - _flat(x0)
    v = _flat(x2) - _flat(x1) - r
    r_norm, v_norm = np.linalg.norm(r), np.linalg.norm(v)
    alpha = -1.0
    if v_norm > 0 and np.isfinite(v_norm) and np.isfinite(r_norm):
        alpha = float(np.clip(-r_norm / v_norm, -step.max_step, -1.0))
    at_bound = alpha == -step.max_step
    for attempt in range(_MAX_BACKTRACKS + 1):
        # a = -1 is exactly x2: plain EM, accepted as it is.
        jump = x2 if alpha == -1.0 else _unflat(_flat(x0) - 2 * alpha * r + alpha**2 * v, x0)
        logp_jump, resp_jump = safe_e_step(em, jump)
        n_e_steps += 1
        if not np.isfinite(logp_jump) and alpha == -1.0:
            return EMState(jump, logp_jump, resp_jump), n_e_steps
        if np.isfinite(logp_jump):
            stabilized = em._m_step_values(jump, resp_jump)
            logp_new, resp_new = safe_e_step(em, stabilized)
            n_e_steps += 1
            monotone = np.isfinite(logp_new) and logp_new >= state.logp - tolerance
            if monotone or alpha == -1.0:
                if at_bound and attempt == 0:
                    step.max_step *= _STEP_GROWTH
                return EMState(stabilized, logp_new, resp_new), n_e_steps
        alpha = (alpha - 1.0) / 2.0
        if alpha > -1.0 - 1e-12 or attempt == _MAX_BACKTRACKS - 1:
            alpha = -1.0
    raise AssertionError("unreachable: the last attempt is a plain EM step")

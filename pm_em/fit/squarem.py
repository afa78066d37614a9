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

import numpy as np

from pm_em.fit.state import EMInfo, EMState, e_step_state

__all__ = ["squarem_cycle"]

# Halvings of a failed step before falling back to plain EM steps.
_MAX_BACKTRACKS = 3
_STEP_GROWTH = 4.0


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
    routine, state: EMState, tolerance: float, converged_change: float = 0.0
) -> tuple[EMState, EMInfo]:
    """One SQUAREM cycle from ``state``.

    Parameters
    ----------
    routine : Routine
        Its public ``e_step`` and ``m_step`` are the EM map.
    state : EMState
        Current point with its E-step, and the step bound ``max_step``.
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
        (beyond ``tolerance``) unless plain EM steps themselves decrease it. Its
        ``max_step`` grew when the largest step allowed was taken and kept.
    info : EMInfo
        E-steps evaluated.
    """
    x0, max_step = state.values, state.max_step
    x1 = routine.m_step(x0, state.log_resp)
    first = e_step_state(routine, x1, max_step)
    n_e_steps = 1
    if not np.isfinite(first.logp) or abs(first.logp - state.logp) < converged_change:
        # EM itself degenerates here, or has converged.
        return first, EMInfo(n_e_steps, True)
    x2 = routine.m_step(x1, first.log_resp)
    r = _flat(x1) - _flat(x0)
    v = _flat(x2) - _flat(x1) - r
    r_norm, v_norm = np.linalg.norm(r), np.linalg.norm(v)
    alpha = -1.0
    if v_norm > 0 and np.isfinite(v_norm) and np.isfinite(r_norm):
        alpha = float(np.clip(-r_norm / v_norm, -max_step, -1.0))
    at_bound = alpha == -max_step
    for attempt in range(_MAX_BACKTRACKS + 1):
        # a = -1 is exactly x2: plain EM, accepted as it is.
        jump = x2 if alpha == -1.0 else _unflat(_flat(x0) - 2 * alpha * r + alpha**2 * v, x0)
        jumped = e_step_state(routine, jump, max_step)
        n_e_steps += 1
        if not np.isfinite(jumped.logp) and alpha == -1.0:
            return jumped, EMInfo(n_e_steps, True)
        if np.isfinite(jumped.logp):
            stabilized = e_step_state(routine, routine.m_step(jump, jumped.log_resp), max_step)
            n_e_steps += 1
            monotone = np.isfinite(stabilized.logp) and stabilized.logp >= state.logp - tolerance
            if monotone or alpha == -1.0:
                if at_bound and attempt == 0:
                    stabilized = stabilized._replace(max_step=max_step * _STEP_GROWTH)
                return stabilized, EMInfo(n_e_steps, True)
        alpha = (alpha - 1.0) / 2.0
        if alpha > -1.0 - 1e-12 or attempt == _MAX_BACKTRACKS - 1:
            alpha = -1.0
    raise AssertionError("unreachable: the last attempt is a plain EM step")

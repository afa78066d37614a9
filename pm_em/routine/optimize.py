"""The numeric block of the M-step at run time: L-BFGS on Q, then Newton polishing.

The graphs of Q and its gradient are built in :mod:`pm_em.mstep.objective` and
compiled by the routine (:mod:`pm_em.routine.compiled`); this module only drives them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pm_em.routine.support import minimize_within_support, outside_support_as_inf

__all__ = ["minimize_negative_q"]

# The M-step's inner optimizer must be far more precise than the EM tolerance, or EM
# stalls on the optimizer's noise instead of converging.
_MSTEP_OPTIONS = {"maxiter": 500, "ftol": 0.0, "gtol": 1e-10, "maxcor": 20}


def _polish(negative, theta: np.ndarray, n_steps: int = 3) -> np.ndarray:
    """Newton steps on the gradient alone, after L-BFGS.

    Near the maximum, changes of Q fall below the rounding error of a sum over all
    observations, so L-BFGS's line search stops early (its termination is decided on
    Q's value). The gradient stays accurate there: a few Newton steps with a
    finite-difference Hessian of the gradient make the M-step exact, which EM's
    convergence (and agreement with closed-form references) needs. A step is kept
    only if it shrinks the gradient; ``negative`` returns a NaN gradient outside the
    support (:func:`~pm_em.routine.support.outside_support_as_inf`), which is never kept.
    """
    _, grad = negative(theta)
    for _ in range(n_steps):
        if not np.all(np.isfinite(grad)) or np.max(np.abs(grad), initial=0.0) < 1e-13:
            break
        steps = 1e-6 * (1.0 + np.abs(theta))
        hessian = np.empty((theta.size, theta.size))
        for i, h in enumerate(steps):
            shift = np.zeros_like(theta)
            shift[i] = h
            hessian[:, i] = (negative(theta + shift)[1] - negative(theta - shift)[1]) / (2 * h)
        hessian = 0.5 * (hessian + hessian.T)
        if not np.all(np.isfinite(hessian)):
            break  # a difference step left the support: leave L-BFGS's answer
        try:
            np.linalg.cholesky(hessian)
        except np.linalg.LinAlgError:
            break  # not locally convex: leave L-BFGS's answer
        candidate = theta - np.linalg.solve(hessian, grad)
        _, candidate_grad = negative(candidate)
        if not np.linalg.norm(candidate_grad) < np.linalg.norm(grad):
            break
        theta, grad = candidate, candidate_grad
    return theta


def minimize_negative_q(negative: Callable, start: np.ndarray) -> np.ndarray | None:
    """The minimizer of ``negative`` (theta -> minus Q, minus its gradient) from
    ``start``, or None when no point better than ``start`` was found.

    A trial point outside the support (a covariance no longer numerically positive
    definite) is a point of zero density: +inf, stepped back from.
    """
    negative = outside_support_as_inf(negative)
    q_start, _ = negative(start)
    theta, q_end = minimize_within_support(negative, start, _MSTEP_OPTIONS)
    # A generalized EM step only needs Q not to decrease; never accept worse.
    if not np.isfinite(q_end) or q_end > q_start:
        return None
    return _polish(negative, theta)

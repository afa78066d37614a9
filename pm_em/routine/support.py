"""Trial points outside the model's support, as pm_em's optimizers see them.

The unconstrained space maps every point into the support in exact arithmetic, but
not in floating point: an L-BFGS trial step of a few tens on the log of a Cholesky
factor's diagonal (``LKJCholeskyCov``) gives a covariance that is no longer
numerically positive definite, and PyMC's ``MvNormal`` refuses it with a
``ParameterValueError`` from inside the compiled graph. Such a point is not an
error of the model: it is a point of zero density, which an optimizer must treat as
infinitely bad and step back from. Here it becomes exactly that, a value of ``+inf``
(of the minimized objective), and :func:`minimize_within_support` makes scipy's
L-BFGS-B step back from it, which it does not do by itself: its line search gives up
at the first non-finite value, leaving the optimizer where it started.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from pymc.logprob.utils import ParameterValueError
from scipy import optimize

__all__ = ["minimize_within_support", "outside_support_as_inf"]

# The first step of an L-BFGS-B run has length 1 on its variables; after a run that
# stopped on a point outside the support without improving, the next one starts
# with steps this much shorter, down to _MIN_SCALE (then the start is the answer).
_SHRINK = 0.1
_MIN_SCALE = 1e-10
_MAX_RUNS = 30


def outside_support_as_inf(negative: Callable) -> Callable:
    """``negative`` (theta -> value to minimize, gradient) returning ``(inf, nan)``
    where the model refuses ``theta`` (a ``ParameterValueError``) or evaluates to a
    non-finite value or gradient: a point of zero density."""

    def guarded(theta):
        try:
            value, grad = negative(theta)
        except ParameterValueError:
            return np.inf, np.full(np.shape(theta), np.nan)
        value, grad = float(value), np.asarray(grad, dtype=float)
        if not (np.isfinite(value) and np.all(np.isfinite(grad))):
            return np.inf, np.full(np.shape(theta), np.nan)
        return value, grad

    return guarded


def minimize_within_support(
    negative: Callable, start: np.ndarray, options: dict
) -> tuple[np.ndarray, float]:
    """Minimize ``negative`` by L-BFGS-B from ``start``, stepping back from trial
    points outside the support.

    scipy's L-BFGS-B ends a run at the first non-finite trial value, at the last
    accepted point. From there the run is restarted on rescaled variables,
    ``theta = x + scale * u``, whose first step is ``scale`` long in ``theta``: the
    scale is kept while runs improve and shrunk tenfold when one does not, which is a
    backtracking line search across runs. A run that meets no such point ends the
    minimization (its own convergence test decides).

    Parameters
    ----------
    negative : callable
        ``theta -> (value, gradient)``, guarded by :func:`outside_support_as_inf`.
    start : np.ndarray
        Inside the support (a finite value), or the result is ``start`` itself.
    options : dict
        L-BFGS-B options.

    Returns
    -------
    theta : np.ndarray
        The minimizer found; never worse than ``start``.
    value : float
        ``negative`` there.
    """
    theta = np.asarray(start, dtype=float)
    value = negative(theta)[0]
    if not np.isfinite(value):
        return theta, value
    scale = 1.0
    for _ in range(_MAX_RUNS):
        met_outside = False

        def scaled(u, origin=theta, scale=scale):
            nonlocal met_outside
            trial_value, grad = negative(origin + scale * u)
            if not np.isfinite(trial_value):
                met_outside = True
                # L-BFGS-B reads a gradient even at a rejected point: a finite one.
                return np.inf, np.zeros_like(u)
            return trial_value, scale * grad

        # The gradient on u is ``scale`` times the gradient on theta: the same
        # convergence test on theta needs a tolerance ``scale`` times smaller.
        scaled_options = {**options, "gtol": options.get("gtol", 1e-5) * scale}
        result = optimize.minimize(
            scaled, np.zeros_like(theta), jac=True, method="L-BFGS-B", options=scaled_options
        )
        improved = np.isfinite(result.fun) and result.fun < value
        if improved:
            theta, value = theta + scale * result.x, float(result.fun)
        if not met_outside:
            break
        if not improved:
            scale *= _SHRINK
            if scale < _MIN_SCALE:
                break
    return theta, value

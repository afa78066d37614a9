"""Rounding allowances of the EM loop, for the float precision a model computes in.

EM never decreases the observed-data log-posterior, but its computed value carries
rounding: SQUAREM must tolerate it when it accepts a step, the loop must not report
it as a decrease, and the convergence test must not chase it. The float64 allowances
are fixed constants (:mod:`pm_em.fit.loop`), kept exactly. Under ``floatX="float32"``
each log-density element is computed in float32, so the log-posterior (summed in
float64, see :func:`pm_em.model.analysis._terms`) is known to about ``eps32 * |logp|``
only (measured on the test models: up to ~0.4 ``eps32`` relative, ``eps32`` ~ 1.2e-7);
the allowances become multiples of float32's epsilon there.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["LoopTolerances", "Settling", "loop_tolerances"]

_FLOAT64_EPS = float(np.finfo(np.float64).eps)
# In lower precision, in units of epsilon relative to max(1, |logp|): the rounding
# allowed for when SQUAREM accepts a step (~40 times the error measured)...
_ROUNDING_EPS = 16.0
# ...a decrease beyond this is reported (the float64 bound, 1e-8, is also far above
# its rounding: it leaves room for an inexact numeric M-step)...
_DECREASE_EPS = 128.0
# ...and a change below this is no longer told from rounding.
_STALL_EPS = 1.0
# The parameters have settled when none moved by more than this many eps (relative)
# in an iteration: some ulps of float32 (8e-6), above the jitter of its rounded EM map.
_SETTLED_EPS = 64.0


class LoopTolerances(NamedTuple):
    """The loop's tolerances; the log-posterior ones relative to ``max(1, |logp|)``.

    Attributes
    ----------
    rounding : float
        A decrease of the log-posterior below this is rounding (SQUAREM accepts the
        step).
    decrease : float
        A decrease beyond this is reported: EM should never decrease it.
    stall : float
        Lower precision only (0 in float64): a change of the log-posterior below
        this is rounding, so it counts as converged whatever ``tol`` asks, provided
        the values have settled (``moved``).
    moved : float
        Lower precision only: the largest relative change of the parameters
        (:class:`Settling`) below which they have settled.
    """

    rounding: float
    decrease: float
    stall: float = 0.0
    moved: float = np.inf

    @property
    def blurred(self) -> bool:
        """Whether the log-posterior's changes are blurred by rounding (float32)."""
        return self.stall > 0.0


def loop_tolerances(eps: float, rounding: float, decrease: float) -> LoopTolerances:
    """The loop's tolerances for a model computing with machine epsilon ``eps``.

    Parameters
    ----------
    eps : float
        :attr:`pm_em.model.analysis.ModelStructure.float_eps`.
    rounding, decrease : float
        The float64 allowances, returned unchanged when ``eps`` is float64's.
    """
    if eps <= _FLOAT64_EPS:
        return LoopTolerances(rounding, decrease)
    # In float32 a change of tol * n (2e-6 at the default tol and n = 200) is below
    # the log-posterior's rounding (~eps * |logp|, 5e-5 there): the test on it alone
    # would stop EM on noise, or on a plateau where EM gains less than that per
    # iteration while its parameters still move by ~1e-3 per step. So the parameters
    # must also have settled, which float32 resolves far more finely. Measured on the
    # test models: such fits land within ~3e-5 of the float64 mode, closer than
    # float64's own default tol stops (~2e-4), in 0-20% more iterations.
    return LoopTolerances(
        rounding=max(rounding, _ROUNDING_EPS * eps),
        decrease=max(decrease, _DECREASE_EPS * eps),
        stall=_STALL_EPS * eps,
        moved=_SETTLED_EPS * eps,
    )


class Settling:
    """How far the parameters moved in the last iteration, on their constrained
    space (what the user reads), relative to ``1 + |value|`` elementwise.

    On the constrained space a parameter drifting toward a boundary (a weight going
    to 0, its log-odds to -inf) settles as the log-posterior does, instead of
    moving by a constant step in log space for ever.

    Parameters
    ----------
    routine : Routine
    values : list of np.ndarray
        The start, on the unconstrained space.
    """

    def __init__(self, routine, values):
        self._routine = routine
        self._last = self._constrained(values)

    def _constrained(self, values) -> list[np.ndarray]:
        return [np.asarray(v, dtype=float) for v in self._routine.constrained(values)]

    def move(self, values) -> float:
        """The largest relative change from the previous call's values (or the
        start) to ``values``."""
        current = self._constrained(values)
        moves = [
            np.max(np.abs(a - b) / (1.0 + np.abs(b)), initial=0.0)
            for b, a in zip(self._last, current)
        ]
        self._last = current
        return float(max(moves, default=0.0))

"""What the EM loop (:mod:`pm_em.fit.loop`) asks of a routine.

Two routines implement it: the compiled in-memory one
(:class:`pm_em.routine.compiled.Routine`) and the one over chunks of the data
(:class:`pm_em.chunks.fit.ChunkedEM`). The loop, SQUAREM
(:mod:`pm_em.fit.squarem`), the degenerate-solution checks
(:mod:`pm_em.fit.degenerate`) and the float32 settling test
(:mod:`pm_em.fit.precision`) read nothing else from it.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np

__all__ = ["EMRoutine", "ExpectedCounts"]


class ExpectedCounts(NamedTuple):
    """The expected number of elements of a latent at each support value, summed
    over the data: ``sum_i p(z_i = k | x, theta)``.

    Attributes
    ----------
    latent : str
    support : np.ndarray
        The support values, in order.
    counts : np.ndarray
        One per support value.
    """

    latent: str
    support: np.ndarray
    counts: np.ndarray


class EMRoutine(Protocol):
    """An EM map on the parameters' values (unconstrained space, in ``params``
    order), and what the loop needs to judge its iterates.

    ``log_resp`` below is whatever :meth:`e_step` returns beside the
    log-posterior: the loop passes it back to :meth:`m_step` at the same values
    and to :meth:`expected_counts`, and never looks inside.

    Attributes
    ----------
    params : list of ParamSpec
        The continuous free variables (``name``, ``transform``): the collapse test
        reads which values are logs of positive quantities.
    n_observations : int
        Observed entries of the whole data: the convergence test is on the change of
        the log-posterior per observation.
    float_eps : float
        Machine epsilon of the precision the routine computes in; the loop's
        rounding allowances scale with it (:func:`pm_em.fit.precision.loop_tolerances`).
    concurrent_starts : bool
        Whether several starts may run on it at once, each in its own thread
        (:func:`pm_em.fit.loop.run_starts`).
    """

    params: list
    n_observations: int
    float_eps: float
    concurrent_starts: bool

    def e_step(self, values: list[np.ndarray]) -> tuple[float, object]:
        """The observed-data log-posterior at ``values`` and the E-step's result
        there. May raise :class:`pymc.logprob.utils.ParameterValueError` where the
        model refuses ``values``, or :class:`pm_em.errors.ComputationLostError`
        when it can no longer compute."""

    def m_step(self, values: list[np.ndarray], log_resp) -> list[np.ndarray]:
        """The next values, from ``log_resp`` of :meth:`e_step` at ``values``."""

    def constrained(self, values: list[np.ndarray]) -> list[np.ndarray]:
        """The parameters' values on their constrained space, in order."""

    def to_point(self, values: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Constrained point by variable name (what a ``callback`` receives)."""

    def expected_counts(self, log_resp) -> list[ExpectedCounts]:
        """Per latent with more than one element (a component of the data; not a
        global latent), its expected counts at the point of ``log_resp``: a
        component whose count falls to ~0 is reported empty."""

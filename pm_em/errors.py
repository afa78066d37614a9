"""Exceptions and warnings raised by pm_em."""


class UnsupportedModelError(ValueError):
    """The model has a latent structure that pm_em cannot enumerate exactly.

    The message names the variable, the reason, and a way out (for example
    truncating a latent with infinite support, or marginalizing it by hand).
    """


class EMConvergenceWarning(UserWarning):
    """EM stopped before its convergence criterion was met, or misbehaved.

    Raised when ``max_iter`` is reached before the change in the observed-data
    log-posterior falls below ``tol``, or when the log-posterior decreases by
    more than rounding error (which signals a bug or an ill-posed M-step).
    """


class DegenerateSolutionWarning(UserWarning):
    """EM ran into a degenerate solution.

    Either a positive parameter collapsed toward 0 (or infinity) along a path where
    the log-posterior grows without bound, e.g. a mixture component shrinking onto
    one observation (the start is stopped there, and restarts skip it), or a
    component's expected count fell to ~0 (a bounded mode on the boundary; reported
    only).
    """


class MultimodalWarning(UserWarning):
    """The starts of a fit (``n_init`` > 1) ended at different modes.

    EM climbs to the mode nearest its start; when converged starts end at
    log-posteriors further apart than their stopping rule explains, the likelihood
    has several modes and the best one may not have been found. The message names
    how many starts reached the best and how far below the others ended; raise
    ``n_init``.
    """


class ComputationLostError(RuntimeError):
    """A routine can no longer compute, e.g. every Dask worker holding chunks of the
    data was lost. The EM loop stops at the last completed iteration, warns, and
    records :attr:`reason` in ``history.stopped``."""

    #: What ``history.stopped`` says.
    reason = "computation lost"

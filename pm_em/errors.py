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

"""Reading a parameter's prior: which family, with which constant arguments."""

from __future__ import annotations

import numpy as np

from pm_em.model.analysis import ParamSpec

__all__ = ["prior_constants", "prior_family", "rate_prior"]


def prior_family(param: ParamSpec) -> str:
    """Lower-case name of the prior's distribution (``"normal"``, ``"halfflat"``...)."""
    return type(param.rv.owner.op).__name__.removesuffix("RV").lower()


def prior_constants(ctx, param: ParamSpec, n_args: int) -> list[np.ndarray] | None:
    """The prior's distribution arguments broadcast to the parameter's shape and
    flattened, when they are constants (a closed form that checks their range at build
    time needs them fixed); None otherwise."""
    values = []
    for arg in param.rv.owner.inputs[2 : 2 + n_args]:
        value = ctx.constant(arg)
        if value is None:
            return None
        values.append(np.broadcast_to(value, param.shape).ravel().astype(float))
    return values


def rate_prior(ctx, param):
    """``(a, b)`` of a Gamma-type prior on a positive rate or precision (flat:
    ``a = 1, b = 0``; ``Exponential(b)``: ``a = 1``), or None."""
    family = prior_family(param)
    if family == "halfflat":
        size = param.value_size
        return np.ones(size), np.zeros(size)
    if family == "gamma":
        constants = prior_constants(ctx, param, 2)
        if constants is None:
            return None
        alpha, scale = constants
        return alpha, 1.0 / scale
    if family == "exponential":
        constants = prior_constants(ctx, param, 1)
        if constants is None:
            return None
        return np.ones(param.value_size), 1.0 / constants[0]
    return None

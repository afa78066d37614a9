"""Reading a parameter's prior: which family, with which constant arguments."""

from __future__ import annotations

import numpy as np

from pm_em.analysis import ParamSpec

__all__ = ["prior_family", "prior_constants"]


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

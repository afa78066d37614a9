"""Which free random variables are finite discrete latents, and what their supports are.

Each distribution family says how to find the bounds of its support through
:func:`support_bounds`, dispatched on the type of the random variable's ``Op`` (as
``pymc.logprob`` dispatches ``_logprob``). The default refuses, naming the family:
a discrete latent with infinite support cannot be enumerated.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import singledispatch

import numpy as np
import pytensor.tensor as pt
from pymc.distributions.discrete import DiscreteUniformRV
from pymc.distributions.distribution import PartialObservedRV
from pymc.distributions.truncated import TruncatedRV
from pytensor.graph.basic import Variable
from pytensor.tensor.random.basic import (
    BernoulliRV,
    BetaBinomialRV,
    BinomialRV,
    CategoricalRV,
    GeometricRV,
    HyperGeometricRV,
    NegBinomialRV,
    PoissonRV,
)

# Count distributions: a truncation without a lower bound still starts at 0 for them.
_NONNEGATIVE_OPS = (
    PoissonRV,
    NegBinomialRV,
    GeometricRV,
    BinomialRV,
    BetaBinomialRV,
    HyperGeometricRV,
)

__all__ = [
    "InfiniteSupportError",
    "LatentSpec",
    "family_name",
    "is_discrete",
    "support_bounds",
]


class InfiniteSupportError(Exception):
    """The random variable's support is not a finite set of integers."""


@dataclass(frozen=True)
class LatentSpec:
    """A finite discrete latent variable of the model.

    Attributes
    ----------
    name : str
        The variable's name in the model.
    rv : Variable
        The random variable.
    value : Variable
        Its value variable in the model's log-probability graph.
    shape : tuple of int
        Its shape (the batch of independent elements that EM enumerates).
    support : np.ndarray
        The integer values it can take, in increasing order.
    dims : tuple of str or None
        The model dims of the variable, if it has any.
    """

    name: str
    rv: Variable
    value: Variable
    shape: tuple[int, ...]
    support: np.ndarray
    dims: tuple[str, ...] | None

    @property
    def size(self) -> int:
        """Number of elements of the latent (1 for a scalar)."""
        return int(np.prod(self.shape, dtype=int))

    @property
    def n_support(self) -> int:
        """Number of values each element can take."""
        return len(self.support)


def is_discrete(rv: Variable) -> bool:
    """Whether a random variable takes integer (or boolean) values."""
    return rv.type.dtype.startswith(("int", "uint", "bool"))


@singledispatch
def support_bounds(op, node) -> tuple[Variable, Variable]:
    """Symbolic lower and upper bounds (inclusive) of a discrete RV's support.

    Parameters
    ----------
    op : Op
        The random variable's ``Op``; dispatch is on its type.
    node : Apply
        The node that creates the random variable.

    Returns
    -------
    lower, upper : Variable
        Graphs for the bounds. They may vary per element (the support used is then
        from the smallest lower to the largest upper bound; the log-probability is
        ``-inf`` outside each element's own support, which keeps enumeration exact).

    Raises
    ------
    InfiniteSupportError
        If the family has no finite support.
    """
    raise InfiniteSupportError(f"{type(op).__name__} has no finite support")


@support_bounds.register(BernoulliRV)
def _bernoulli_bounds(op, node):
    return pt.constant(0), pt.constant(1)


@support_bounds.register(CategoricalRV)
def _categorical_bounds(op, node):
    (p,) = op.dist_params(node)
    return pt.constant(0), p.shape[-1] - 1


@support_bounds.register(BinomialRV)
@support_bounds.register(BetaBinomialRV)
def _binomial_bounds(op, node):
    n = op.dist_params(node)[0]
    return pt.constant(0), n


@support_bounds.register(DiscreteUniformRV)
def _discrete_uniform_bounds(op, node):
    lower, upper = op.dist_params(node)
    return lower, upper


@support_bounds.register(TruncatedRV)
def _truncated_bounds(op, node):
    # TruncatedRV's inputs end with (lower, upper); infinite bounds are caught when
    # the bounds are evaluated.
    *_, lower, upper = node.inputs
    if isinstance(op.base_rv_op, _NONNEGATIVE_OPS):
        lower = pt.maximum(lower, 0)
    return lower, upper


@support_bounds.register(PartialObservedRV)
def _partially_observed_bounds(op, node):
    # PyMC imputes the missing values of a likelihood it cannot split into two
    # random variables (pm.Truncated) by slicing the whole variable with the mask:
    # the slice has the whole variable's support.
    whole = node.inputs[0]
    return support_bounds(whole.owner.op, whole.owner)


def family_name(rv: Variable) -> str:
    """The name of the distribution ``rv`` is drawn from, for messages: the sliced
    variable's, for a partially observed one."""
    node = rv.owner
    while isinstance(node.op, PartialObservedRV):
        node = node.inputs[0].owner
    return type(node.op).__name__

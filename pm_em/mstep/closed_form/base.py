"""What every closed-form rule returns (:class:`ClosedFormUpdate`), and the small
graph helpers they share. The term context they read is
:class:`pm_em.mstep.context.ClosedFormContext`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytensor.tensor as pt
from pytensor.graph.basic import Variable

from pm_em.chunks.statistic import additive
from pm_em.model.analysis import ParamSpec

__all__ = ["ClosedFormUpdate", "finite", "scatter_sum"]


@dataclass(frozen=True)
class ClosedFormUpdate:
    """The exact maximizer of Q over a block of parameters, given the others.

    Attributes
    ----------
    params : list of ParamSpec
        The block.
    new_values : list of Variable
        Each parameter's new value on its value (unconstrained) space.
    family : str
        Which rule produced it (for reports and tests).
    """

    params: list[ParamSpec]
    new_values: list[Variable]
    family: str


def scatter_sum(values: Variable, ids: np.ndarray, size: int) -> Variable:
    """Sum ``values`` ``(K, J, ...)`` into ``size`` bins by ``ids`` (same leading
    shape; -1 entries are dropped).

    When every entry of a configuration has the same id (the usual ``mu[z]``), the
    entries are summed first, so that the scatter is over ``K`` values only.
    """
    if (ids == ids[:, :1]).all():
        summed = additive(values.sum(axis=1))
        config_ids = ids[:, 0].ravel()
        keep = np.flatnonzero(config_ids >= 0)
        flat_summed = pt.broadcast_to(summed, ids[:, 0].shape).ravel()
        return pt.inc_subtensor(pt.zeros((size,))[pt.constant(config_ids[keep])], flat_summed[keep])
    flat_ids = ids.ravel()
    keep = np.flatnonzero(flat_ids >= 0)
    flat_values = pt.broadcast_to(values, ids.shape).ravel()[keep]
    return additive(pt.inc_subtensor(pt.zeros((size,))[pt.constant(flat_ids[keep])], flat_values))


def finite(x: Variable) -> Variable:
    """Elementwise: neither NaN nor infinite."""
    return ~pt.isnan(x) & ~pt.isinf(x)

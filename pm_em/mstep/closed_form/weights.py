"""Categorical probabilities under a Dirichlet prior: mixture weights.

``z ~ Categorical(p=w)``, ``w ~ Dirichlet(a)`` with every ``a_c >= 1``: the MAP is
the expected count of each category plus ``a_c - 1``, normalized. The same holds
for observed Categorical data sharing ``w`` (labelled observations), whose counts
are added with weight one.
"""

from __future__ import annotations

import numpy as np
import pytensor.tensor as pt
from pytensor.tensor.random.basic import CategoricalRV

from pm_em.chunks.statistic import additive
from pm_em.estep.enumeration import unbroadcast
from pm_em.mstep.closed_form.base import ClosedFormUpdate, finite
from pm_em.mstep.closed_form.priors import prior_constants, prior_family

__all__ = ["categorical_weights"]


def categorical_weights(ctx, param) -> ClosedFormUpdate | None:
    """Closed-form update of a Dirichlet-distributed probability vector used as the
    ``p`` of Categorical terms."""
    if prior_family(param) != "dirichlet" or len(param.shape) != 1:
        return None
    prior = prior_constants(ctx, param, 1)
    if prior is None or (prior[0] < 1).any():
        return None
    (concentration,) = prior
    size = param.shape[0]
    counts = pt.zeros((size,))
    for term in ctx.users(param):
        rv = ctx.rv_of(term)
        if rv.owner is None or not isinstance(rv.owner.op, CategoricalRV):
            return None
        entries = ctx.entries(term)
        if entries is None:
            return None
        selection = ctx.selection(rv.owner.inputs[2], [param], entries, core_shape=(size,))
        # Every entry's probability vector must be the whole parameter, in order.
        if selection is None or not (selection.ids == np.arange(size)).all():
            return None
        values = ctx.value_table(entries)  # (K or 1, J) category codes
        codes = unbroadcast(values)
        if codes.type.shape[1] == 1:
            # The latent's own term: one code per configuration. Summing the
            # responsibilities over the entries first (a reduction PyTensor fuses
            # with their exp) leaves nothing the size of the table to allocate.
            one_hot = pt.eq(codes[:, 0, None], pt.arange(size))  # (K or 1, size)
            counts += (additive(entries.weights.sum(axis=1))[:, None] * one_hot).sum(axis=0)
        else:
            # Codes per entry (observed labels): one masked sum per category, rather
            # than a (K, J, size) product.
            counts += pt.stack(
                [additive((entries.weights * pt.eq(values, c)).sum()) for c in range(size)]
            )
    if not ctx.users(param):
        return None
    new = (counts + pt.constant(concentration) - 1) / (counts.sum() + concentration.sum() - size)
    current = ctx.constrained(param)
    new = pt.switch(pt.all(finite(new)) & pt.all(new > 0), new, current)
    return ClosedFormUpdate([param], [ctx.set_value(param, new)], "categorical weights")

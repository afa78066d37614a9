"""A Markov chain's transition rows and initial distribution under Dirichlet priors:
Baum-Welch's M-step.

``s ~ DiscreteMarkovChain(P=P, init_dist=Categorical.dist(p=pi))`` with every row of
``P`` (and ``pi``) Dirichlet with all ``a >= 1``: the expected complete-data
log-posterior in a row of ``P`` is ``sum_k (xi_jk + a_jk - 1) log P_jk``, where
``xi_jk`` is the expected number of ``j -> k`` transitions, so the MAP row is those
pseudo-counted expected counts, normalized. ``pi`` likewise from the posterior of
each sequence's first state. A transition matrix shared by several sequences adds
their counts.
"""

from __future__ import annotations

import numpy as np
import pytensor.tensor as pt
from pytensor.graph.traversal import ancestors
from pytensor.tensor.random.basic import CategoricalRV

from pm_em.chunks.statistic import additive
from pm_em.estep.rewrites import strip_leading_broadcast
from pm_em.mstep.closed_form.base import ClosedFormUpdate, finite
from pm_em.mstep.closed_form.priors import prior_constants, prior_family

__all__ = ["markov_initial", "markov_transitions"]


def _dirichlet_concentration(ctx, param):
    """The Dirichlet prior's concentration shaped like ``param``, when every entry is
    constant and at least 1 (below 1 the mode may sit on the boundary)."""
    if prior_family(param) != "dirichlet":
        return None
    prior = prior_constants(ctx, param, 1)
    if prior is None or (prior[0] < 1).any():
        return None
    return prior[0].reshape(param.shape)


def _to_param_shape(counts, param, n_sequences: int):
    """Per-sequence counts ``(B, *core)`` summed (or reshaped) onto the parameter's
    shape: shared by every sequence, or one per sequence. None otherwise."""
    core_ndim = counts.ndim - 1
    if len(param.shape) == core_ndim:
        return additive(counts.sum(axis=0))
    batch = param.shape[: len(param.shape) - core_ndim]
    if int(np.prod(batch, dtype=int)) != n_sequences:
        return None  # broadcast over some sequence axes only: left to the numeric M-step
    return counts.reshape(param.shape)


def _normalized_rows(counts, concentration, current):
    """``(counts + a - 1)`` normalized along the last axis; a row that is not a
    probability vector (no counts under a flat prior: 0 / 0) keeps its current value.

    A probability that underflows to exactly 0 is kept at the smallest positive
    float of the parameter's dtype instead (float32's under ``floatX="float32"``, or
    the cast to it would give 0 again): the simplex transform maps 0 to an infinite
    value, from which the point could not be mapped back.
    """
    pseudo = counts + pt.constant(concentration - 1.0)
    new = pseudo / pseudo.sum(axis=-1, keepdims=True)
    proper = pt.all(finite(new), axis=-1, keepdims=True) & (pseudo.sum(axis=-1, keepdims=True) > 0)
    return pt.switch(proper, pt.maximum(new, np.finfo(current.dtype).tiny), current)


def _dirichlet_rows_update(ctx, param, expected_counts, label) -> ClosedFormUpdate | None:
    """The Dirichlet posterior mode of ``param``'s rows from the expected counts of
    every chain using it (``expected_counts(use)``, None when a use does not fit)."""
    concentration = _dirichlet_concentration(ctx, param)
    users = ctx.users(param)
    if concentration is None or not users:
        return None
    counts = pt.zeros(param.shape)
    for term in users:
        use = ctx.chain_use(term)
        per_param = None if use is None else expected_counts(use)
        if per_param is None:
            return None
        counts = counts + per_param
    new = _normalized_rows(counts, concentration, ctx.constrained(param))
    return ClosedFormUpdate([param], [ctx.set_value(param, new)], label)


def markov_transitions(ctx, param) -> ClosedFormUpdate | None:
    """Closed-form update of a Dirichlet-distributed transition matrix used as the
    ``P`` of Markov-chain latents (and nowhere else)."""
    if len(param.shape) < 2 or param.shape[-1] != param.shape[-2]:
        return None

    def expected_counts(use):
        if use.chain.transition is not param.rv:
            return None
        if param.value in ancestors([use.chain.log_initial]):
            return None  # also in the initial distribution: Q is not per row
        return _to_param_shape(use.transition_counts, param, use.chain.n_sequences)

    return _dirichlet_rows_update(ctx, param, expected_counts, "markov transitions")


def markov_initial(ctx, param) -> ClosedFormUpdate | None:
    """Closed-form update of a Dirichlet-distributed probability vector used as the
    ``p`` of Markov chains' ``init_dist=Categorical.dist(p=...)`` (and nowhere else)."""

    def expected_counts(use):
        initial = use.chain.initial_dist
        if not isinstance(initial.owner.op, CategoricalRV):
            return None
        if strip_leading_broadcast(initial.owner.inputs[-1]) is not param.rv:
            return None
        if param.value in ancestors([use.chain.log_transition]):
            return None  # also in the transition matrix: Q is not this alone
        weights = pt.exp(use.log_initial_weights)
        return _to_param_shape(weights, param, use.chain.n_sequences)

    return _dirichlet_rows_update(ctx, param, expected_counts, "markov initial")

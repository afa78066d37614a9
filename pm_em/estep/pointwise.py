"""Pointwise observed-data log-likelihood with the latents summed out.

For an observation whose latent element has no other observations (``x[i]`` on
``z[i]``) this is the familiar ``log sum_k p(z_i = k) p(x_i | k)``. When several
observations share a latent element (repeated measures), or a global latent couples
all of them, the joint log-likelihood does not split into independent pieces; it
is then split by the chain rule, ``log p(x_j | x_1, ..., x_{j-1})`` in the order of
the model's variables and of their elements, so the pieces always add up to the
exact observed-data log-likelihood.

Where every element has at most one observation and there is no global latent
(mixtures, zero-inflation, most models), each piece is ``log sum_k p(z_i = k) p(x_i | k)
- log sum_k p(z_i = k)``: :func:`pointwise_graphs` builds it symbolically, so that it is
computed in the compiled result function next to the term tables it reads, which are
then never returned (at large n each would be an n x K array). Otherwise the pieces
are computed once per fit, in NumPy, from the per-configuration term tables
(:func:`pointwise_loglik`).
"""

from __future__ import annotations

import numpy as np
import pytensor.tensor as pt
from pytensor.graph.basic import Variable
from scipy.special import logsumexp

from pm_em.estep.enumeration import ComponentTables, attribute_to_elements, unbroadcast
from pm_em.estep.enumeration import logsumexp as symbolic_logsumexp
from pm_em.model.analysis import Component

__all__ = ["direct_pointwise", "pointwise_graphs", "pointwise_loglik"]


def direct_pointwise(component: Component) -> bool:
    """Whether :func:`pointwise_graphs` applies: no global latent or term, no Markov
    chain, every entry of every term owned by an element, and at most one observed
    entry per element (no chain rule over several observations of one element)."""
    if component.chain is not None or component.global_terms or component.n_global_configs != 1:
        return False
    for group in component.groups:
        observed = []
        for term, owner in group.terms:
            flat_owner = owner.ravel()
            if (flat_owner < 0).any():
                return False
            if term.kind == "observed":
                observed.append(flat_owner)
        if observed:
            owners = np.concatenate(observed)
            if np.unique(owners).size != owners.size:
                return False
    return True


def _rows(table: Variable, owner: np.ndarray, n_configs: int) -> Variable:
    """A term's compact table (broadcastable to ``(C, *owner.shape)``) as ``(C, m)``
    over its flattened entries, or ``(C, 1)`` when it is the same for every entry:
    nothing is broadcast to the elements that need not be (a latent's prior
    ``log w[k]`` stays ``(K, 1)``)."""
    table = unbroadcast(table)
    if owner.ndim == 1 and table.ndim == 2:
        rows = table
    else:
        full = pt.broadcast_to(table, (n_configs, *owner.shape))
        rows = full.reshape((n_configs, owner.size))
    if rows.type.shape[0] != n_configs:
        # A term that does not vary with the configuration still counts once per
        # configuration in the sum over them.
        rows = pt.broadcast_to(rows, (n_configs, rows.shape[1]))
    return rows


def pointwise_graphs(component: Component, tables: ComponentTables) -> dict[str, Variable]:
    """Pointwise log-likelihood of the observed terms of a component for which
    :func:`direct_pointwise` holds, as graphs.

    Element ``i``'s prior over its group's configurations ``k`` is the sum of the
    group's other terms, ``prior[k, i]``; an observed entry ``j`` of element ``i``
    with log-probability ``c[k, j]`` gets ``logsumexp_k (prior[k, i] + c[k, j]) -
    logsumexp_k prior[k, i]`` (what :func:`pointwise_loglik` computes, in one pass).

    Returns
    -------
    dict
        Observed variable name -> graph of its pointwise log-likelihood, shaped like
        its term.
    """
    result = {}
    for group, compact in zip(component.groups, tables.group_term_compact):
        n_configs, n = group.n_configs, group.n_elements
        prior = None
        for (term, owner), table in zip(group.terms, compact):
            if term.kind == "observed":
                continue
            flat_owner = owner.ravel()
            if flat_owner.size == n and (flat_owner == np.arange(n)).all():
                part = _rows(table, owner, n_configs)
            else:
                full = pt.broadcast_to(table, (n_configs, *owner.shape))
                part, _ = attribute_to_elements(full, owner, n)
            prior = part if prior is None else prior + part
        if prior is None:
            prior = pt.zeros((n_configs, 1))
        log_normalizer = symbolic_logsumexp(prior, axis=0)
        for (term, owner), table in zip(group.terms, compact):
            if term.kind != "observed":
                continue
            flat_owner = owner.ravel()
            element_prior, normalizer = prior, log_normalizer
            identity = flat_owner.size == n and (flat_owner == np.arange(n)).all()
            if not identity and prior.type.shape[1] != 1:
                # The prior of each entry's element (broadcast first, in case the
                # prior is the same for every element without that being static).
                index = pt.constant(flat_owner)
                element_prior = pt.broadcast_to(prior, (n_configs, n))[:, index]
                normalizer = pt.broadcast_to(log_normalizer, (n,))[index]
            joint = element_prior + _rows(table, owner, n_configs)
            piece = symbolic_logsumexp(joint, axis=0) - normalizer
            result[term.name] = pt.broadcast_to(piece, (flat_owner.size,)).reshape(owner.shape)
    return result


def _chain(start: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Chain-rule pieces of sequential contributions over global configurations.

    ``start`` is ``(Kg,)``; ``steps`` is ``(Kg, m)``. Returns the ``m`` pieces and the
    updated start.
    """
    cumulative = start[:, None] + np.cumsum(steps, axis=1)
    previous = np.concatenate([start[:, None], cumulative[:, :-1]], axis=1)
    pieces = logsumexp(cumulative, axis=0) - logsumexp(previous, axis=0)
    return pieces, cumulative[:, -1] if steps.shape[1] else start


def pointwise_loglik(
    component: Component,
    global_tables: list[np.ndarray],
    group_tables: list[list[np.ndarray]],
    element_prior: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Pointwise log-likelihood of the observed terms of one component.

    Parameters
    ----------
    component : Component
    global_tables : list of np.ndarray
        Each global term per global configuration, ``(Kg, *shape)``.
    group_tables : list of list of np.ndarray
        Per group, each term per joint configuration, ``(Kg * Ke, *shape)``.
    element_prior : np.ndarray, optional
        For a Markov chain (one group, no globals): ``log p(s_t = k | y_<t)``,
        ``(1, K, n)``. Each step's observations are then pieces of the one-step
        predictive ``log p(y_t | y_<t)``, which add up to the log-likelihood.

    Returns
    -------
    dict
        Observed variable name -> pointwise log-likelihood, shaped like its term.
    """
    n_global = component.n_global_configs
    result: dict[str, np.ndarray] = {}
    state = np.zeros(n_global)
    # Unobserved terms first: they are the prior of the latents.
    for term, table in zip(component.global_terms, global_tables):
        if term.kind != "observed":
            state = state + table.reshape(n_global, -1).sum(axis=1)
    for group, tables in zip(component.groups, group_tables):
        for (term, owner), table in zip(group.terms, tables):
            unowned = owner.ravel() < 0
            if term.kind != "observed" and unowned.any():
                flat = table.reshape(n_global, group.n_configs, -1)[:, 0, :]
                state = state + flat[:, unowned].sum(axis=1)
    for term, table in zip(component.global_terms, global_tables):
        if term.kind == "observed":
            pieces, state = _chain(state, table.reshape(n_global, -1))
            result[term.name] = pieces
    for group, tables in zip(component.groups, group_tables):
        for (term, owner), table in zip(group.terms, tables):
            unowned = owner.ravel() < 0
            if term.kind == "observed" and unowned.any():
                flat = table.reshape(n_global, group.n_configs, -1)[:, 0, :]
                pieces, state = _chain(state, flat[:, unowned])
                result.setdefault(term.name, np.full(owner.size, np.nan))[unowned] = pieces
        state = _group_pieces(group, tables, state, result, element_prior)
    shapes = {t.name: tab.shape[1:] for t, tab in zip(component.global_terms, global_tables)}
    for group, tables in zip(component.groups, group_tables):
        shapes.update({t.name: tab.shape[1:] for (t, _), tab in zip(group.terms, tables)})
    return {name: values.reshape(shapes[name]) for name, values in result.items()}


def _group_pieces(group, tables, state, result, element_prior=None) -> np.ndarray:
    n_global = state.shape[0]
    n, n_group = group.n_elements, group.n_configs
    prior = np.zeros((n_global, n_group, n))
    if element_prior is not None:
        prior = prior + element_prior
    contributions, owners, slots = [], [], []
    for (term, owner), table in zip(group.terms, tables):
        flat_owner = owner.ravel()
        flat = table.reshape(n_global, n_group, -1)
        owned = np.flatnonzero(flat_owner >= 0)
        if term.kind == "observed":
            contributions.append(flat[:, :, owned])
            owners.append(flat_owner[owned])
            slots.append((term.name, owned, owner.size))
        else:
            np.add.at(prior, (slice(None), slice(None), flat_owner[owned]), flat[:, :, owned])
    if not contributions:
        return state + logsumexp(prior, axis=1).sum(axis=1)
    contribution = np.concatenate(contributions, axis=2)
    owner = np.concatenate(owners)
    # Rank of each observation among those of its latent element, in model order.
    order = np.argsort(owner, kind="stable")
    first = np.searchsorted(owner[order], owner[order], side="left")
    rank = np.empty_like(owner)
    rank[order] = np.arange(owner.size) - first

    full = prior.copy()
    np.add.at(full, (slice(None), slice(None), owner), contribution)
    element = logsumexp(full, axis=1)  # (Kg, n)
    before_element = state[:, None] + np.cumsum(element, axis=1) - element

    pieces = np.empty(owner.size)
    running = prior
    for r in range(int(rank.max()) + 1):
        selected = np.flatnonzero(rank == r)
        at = owner[selected]
        before = logsumexp(running[:, :, at], axis=1)
        running[:, :, at] += contribution[:, :, selected]
        after = logsumexp(running[:, :, at], axis=1)
        weight = before_element[:, at]
        pieces[selected] = logsumexp(weight + after, axis=0) - logsumexp(weight + before, axis=0)

    start = 0
    for name, positions, size in slots:
        stop = start + len(positions)
        result.setdefault(name, np.full(size, np.nan))[positions] = pieces[start:stop]
        start = stop
    return state + element.sum(axis=1)

"""Pointwise observed-data log-likelihood with the latents summed out.

For an observation whose latent element has no other observations (``x[i]`` on
``z[i]``) this is the familiar ``log sum_k p(z_i = k) p(x_i | k)``. When several
observations share a latent element (repeated measures), or a global latent couples
all of them, the joint log-likelihood does not split into independent pieces; it
is then split by the chain rule, ``log p(x_j | x_1, ..., x_{j-1})`` in the order of
the model's variables and of their elements, so the pieces always add up to the
exact observed-data log-likelihood.

Runs once per fit, in NumPy, on the per-configuration term tables.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from pm_em.analysis import Component

__all__ = ["pointwise_loglik"]


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

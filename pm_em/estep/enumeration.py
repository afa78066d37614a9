"""Symbolic enumeration of the latents: log-joint tables, responsibilities, and the
observed-data log-posterior.

For a component with global latents (joint configurations ``g``, ``Kg`` of them) and
element groups (joint configurations ``k`` per element ``i``), the log-probability
terms are evaluated once per configuration by vectorizing the model's graph over a
leading batch axis (``vectorize_graph``), and attributed to elements through the owner
maps of the analysis:

* ``A[g, k, i]``: the terms attributed to element ``i`` of a group;
* ``B[g]``: the terms that depend on the global latents only.

Then, with ``m[g, i] = logsumexp_k A[g, k, i]`` and ``L[g] = B[g] + sum_i m[g, i]``,
the component's log marginal is ``logsumexp_g L[g]``, the posterior of the globals is
``log q(g) = L[g] - logsumexp L``, and the joint posterior of element ``i`` is
``log W[g, k, i] = log q(g) + A[g, k, i] - m[g, i]``. All in log space.

Each term is vectorized with the latents it allows replaced by broadcastable
stand-ins of shape ``(C, 1, ..., 1)`` (:mod:`pm_em.estep.standins`), so that what depends
on the latents' values only (``mu[z]``, the Cholesky factor of ``cov[z]``) is
computed once per configuration rather than once per element and configuration;
the other latents get their full batch ``(C, *shape)``. Batched vector solves
against a per-configuration matrix are then turned into matrix solves
(:mod:`pm_em.estep.rewrites`). Every batched term is broadcast to ``(C, *term.shape)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytensor.tensor as pt
from pymc.distributions.dist_math import check_parameters
from pytensor.graph.basic import Variable
from pytensor.graph.replace import vectorize_graph
from pytensor.tensor.basic import Alloc

from pm_em.errors import UnsupportedModelError
from pm_em.estep.forward_backward import forward_backward, forward_filter, viterbi
from pm_em.estep.rewrites import batch_solves
from pm_em.estep.standins import latent_mask, plan_standins, vectorize_with_standins
from pm_em.model.analysis import Component, ElementGroup, ModelStructure
from pm_em.model.latents import LatentSpec

__all__ = [
    "ComponentPosterior",
    "ComponentTables",
    "attribute_to_elements",
    "build_tables",
    "logsumexp",
    "posterior_from_tables",
    "unbroadcast",
]


def logsumexp(x: Variable, axis) -> Variable:
    """``log(sum(exp(x)))`` along ``axis``, exact when every entry is ``-inf``."""
    x_max = pt.max(x, axis=axis, keepdims=True)
    safe_max = pt.switch(pt.isinf(x_max), 0.0, x_max)
    total = pt.log(pt.sum(pt.exp(x - safe_max), axis=axis, keepdims=True)) + safe_max
    return pt.squeeze(total, axis=axis)


@dataclass
class ComponentTables:
    """Symbolic log-joint tables of one component.

    Attributes
    ----------
    global_table : Variable
        ``B``, shape ``(Kg,)``.
    group_tables : list of Variable
        ``A`` per element group, shape ``(Kg, Ke, n)``.
    global_term_tables : list of Variable
        Each global term evaluated per global configuration, ``(Kg, *term.shape)``.
    group_term_tables : list of list of Variable
        Per group, each of its terms per joint configuration, ``(Kg * Ke, *term.shape)``
        (for pointwise log-likelihoods).
    group_term_compact : list of list of Variable
        The same terms before they are broadcast: only broadcastable to
        ``(Kg * Ke, *term.shape)``, so that a term constant over the elements (a
        latent's prior ``log w[k]``) stays ``(Kg * Ke, 1, ...)`` where a graph can use
        it as it is.
    """

    global_table: Variable
    group_tables: list[Variable]
    global_term_tables: list[Variable]
    group_term_tables: list[list[Variable]]
    group_term_compact: list[list[Variable]]


@dataclass
class ComponentPosterior:
    """Symbolic E-step results of one component.

    Attributes
    ----------
    log_marginal : Variable
        Scalar: log of the component's terms with its latents summed out.
    log_q_global : Variable
        ``log q(g)``, shape ``(Kg,)``.
    log_w_groups : list of Variable
        ``log W[g, k, i]`` per group, shape ``(Kg, Ke, n)``.
    log_resp : dict
        Latent name -> log responsibilities, shaped ``latent.shape + (n_support,)``.
    transition_counts : Variable or None
        For a Markov chain: the expected transition counts per sequence, ``(B, K, K)``.
    resp_is_group : dict
        Latent name -> index of the group whose ``log W`` ``(1, K, n)`` holds its log
        responsibilities as they are (a latent enumerated alone, no globals): its
        ``log_resp`` is then that table transposed, which a caller can take as a view
        of the group's table rather than compute (and store) a second copy.
    """

    log_marginal: Variable
    log_q_global: Variable
    log_w_groups: list[Variable]
    log_resp: dict[str, Variable]
    transition_counts: Variable | None = None
    resp_is_group: dict[str, int] = field(default_factory=dict)


def _vectorize(terms: list, replace: dict, names: list[str]) -> list[Variable]:
    """``vectorize_graph`` over the configurations, with PyTensor's gaps reported as
    an unsupported model rather than a bare traceback."""
    try:
        return vectorize_graph(terms, replace=replace)
    except NotImplementedError as err:
        raise UnsupportedModelError(
            f"PyTensor cannot enumerate the latent(s) {names} through an op of this model "
            f"({err}). Transpose the indexed parameter so that the index arrays are "
            "next to each other (x.transpose(0, 2, 1)[z, z2], not x[z, :, z2]), or "
            "marginalize the latent by hand."
        ) from err


def _vectorize_term(term: Variable, full: dict, standins: dict, names: list[str]) -> Variable:
    """One term per configuration: stand-ins for the latents the term allows (see
    :mod:`pm_em.estep.standins`), full batches for the others.

    The result is broadcastable to ``(C, *term.shape)``, not necessarily of that
    shape. Should PyTensor fail to vectorize the stand-in graph, the full
    substitution, which the stand-ins only optimize, is used instead.
    """
    candidates = {value: latent_mask(shape) for value, (shape, _) in standins.items()}
    plan = plan_standins(term, candidates)
    if plan.standins:
        replace = {
            value: standins[value][1] if value in plan.standins else batch
            for value, batch in full.items()
        }
        try:
            return vectorize_with_standins(term, plan, replace)
        except (NotImplementedError, TypeError, ValueError):
            pass
    (batched,) = _vectorize([term], full, names)
    return batched


def _batched_terms(
    terms: list[Variable], latents: list[LatentSpec], values: list[np.ndarray]
) -> list[Variable]:
    """Each of ``terms`` evaluated at every configuration (``values``: each latent's
    support value per configuration), broadcastable to ``(C, *term.shape)``."""
    full = {lat.value: _batched_value(lat, v) for lat, v in zip(latents, values)}
    standins = {
        lat.value: (lat.shape, _standin_value(lat, v))
        for lat, v in zip(latents, values)
        if lat.size > 1
    }
    names = [lat.name for lat in latents]
    batched = [_vectorize_term(term, full, standins, names) for term in terms]
    return batch_solves(batched)


def _config_values(latents: list[LatentSpec], repeat: int, tile: int) -> list[np.ndarray]:
    """Support value of each latent at each joint configuration.

    Configurations are enumerated row-major over ``latents``; each is repeated
    ``repeat`` times consecutively and the whole sequence tiled ``tile`` times, so
    that global configurations (outer) and group configurations (inner) combine
    as ``c = g * Ke + k``.
    """
    sizes = [lat.n_support for lat in latents]
    if not latents:
        return []
    indices = np.unravel_index(np.arange(int(np.prod(sizes))), sizes)
    return [
        np.tile(np.repeat(lat.support[idx], repeat), tile) for lat, idx in zip(latents, indices)
    ]


def _standin_value(latent: LatentSpec, values: np.ndarray) -> Variable:
    """The latent's value variable replaced by one value per configuration, shaped
    ``(C, 1, ..., 1)``: every element of the latent takes that value."""
    column = values.astype(latent.value.type.dtype)
    return pt.constant(column.reshape((len(values),) + (1,) * len(latent.shape)))


def _batched_value(latent: LatentSpec, values: np.ndarray) -> Variable:
    """The latent's value variable replaced by one value per configuration, shaped
    ``(C, *latent.shape)``."""
    return pt.broadcast_to(_standin_value(latent, values), (len(values), *latent.shape))


def unbroadcast(x: Variable) -> Variable:
    """``x`` without the broadcasts (``Alloc``, what ``pt.broadcast_to`` builds) at its
    output: the same values, broadcastable to ``x``'s shape, for graphs that would
    otherwise allocate ``x`` whole (a latent's prior ``log w[k]`` broadcast to every
    element is ``(K, 1)`` underneath)."""
    while x.owner is not None and isinstance(x.owner.op, Alloc):
        value = x.owner.inputs[0]
        x = pt.shape_padleft(value, x.ndim - value.ndim)
    return x


def attribute_to_elements(
    term_batched: Variable, owner: np.ndarray, n: int
) -> tuple[Variable, Variable]:
    """Split a batched term ``(C, *shape)`` into its per-element part ``(C, n)`` and
    the part that depends on no element ``(C,)``."""
    n_configs = term_batched.shape[0]
    flat_owner = owner.ravel()
    flat = term_batched.reshape((n_configs, flat_owner.size))
    owned = flat_owner >= 0
    unowned_part = pt.zeros((n_configs,))
    if not owned.all():
        unowned_part = flat[:, np.flatnonzero(~owned)].sum(axis=1)
        flat = flat[:, np.flatnonzero(owned)]
        flat_owner = flat_owner[owned]
    if flat_owner.size == n and (flat_owner == np.arange(n)).all():
        return flat, unowned_part
    repeats = flat_owner.size // n
    if repeats * n == flat_owner.size and (flat_owner == np.repeat(np.arange(n), repeats)).all():
        return flat.reshape((n_configs, n, repeats)).sum(axis=2), unowned_part
    # General case (e.g. repeated measures in any order): scatter-add by owner.
    summed = pt.zeros((n, n_configs))
    summed = pt.inc_subtensor(summed[pt.constant(flat_owner)], flat.T)
    return summed.T, unowned_part


def _group_table(group: ElementGroup, globals_: list[LatentSpec], n_global: int) -> tuple:
    n_group = group.n_configs
    values = _config_values(globals_, n_group, 1) + _config_values(group.latents, 1, n_global)
    n_configs = n_global * n_group
    terms = [t.logp for t, _ in group.terms]
    batched = _batched_terms(terms, globals_ + group.latents, values)
    element_total = pt.zeros((n_configs, group.n_elements))
    unowned_total = pt.zeros((n_configs,))
    full = [
        pt.broadcast_to(term_batched, (n_configs, *owner.shape))
        for (_, owner), term_batched in zip(group.terms, batched)
    ]
    for (_, owner), term_batched in zip(group.terms, full):
        element_part, unowned_part = attribute_to_elements(term_batched, owner, group.n_elements)
        element_total = element_total + element_part
        unowned_total = unowned_total + unowned_part
    table = element_total.reshape((n_global, n_group, group.n_elements))
    # The unowned part does not vary with the group's configuration.
    return table, unowned_total.reshape((n_global, n_group))[:, 0], full, batched


def build_tables(component: Component) -> ComponentTables:
    """Symbolic log-joint tables of ``component``, in terms of the value variables."""
    n_global = component.n_global_configs
    global_table = pt.zeros((n_global,))
    global_term_tables = []
    if component.global_terms:
        batched = _batched_terms(
            [t.logp for t in component.global_terms],
            component.globals,
            _config_values(component.globals, 1, 1),
        )
        for term, term_batched in zip(component.global_terms, batched):
            term_batched = pt.broadcast_to(term_batched, (n_global, *term.shape))
            global_term_tables.append(term_batched)
            global_table = global_table + term_batched.reshape((n_global, -1)).sum(axis=1)
    group_tables, group_term_tables, group_term_compact = [], [], []
    for group in component.groups:
        table, unowned, term_tables, compact = _group_table(group, component.globals, n_global)
        group_tables.append(table)
        group_term_tables.append(term_tables)
        group_term_compact.append(compact)
        global_table = global_table + unowned
    return ComponentTables(
        global_table, group_tables, global_term_tables, group_term_tables, group_term_compact
    )


def posterior_from_tables(component: Component, tables: ComponentTables) -> ComponentPosterior:
    """E-step of one component: responsibilities and log marginal from its tables."""
    if component.chain is not None:
        return _chain_posterior(component, tables)
    element_marginals = [logsumexp(table, axis=1) for table in tables.group_tables]
    per_global = tables.global_table
    for marginal in element_marginals:
        per_global = per_global + marginal.sum(axis=1)
    log_marginal = logsumexp(per_global, axis=0)
    log_q_global = per_global - log_marginal
    log_w_groups = [
        log_q_global[:, None, None] + table - marginal[:, None, :]
        for table, marginal in zip(tables.group_tables, element_marginals)
    ]
    log_resp, resp_is_group = {}, {}
    sizes = [lat.n_support for lat in component.globals]
    for axis, lat in enumerate(component.globals):
        joint = log_q_global.reshape(sizes)
        other = tuple(a for a in range(len(sizes)) if a != axis)
        marginal = logsumexp(joint, axis=other) if other else joint
        log_resp[lat.name] = marginal.reshape((*lat.shape, lat.n_support))
    for index, (group, log_w) in enumerate(zip(component.groups, log_w_groups)):
        sizes = [lat.n_support for lat in group.latents]
        joint = log_w.reshape((log_w.shape[0], *sizes, group.n_elements))
        for axis, lat in enumerate(group.latents):
            if len(sizes) == 1 and component.n_global_configs == 1:
                # Nothing to sum out: the joint is the latent's own posterior (and a
                # log-sum-exp would cost a few n x K temporaries every iteration).
                marginal = log_w[0]
                resp_is_group[lat.name] = index
            else:
                other = (0,) + tuple(a + 1 for a in range(len(sizes)) if a != axis)
                marginal = logsumexp(joint, axis=other)  # (n_support, n)
            log_resp[lat.name] = marginal.T.reshape((*lat.shape, lat.n_support))
    return ComponentPosterior(
        log_marginal, log_q_global, log_w_groups, log_resp, resp_is_group=resp_is_group
    )


def chain_emissions(component: Component, table: Variable) -> Variable:
    """A chain's per-element table ``(1, K, n)`` as forward-backward's log emissions
    ``(B, T, K)`` (elements are the chain's, in C order: sequence, then time)."""
    chain = component.chain
    shape = (chain.n_states, chain.n_sequences, chain.n_steps)
    return table[0].reshape(shape).transpose(1, 2, 0)


def viterbi_path(component: Component, tables: ComponentTables) -> Variable:
    """A Markov chain's most probable state sequence, shaped as the chain."""
    chain = component.chain
    log_emission = chain_emissions(component, tables.group_tables[0])
    path, _ = viterbi(log_emission, chain.log_transition, chain.log_initial)
    return chain.latent.support[0] + path.reshape(chain.latent.shape)


def predictive_table(component: Component, tables: ComponentTables) -> Variable:
    """``log p(s_t = k | observations before t)`` per element, ``(1, K, n)``."""
    chain = component.chain
    log_emission = chain_emissions(component, tables.group_tables[0])
    log_predictive = forward_filter(log_emission, chain.log_transition, chain.log_initial)
    return log_predictive.transpose(2, 0, 1).reshape((1, chain.n_states, chain.latent.size))


def _chain_posterior(component: Component, tables: ComponentTables) -> ComponentPosterior:
    """Forward-backward over a Markov chain's emission tables."""
    chain = component.chain
    log_emission = chain_emissions(component, tables.group_tables[0])
    log_gamma, transition_counts, log_likelihood = forward_backward(
        log_emission, chain.log_transition, chain.log_initial
    )
    log_marginal = check_parameters(
        log_likelihood.sum() + tables.global_table[0],
        chain.valid,
        msg=f"the rows of the transition matrix of '{chain.name}' must sum to 1",
    )
    n_states, n_elements = chain.n_states, chain.latent.size
    log_w = log_gamma.transpose(2, 0, 1).reshape((1, n_states, n_elements))
    log_resp = {chain.name: log_gamma.reshape((*chain.latent.shape, n_states))}
    return ComponentPosterior(
        log_marginal=log_marginal,
        log_q_global=pt.zeros((1,)),
        log_w_groups=[log_w],
        log_resp=log_resp,
        transition_counts=transition_counts,
    )


def latent_free_logp(structure: ModelStructure) -> Variable:
    """Sum of the terms that depend on no latent (priors, other likelihoods)."""
    total = pt.constant(0.0)
    for term in structure.latent_free_terms:
        total = total + term.logp.sum()
    return total

"""The numeric M-step's objective on expected sufficient statistics.

The numeric block maximizes ``Q`` over the parameters no closed form claimed, with
L-BFGS: tens of evaluations per EM iteration. Evaluated term by term over the data
that is ``O(n K)`` each time. Only the terms that involve those parameters matter
(the others are constant in them), and many of those reduce to statistics computed
once per M-step, so that each evaluation costs ``O(K)``:

* a Normal likelihood whose location and scale are the same for every entry under a
  configuration (``Normal(mu[z], sigma[z])`` with ``sigma`` under a prior that has no
  closed form): the expected count, and the first two moments about the location at
  the E-step (centred, so the sums do not cancel);
* a latent's own term (``z ~ Categorical(p=f(theta))``, the peppered moth's
  Hardy-Weinberg frequencies): the expected count of each support value;
* a discrete observed variable (any univariate family) with per-configuration
  parameters: the expected count of each distinct observed value.

Everything else enters as ``sum R * logp`` over its entries, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pymc as pm
import pytensor.tensor as pt
from pytensor.graph.basic import Constant, Variable
from pytensor.graph.replace import vectorize_graph
from pytensor.graph.traversal import ancestors
from pytensor.tensor.random.basic import NormalRV
from pytensor.tensor.random.op import RandomVariable

from pm_em.compile import evaluate_once
from pm_em.estep.enumeration import ComponentTables
from pm_em.model.analysis import ModelStructure, ParamSpec, Term
from pm_em.model.initial_point import model_initial_point
from pm_em.mstep.context import ClosedFormContext, TermEntries
from pm_em.mstep.inputs import ResponsibilityInputs, expectation

__all__ = ["NumericObjective", "build_numeric_objective"]

# Compress discrete data only when it pays: at most this share of distinct values.
_MAX_DISTINCT_SHARE = 0.5


@dataclass
class NumericObjective:
    """``Q`` restricted to the terms involving the numeric parameters.

    Attributes
    ----------
    objective : Variable
        Graph of the value variables, the responsibility inputs and ``stat_inputs``.
    stat_inputs : list of Variable
        Placeholders of the statistics in ``objective``...
    stats : list of Variable
        ...and the statistics as graphs of the value variables (the E-step's point)
        and the responsibility inputs.
    on_statistics : list of str
        Names of the terms evaluated on statistics (for reports and tests).
    """

    objective: Variable
    stat_inputs: list[Variable] = field(default_factory=list)
    stats: list[Variable] = field(default_factory=list)
    on_statistics: list[str] = field(default_factory=list)

    def add_stat(self, graph: Variable, name: str) -> Variable:
        placeholder = graph.type(name)
        self.stat_inputs.append(placeholder)
        self.stats.append(graph)
        return placeholder


def build_numeric_objective(
    structure: ModelStructure,
    tables: list[ComponentTables],
    responsibilities: ResponsibilityInputs,
    numeric_params: list[ParamSpec],
    *,
    compress_values: bool = True,
    leave_out: frozenset = frozenset(),
) -> NumericObjective:
    """Build the numeric M-step's objective (see the module docstring).

    ``compress_values=False`` keeps discrete data as ``sum R * logp`` over its
    entries instead of counts per distinct value (whose index into the values is a
    constant of this data: a chunked fit needs the sum over entries). The latent-free
    terms named in ``leave_out`` are left out (a chunked fit counts them once).
    """
    result = NumericObjective(objective=pt.constant(0.0, dtype="float64"))
    if not numeric_params:
        return result
    values = {p.value for p in numeric_params}

    def involved(term: Term) -> bool:
        return bool(values & set(ancestors([term.logp])))

    ctx = ClosedFormContext(structure, responsibilities)
    total = pt.constant(0.0, dtype="float64")
    for term in structure.latent_free_terms:
        if involved(term) and term.name not in leave_out:
            total = total + term.logp.sum()
    for c, comp in enumerate(structure.components):
        if comp.chain is not None and involved(comp.chain_term):
            total = total + _expected_chain_term(ctx.chain_use(comp.chain_term))
        comp_terms = list(comp.global_terms) + [t for g in comp.groups for t, _ in g.terms]
        if not any(involved(t) for t in comp_terms):
            continue
        entries = {t.name: ctx.entries(t) for t in comp_terms if involved(t)}
        if len(comp.latents) != 1 or any(e is None for e in entries.values()):
            # Latents enumerated jointly: the component's whole expected table.
            total = total + expectation(responsibilities.log_q_global[c], tables[c].global_table)
            for log_w, table in zip(responsibilities.log_w_groups[c], tables[c].group_tables):
                total = total + expectation(log_w, table)
            continue
        per_term = _per_term_tables(comp, tables[c])
        for name, term_entries in entries.items():
            reduced = _on_statistics(ctx, term_entries, result, compress_values)
            if reduced is not None:
                total = total + reduced
                result.on_statistics.append(name)
                continue
            table = per_term[name].reshape((term_entries.n_configs, term_entries.n_entries))
            total = total + _weighted_sum(term_entries.weights, table)
    result.objective = total
    return result


def _per_term_tables(comp, tables: ComponentTables) -> dict[str, Variable]:
    per_term = {t.name: tab for t, tab in zip(comp.global_terms, tables.global_term_tables)}
    for group, group_tables in zip(comp.groups, tables.group_term_tables):
        for (t, _), tab in zip(group.terms, group_tables):
            per_term[t.name] = tab
    return per_term


def _expected_chain_term(use) -> Variable:
    """A Markov chain's own term in expectation: ``sum_k gamma_0(k) log p(s_0 = k)``
    plus ``sum_jk xi_jk log P_jk`` (expected transition counts), per sequence."""
    initial = _weighted_sum(pt.exp(use.log_initial_weights), use.chain.log_initial)
    return initial + _weighted_sum(use.transition_counts, use.chain.log_transition)


def _weighted_sum(weights: Variable, table: Variable) -> Variable:
    # Zero-probability configurations may have a -inf log-probability: they add 0.
    return pt.switch(weights > 0, weights * table, 0.0).sum()


# -- a term on statistics ------------------------------------------------------------


def _on_statistics(
    ctx: ClosedFormContext, entries: TermEntries, result: NumericObjective, compress_values=True
):
    """The term's expected log-probability on statistics, or None."""
    rv = entries.rv
    if rv.owner is None or not isinstance(rv.owner.op, RandomVariable):
        return None
    if rv.owner.op.ndim_supp != 0 or entries.latent is None:
        return None
    found = _per_config_inputs(ctx, entries)
    if found is None:
        return None
    columns, varying = found
    kind = entries.term.kind
    if kind == "latent" and entries.latent.name == entries.term.name:
        return _latent_on_statistics(entries, columns, varying, result)
    if kind != "observed":
        return None
    if isinstance(rv.owner.op, NormalRV):
        return _normal_on_statistics(ctx, entries, columns, varying, result)
    if not compress_values:
        return None
    return _discrete_on_statistics(ctx, entries, columns, varying, result)


def _per_config_inputs(ctx, entries):
    """The distribution's inputs per configuration, ``(K, *core)``, when they are the
    same for every entry under a configuration (checked at two points), with the
    configurations where they depend on the parameters at all; else None.

    Configurations whose inputs are constant (``mu = z * rate`` at ``z = 0``) add a
    constant to Q and are left out: their log-probability can be ``-inf`` where the
    responsibility is zero, and its gradient NaN.
    """
    op = entries.rv.owner.op
    tables, narrow = [], []
    for arg, core_ndim in zip(entries.rv.owner.inputs[2:], op.ndims_params):
        core_shape = _core_shape(ctx, arg, core_ndim)
        table = ctx.table(arg, entries, core_shape)
        # One row per configuration, even where the input does not depend on it.
        tables.append(pt.broadcast_to(table, (entries.n_configs, *table.shape[1:])))
        narrow.append(_narrow_column(ctx, arg, entries, core_shape))
    model = ctx.model
    inputs = model.value_vars
    start = model_initial_point(model)
    rng = np.random.default_rng(7)
    jittered = {
        name: value + rng.normal(size=np.shape(value))
        if np.issubdtype(np.asarray(value).dtype, np.floating)
        else value
        for name, value in start.items()
    }
    usable = [n for n in narrow if n is not None]
    evaluated = []
    for point in (start, jittered):
        try:
            values = evaluate_once(inputs, tables + usable, [point[v.name] for v in inputs])
        except Exception:  # noqa: BLE001 - an input that cannot be evaluated: kept as a table
            return None
        values = [np.asarray(v) for v in values]
        full, narrow_values = values[: len(tables)], iter(values[len(tables) :])
        if not all(np.array_equal(v, np.broadcast_to(v[:, :1], v.shape)) for v in full):
            return None
        for i, column in enumerate(narrow):
            # The per-configuration graph must give the full table's values.
            if column is not None and not np.allclose(
                next(narrow_values), full[i][:, 0], rtol=1e-12, atol=0
            ):
                narrow[i] = None
        evaluated.append(full)
    varying = np.zeros(entries.n_configs, dtype=bool)
    for first, second in zip(*evaluated):
        changed = first[:, 0] != second[:, 0]
        varying |= changed.reshape(entries.n_configs, -1).any(axis=1)
    # Where possible the columns are computed once per configuration: slicing the
    # full table would cost O(n) per evaluation, in its gradient too.
    columns = [t[:, 0] if n is None else n for t, n in zip(tables, narrow)]
    return columns, np.flatnonzero(varying)


def _core_shape(ctx, arg, core_ndim: int) -> tuple:
    """The core shape of a distribution input: static where the type knows it, else
    read from the input's graph on the value variables. Read from the input itself,
    a random variable among them (``p=w``) would stay in the objective for its shape
    alone, and bring its RNG to the compiled function (JAX takes none)."""
    if not core_ndim:
        return ()
    static = arg.type.shape[arg.ndim - core_ndim :]
    if None not in static:
        return tuple(static)
    return tuple(ctx.evaluate(arg).shape[arg.ndim - core_ndim :])


def _narrow_column(ctx, arg, entries, core_shape) -> Variable | None:
    """``arg`` per configuration, ``(K, *core)``, evaluated with the latent replaced
    by one value per configuration (shape ``(K, 1, ..., 1)``) instead of one per
    element; None where the graph does not allow it."""
    graph = ctx.evaluate(arg)
    latent = entries.latent
    ones = (1,) * len(entries.batch_shape)
    try:
        if latent.value in ancestors([graph]):
            column = pt.constant(latent.support.astype(latent.value.type.dtype))
            standin = column.reshape((latent.n_support,) + (1,) * len(latent.shape))
            graph = vectorize_graph(graph, replace={latent.value: standin})
        else:
            graph = graph[None]
        graph = pt.broadcast_to(graph, (entries.n_configs, *ones, *core_shape))
        return graph.reshape((entries.n_configs, *core_shape))
    except Exception:  # noqa: BLE001 - ops that need the latent's full shape
        return None


def _logp_per_config(entries, columns, value: Variable) -> Variable:
    """``logp(value | inputs of configuration k)`` for ``value`` broadcastable
    against ``(K, 1)``."""
    op = entries.rv.owner.op
    fresh = op(*columns, rng=None)
    return pm.logp(fresh, value)


def _latent_on_statistics(entries, columns, varying, result):
    """``sum_k N_k log p(z = support_k | theta)``."""
    keep = pt.constant(varying)
    count = result.add_stat(entries.weights[keep].sum(axis=1), f"{entries.term.name}_count")
    support = entries.latent.support[varying].astype(entries.latent.value.type.dtype)
    logp = _logp_per_config(entries, [col[keep] for col in columns], pt.constant(support))
    return _weighted_sum(count, logp)


def _normal_on_statistics(ctx, entries, columns, varying, result):
    """``sum_k -N_k log(sigma_k sqrt(2 pi)) - sum_j R_kj (x_j - mu_k)^2 / (2 sigma_k^2)``,
    with the squares expanded about the E-step's location ``c_k``."""
    name = entries.term.name
    keep = pt.constant(varying)
    location, scale = (col[keep] for col in columns)
    data = ctx.value_table(entries)[0]  # (J,)
    weights = entries.weights[keep]
    center = location  # at the E-step's point: a graph of the value variables
    deviation = data[None, :] - center[:, None]
    count = result.add_stat(weights.sum(axis=1), f"{name}_count")
    first = result.add_stat((weights * deviation).sum(axis=1), f"{name}_moment1")
    second = result.add_stat((weights * deviation**2).sum(axis=1), f"{name}_moment2")
    centre = result.add_stat(center, f"{name}_centre")
    shift = location - centre
    squares = second - 2 * shift * first + shift**2 * count
    return (-count * (pt.log(scale) + 0.5 * np.log(2 * np.pi)) - squares / (2 * scale**2)).sum()


def _discrete_on_statistics(ctx, entries, columns, varying, result):
    """``sum_{k,u} C_ku log p(u | theta_k)`` over the distinct observed values ``u``."""
    data = entries.rv
    value = ctx.model.rvs_to_values.get(data)
    if not isinstance(value, Constant) or "int" not in value.type.dtype:
        return None  # continuous or mutable data: no compression
    flat = np.asarray(value.data).ravel()
    distinct, inverse = np.unique(flat, return_inverse=True)
    if distinct.size > _MAX_DISTINCT_SHARE * flat.size:
        return None
    keep = pt.constant(varying)
    counts = pt.zeros((varying.size, distinct.size))
    counts = pt.inc_subtensor(counts[:, pt.constant(inverse)], entries.weights[keep])
    counts = result.add_stat(counts, f"{entries.term.name}_value_counts")
    logp = _logp_per_config(
        entries,
        [col[keep][:, None] for col in columns],
        pt.constant(distinct.astype(value.type.dtype))[None, :],
    )
    return _weighted_sum(counts, logp)

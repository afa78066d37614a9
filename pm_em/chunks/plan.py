"""Split an EM routine into what one chunk of the data computes and what runs once.

The routine of a model declared on one chunk of the data (``m`` rows) is cut at the
additive statistics (:mod:`pm_em.chunks.statistic`):

* per chunk, at level ``L``: the marked sums whose own inputs hold no unfinished
  sum, given the totals of the levels before (the ECM order makes a scale's sum of
  squared residuals read the location just updated from level 0's totals), and at
  level 0 also the chunk's log-likelihood;
* once: the closed-form M-step from the totals, and the prior terms of the
  log-posterior;
* the numeric M-step's ``Q`` and its gradient in the numeric parameters, split the
  same way: per chunk, the expected complete-data terms with the chunk's
  responsibilities recomputed at the E-step point (a copy of the value variables,
  :attr:`ChunkPlan.estep_values`) on every evaluation; once, the terms that read no
  chunked data (the numeric parameters' priors). Discrete data is kept as a sum
  over entries (no counts per distinct value, which would index the declared
  chunk's values).

The cut is checked, not assumed: the once-only graphs may not read the data (or a
constant shaped like it) but through a marked sum, every latent must be one element
per row, and every per-row input of the model must be chunked. Otherwise
:class:`~pm_em.errors.UnsupportedModelError` names the variable. Nothing here
compiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytensor
import pytensor.tensor as pt
from pytensor.compile.sharedvalue import SharedVariable
from pytensor.graph.basic import Constant, Variable
from pytensor.graph.replace import clone_replace
from pytensor.graph.traversal import ancestors

from pm_em.chunks.statistic import additive_statistics
from pm_em.errors import UnsupportedModelError
from pm_em.model.analysis import ParamSpec
from pm_em.mstep.inputs import flatten_params
from pm_em.mstep.objective import build_numeric_objective

__all__ = ["ChunkPlan", "plan_chunks"]


@dataclass
class ChunkPlan:
    """The graphs of a chunked EM routine.

    Attributes
    ----------
    names : list of str
        The chunked inputs (observed variables or ``pm.Data`` containers), by name.
    chunk_inputs : list of Variable
        Their placeholders, shaped as one chunk: ``(m, *row_shape)``.
    chunk_length : int
        ``m``: the rows the model was declared with.
    values : list of Variable
        The parameters' value variables (as :attr:`pm_em.EM.graphs`).
    levels : list of list of Variable
        Per level, the graphs of its statistics, per chunk: inputs ``values``, the
        chunk inputs and the totals of the levels before (:attr:`totals`).
    totals : list of list of Variable
        Per level, the placeholders of its statistics' totals over the chunks.
    chunk_logp : Variable
        The chunk's log-likelihood (latents summed out), computed with level 0.
    counts : list of Variable
        Per latent of :attr:`count_latents`, the sum of its responsibilities over the
        chunk's elements, one per support value (computed with level 0: the loop's
        empty-component check, :func:`pm_em.fit.degenerate.find_empty_components`).
    count_latents : list of tuple
        ``(name, support values)`` of each latent counted.
    global_logp : Variable
        The terms counted once (priors, data not chunked): a graph of ``values``.
    closed_step : list of Variable
        The closed-form parameters' new values from the totals: inputs ``values``
        and every level's totals.
    closed_index : list of int
        Position in ``values`` of each closed-form parameter.
    rows_observed : int
        Observed entries per chunked row (for the per-observation tolerance).
    numeric_params : list of ParamSpec
        The parameters of the numeric M-step (none: closed form only)...
    numeric_index : list of int
        ...their positions in ``values``.
    theta : Variable or None
        The numeric parameters' flat vector (input of the graphs below).
    estep_values : list of Variable
        Copies of ``values``: the E-step point the responsibilities are taken at.
    chunk_q : list of Variable
        ``[Q, dQ/dtheta]`` of one chunk: inputs ``theta``, ``values`` (the
        closed-form parameters at their new values), ``estep_values`` and the chunk
        inputs.
    global_q : list of Variable
        ``[Q, dQ/dtheta]`` of the terms counted once: inputs ``theta``, ``values``.
    """

    names: list[str]
    chunk_inputs: list[Variable]
    chunk_length: int
    values: list[Variable]
    levels: list[list[Variable]]
    totals: list[list[Variable]]
    chunk_logp: Variable
    counts: list[Variable]
    count_latents: list[tuple]
    global_logp: Variable
    closed_step: list[Variable]
    closed_index: list[int]
    rows_observed: int
    numeric_params: list[ParamSpec]
    numeric_index: list[int]
    theta: Variable | None
    estep_values: list[Variable]
    chunk_q: list[Variable]
    global_q: list[Variable]


def _data_leaf(model, name: str) -> Variable:
    """The graph leaf holding ``name``'s data: an observed variable's constant (or
    ``pm.Data`` container), or a ``pm.Data`` container itself."""
    if name not in model.named_vars:
        raise ValueError(f"data: '{name}' is not a variable of the model.")
    var = model[name]
    if isinstance(var, SharedVariable):
        return var
    if var in model.observed_RVs:
        leaf = model.rvs_to_values[var]
        if isinstance(leaf, Constant | SharedVariable):
            return leaf
        raise UnsupportedModelError(
            f"data: the data of '{name}' is a graph, not a plain array; pass the pm.Data "
            "container it is computed from instead."
        )
    raise ValueError(
        f"data: '{name}' is neither an observed variable nor a pm.Data container; only "
        "those can be given in chunks."
    )


def _levels(statistics: list[Variable]) -> list[list[Variable]]:
    """Statistics grouped by level: a statistic whose sum reads another's total is a
    level after it."""
    marked = set(statistics)
    level = {}

    def level_of(stat):
        if stat not in level:
            upstream = [s for s in ancestors(stat.owner.inputs) if s in marked]
            level[stat] = 1 + max((level_of(s) for s in upstream), default=-1)
        return level[stat]

    for stat in statistics:
        level_of(stat)
    grouped = [[] for _ in range(1 + max(level.values(), default=-1))]
    for stat, lev in level.items():
        grouped[lev].append(stat)
    return grouped


def _value_shape(var: Variable) -> tuple[int, ...]:
    value = var.get_value(borrow=True) if isinstance(var, SharedVariable) else var.data
    return tuple(int(d) for d in value.shape)


def _n_rows(var: Variable) -> int | None:
    """Rows of a constant or a ``pm.Data`` container (its current value), None for
    a scalar."""
    value = var.get_value(borrow=True) if isinstance(var, SharedVariable) else var.data
    return int(value.shape[0]) if getattr(value, "ndim", 0) >= 1 else None


def _row_constants(graphs: list[Variable], length: int, known: set) -> list[Variable]:
    """Constants and ``pm.Data`` containers among the ancestors of ``graphs`` with
    ``length`` rows, other than ``known``: per-row data the chunks would not replace."""
    return [
        v
        for v in ancestors(graphs)
        if isinstance(v, Constant | SharedVariable) and v not in known and _n_rows(v) == length
    ]


def _substituted(outputs: list[Variable], mapping: dict) -> list[Variable]:
    """``outputs`` with the variables of ``mapping`` replaced (those in the graph)."""
    present = set(ancestors(outputs))
    mapping = {k: v for k, v in mapping.items() if k in present}
    return clone_replace(list(outputs), mapping) if mapping else list(outputs)


def _describe(var: Variable) -> str:
    return f"'{var.name}'" if var.name else f"a constant of shape {var.type.shape}"


def plan_chunks(em, names: list[str]) -> ChunkPlan:
    """Cut ``em``'s routine (a model declared on one chunk) at its additive
    statistics, with ``names`` as the chunked inputs.

    Raises
    ------
    UnsupportedModelError
        When the fit cannot be split exactly over chunks of rows: a latent that is
        not one element per row (a global one, a Markov chain), a per-row input of
        the model not in ``names``, a closed-form update reading the data outside
        a marked sum, or a numeric M-step whose objective reads per-row data that
        is not chunked.
    """
    structure, graphs, model = em.structure, em.graphs, em.model
    if not names:
        raise ValueError("data: give at least one observed variable's full data.")
    leaves = {name: _data_leaf(model, name) for name in names}
    lengths = {name: _n_rows(leaf) for name, leaf in leaves.items()}
    if len(set(lengths.values())) != 1 or None in lengths.values():
        raise ValueError(
            f"data: every chunked input needs the same number of rows in the model, got "
            f"{lengths}. Declare the model on one chunk (the same slice of every input)."
        )
    (length,) = set(lengths.values())

    for comp in structure.components:
        if comp.globals:
            raise UnsupportedModelError(
                f"Latent {[lat.name for lat in comp.globals]} is enumerated jointly with all "
                "the data (a global latent): its posterior needs every chunk at once, so the "
                "fit cannot be chunked. Use find_MAP on the data in memory."
            )
        if comp.chain is not None and (
            len(comp.chain.latent.shape) < 2 or comp.chain.latent.shape[0] != length
        ):
            # Sequences are independent, time steps are not: a chunk is whole sequences.
            raise UnsupportedModelError(
                f"'{comp.chain.name}' is a Markov chain of shape {comp.chain.latent.shape}: "
                f"a chunk must be whole sequences, one per row ({length} rows), with time "
                "on the last axis. Declare the chain over (sequence, time)."
            )
        for lat in comp.latents:
            if not lat.shape or lat.shape[0] != length:
                raise UnsupportedModelError(
                    f"Latent '{lat.name}' has shape {lat.shape}, not one element per row of "
                    f"the chunk ({length} rows): the fit cannot be chunked."
                )
    known = set(leaves.values())
    model_terms = [t.logp for t in structure.terms]
    missed = _row_constants(model_terms, length, known)
    if missed:
        raise UnsupportedModelError(
            f"The model reads {_describe(missed[0])} with one row per observation, which is "
            f"not chunked: pass its full data in data= (as a pm.Data container), or the "
            f"fit would reuse the first chunk's. Chunked inputs: {names}."
        )

    placeholders = {
        leaf: pt.tensor(f"{name}_chunk", shape=_value_shape(leaf), dtype=leaf.type.dtype)
        for name, leaf in leaves.items()
    }
    rows_observed = 0
    chunk_terms, global_terms = [], []
    for term in structure.latent_free_terms:
        if known & set(ancestors([term.logp])):
            if not term.shape or term.shape[0] != length:
                raise UnsupportedModelError(
                    f"Term '{term.name}' reads the chunked data but is not one value per "
                    f"row (shape {term.shape}): it cannot be split over chunks."
                )
            chunk_terms.append(term.logp.sum())
        else:
            global_terms.append(term.logp.sum())
    for rv in model.observed_RVs:
        if known & set(ancestors([model.rvs_to_values[rv]])):
            value = model.rvs_to_values[rv]
            if isinstance(value, Constant | SharedVariable):
                row_shape = _value_shape(value)[1:]
            else:
                row_shape = _value_shape(next(v for v in known if v in ancestors([value])))[1:]
            rows_observed += math.prod(row_shape)
    chunk_logp = sum((post.log_marginal for post in graphs.posteriors), pt.constant(0.0))
    chunk_logp = chunk_logp + sum(chunk_terms, pt.constant(0.0))
    global_logp = sum(global_terms, pt.constant(0.0))
    latents = {lat.name: lat for lat in structure.latents}
    count_latents, counts = [], []
    for post in graphs.posteriors:
        for name, log_resp in post.log_resp.items():
            lat = latents[name]
            if lat.size > 1:
                count_latents.append((name, lat.support))
                counts.append(pt.exp(log_resp).reshape((-1, lat.n_support)).sum(axis=0))

    statistics = additive_statistics(graphs.closed_step)
    levels = _levels(statistics)
    totals = [
        [s.type(f"total_{lev}_{i}") for i, s in enumerate(stats)]
        for lev, stats in enumerate(levels)
    ]
    to_total = {s: t for stats, tots in zip(levels, totals) for s, t in zip(stats, tots)}
    level_graphs = []
    for stats in levels:
        sums = [s.owner.inputs[0] for s in stats]
        level_graphs.append(_substituted(sums, {**placeholders, **to_total}))
    (chunk_logp, *counts) = _substituted([chunk_logp, *counts], placeholders)
    closed_step = _substituted(graphs.closed_step, to_total)
    leaked = _row_constants([*closed_step, global_logp], length, set()) + [
        v for v in ancestors([*closed_step, global_logp]) if v in known
    ]
    if leaked:
        raise UnsupportedModelError(
            f"The closed-form M-step reads {_describe(leaked[0])} (one value per row) "
            "outside a sum over the observations: it cannot be computed from chunk "
            "totals. Use find_MAP on the data in memory."
        )
    names_order = [p.name for p in em.params]
    theta, estep_values, chunk_q, global_q = _numeric_block(em, known, placeholders, length)
    return ChunkPlan(
        names=list(names),
        chunk_inputs=[placeholders[leaves[name]] for name in names],
        chunk_length=length,
        values=list(graphs.values),
        levels=level_graphs,
        totals=totals,
        chunk_logp=chunk_logp,
        counts=counts,
        count_latents=count_latents,
        global_logp=global_logp,
        closed_step=closed_step,
        closed_index=[names_order.index(p.name) for p in graphs.closed_params],
        rows_observed=rows_observed,
        numeric_params=list(graphs.numeric_params),
        numeric_index=[names_order.index(p.name) for p in graphs.numeric_params],
        theta=theta,
        estep_values=estep_values,
        chunk_q=chunk_q,
        global_q=global_q,
    )


def _numeric_block(em, known: set, placeholders: dict, length: int):
    """The numeric M-step's ``Q`` and gradient split into a chunk's part and the
    part counted once (see the module docstring); ``(None, [], [], [])`` without
    numeric parameters."""
    structure, graphs = em.structure, em.graphs
    numeric = graphs.numeric_params
    if not numeric:
        return None, [], [], []
    numeric_values = {p.value for p in numeric}
    once = [
        t
        for t in structure.latent_free_terms
        if not known & set(ancestors([t.logp])) and numeric_values & set(ancestors([t.logp]))
    ]
    objective = build_numeric_objective(
        structure,
        graphs.tables,
        graphs.responsibilities,
        numeric,
        compress_values=False,
        leave_out=frozenset(t.name for t in once),
    )
    # The responsibilities (and the statistics taken from them) at the E-step's
    # point, a copy of the value variables: the objective reads the closed-form
    # parameters at their new values through the value variables themselves.
    fused = {}
    for c, post in enumerate(graphs.posteriors):
        fused[graphs.responsibilities.log_q_global[c]] = post.log_q_global
        for placeholder, log_w in zip(graphs.responsibilities.log_w_groups[c], post.log_w_groups):
            fused[placeholder] = log_w
        if post.transition_counts is not None:
            fused[graphs.responsibilities.transition_counts[c]] = post.transition_counts
    stats = _substituted(objective.stats, fused)
    estep_values = [v.type(f"{v.name}_estep") for v in graphs.values]
    at_estep = dict(zip(graphs.values, estep_values))
    inputs = [*fused, *objective.stat_inputs]
    estep_graphs = _substituted([*fused.values(), *stats], at_estep)
    (chunk,) = _substituted([objective.objective], dict(zip(inputs, estep_graphs)))
    once_q = sum((t.logp.sum() for t in once), pt.constant(0.0))
    theta, (chunk, once_q) = flatten_params(numeric, [chunk, once_q])
    (chunk,) = _substituted([chunk], placeholders)
    leaked = _row_constants([chunk, once_q], length, set()) + [
        v for v in ancestors([once_q]) if v in known
    ]
    if leaked:
        raise UnsupportedModelError(
            f"The numeric M-step of {[p.name for p in numeric]} reads {_describe(leaked[0])} "
            "(one value per row) that is not chunked: its objective cannot be summed over "
            "chunks. Pass that data in data= (as a pm.Data container), or use find_MAP on "
            "the data in memory."
        )
    grads = (
        pytensor.grad(chunk, theta, disconnected_inputs="ignore", return_disconnected="zero"),
        pytensor.grad(once_q, theta, disconnected_inputs="ignore", return_disconnected="zero"),
    )
    return theta, estep_values, [chunk, grads[0]], [once_q, grads[1]]

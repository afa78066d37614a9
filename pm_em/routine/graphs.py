"""All symbolic graphs of one EM routine, built from a :class:`ModelStructure`.

Nothing here compiles or evaluates; :mod:`pm_em.routine.em` compiles what is built here.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytensor
import pytensor.tensor as pt
from pytensor.graph.basic import Variable
from pytensor.graph.op import io_connection_pattern
from pytensor.graph.replace import graph_replace

from pm_em.estep.enumeration import (
    ComponentPosterior,
    ComponentTables,
    build_tables,
    latent_free_logp,
    posterior_from_tables,
    predictive_table,
    viterbi_path,
)
from pm_em.model.analysis import ModelStructure, ParamSpec
from pm_em.mstep.closed_form import ClosedFormUpdate, closed_form_updates
from pm_em.mstep.inputs import ResponsibilityInputs, flatten_params
from pm_em.mstep.objective import NumericObjective, build_numeric_objective

__all__ = ["EMGraphs", "build_em_graphs", "params_without_terms"]


@dataclass
class EMGraphs:
    """The graphs of one EM routine.

    Attributes
    ----------
    values : list of Variable
        The parameters' value variables (unconstrained space): inputs of the E-step.
    logp : Variable
        Observed-data log-posterior (latents summed out, no Jacobian).
    posteriors : list of ComponentPosterior
    tables : list of ComponentTables
    responsibilities : ResponsibilityInputs
        Inputs of the M-step objective.
    closed_form : list of ClosedFormUpdate
        The closed-form blocks of the M-step, in ECM order; their new values are
        graphs of ``values`` and the responsibility inputs.
    closed_params, numeric_params : list of ParamSpec
        The parameters updated in closed form, and the rest (but the unused ones).
    unused_params : list of ParamSpec
        Parameters the log-posterior does not depend on (a ``Flat`` prior and no
        dependents): no value is better than another, so EM leaves them where they
        start.
    closed_step : list of Variable
        The closed-form new values as graphs of ``values`` alone (E-step fused in).
    numeric : NumericObjective
        The numeric block's objective, on expected sufficient statistics where a
        term allows it.
    stats_step : list of Variable
        Those statistics as graphs of ``values`` alone (E-step fused in).
    theta_flat : Variable
        Flat vector of the numeric parameters' values (input of the objective).
    objective, gradient : Variable
        Q (up to terms constant in the numeric parameters) and dQ/dtheta as graphs
        of ``theta_flat``, the closed-form parameters' value variables, the
        responsibilities and the statistics.
    constrained : list of Variable
        Each parameter on its constrained space, as a graph of ``values``.
    constrained_inputs : list of Variable
        Placeholders for constrained parameter values...
    unconstrained : list of Variable
        ...and each parameter's value variable as a graph of them.
    deterministics : list of Variable
        The model's Deterministics as graphs of ``values`` and the latents' values.
    chain_paths : list of Variable or None
        Per component, for a Markov chain: its Viterbi path (most probable state
        sequence), shaped as the chain, a graph of ``values``.
    chain_predictive : list of Variable or None
        Per component, for a Markov chain: ``log p(s_t = k | y_<t)`` as a table
        ``(1, K, n)`` over the chain's elements (for pointwise log-likelihoods).
    """

    values: list[Variable]
    logp: Variable
    posteriors: list[ComponentPosterior]
    tables: list[ComponentTables]
    responsibilities: ResponsibilityInputs
    closed_form: list[ClosedFormUpdate]
    closed_params: list[ParamSpec]
    numeric_params: list[ParamSpec]
    unused_params: list[ParamSpec]
    closed_step: list[Variable]
    numeric: NumericObjective
    stats_step: list[Variable]
    theta_flat: Variable
    objective: Variable
    gradient: Variable
    constrained: list[Variable]
    constrained_inputs: list[Variable]
    unconstrained: list[Variable]
    deterministics: list[Variable]
    chain_paths: list[Variable | None]
    chain_predictive: list[Variable | None]


def params_without_terms(structure: ModelStructure) -> list[ParamSpec]:
    """The parameters on which no log-probability term depends (PyTensor finds no
    gradient path): a ``Flat`` prior (whose log-density is 0 whatever the value) on a
    variable nothing else uses, or that only a Deterministic uses.

    Decided by the connectivity that ``pytensor.grad`` itself follows (each op's
    ``connection_pattern``: a shape, an index or a comparison carries no gradient),
    without building the gradient: for a full-covariance mixture, building it cost
    about a second of a cold fit, for a graph never compiled.
    """
    if not structure.params:
        return []
    total = sum((pt.sum(t.logp) for t in structure.terms), pt.constant(0.0))
    pattern = io_connection_pattern([p.value for p in structure.params], [total])
    return [p for p, (connected,) in zip(structure.params, pattern) if not connected]


def build_em_graphs(structure: ModelStructure, closed_form: bool = True) -> EMGraphs:
    """Build every graph an EM routine for ``structure`` needs; with
    ``closed_form=False`` every parameter goes to the numeric M-step."""
    model = structure.model
    tables = [build_tables(comp) for comp in structure.components]
    posteriors = [
        posterior_from_tables(comp, table) for comp, table in zip(structure.components, tables)
    ]
    latent_free = latent_free_logp(structure)
    logp = latent_free
    for post in posteriors:
        logp = logp + post.log_marginal

    responsibilities = ResponsibilityInputs.for_structure(structure)
    if closed_form:
        closed_form = closed_form_updates(structure, responsibilities)
    else:
        closed_form = []
    closed_params = [p for update in closed_form for p in update.params]
    closed_names = {p.name for p in closed_params}
    unused_params = params_without_terms(structure)
    unused_names = {p.name for p in unused_params}
    numeric_params = [p for p in structure.params if p.name not in closed_names | unused_names]
    closed_new = [v for update in closed_form for v in update.new_values]
    # The fused step: the same updates with the E-step's own results substituted.
    fused = {}
    for c, post in enumerate(posteriors):
        fused[responsibilities.log_q_global[c]] = post.log_q_global
        for placeholder, log_w in zip(responsibilities.log_w_groups[c], post.log_w_groups):
            fused[placeholder] = log_w
        if post.transition_counts is not None:
            fused[responsibilities.transition_counts[c]] = post.transition_counts
    closed_step = graph_replace(closed_new, fused, strict=False) if closed_new else []

    numeric = build_numeric_objective(structure, tables, responsibilities, numeric_params)
    stats_step = graph_replace(numeric.stats, fused, strict=False) if numeric.stats else []
    theta_flat, (flat_expected,) = flatten_params(numeric_params, [numeric.objective])
    if numeric_params:
        gradient = pytensor.grad(flat_expected, theta_flat)
    else:
        gradient = pt.zeros((0,))

    rvs = [p.rv for p in structure.params]
    constrained = model.replace_rvs_by_values(rvs)
    constrained_inputs = [p.rv.type(f"{p.name}_constrained") for p in structure.params]
    rv_to_input = dict(zip(rvs, constrained_inputs))
    unconstrained = []
    for p, placeholder in zip(structure.params, constrained_inputs):
        if p.transform is None:
            unconstrained.append(placeholder)
            continue
        forward = p.transform.forward(placeholder, *p.rv.owner.inputs)
        unconstrained.append(graph_replace(forward, rv_to_input, strict=False))
    deterministics = model.replace_rvs_by_values(model.deterministics)
    chain_paths, chain_predictive = [], []
    for comp, table in zip(structure.components, tables):
        if comp.chain is None:
            chain_paths.append(None)
            chain_predictive.append(None)
            continue
        chain_paths.append(viterbi_path(comp, table))
        chain_predictive.append(predictive_table(comp, table))
    return EMGraphs(
        values=[p.value for p in structure.params],
        logp=logp,
        posteriors=posteriors,
        tables=tables,
        responsibilities=responsibilities,
        closed_form=closed_form,
        closed_params=closed_params,
        numeric_params=numeric_params,
        unused_params=unused_params,
        closed_step=closed_step,
        numeric=numeric,
        stats_step=stats_step,
        theta_flat=theta_flat,
        objective=flat_expected,
        gradient=gradient,
        constrained=constrained,
        constrained_inputs=constrained_inputs,
        unconstrained=unconstrained,
        deterministics=deterministics,
        chain_paths=chain_paths,
        chain_predictive=chain_predictive,
    )

"""All symbolic graphs of one EM routine, built from a :class:`ModelStructure`.

Nothing here compiles or evaluates; :mod:`pm_em.em` compiles what is built here.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytensor
import pytensor.tensor as pt
from pytensor.graph.basic import Variable
from pytensor.graph.replace import graph_replace

from pm_em.analysis import ModelStructure
from pm_em.enumeration import (
    ComponentPosterior,
    ComponentTables,
    build_tables,
    latent_free_logp,
    posterior_from_tables,
)
from pm_em.mstep import ResponsibilityInputs, build_expected_logp, flatten_params

__all__ = ["EMGraphs", "build_em_graphs"]


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
    theta_flat : Variable
        Flat vector of all parameter values (input of the objective).
    objective, gradient : Variable
        Q and dQ/dtheta as graphs of ``theta_flat`` and the responsibilities.
    constrained : list of Variable
        Each parameter on its constrained space, as a graph of ``values``.
    constrained_inputs : list of Variable
        Placeholders for constrained parameter values...
    unconstrained : list of Variable
        ...and each parameter's value variable as a graph of them.
    deterministics : list of Variable
        The model's Deterministics as graphs of ``values`` and the latents' values.
    """

    values: list[Variable]
    logp: Variable
    posteriors: list[ComponentPosterior]
    tables: list[ComponentTables]
    responsibilities: ResponsibilityInputs
    theta_flat: Variable
    objective: Variable
    gradient: Variable
    constrained: list[Variable]
    constrained_inputs: list[Variable]
    unconstrained: list[Variable]
    deterministics: list[Variable]


def build_em_graphs(structure: ModelStructure) -> EMGraphs:
    """Build every graph an EM routine for ``structure`` needs."""
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
    expected = build_expected_logp(structure, tables, responsibilities, latent_free)
    theta_flat, (flat_expected,) = flatten_params(structure.params, [expected])
    if structure.params:
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
    return EMGraphs(
        values=[p.value for p in structure.params],
        logp=logp,
        posteriors=posteriors,
        tables=tables,
        responsibilities=responsibilities,
        theta_flat=theta_flat,
        objective=flat_expected,
        gradient=gradient,
        constrained=constrained,
        constrained_inputs=constrained_inputs,
        unconstrained=unconstrained,
        deterministics=deterministics,
    )

"""Closed-form M-step updates recognized in the model's graph.

Each family lives in its own module and contributes *rules*: functions
``rule(ctx, param) -> ClosedFormUpdate | None`` that return nothing when their pattern
does not hold exactly, leaving the parameter to the numeric M-step. Rules run in the
order of :data:`RULES`, each given the values its predecessors just computed (ECM:
every block is maximized given the latest values of the others, which keeps EM's
monotone guarantee); weights come first, then locations, then scales.
"""

from __future__ import annotations

from pm_em.model.analysis import ModelStructure
from pm_em.mstep.closed_form.base import ClosedFormUpdate
from pm_em.mstep.closed_form.counts import binomial_probability, exponential_rate, poisson_rate
from pm_em.mstep.closed_form.mvnormal import mvnormal_covariance, mvnormal_mean
from pm_em.mstep.closed_form.normal import normal_location, normal_precision, normal_scale
from pm_em.mstep.closed_form.transitions import markov_initial, markov_transitions
from pm_em.mstep.closed_form.weights import categorical_weights
from pm_em.mstep.context import ClosedFormContext
from pm_em.mstep.inputs import ResponsibilityInputs

__all__ = ["RULES", "ClosedFormUpdate", "closed_form_updates"]

#: The registry, in ECM order.
RULES = [
    markov_transitions,
    markov_initial,
    categorical_weights,
    binomial_probability,
    normal_location,
    normal_scale,
    normal_precision,
    mvnormal_mean,
    mvnormal_covariance,
    poisson_rate,
    exponential_rate,
]


def closed_form_updates(
    structure: ModelStructure, responsibilities: ResponsibilityInputs
) -> list[ClosedFormUpdate]:
    """Every closed-form block of the M-step, in ECM order.

    Parameters
    ----------
    structure : ModelStructure
    responsibilities : ResponsibilityInputs
        The E-step's results per component, as input placeholders.

    Returns
    -------
    list of ClosedFormUpdate
        Their ``new_values`` are graphs of the parameters' value variables and of
        the responsibility inputs.
    """
    ctx = ClosedFormContext(structure, responsibilities)
    updates = []
    for rule in RULES:
        for param in structure.params:
            if param.name in ctx.claimed:
                continue
            update = rule(ctx, param)
            if update is not None:
                updates.append(update)
                ctx.claimed.update(p.name for p in update.params)
    return updates

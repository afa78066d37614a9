"""The M-step, built symbolically: the expected complete-data log-posterior and its
gradient on the unconstrained space, plus the registry of closed-form updates.

``Q(theta) = sum_g q(g) B_theta[g] + sum_{g,k,i} W[g,k,i] A_theta[g,k,i]
+ log p(theta) + (terms free of latents)``, no Jacobian: the mode is in the model's
own parameterization, as ``pm.find_MAP`` gives it.

Closed-form updates are pluggable: a rule in :data:`CLOSED_FORM_RULES` looks at a
parameter and returns a :class:`ClosedFormUpdate` (a graph for its maximizer given
the responsibilities and the other parameters), or ``None`` when its pattern does
not hold; the parameters no rule claims are optimized numerically (ECM: each block
maximized given the others, which keeps EM's monotone guarantee).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytensor.tensor as pt
from pytensor.graph.basic import Variable
from pytensor.graph.replace import graph_replace

from pm_em.analysis import ModelStructure, ParamSpec
from pm_em.enumeration import ComponentTables

__all__ = [
    "CLOSED_FORM_RULES",
    "ClosedFormUpdate",
    "ResponsibilityInputs",
    "build_expected_logp",
    "flatten_params",
]


@dataclass(frozen=True)
class ClosedFormUpdate:
    """A parameter's exact maximizer of Q, as a graph of the current value variables
    and the responsibility inputs, on the parameter's value (unconstrained) space."""

    param: ParamSpec
    new_value: Variable


#: Rules ``(structure, param, responsibilities) -> ClosedFormUpdate | None``.
CLOSED_FORM_RULES: list[Callable] = []


@dataclass
class ResponsibilityInputs:
    """Input variables through which the E-step's results enter the M-step graph.

    Attributes
    ----------
    log_q_global : list of Variable
        Per component, ``(Kg,)``.
    log_w_groups : list of list of Variable
        Per component, per element group, ``(Kg, Ke, n)``.
    """

    log_q_global: list[Variable]
    log_w_groups: list[list[Variable]]

    @classmethod
    def for_structure(cls, structure: ModelStructure) -> ResponsibilityInputs:
        log_q, log_w = [], []
        for c, comp in enumerate(structure.components):
            log_q.append(pt.vector(f"log_q_global_{c}", dtype="float64"))
            log_w.append(
                [
                    pt.tensor(f"log_w_{c}_{j}", shape=(None, None, None), dtype="float64")
                    for j, _ in enumerate(comp.groups)
                ]
            )
        return cls(log_q, log_w)

    @property
    def flat(self) -> list[Variable]:
        return self.log_q_global + [w for ws in self.log_w_groups for w in ws]


def _weighted(log_weight: Variable, table: Variable) -> Variable:
    # Zero-probability configurations may have a -inf log-joint: they contribute 0.
    weight = pt.exp(log_weight)
    return pt.switch(weight > 0, weight * table, 0.0).sum()


def build_expected_logp(
    structure: ModelStructure,
    tables: list[ComponentTables],
    responsibilities: ResponsibilityInputs,
    latent_free: Variable,
) -> Variable:
    """Q: the expected complete-data log-posterior, a graph of the value variables and
    the responsibility inputs."""
    total = latent_free
    for c, table in enumerate(tables):
        total = total + _weighted(responsibilities.log_q_global[c], table.global_table)
        for log_w, group_table in zip(responsibilities.log_w_groups[c], table.group_tables):
            total = total + _weighted(log_w, group_table)
    return total


def flatten_params(params: list[ParamSpec], graphs: list[Variable]) -> tuple[Variable, list]:
    """Rewrite ``graphs`` as functions of one flat vector of the params' values.

    Returns the flat vector and the rewritten graphs (for scipy optimizers).
    """
    flat = pt.vector("theta_flat", dtype="float64")
    replace, offset = {}, 0
    for p in params:
        size = p.value_size
        piece = flat[offset : offset + size].reshape(p.value_shape)
        replace[p.value] = piece.astype(p.value.type.dtype)
        offset += size
    return flat, graph_replace(graphs, replace, strict=False)


def split_flat(params: list[ParamSpec], flat: np.ndarray) -> dict[str, np.ndarray]:
    """Inverse of the flattening: value-variable name -> array."""
    values, offset = {}, 0
    for p in params:
        size = p.value_size
        values[p.value.name] = np.asarray(flat[offset : offset + size]).reshape(p.value_shape)
        offset += size
    return values


def join_flat(params: list[ParamSpec], values: dict[str, np.ndarray]) -> np.ndarray:
    """Flatten value-variable values in the params' order."""
    if not params:
        return np.zeros(0)
    return np.concatenate([np.asarray(values[p.value.name], dtype=float).ravel() for p in params])

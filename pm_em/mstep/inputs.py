"""Pieces of the M-step graphs: the E-step's results as inputs, expectations over
them, and the flat parameter vector of the numeric optimizer.

``Q(theta) = sum_g q(g) B_theta[g] + sum_{g,k,i} W[g,k,i] A_theta[g,k,i]
+ log p(theta) + (terms free of latents)``, no Jacobian: the mode is in the model's
own parameterization, as ``pm.find_MAP`` gives it. The closed-form blocks are in
:mod:`pm_em.mstep.closed_form`, the numeric block's objective in :mod:`pm_em.mstep.objective`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytensor.tensor as pt
from pytensor.graph.basic import Variable
from pytensor.graph.replace import graph_replace

from pm_em.model.analysis import ModelStructure, ParamSpec

__all__ = [
    "ResponsibilityInputs",
    "expectation",
    "flatten_params",
]


@dataclass
class ResponsibilityInputs:
    """Input variables through which the E-step's results enter the M-step graph.

    Attributes
    ----------
    log_q_global : list of Variable
        Per component, ``(Kg,)``.
    log_w_groups : list of list of Variable
        Per component, per element group, ``(Kg, Ke, n)``.
    transition_counts : list of Variable or None
        Per component, for a Markov chain: expected transition counts ``(B, K, K)``.
    """

    log_q_global: list[Variable]
    log_w_groups: list[list[Variable]]
    transition_counts: list[Variable | None]

    @classmethod
    def for_structure(cls, structure: ModelStructure) -> ResponsibilityInputs:
        log_q, log_w, counts = [], [], []
        for c, comp in enumerate(structure.components):
            log_q.append(pt.vector(f"log_q_global_{c}", dtype="float64"))
            log_w.append(
                [
                    pt.tensor(f"log_w_{c}_{j}", shape=(None, None, None), dtype="float64")
                    for j, _ in enumerate(comp.groups)
                ]
            )
            counts.append(
                None
                if comp.chain is None
                else pt.tensor(f"transition_counts_{c}", shape=(None,) * 3, dtype="float64")
            )
        return cls(log_q, log_w, counts)

    @property
    def flat(self) -> list[Variable]:
        """All inputs, component by component (``log q``, each group's ``log W``, the
        transition counts of a chain): the order of the E-step's outputs."""
        inputs = []
        for log_q, log_w, counts in zip(
            self.log_q_global, self.log_w_groups, self.transition_counts
        ):
            inputs += [log_q, *log_w] + ([] if counts is None else [counts])
        return inputs


def expectation(log_weight: Variable, table: Variable) -> Variable:
    """``sum(exp(log_weight) * table)``, with zero-weight entries adding 0."""
    # Zero-probability configurations may have a -inf log-joint: they contribute 0.
    weight = pt.exp(log_weight)
    return pt.switch(weight > 0, weight * table, 0.0).sum()


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
    """Inverse of the flattening: value-variable name -> array, in the value
    variable's dtype.

    The optimizer works in float64; a float32 model (``floatX="float32"``) evaluates
    its point rounded to float32, so that is what the point holds too (a no-op for
    float64).
    """
    values, offset = {}, 0
    for p in params:
        size = p.value_size
        piece = np.asarray(flat[offset : offset + size]).reshape(p.value_shape)
        values[p.value.name] = piece.astype(p.value.type.dtype, copy=False)
        offset += size
    return values


def join_flat(params: list[ParamSpec], values: dict[str, np.ndarray]) -> np.ndarray:
    """Flatten value-variable values in the params' order."""
    if not params:
        return np.zeros(0)
    return np.concatenate([np.asarray(values[p.value.name], dtype=float).ravel() for p in params])

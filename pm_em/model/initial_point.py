"""A model's initial point, as EM starts from it (any model, chains or none)."""

from __future__ import annotations

import numpy as np
from pymc.initial_point import make_initial_point_fn
from pymc.model.core import Point

from pm_em.compile import evaluate_once
from pm_em.model.chains import is_markov_chain

__all__ = ["model_initial_point"]


def model_initial_point(model, random_seed=None) -> dict[str, np.ndarray]:
    """``model.initial_point(random_seed)``, except that a Markov chain without an
    initial value of its own starts in state 0 throughout.

    pymc-extras' default start for a chain (a greedy scan) fails to build for a
    batch of sequences; EM needs no start for its latents anyway, only their shapes.
    """
    chains = [
        rv
        for rv in model.free_RVs
        if is_markov_chain(rv) and model.rvs_to_initial_values.get(rv) is None
    ]
    if not chains:
        return model.initial_point(random_seed=random_seed)
    shapes = evaluate_once([], [rv.shape for rv in chains], [])
    overrides = {
        rv: np.zeros(tuple(int(n) for n in shape), dtype=rv.type.dtype)
        for rv, shape in zip(chains, shapes)
    }
    initial_point_fn = make_initial_point_fn(model=model, overrides=overrides)
    return Point(initial_point_fn(random_seed), model=model)

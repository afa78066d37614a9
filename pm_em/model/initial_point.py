"""A model's initial point, as EM starts from it (any model, chains or none)."""

from __future__ import annotations

import numpy as np
from pymc.initial_point import make_initial_point_expression
from pymc.model.core import Point
from pymc.pytensorf import compile, find_rng_nodes, replace_rng_nodes, reseed_rngs
from pymc.util import get_transformed_name

from pm_em.compile import ONCE_MODE, evaluate_once
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
    overrides = {}
    if chains:
        shapes = evaluate_once([], [rv.shape for rv in chains], [])
        overrides = {
            rv: np.zeros(tuple(int(n) for n in shape), dtype=rv.type.dtype)
            for rv, shape in zip(chains, shapes)
        }
    return Point(_initial_point(model, overrides, random_seed), model=model)


def _initial_point(model, overrides, random_seed) -> dict[str, np.ndarray]:
    """What ``pymc.initial_point.make_initial_point_fn(model=model,
    overrides=overrides)(random_seed)`` returns, evaluated with Python thunks.

    PyMC compiles it in ``FAST_COMPILE`` mode, whose VM linker costs about a second
    on an empty compile directory (PyTensor's lazy-linker module); the graph is run
    once, by the same ``perform`` methods either way.
    """
    initial_values = make_initial_point_expression(
        free_rvs=model.free_RVs,
        rvs_to_transforms=model.rvs_to_transforms,
        initval_strategies={**model.rvs_to_initial_values, **overrides},
        return_transformed=True,
    )
    # PyMC's own steps: copies of the RNGs, reseeded, so the model's stay untouched.
    initial_values = replace_rng_nodes(initial_values)
    fn = compile(inputs=[], outputs=initial_values, mode=ONCE_MODE)
    reseed_rngs(find_rng_nodes(fn.maker.fgraph.outputs), random_seed)
    names = []
    for var in model.free_RVs:
        transform = model.rvs_to_transforms[var]
        names.append(var.name if transform is None else get_transformed_name(var.name, transform))
    return dict(zip(names, fn()))

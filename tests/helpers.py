"""Helpers shared by several test files (the shared fixtures are in ``conftest.py``)."""

import numpy as np
import pymc as pm
import pytensor
from pytensor.tensor.variable import TensorConstant

from tests.references.brute_force import ModelEnumeration, enumerate_model

# The engine's convergence where its numbers are compared with a reference's to ~1e-8:
# pm_em's tol is on the change of the log-posterior per observation.
ENGINE_TOL = 1e-14
MAX_ITER = 10_000


def at_map(dataset, name):
    """Drop the (chain, draw) = (1, 1) dimensions of a point estimate."""
    values = dataset[name]
    assert values.sizes["chain"] == 1 and values.sizes["draw"] == 1, values.sizes
    return values.isel(chain=0, draw=0).values


def latent_supports(em) -> dict:
    """The support ``em`` found for each latent, by name."""
    return {lat.name: lat.support for lat in em.latents}


def brute_force(em, point) -> ModelEnumeration:
    """The exact posterior of ``em``'s model at ``point`` (a point of its parameters),
    every latent enumerated over the support ``em`` found for it."""
    return enumerate_model(em.model, point, latent_supports(em))


def _frozen(value):
    """A hashable, exactly comparable stand-in for an array."""
    value = np.asarray(value)
    return (str(value.dtype), value.shape, value.tobytes())


def snapshot(model) -> dict:
    """Everything a fit must leave as it was."""
    observed = {}
    for rv in model.observed_RVs:
        value = model.rvs_to_values[rv]
        # A constant, a pm.Data shared variable, or a cast of one (integer pm.Data).
        data = value.eval() if not isinstance(value, TensorConstant) else value.data
        observed[rv.name] = (type(value).__name__, str(value.type), _frozen(data))
    return {
        "named_vars": list(model.named_vars),
        "free_RVs": [rv.name for rv in model.free_RVs],
        "observed_RVs": [rv.name for rv in model.observed_RVs],
        "deterministics": [d.name for d in model.deterministics],
        "rvs_to_values": {
            rv.name: (value.name, str(value.type)) for rv, value in model.rvs_to_values.items()
        },
        "rvs_to_transforms": {
            rv.name: type(t).__name__ for rv, t in model.rvs_to_transforms.items()
        },
        "rvs_to_initial_values": {
            rv.name: repr(v) for rv, v in model.rvs_to_initial_values.items()
        },
        "named_vars_to_dims": dict(model.named_vars_to_dims),
        "coords": {name: tuple(values) for name, values in model.coords.items()},
        "dim_lengths": {name: int(length.eval()) for name, length in model.dim_lengths.items()},
        "initial_point": {k: _frozen(v) for k, v in model.initial_point(random_seed=0).items()},
        "logp_graph": pytensor.printing.debugprint(model.logp(), file="str"),
        "data": {d.name: _frozen(d.get_value()) for d in model.data_vars},
        "observed": observed,
    }


def sample_briefly(model):
    """A short ``pm.sample`` run (one chain of 20 draws): the model still samples."""
    return pm.sample(
        draws=20,
        tune=20,
        chains=1,
        cores=1,
        random_seed=1,
        progressbar=False,
        compute_convergence_checks=False,
        # The check is that the model samples, not how fast: Python-mode compilation
        # saves ~12 s of C compilation per new model on an empty cache.
        compile_kwargs={"mode": "FAST_COMPILE"},
        model=model,
    )

"""Helpers shared by several test files (the shared fixtures are in ``conftest.py``)."""

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


def brute_force(em, point) -> ModelEnumeration:
    """The exact posterior of ``em``'s model at ``point`` (a point of its parameters),
    every latent enumerated over the support ``em`` found for it."""
    return enumerate_model(em.model, point, {lat.name: lat.support for lat in em.latents})

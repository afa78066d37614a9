"""Small models that several test files build the same way (on their own data)."""

import numpy as np
import pymc as pm


def normal_mixture(x):
    """Two Normal components with proper priors, so that the MAP is finite:
    ``w ~ Dirichlet(1)``, ``mu ~ Normal(0, 10)``, ``sigma ~ InverseGamma(2, 1)``."""
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Normal("mu", 0.0, 10.0, shape=2)
        sigma = pm.InverseGamma("sigma", 2.0, 1.0, shape=2)
        z = pm.Categorical("z", w, shape=len(x))
        pm.Normal("x", mu[z], sigma[z], observed=x)
    return model


def unit_scale_mixture(data, mutable=True):
    """Two Normal components of scale 1 over the dim ``obs``, the data in the
    ``pm.Data`` container ``"data"`` when ``mutable`` (then ``pm.set_data`` changes them)."""
    with pm.Model(coords={"obs": np.arange(len(data))}) as model:
        observed = pm.Data("data", data, dims="obs") if mutable else data
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Normal("mu", 0.0, 10.0, shape=2)
        z = pm.Categorical("z", w, dims="obs")
        pm.Normal("x", mu[z], 1.0, observed=observed, dims="obs")
    return model


# 60 standard normal draws and an outlier a component can shrink onto.
SPIKE_DATA = np.concatenate([np.random.default_rng(3).normal(0.0, 1.0, 60), [9.0]])
#: A start with the second component on the outlier, its scale already small.
SPIKE_START = {
    "w": np.array([0.98, 0.02]),
    "mu": np.array([0.0, 9.0]),
    "sigma": np.array([1.0, 0.05]),
}


def spike_model(data):
    """Two Normal components with a flat scale prior: the likelihood is unbounded as
    a scale goes to 0 on one observation (``SPIKE_DATA``'s outlier)."""
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Flat("mu", shape=2)
        sigma = pm.HalfFlat("sigma", shape=2)
        z = pm.Categorical("z", p=w, shape=len(data))
        pm.Normal("x", mu=mu[z], sigma=sigma[z], observed=data)
    return model

"""Parameters nothing depends on: a Flat one has no mode (left at its start, with an
INFO note), a proper prior gives its own mode. The other parameters' estimates are
those of the same model without it, from the same start."""

import numpy as np
import pymc as pm
import pytest

import pm_em

rng = np.random.default_rng(3)
X = np.concatenate([rng.normal(-2.0, 1.0, 30), rng.normal(3.0, 1.0, 20)])
START = {"w": np.array([0.5, 0.5]), "mu": np.array([-1.0, 1.0]), "sigma": np.ones(2)}


def _mixture(extra=None):
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Normal("mu", 0.0, 10.0, shape=2)
        sigma = pm.HalfNormal("sigma", 5.0, shape=2)
        if extra is not None:
            extra()
        z = pm.Categorical("z", p=w, shape=len(X))
        pm.Normal("x", mu[z], sigma[z], observed=X)
    return model


@pytest.fixture(scope="module")
def reference():
    idata = pm_em.find_MAP(_mixture(), init=START, progressbar=False)
    return {name: idata.posterior[name].values for name in START}


def _flat_alone():
    pm.Flat("unused")


def _flat_in_deterministic():
    pm.Deterministic("doubled", 2.0 * pm.Flat("unused"))


@pytest.mark.parametrize("extra", [_flat_alone, _flat_in_deterministic], ids=["alone", "det"])
def test_unused_flat_is_reported_and_left_at_its_start(extra, reference, caplog):
    model = _mixture(extra)
    with caplog.at_level("INFO", logger="pm_em"):
        idata = pm_em.find_MAP(model, init=START, initvals={"unused": 0.7}, progressbar=False)
    assert "Parameter 'unused' enters no term of the log-posterior" in caplog.text
    assert "its MAP is undefined" in caplog.text
    np.testing.assert_array_equal(idata.posterior["unused"].values.ravel(), [0.7])
    if "doubled" in idata.posterior:
        np.testing.assert_allclose(idata.posterior["doubled"].values.ravel(), [1.4])
    for name, value in reference.items():
        np.testing.assert_allclose(idata.posterior[name].values, value, rtol=1e-10)


@pytest.mark.parametrize(
    "prior, mode",
    [
        (lambda: pm.Normal("unused", 3.0, 2.0), 3.0),
        # The mode of the density itself (no Jacobian): (a - 1) / b.
        (lambda: pm.Gamma("unused", alpha=3.0, beta=2.0), 1.0),
    ],
    ids=["normal", "gamma"],
)
def test_unused_parameter_with_a_proper_prior_gets_its_prior_mode(prior, mode, reference):
    idata = pm_em.find_MAP(_mixture(prior), init=START, initvals={"unused": 0.7}, progressbar=False)
    np.testing.assert_allclose(idata.posterior["unused"].values.ravel(), [mode], rtol=1e-6)
    for name, value in reference.items():
        np.testing.assert_allclose(idata.posterior[name].values, value, rtol=1e-10)

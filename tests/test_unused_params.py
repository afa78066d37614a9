"""Parameters nothing depends on: a Flat one has no mode (left at its start, with an
INFO note), a proper prior gives its own mode. The other parameters' estimates are
those of the same model without it, from the same start."""

import numpy as np
import pymc as pm
import pytensor
import pytensor.tensor as pt
import pytest
from pytensor.gradient import DisconnectedType

import pm_em
from pm_em.model.analysis import analyze_model
from pm_em.routine.graphs import params_without_terms

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


def _flat_through_shape_only():
    # Only the shape of 'unused' reaches a term: no gradient path.
    unused = pm.Flat("unused", shape=2)
    pm.Normal("y", mu=pt.zeros(unused.shape[0]), sigma=1.0, observed=np.zeros(2))


def _flat_in_likelihood():
    pm.Normal("y", mu=pm.Flat("unused"), sigma=1.0, observed=np.zeros(3))


def _full_covariance_mixture():
    data = rng.normal(size=(40, 2))
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Flat("mu", shape=(2, 2))
        chol_diag = pm.HalfFlat("chol_diag", shape=(2, 2))
        chol_offdiag = pm.Flat("chol_offdiag", shape=(2, 1))
        pm.Flat("unused")
        chol = pt.zeros((2, 2, 2))
        chol = pt.set_subtensor(chol[:, [0, 1], [0, 1]], chol_diag)
        chol = pt.set_subtensor(chol[:, [1], [0]], chol_offdiag)
        z = pm.Categorical("z", p=w, shape=len(data))
        pm.MvNormal("x", mu=mu[z], chol=chol[z], observed=data)
    return model


@pytest.mark.parametrize(
    "build",
    [
        lambda: _mixture(),
        lambda: _mixture(_flat_alone),
        lambda: _mixture(_flat_in_deterministic),
        lambda: _mixture(_flat_through_shape_only),
        lambda: _mixture(_flat_in_likelihood),
        _full_covariance_mixture,
    ],
    ids=["none", "alone", "det", "shape-only", "used", "mvnormal"],
)
def test_params_without_terms_are_those_pytensor_grad_finds_disconnected(build):
    # The reference: the gradient of the whole log-posterior, built by PyTensor.
    structure = analyze_model(build(), None)
    total = sum((pt.sum(t.logp) for t in structure.terms), pt.constant(0.0))
    grads = pytensor.grad(
        total,
        [p.value for p in structure.params],
        disconnected_inputs="ignore",
        return_disconnected="disconnected",
    )
    expected = [
        p.name for p, g in zip(structure.params, grads) if isinstance(g.type, DisconnectedType)
    ]
    assert [p.name for p in params_without_terms(structure)] == expected

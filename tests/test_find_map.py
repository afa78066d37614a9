"""find_MAP end to end: InferenceData layout, reuse of the compiled routine, and the
user's model left as it was (pm.sample still works on it)."""

import warnings

import numpy as np
import pymc as pm
import pytest

import pm_em
from tests.helpers import sample_briefly, snapshot

N = 60


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    labels = rng.random(N) < 0.6
    return np.where(labels, rng.normal(2.0, 0.5, N), rng.normal(5.0, 1.0, N))


@pytest.fixture(scope="module")
def model(data):
    coords = {"component": ["a", "b"], "obs": np.arange(N)}
    with pm.Model(coords=coords) as model:
        w = pm.Dirichlet("w", a=np.ones(2), dims="component")
        mu = pm.Normal("mu", 0, 10, dims="component")
        sigma = pm.HalfNormal("sigma", 5, dims="component")
        z = pm.Categorical("z", p=w, dims="obs")
        pm.Normal("x", mu=mu[z], sigma=sigma[z], observed=data, dims="obs")
        pm.Deterministic("gap", mu[1] - mu[0])
    return model


@pytest.fixture(scope="module")
def fitted(model):
    before = snapshot(model)
    start = {"mu": np.array([1.0, 6.0])}
    with model:
        idata = pm_em.find_MAP(initvals=start, random_seed=1, progressbar=False)
    return before, idata


def test_posterior_layout_follows_model(model, fitted):
    _, idata = fitted
    post = idata.posterior
    assert post["mu"].dims == ("chain", "draw", "component")
    assert list(post["component"].values) == ["a", "b"]
    assert post["z"].dims == ("chain", "draw", "obs")
    assert post["lp_z"].dims == ("chain", "draw", "obs", "lp_z_dim")
    np.testing.assert_array_equal(post["lp_z_dim"].values, [0, 1])
    np.testing.assert_allclose(np.exp(post["lp_z"]).sum("lp_z_dim"), 1.0, atol=1e-12)
    # z is the most probable value of each element.
    np.testing.assert_array_equal(post["z"].values, post["lp_z"].values.argmax(-1))
    np.testing.assert_allclose(post["gap"], post["mu"][..., 1] - post["mu"][..., 0])
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "obs")
    assert idata.observed_data["x"].dims == ("obs",)


def test_em_stats_monotone_and_converged(fitted):
    _, idata = fitted
    stats = idata.em_stats
    logp = stats["logp"].values
    assert bool(stats["converged"])
    assert int(stats["n_iter"]) == len(logp) - 1
    assert stats.attrs["tol"] == 1e-8 and stats.attrs["max_iter"] == 1000
    assert np.all(np.diff(logp) >= -1e-9 * np.abs(logp[:-1]))


def test_map_is_a_stationary_point_of_em(model, fitted):
    _, idata = fitted
    em = pm_em.routine.em.cached_routine(model)
    point = {name: idata.posterior[name].values[0, 0] for name in ("w", "mu", "sigma")}
    after = em.m_step(point, em.e_step(point))
    for name, value in point.items():
        np.testing.assert_allclose(after[name], value, rtol=1e-4)
    np.testing.assert_allclose(em.logp(point), idata.em_stats["logp"].values[-1], rtol=1e-12)


def test_compiled_routine_is_reused(model, fitted):
    first = pm_em.routine.em.cached_routine(model)
    with model:
        pm_em.find_MAP(random_seed=2, progressbar=False, max_iter=200, tol=1e-3)
    assert pm_em.routine.em.cached_routine(model) is first


def test_find_map_reuses_a_user_built_routine():
    with pm.Model() as model:
        mu = pm.Normal("mu", 0.0, 1.0, shape=2)
        z = pm.Bernoulli("z", p=np.float64(0.5), shape=3)
        pm.Normal("x", mu[z], 1.0, observed=np.array([-1.0, 0.5, 2.0]))
    em = pm_em.EM(model)
    pm_em.find_MAP(model, random_seed=1, progressbar=False)
    assert pm_em.routine.em.cached_routine(model) is em


def test_initvals_are_checked(model):
    with pytest.raises(ValueError, match=r"initvals\['mu'\] contains NaN"):
        pm_em.find_MAP(model, initvals={"mu": np.array([np.nan, 1.0])}, progressbar=False)
    with pytest.raises(ValueError, match=r"initvals\['z'\]: it is a latent"):
        pm_em.find_MAP(model, initvals={"z": np.zeros(N)}, progressbar=False)


def test_max_iter_warns(model):
    with pytest.warns(pm_em.EMConvergenceWarning, match="did not converge in 2 iterations"):
        idata = pm_em.find_MAP(model, max_iter=2, random_seed=0, progressbar=False)
    assert not bool(idata.em_stats["converged"])


def test_model_untouched_and_still_samples(model, fitted):
    before, _ = fitted
    assert snapshot(model) == before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trace = sample_briefly(model)
    assert set(trace.posterior.data_vars) == {"w", "mu", "sigma", "z", "gap"}


def test_model_without_latents_is_plain_map():
    # Normal mean with a Normal(0, 10) prior: the MAP is sum(y) / (n + 1/100).
    y = np.array([1.0, 2.0, 3.0])
    with pm.Model() as model:
        mu = pm.Normal("mu", 0, 10)
        pm.Normal("y", mu, 1, observed=y)
    idata = pm_em.find_MAP(model, progressbar=False)
    np.testing.assert_allclose(idata.posterior["mu"].item(), y.sum() / (3 + 0.01), rtol=1e-9)


def test_latent_without_dependents_keeps_its_prior():
    with pm.Model() as model:
        mu = pm.Normal("mu", 0, 10)
        pm.Bernoulli("z", 0.3, shape=2)
        pm.Normal("y", mu, 1, observed=np.array([1.0, 2.0, 3.0]))
    idata = pm_em.find_MAP(model, progressbar=False)
    np.testing.assert_allclose(np.exp(idata.posterior["lp_z"].values[0, 0]), [[0.7, 0.3]] * 2)
    np.testing.assert_array_equal(idata.posterior["z"].values[0, 0], [0, 0])


def test_var_names_select_the_posterior(model, fitted):
    _, full = fitted
    start = {"mu": np.array([1.0, 6.0])}
    idata = pm_em.find_MAP(
        model, initvals=start, random_seed=1, progressbar=False, var_names=["mu", "z", "gap"]
    )
    assert set(idata.posterior.data_vars) == {"mu", "gap", "z", "lp_z"}
    assert idata.posterior["mu"].dims == ("chain", "draw", "component")
    np.testing.assert_array_equal(idata.posterior["mu"].values, full.posterior["mu"].values)
    with pytest.raises(ValueError, match=r"var_names: \['nope'\] are not variables"):
        pm_em.find_MAP(model, var_names=["nope"], progressbar=False)

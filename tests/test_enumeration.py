"""E-step and observed-data log-posterior against brute-force enumeration.

The reference enumerates every joint configuration of all latents with
itertools.product and evaluates the model's own joint log-density (PyMC's
``compile_logp``, no Jacobian) at each; logsumexp over configurations gives the
exact log marginal, and normalized sums give the exact posterior marginals.
"""

import itertools

import numpy as np
import pymc as pm
import pytensor.tensor as pt
import pytest
from scipy.special import logsumexp

import pm_em


def brute_force(em, point):
    """Exact log marginal and posterior marginals by enumerating all latents jointly."""
    model = em.model
    joint_logp = model.compile_logp(jacobian=False)
    values = dict(zip([p.value.name for p in em.params], em.to_values(point)))
    latents = em.latents
    configs = itertools.product(
        *[itertools.product(lat.support, repeat=lat.size) for lat in latents]
    )
    log_joint, settings = [], []
    for config in configs:
        full = dict(values)
        for lat, setting in zip(latents, config):
            full[lat.value.name] = np.asarray(setting, dtype="int64").reshape(lat.shape)
        log_joint.append(joint_logp(full))
        settings.append(config)
    log_joint = np.asarray(log_joint)
    log_marginal = logsumexp(log_joint)
    posterior = np.exp(log_joint - log_marginal)
    marginals = {}
    for a, lat in enumerate(latents):
        probs = np.zeros((lat.size, lat.n_support))
        for weight, config in zip(posterior, settings):
            for i, v in enumerate(config[a]):
                probs[i, np.searchsorted(lat.support, v)] += weight
        with np.errstate(divide="ignore"):
            marginals[lat.name] = np.log(probs).reshape(*lat.shape, lat.n_support)
    return log_marginal, marginals


def mixture_model():
    x = np.array([-1.0, 0.3, 2.5])
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Normal("mu", 0, 10, shape=2)
        sigma = pm.HalfNormal("sigma", 5, shape=2)
        z = pm.Categorical("z", p=w, shape=3)
        pm.Normal("x", mu=mu[z], sigma=sigma[z], observed=x)
    return model


def repeated_measures_model():
    group = np.array([0, 1, 1, 2, 0, 2, 2])
    y = np.array([0.1, 2.2, 1.9, -0.4, 0.5, 0.2, -0.1])
    with pm.Model() as model:
        p = pm.Beta("p", 2, 2)
        mu = pm.Normal("mu", 0, 5, shape=2)
        z = pm.Bernoulli("z", p=p, shape=3)
        pm.Normal("y", mu=mu[z[group]], sigma=1.0, observed=y)
    return model


def chained_latents_model():
    # z2[i] depends on z1[i]; x[i] on both.
    x = np.array([0.2, 1.7, 3.1])
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        transition = pm.Dirichlet("transition", a=np.ones((2, 3)))
        mu = pm.Normal("mu", 0, 5, shape=(2, 3))
        z1 = pm.Categorical("z1", p=w, shape=3)
        z2 = pm.Categorical("z2", p=transition[z1], shape=3)
        pm.Normal("x", mu=mu[z1, z2], sigma=1.0, observed=x)
    return model


def global_latent_model():
    # A scalar regime switches the mean of every element-level mixture.
    x = np.array([0.4, 2.1, 2.9, -0.3])
    with pm.Model() as model:
        regime_p = pm.Beta("regime_p", 1, 1)
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Normal("mu", 0, 5, shape=2)
        shift = pm.Normal("shift", 0, 2)
        regime = pm.Bernoulli("regime", p=regime_p)
        z = pm.Categorical("z", p=w, shape=4)
        pm.Normal("x", mu=mu[z] + regime * shift, sigma=1.0, observed=x)
    return model


def binomial_latent_model():
    # Binomial latent with per-element n: support 0..max(n), -inf beyond each n_i.
    with pm.Model() as model:
        theta = pm.Beta("theta", 2, 2)
        k = pm.Binomial("k", n=np.array([2, 3]), p=theta, shape=2)
        pm.Poisson("y", mu=1.0 + k, observed=np.array([1, 4]))
    return model


def truncated_poisson_model():
    # An infinite-support count made finite by truncation (lower bound from Poisson).
    with pm.Model() as model:
        rate = pm.Gamma("rate", 2, 1)
        k = pm.Truncated("k", pm.Poisson.dist(rate), upper=4, shape=2)
        pm.Normal("y", mu=k, sigma=0.7, observed=np.array([1.2, 3.5]))
    return model


MODELS = {
    "mixture": mixture_model,
    "repeated_measures": repeated_measures_model,
    "chained_latents": chained_latents_model,
    "global_latent": global_latent_model,
    "binomial_latent": binomial_latent_model,
    "truncated_poisson": truncated_poisson_model,
}


_ROUTINES = {}


def compiled(name):
    """One compiled EM routine per model for the whole module (compilation is slow)."""
    if name not in _ROUTINES:
        _ROUTINES[name] = pm_em.EM(MODELS[name]())
    return _ROUTINES[name]


@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def routine(request):
    return compiled(request.param)


def test_e_step_and_logp_match_brute_force(routine):
    point = routine.initial_point(random_seed=3)
    log_marginal, marginals = brute_force(routine, point)
    # logp adds the latent-free terms (priors); the brute force includes them too.
    np.testing.assert_allclose(routine.logp(point), log_marginal, rtol=1e-10)
    log_resp = routine.e_step(point)
    assert set(log_resp) == set(marginals)
    for name, expected in marginals.items():
        np.testing.assert_allclose(np.exp(log_resp[name]), np.exp(expected), atol=1e-10)
        np.testing.assert_allclose(np.exp(log_resp[name]).sum(-1), 1.0, atol=1e-12)


def test_step_by_step_never_decreases_logp(routine):
    point = routine.initial_point(random_seed=5)
    history = [routine.logp(point)]
    for _ in range(8):
        point = routine.m_step(point, routine.e_step(point))
        history.append(routine.logp(point))
    assert np.all(np.diff(history) >= -1e-9 * np.abs(history[:-1]))
    assert history[-1] > history[0]


@pytest.mark.filterwarnings("ignore::pm_em.EMConvergenceWarning")
def test_pointwise_loglik_sums_to_observed_loglik(routine):
    # The identity holds at any point; a few iterations keep the test fast.
    idata = pm_em.find_MAP(routine.model, random_seed=1, progressbar=False, max_iter=10)
    point = {p.name: idata.posterior[p.name].values[0, 0] for p in routine.params}
    # Reference: the brute-force log marginal minus the latent-free prior terms.
    log_marginal, _ = brute_force(routine, point)
    prior = sum(pm.logp(p.rv, point[p.name]).sum().eval() for p in routine.params)
    total = sum(idata.log_likelihood[name].sum().item() for name in idata.log_likelihood)
    assert np.isclose(total, log_marginal - prior, rtol=1e-8)


def test_plain_dict_rejected_for_jointly_enumerated_latents():
    em = compiled("chained_latents")
    point = em.initial_point(random_seed=0)
    log_resp = dict(em.e_step(point))
    with pytest.raises(ValueError, match="enumerated jointly"):
        em.m_step(point, log_resp)


def test_interval_latent_support_is_exact():
    with pm.Model() as model:
        mu = pm.Normal("mu", 0, 3)
        k = pm.DiscreteUniform("k", lower=-1, upper=2, shape=2)
        pm.Normal("y", mu=mu + k, sigma=1.0, observed=np.array([0.5, 2.0]))
    em = pm_em.EM(model)
    (latent,) = em.latents
    np.testing.assert_array_equal(latent.support, [-1, 0, 1, 2])
    point = em.initial_point(random_seed=0)
    log_marginal, marginals = brute_force(em, point)
    np.testing.assert_allclose(em.logp(point), log_marginal, rtol=1e-10)
    np.testing.assert_allclose(em.e_step(point)["k"], marginals["k"], atol=1e-10)


def test_pt_ops_in_dependents_are_supported():
    x = np.array([[0.1, 0.2], [2.0, 2.1], [0.0, -0.2]])
    with pm.Model() as model:
        mu = pm.Normal("mu", 0, 5, shape=(2, 2))
        z = pm.Bernoulli("z", p=0.5, shape=3)
        pm.Normal("x", mu=pt.exp(mu[z]) - 1.0, sigma=1.0, observed=x)
    em = pm_em.EM(model)
    point = em.initial_point(random_seed=0)
    log_marginal, marginals = brute_force(em, point)
    np.testing.assert_allclose(em.logp(point), log_marginal, rtol=1e-10)
    np.testing.assert_allclose(em.e_step(point)["z"], marginals["z"], atol=1e-10)

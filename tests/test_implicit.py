"""Models written with PyMC's mixture distributions fit as their explicit-label twins.

``pm.NormalMixture``, ``pm.ZeroInflatedPoisson`` and ``pm.Mixture`` of MvNormals
against the same models with the label written out (the seed examples' form): from
the same start, the same estimates, log-likelihood and responsibilities. A hurdle
model (no explicit twin in the seeds) against direct maximization of PyMC's own
log-density, and a mixture inside another latent's dependents against brute-force
enumeration of that latent.
"""

import numpy as np
import pymc as pm
import pytensor.tensor as pt
import pytest
from scipy import optimize

import pm_em
from tests.references.brute_force import enumerate_model

TOL = 1e-12
RTOL = 1e-6


def _fit(model, start):
    return pm_em.find_MAP(model, initvals=start, tol=TOL, progressbar=False)


def _assert_same_fit(implicit, explicit, names, observed, label):
    for name in names:
        np.testing.assert_allclose(
            implicit.posterior[name].values, explicit.posterior[name].values, rtol=RTOL
        )
    np.testing.assert_allclose(
        float(implicit.log_likelihood[observed].sum()),
        float(explicit.log_likelihood[observed].sum()),
        rtol=1e-10,
    )
    resp_implicit = np.exp(implicit.posterior[f"lp_{observed}"].values)
    resp_explicit = np.exp(explicit.posterior[f"lp_{label}"].values)
    np.testing.assert_allclose(resp_implicit, resp_explicit, atol=RTOL)


@pytest.fixture(scope="module")
def normal_data():
    rng = np.random.default_rng(0)
    return np.concatenate([rng.normal(-1, 0.5, 200), rng.normal(2, 1, 150)])


def _normal_priors():
    w = pm.Dirichlet("w", np.ones(2), dims="component")
    mu = pm.Normal("mu", 0, 10, dims="component")
    sigma = pm.HalfNormal("sigma", 5, dims="component")
    return w, mu, sigma


def test_normal_mixture(normal_data):
    x = normal_data
    coords = {"obs": range(len(x)), "component": ["a", "b"]}
    with pm.Model(coords=coords) as implicit:
        w, mu, sigma = _normal_priors()
        pm.NormalMixture("x", w=w, mu=mu, sigma=sigma, observed=x, dims="obs")
    with pm.Model(coords=coords) as explicit:
        w, mu, sigma = _normal_priors()
        z = pm.Categorical("z", p=w, dims="obs")
        pm.Normal("x", mu=mu[z], sigma=sigma[z], observed=x, dims="obs")
    start = {"w": np.array([0.5, 0.5]), "mu": np.array([-0.5, 1.0]), "sigma": np.ones(2)}
    fit = _fit(implicit, start)
    _assert_same_fit(fit, _fit(explicit, start), ["w", "mu", "sigma"], "x", "z")
    # Written as the user would have: every update in closed form.
    assert set(pm_em.EM(implicit).closed_form_params) == {"w", "mu", "sigma"}
    # Layout: lp_x over the components, x_component the most probable one; the
    # model itself is untouched.
    assert fit.posterior["lp_x"].dims == ("chain", "draw", "obs", "lp_x_dim")
    assert fit.posterior["x_component"].dims == ("chain", "draw", "obs")
    assert "x" not in fit.posterior and "z" not in fit.posterior
    assert [rv.name for rv in implicit.free_RVs] == ["w", "mu", "sigma"]


def test_zero_inflated_poisson(rng):
    y = rng.poisson(3.0, 400) * (rng.random(400) < 0.6)
    with pm.Model() as implicit:
        psi = pm.Uniform("psi", 0, 1)
        rate = pm.HalfFlat("rate")
        pm.ZeroInflatedPoisson("y", psi=psi, mu=rate, observed=y)
    with pm.Model() as explicit:  # the seed's form
        psi = pm.Uniform("psi", 0, 1)
        rate = pm.HalfFlat("rate")
        z = pm.Bernoulli("z", p=psi, shape=len(y))
        pm.Poisson("y", mu=z * rate, observed=y)
    start = {"psi": np.array(0.5), "rate": np.array(2.0)}
    _assert_same_fit(_fit(implicit, start), _fit(explicit, start), ["psi", "rate"], "y", "z")


def test_mixture_of_mvnormals(rng):
    covs = np.array([[[1.0, 0.5], [0.5, 1.0]], [[0.6, -0.2], [-0.2, 0.8]]])
    x = np.concatenate(
        [
            rng.multivariate_normal([-2.0, 0.0], covs[0], 150),
            rng.multivariate_normal([2.0, 1.0], covs[1], 100),
        ]
    )
    with pm.Model() as implicit:
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Normal("mu", 0, 10, shape=(2, 2))
        components = [pm.MvNormal.dist(mu=mu[k], cov=covs[k]) for k in range(2)]
        pm.Mixture("x", w=w, comp_dists=components, observed=x)
    with pm.Model() as explicit:
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Normal("mu", 0, 10, shape=(2, 2))
        z = pm.Categorical("z", p=w, shape=len(x))
        pm.MvNormal("x", mu=mu[z], cov=pt.as_tensor(covs)[z], observed=x)
    start = {"w": np.array([0.5, 0.5]), "mu": np.array([[-1.0, 0.0], [1.0, 0.0]])}
    _assert_same_fit(_fit(implicit, start), _fit(explicit, start), ["w", "mu"], "x", "z")


def test_hurdle_poisson_is_the_map_of_its_own_density(rng):
    y = np.where(rng.random(300) < 0.35, 0, rng.poisson(2.5, 300))
    y[y == 0] = np.where(rng.random((y == 0).sum()) < 0.5, 0, 1)
    with pm.Model() as model:
        psi = pm.Beta("psi", 2, 2)
        rate = pm.Gamma("rate", 2, 1)
        pm.HurdlePoisson("y", psi=psi, mu=rate, observed=y)
    fit = _fit(model, {"psi": np.array(0.5), "rate": np.array(1.0)})
    em = pm_em.EM(model)
    # Direct maximization of PyMC's own log-density (no Jacobian) on the unconstrained
    # space: the same mode.
    logp = model.compile_logp(jacobian=False, mode="FAST_COMPILE")
    names = [p.value.name for p in em.params]

    def unflatten(theta):
        return [piece.reshape(p.value_shape) for p, piece in zip(em.params, np.split(theta, 2))]

    def negative(theta):
        return -logp(dict(zip(names, unflatten(theta))))

    start = np.concatenate([np.ravel(v) for v in em.to_values({"psi": 0.5, "rate": 1.0})])
    direct = optimize.minimize(negative, start, method="Nelder-Mead", options={"xatol": 1e-10})
    mode = em.to_point(unflatten(direct.x))
    for name in ("psi", "rate"):
        np.testing.assert_allclose(fit.posterior[name].values.ravel(), mode[name], rtol=1e-5)
    np.testing.assert_allclose(float(fit.em_stats["logp"][-1]), -direct.fun, rtol=1e-9, atol=1e-9)


def test_mixture_inside_another_latents_dependents():
    """A per-observation latent choosing the mixture's weights: both labels are
    enumerated jointly; the log-posterior equals PyMC's summed over that latent."""
    x = np.array([-1.2, 0.3, 2.5, 1.9])
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2), shape=(2, 2))
        mu = pm.Normal("mu", 0, 5, shape=2)
        g = pm.Bernoulli("g", 0.3, shape=len(x))
        pm.NormalMixture("x", w=w[g], mu=mu, sigma=1.0, observed=x)
    em = pm_em.EM(model)
    point = {"w": np.array([[0.3, 0.7], [0.8, 0.2]]), "mu": np.array([-1.0, 2.0])}
    total = enumerate_model(model, point, {"g": [0, 1]}).log_marginal
    np.testing.assert_allclose(em.logp(point), total, rtol=1e-12)
    fit = pm_em.find_MAP(model, initvals=point, progressbar=False)
    assert fit.posterior["lp_g"].shape == (1, 1, len(x), 2)
    assert fit.posterior["lp_x"].shape == (1, 1, len(x), 2)

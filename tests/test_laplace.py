"""The Laplace approximation at EM's mode (``pm_em.results.laplace``).

Checked against: finite differences of ``EM.logp`` (the Hessian, autodiff and the
finite-difference fallback of Markov chains), PyMC's own log-Jacobian (model logp with
and without Jacobian), a model with closed-form posteriors (the Laplace approximation
of a conjugate Normal mean is exact; that of a log precision has a closed form too),
and pymc-extras' labels of the ``fit`` group.
"""

import arviz as az
import numpy as np
import pymc as pm
import pymc_extras as pmx
import pytest
import xarray as xr
from pymc_extras.inference.laplace_approx.idata import make_unpacked_variable_names

import pm_em
from pm_em.results.laplace import (
    NonPositiveCurvatureError,
    fit_laplace,
    laplace_idata,
    log_density_derivatives,
)
from pm_em.routine.em import cached_routine

N_MIX = 60
DRAWS = 4000


def flat_values(em, point):
    return np.concatenate([np.ravel(v) for v in em.to_values(point)])


def split_values(em, theta):
    values, offset = [], 0
    for p in em.params:
        values.append(theta[offset : offset + p.value_size].reshape(p.value_shape))
        offset += p.value_size
    return values


def em_point(em, idata):
    return {p.name: idata.posterior[p.name].values[0, 0] for p in em.params}


def fd_gradient_hessian(f, theta, h=1e-4):
    """Central differences of a scalar function: gradient and Hessian."""
    n = theta.size
    steps = h * np.maximum(1.0, np.abs(theta))
    grad = np.empty(n)
    hess = np.empty((n, n))
    for i in range(n):
        ei = np.zeros(n)
        ei[i] = steps[i]
        grad[i] = (f(theta + ei) - f(theta - ei)) / (2 * steps[i])
        for j in range(i, n):
            ej = np.zeros(n)
            ej[j] = steps[j]
            hess[i, j] = hess[j, i] = (
                f(theta + ei + ej) - f(theta + ei - ej) - f(theta - ei + ej) + f(theta - ei - ej)
            ) / (4 * steps[i] * steps[j])
    return grad, hess


# -- a 1-D two-component Gaussian mixture --------------------------------------------------


@pytest.fixture(scope="module")
def mixture():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(0.0, 1.0, 36), rng.normal(4.0, 0.7, N_MIX - 36)])
    coords = {"component": ["a", "b"], "obs": np.arange(N_MIX)}
    with pm.Model(coords=coords) as model:
        w = pm.Dirichlet("w", a=np.full(2, 2.0), dims="component")
        mu = pm.Normal("mu", 0.0, 10.0, dims="component")
        sigma = pm.InverseGamma("sigma", 2.0, 1.0, dims="component")
        z = pm.Categorical("z", p=w, dims="obs")
        pm.Normal("x", mu=mu[z], sigma=sigma[z], observed=x, dims="obs")
        pm.Deterministic("gap", mu[1] - mu[0])
        pm.Deterministic("mu_z", mu[z], dims="obs")
        idata = pm_em.find_MAP(
            initvals={"mu": np.array([0.0, 4.0])}, random_seed=1, progressbar=False
        )
    return model, idata, x


@pytest.fixture(scope="module")
def mixture_laplace(mixture):
    model, idata, _ = mixture
    before = idata.copy()
    with_jacobian = fit_laplace(idata, model, draws=DRAWS, random_seed=2)
    without = fit_laplace(idata, model, draws=DRAWS, random_seed=2, jacobian=False)
    return before, with_jacobian, without


def test_hessian_matches_finite_differences(mixture):
    """Autodiff Hessian of the observed-data log-posterior (and of it plus PyMC's
    log-Jacobian) against second differences of ``EM.logp``."""
    model, idata, _ = mixture
    em = cached_routine(model)
    point = em_point(em, idata)
    theta = flat_values(em, point)
    # PyMC's own log|J|: the model's logp with and without Jacobian, any latent value.
    logp_with = model.compile_logp(jacobian=True, mode="FAST_COMPILE")
    logp_without = model.compile_logp(jacobian=False, mode="FAST_COMPILE")
    labels = idata.posterior["z"].values[0, 0]

    def log_jacobian(t):
        full = {p.value.name: v for p, v in zip(em.params, split_values(em, t))}
        full["z"] = labels
        return logp_with(full) - logp_without(full)

    def em_logp(t):
        return em.logp(em.to_point(split_values(em, t)))

    for jacobian, f in [
        (False, em_logp),
        (True, lambda t: em_logp(t) + log_jacobian(t)),
    ]:
        value, grad, hess = log_density_derivatives(em, theta, jacobian=jacobian)
        np.testing.assert_allclose(value, f(theta), rtol=1e-12)
        fd_grad, fd_hess = fd_gradient_hessian(f, theta)
        scale = np.max(np.abs(hess))
        np.testing.assert_allclose(grad, fd_grad, atol=1e-5 * scale)
        np.testing.assert_allclose(hess, fd_hess, atol=1e-5 * scale)
        np.testing.assert_array_equal(hess, hess.T)
    # EM's point is the no-Jacobian mode (to EM's tolerance); the Jacobian moves the
    # transformed ones.
    _, grad, _ = log_density_derivatives(em, theta, jacobian=False)
    assert np.max(np.abs(grad)) < 1e-2
    _, grad, _ = log_density_derivatives(em, theta, jacobian=True)
    assert np.max(np.abs(grad)) > 0.5


def test_layout(mixture, mixture_laplace):
    model, idata, _ = mixture
    before, laplace, _ = mixture_laplace
    groups = set(laplace.groups())
    assert {"posterior", "map", "fit", "log_likelihood", "em_stats", "observed_data"} <= groups
    post = laplace.posterior
    assert post.sizes["chain"] == 1 and post.sizes["draw"] == DRAWS
    assert post["mu"].dims == ("chain", "draw", "component")
    assert post["w"].dims == ("chain", "draw", "component")
    assert list(post["component"].values) == ["a", "b"]
    assert post["gap"].dims == ("chain", "draw")
    # Latents and the Deterministics that depend on them are in the map group only.
    assert set(post.data_vars) == {"w", "mu", "sigma", "gap"}
    xr.testing.assert_identical(laplace.map, idata.posterior)
    assert {"z", "lp_z", "mu_z"} <= set(laplace.map.data_vars)
    xr.testing.assert_identical(laplace.log_likelihood, idata.log_likelihood)
    xr.testing.assert_identical(laplace.em_stats, idata.em_stats)
    # The input is left as it was.
    assert idata.groups() == before.groups()
    xr.testing.assert_identical(idata.posterior, before.posterior)

    fit = laplace.fit
    em = cached_routine(model)
    expected_rows = make_unpacked_variable_names([p.value.name for p in em.params], model)
    assert list(fit["rows"].values) == expected_rows
    assert expected_rows == ["w_simplex__[0]", "mu[a]", "mu[b]", "sigma_log__[a]", "sigma_log__[b]"]
    assert fit["mean_vector"].dims == ("rows",)
    assert fit["covariance_matrix"].dims == ("rows", "columns")
    assert list(fit["columns"].values) == expected_rows
    cov = fit["covariance_matrix"].values
    np.testing.assert_array_equal(cov, cov.T)
    assert np.all(np.linalg.eigvalsh(cov) > 0)
    for name in ("w", "mu", "sigma"):
        assert fit[f"{name}_se"].dims == ("component",)
        assert np.all(np.isfinite(fit[f"{name}_se"])) and np.all(fit[f"{name}_se"] > 0)
    assert fit.attrs["hessian_method"] == "autodiff" and fit.attrs["jacobian"] == 1

    summary = az.summary(laplace, var_names=["w", "mu", "sigma", "gap"], kind="stats")
    assert {"mu[a]", "mu[b]", "sigma[a]", "w[b]", "gap"} <= set(summary.index)


def test_draws_follow_the_gaussian(mixture, mixture_laplace):
    """Draws mapped back to the unconstrained space have the fit's mean and
    covariance; Deterministics are computed per draw; the seed fixes the draws."""
    model, idata, _ = mixture
    _, laplace, _ = mixture_laplace
    post = laplace.posterior
    w = post["w"].values[0]
    unconstrained = np.column_stack(
        [
            # PyMC's simplex transform for two weights: log w0 - mean(log w).
            0.5 * (np.log(w[:, 0]) - np.log(w[:, 1])),
            post["mu"].values[0],
            np.log(post["sigma"].values[0]),
        ]
    )
    mean = laplace.fit["mean_vector"].values
    cov = laplace.fit["covariance_matrix"].values
    chol = np.linalg.cholesky(cov)
    standardized = np.linalg.solve(chol, (unconstrained - mean).T).T
    # Mean within 5 Monte Carlo standard errors, covariance the identity within 0.1.
    assert np.all(np.abs(standardized.mean(axis=0)) < 5 / np.sqrt(DRAWS))
    np.testing.assert_allclose(np.cov(standardized.T), np.eye(mean.size), atol=0.1)
    np.testing.assert_allclose(post["gap"], post["mu"][..., 1] - post["mu"][..., 0])
    np.testing.assert_allclose(post["w"].sum("component"), 1.0)
    again = fit_laplace(idata, model, draws=DRAWS, random_seed=2)
    xr.testing.assert_identical(again.posterior["mu"], post["mu"])
    # A Laplace fit can be refitted: its map group is the EM point.
    refit = fit_laplace(laplace, model, draws=10, random_seed=3, jacobian=False)
    xr.testing.assert_identical(refit.map, idata.posterior)


def test_jacobian_recentres_transformed_parameters(mixture, mixture_laplace):
    """jacobian=False is centred at EM's mode (Newton only polishes it); jacobian=True
    at the mode of the unconstrained density. The standard errors do not depend on
    the choice, and are the delta method of the no-Jacobian covariance."""
    model, idata, _ = mixture
    _, with_jacobian, without = mixture_laplace
    em = cached_routine(model)
    theta_em = flat_values(em, em_point(em, idata))
    centre = without.fit["mean_vector"].values
    cov = without.fit["covariance_matrix"].values
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(centre - theta_em) < 1e-3 * sd)
    _, grad, _ = log_density_derivatives(em, centre, jacobian=False)
    assert np.max(np.abs(grad)) < 1e-8
    recentred = with_jacobian.fit["mean_vector"].values
    _, grad, _ = log_density_derivatives(em, recentred, jacobian=True)
    assert np.max(np.abs(grad)) < 1e-8
    sigma_rows = ["sigma_log__[a]", "sigma_log__[b]"]
    shift = with_jacobian.fit["mean_vector"].sel(rows=sigma_rows) - without.fit["mean_vector"].sel(
        rows=sigma_rows
    )
    # log sigma's density has an extra + log sigma: its mode is to the right.
    assert np.all(shift > 0)
    for name in ("w", "mu", "sigma"):
        np.testing.assert_allclose(with_jacobian.fit[f"{name}_se"], without.fit[f"{name}_se"])
    sigma_map = np.exp(without.fit["mean_vector"].sel(rows=sigma_rows).values)
    log_sd = np.sqrt(
        np.diag(without.fit["covariance_matrix"].sel(rows=sigma_rows, columns=sigma_rows))
    )
    np.testing.assert_allclose(without.fit["sigma_se"], sigma_map * log_sd, rtol=1e-10)
    np.testing.assert_allclose(without.fit["mu_se"], sd[1:3], rtol=1e-12)
    # The weights sum to one: equal standard errors.
    np.testing.assert_allclose(without.fit["w_se"][0], without.fit["w_se"][1], rtol=1e-10)


def test_saddle_raises_clearly(mixture):
    """At the symmetric point (both components equal) the separation of the means is
    a direction of positive curvature of the log-posterior: a saddle."""
    model, idata, x = mixture
    saddle = idata.copy()
    post = saddle.posterior
    post["mu"][:] = x.mean()
    post["sigma"][:] = 1.0
    post["w"][:] = 0.5
    with pytest.raises(
        NonPositiveCurvatureError, match=r"mu\[a\].*mu\[b\]|mu\[b\].*mu\[a\]"
    ) as err:
        fit_laplace(saddle, model, draws=10)
    assert isinstance(err.value, ValueError)
    assert "mu" in err.value.parameters
    assert np.all(np.isfinite(err.value.curvatures)) and np.all(err.value.curvatures < 0)
    # One direction separates the means, another the scales.
    assert any(
        list(d)[:2] in (["mu[a]", "mu[b]"], ["mu[b]", "mu[a]"]) for d in err.value.directions
    )


def test_weight_at_zero_raises_clearly(mixture):
    """A weight at ~0: the log-posterior is flat along it on the unconstrained space."""
    model, idata, _ = mixture
    boundary = idata.copy()
    boundary.posterior["w"][:] = np.array([1.0, 1e-20])
    with pytest.raises(NonPositiveCurvatureError, match=r"w_simplex__\[0\]") as err:
        fit_laplace(boundary, model, draws=10)
    assert err.value.parameters == ["w"]


def test_invalid_input(mixture):
    model, idata, _ = mixture
    with pytest.raises(ValueError, match="draws"):
        fit_laplace(idata, model, draws=0)
    with pytest.raises(ValueError, match="jacobian"):
        fit_laplace(idata, model, jacobian="yes")
    missing = idata.copy()
    missing.posterior = missing.posterior.drop_vars("sigma")
    with pytest.raises(ValueError, match="not an EM fit"):
        fit_laplace(missing, model)


# -- closed-form posteriors ----------------------------------------------------------------

M0, S0 = 1.0, 2.0  # mu ~ Normal(M0, S0)
A0, B0 = 3.0, 2.0  # tau ~ Gamma(A0, B0)


@pytest.fixture(scope="module")
def conjugate():
    """Blocks with closed-form posteriors beside a latent (so that pm_em accepts the
    model): ``mu`` Normal-Normal, ``tau`` Gamma-Normal precision, ``p`` with a
    Bernoulli latent."""
    rng = np.random.default_rng(9)
    x1 = rng.normal(0.5, 1.0, 20)
    x2 = rng.normal(0.0, 0.6, 15)
    z = rng.random(25) < 0.3
    y = rng.normal(3.0 * z, 1.0)
    with pm.Model() as model:
        mu = pm.Normal("mu", M0, S0)
        pm.Normal("x1", mu, 1.0, observed=x1)
        tau = pm.Gamma("tau", alpha=A0, beta=B0)
        pm.Normal("x2", 0.0, tau=tau, observed=x2)
        p = pm.Beta("p", 2.0, 2.0)
        zz = pm.Bernoulli("z", p=p, shape=len(y))
        pm.Normal("y", 3.0 * zz, 1.0, observed=y)
        idata = pm_em.find_MAP(random_seed=1, progressbar=False)
    laplace = {
        jacobian: fit_laplace(idata, model, draws=DRAWS, random_seed=4, jacobian=jacobian)
        for jacobian in (True, False)
    }
    return model, idata, laplace, x1, x2


def test_conjugate_normal_mean_is_exact(conjugate):
    _, _, laplace, x1, _ = conjugate
    precision = 1 / S0**2 + len(x1)
    mean = (M0 / S0**2 + x1.sum()) / precision
    for fit in (laplace[True].fit, laplace[False].fit):
        np.testing.assert_allclose(fit["mean_vector"].sel(rows="mu"), mean, rtol=1e-8)
        np.testing.assert_allclose(
            fit["covariance_matrix"].sel(rows="mu", columns="mu"), 1 / precision, rtol=1e-8
        )
        np.testing.assert_allclose(fit["mu_se"], np.sqrt(1 / precision), rtol=1e-8)
        # mu's block is independent of the others.
        others = [r for r in fit["rows"].values if r != "mu"]
        np.testing.assert_allclose(
            fit["covariance_matrix"].sel(rows="mu", columns=others), 0.0, atol=1e-12
        )
    draws = laplace[True].posterior["mu"].values.ravel()
    assert abs(draws.mean() - mean) < 5 * np.sqrt(1 / precision / DRAWS)


def test_log_precision_has_its_closed_form(conjugate):
    """tau | x ~ Gamma(a, b). On u = log tau, without Jacobian the log-density is
    (a - 1) u - b e^u: mode log((a - 1) / b), variance 1 / (a - 1); with it,
    a u - b e^u: mode log(a / b), variance 1 / a. Newton's re-centring finds the
    latter exactly."""
    _, _, laplace, _, x2 = conjugate
    a = A0 + len(x2) / 2
    b = B0 + np.sum(x2**2) / 2
    for jacobian, shape in ((False, a - 1), (True, a)):
        fit = laplace[jacobian].fit
        np.testing.assert_allclose(
            fit["mean_vector"].sel(rows="tau_log__"), np.log(shape / b), rtol=1e-8
        )
        np.testing.assert_allclose(
            fit["covariance_matrix"].sel(rows="tau_log__", columns="tau_log__"),
            1 / shape,
            rtol=1e-8,
        )
        # Standard error of the MAP (a - 1) / b by the delta method, either way.
        np.testing.assert_allclose(fit["tau_se"], np.sqrt(a - 1) / b, rtol=1e-8)


def test_jacobian_moves_transformed_parameters_only(conjugate):
    _, idata, laplace, _, _ = conjugate
    with_jacobian, without = laplace[True].fit, laplace[False].fit
    # p (logodds) is transformed: its centre and variance change.
    assert (
        abs(
            float(
                with_jacobian["mean_vector"].sel(rows="p_logodds__")
                - without["mean_vector"].sel(rows="p_logodds__")
            )
        )
        > 1e-3
    )
    assert not np.isclose(
        with_jacobian["covariance_matrix"].sel(rows="p_logodds__", columns="p_logodds__"),
        without["covariance_matrix"].sel(rows="p_logodds__", columns="p_logodds__"),
        rtol=1e-3,
    )
    # mu is not: identical.
    np.testing.assert_allclose(
        with_jacobian["mean_vector"].sel(rows="mu"),
        without["mean_vector"].sel(rows="mu"),
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        with_jacobian["covariance_matrix"].sel(rows="mu", columns="mu"),
        without["covariance_matrix"].sel(rows="mu", columns="mu"),
        rtol=1e-12,
    )
    # Without Jacobian the centre is EM's MAP, to EM's tolerance.
    logodds = np.log(idata.posterior["p"].values.item()) - np.log1p(
        -idata.posterior["p"].values.item()
    )
    sd = np.sqrt(float(without["covariance_matrix"].sel(rows="p_logodds__", columns="p_logodds__")))
    assert abs(float(without["mean_vector"].sel(rows="p_logodds__")) - logodds) < 1e-3 * sd


# -- a Markov-chain latent: finite-difference Hessian ---------------------------------------


@pytest.fixture(scope="module")
def markov_chain():
    rng = np.random.default_rng(3)
    n_steps = 50
    transition = np.array([[0.9, 0.1], [0.2, 0.8]])
    states = [0]
    for _ in range(n_steps - 1):
        states.append(rng.choice(2, p=transition[states[-1]]))
    y = rng.normal(np.array([-1.0, 2.0])[states], 0.7)
    coords = {"state": [0, 1], "state_from": [0, 1], "time": np.arange(n_steps)}
    with pm.Model(coords=coords) as model:
        P = pm.Dirichlet("P", a=np.full((2, 2), 2.0), dims=("state_from", "state"))
        pi = pm.Dirichlet("pi", a=np.full(2, 2.0), dims="state")
        mu = pm.Normal("mu", 0.0, 10.0, dims="state")
        sigma = pm.InverseGamma("sigma", 2.0, 1.0, dims="state")
        s = pmx.DiscreteMarkovChain("s", P=P, init_dist=pm.Categorical.dist(p=pi), dims="time")
        pm.Normal("y", mu=mu[s], sigma=sigma[s], observed=y, dims="time")
        idata = pm_em.find_MAP(random_seed=1, progressbar=False)
    return model, idata


def test_markov_chain_uses_finite_differences(markov_chain):
    model, idata = markov_chain
    em = cached_routine(model)
    laplace = laplace_idata(em, idata, draws=200, random_seed=1, jacobian=False)
    assert laplace.fit.attrs["hessian_method"] == "finite differences"
    assert laplace.posterior["P"].dims == ("chain", "draw", "state_from", "state")
    assert list(laplace.fit["rows"].values[:2]) == ["P_simplex__[0,0]", "P_simplex__[1,0]"]
    theta = flat_values(em, em_point(em, idata))
    _, grad, hess = log_density_derivatives(em, theta, jacobian=False)

    def em_logp(t):
        return em.logp(em.to_point(split_values(em, t)))

    fd_grad, fd_hess = fd_gradient_hessian(em_logp, theta)
    scale = np.max(np.abs(hess))
    np.testing.assert_allclose(grad, fd_grad, atol=1e-5 * scale)
    np.testing.assert_allclose(hess, fd_hess, atol=1e-5 * scale)
    np.testing.assert_array_equal(hess, hess.T)


def test_find_map_with_laplace(mixture, mixture_laplace):
    """find_MAP(laplace=True) gives the same groups as fit_laplace on its result."""
    model, idata, _ = mixture
    start = {name: idata.posterior[name].values[0, 0] for name in ("w", "mu", "sigma")}
    with_laplace = pm_em.find_MAP(model, initvals=start, laplace=True, progressbar=False)
    assert {"posterior", "map", "fit"} <= set(with_laplace.groups())
    assert with_laplace.posterior.sizes["draw"] == 1000
    np.testing.assert_allclose(
        with_laplace.fit["mu_se"].values, mixture_laplace[1].fit["mu_se"].values, rtol=1e-4
    )

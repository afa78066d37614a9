"""Data-driven starts: k-means on every location indexed by a latent on the data
(MvNormal's ``mu[z]`` through PyMC's broadcasting, ``mu_g[group] + delta[z]``
through a sum), then one M-step on the k-means labels; and the strategy recorded.

References: scikit-learn's ``KMeans`` and ``GaussianMixture`` (k-means start), and
scipy's optimizer on a NumPy marginal log-posterior written out by hand.
"""

import numpy as np
import pymc as pm
import pytensor.tensor as pt
import pytest
from scipy import optimize, stats
from scipy.special import expit, logsumexp
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

import pm_em
from pm_em.fit.starts import kmeans_targets, start_points
from pm_em.model.analysis import analyze_model


def _blobs(n_per=100, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.array([[-3.0, 0.0], [3.0, 2.0], [0.0, 6.0]])
    return np.concatenate([rng.normal(c, 1.0, (n_per, 2)) for c in centers])


def _sorted_rows(a):
    a = np.asarray(a).reshape(len(a), -1)
    return a[np.argsort(a[:, 0])]


@pytest.fixture(scope="module")
def blobs():
    return _blobs()


@pytest.fixture(scope="module")
def mvnormal_cov(blobs):
    """Known covariance: ``mu`` reaches MvNormal as ``second(cov[..., -1], mu[z])``."""
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(3))
        mu = pm.Normal("mu", 0.0, 10.0, shape=(3, 2))
        z = pm.Categorical("z", p=w, shape=len(blobs))
        pm.MvNormal("x", mu[z], cov=np.eye(2), observed=blobs)
    return model


def _lkj_model(X):
    """Per-component Cholesky factors from LKJCholeskyCov, stacked and indexed."""
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(3))
        mu = pm.Normal("mu", 0.0, 10.0, shape=(3, 2))
        sd_dist = pm.Exponential.dist(1.0, shape=2)
        chols = [
            pm.LKJCholeskyCov(f"chol{k}", n=2, eta=2.0, sd_dist=sd_dist, compute_corr=True)[0]
            for k in range(3)
        ]
        z = pm.Categorical("z", p=w, shape=len(X))
        pm.MvNormal("x", mu[z], chol=pt.stack(chols)[z], observed=X)
    return model


def _shared_lkj_model(X):
    """One Cholesky factor for every component (not indexed by the latent)."""
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(3))
        mu = pm.Normal("mu", 0.0, 10.0, shape=(3, 2))
        chol, _, _ = pm.LKJCholeskyCov(
            "chol", n=2, eta=2.0, sd_dist=pm.Exponential.dist(1.0, shape=2)
        )
        z = pm.Categorical("z", p=w, shape=len(X))
        pm.MvNormal("x", mu[z], chol=chol, observed=X)
    return model


@pytest.mark.parametrize("build", [_lkj_model, _shared_lkj_model], ids=["chol[z]", "chol"])
def test_mvnormal_location_is_a_kmeans_target(blobs, build):
    # The graph analysis alone (no compilation): k-means needs the model's
    # parameters and latents, not the compiled routine.
    structure = analyze_model(build(blobs))
    (target,) = kmeans_targets(structure)
    assert (target.param, target.latent, target.n_clusters) == ("mu", "z", 3)
    assert target.offset == () and target.aligned
    np.testing.assert_array_equal(target.data, blobs)


def test_kmeans_start_of_mvnormal_cov(mvnormal_cov, blobs):
    em = pm_em.routine.em.cached_routine(mvnormal_cov)
    (start,) = start_points(em, "kmeans", 1, random_seed=3)
    reference = KMeans(3, n_init=10, random_state=0).fit(blobs)
    np.testing.assert_allclose(
        _sorted_rows(start["mu"]), _sorted_rows(reference.cluster_centers_), atol=1e-8
    )
    # The weights come from the M-step on the k-means labels: the cluster shares.
    counts = np.bincount(reference.labels_, minlength=3)
    np.testing.assert_allclose(np.sort(start["w"]), np.sort(counts / len(blobs)), atol=1e-3)
    idata = pm_em.find_MAP(mvnormal_cov, random_seed=1, progressbar=False)
    assert idata.em_stats.attrs["init"] == "kmeans"


def test_kmeans_fit_of_mvnormal_chol_matches_sklearn():
    """Full covariances (Cholesky factor ``chol[z]``, flat priors: MAP = MLE) from a
    k-means start, against scikit-learn's GaussianMixture from its k-means start."""
    from examples import multivariate_mixture as example

    X = example.simulate_data(n=300)
    model = example.build_model(X)
    idata = pm_em.find_MAP(model, init="kmeans", tol=1e-12, random_seed=2, progressbar=False)
    gm = GaussianMixture(
        3, covariance_type="full", reg_covar=0.0, tol=1e-12, max_iter=10_000, random_state=0
    ).fit(X)
    assert gm.converged_
    loglik = idata.posterior.attrs["log_likelihood"]
    np.testing.assert_allclose(loglik, gm.score(X) * len(X), rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        _sorted_rows(idata.posterior["mu"].values[0, 0]), _sorted_rows(gm.means_), atol=1e-5
    )
    assert idata.em_stats.attrs["init"] == "kmeans"


# -- a hierarchical mixture: the latent-indexed location inside a sum ------------------

N_GROUPS = 6


def _hierarchical_data(n=600, seed=0):
    rng = np.random.default_rng(seed)
    group = rng.integers(N_GROUPS, size=n)
    mu_g = rng.normal(0.0, 3.0, size=N_GROUPS)
    z = (rng.random(n) < 0.5).astype(int)
    delta = np.array([-2.0, 2.0])
    y = mu_g[group] + delta[z] + rng.normal(0.0, 0.5, n)
    truth = {"mu_g": mu_g, "delta": delta, "sigma": 0.5, "w1": 0.5, "mu0": 0.0, "tau": 3.0}
    return y, group, truth


@pytest.fixture(scope="module")
def hierarchical():
    y, group, truth = _hierarchical_data()
    with pm.Model() as model:
        mu0 = pm.Normal("mu0", 0.0, 10.0)
        tau = pm.HalfNormal("tau", 5.0)
        mu_g = pm.Normal("mu_g", mu0, tau, shape=N_GROUPS)
        w = pm.Dirichlet("w", np.ones(2))
        delta = pm.Normal("delta", 0.0, 5.0, shape=2)
        sigma = pm.HalfNormal("sigma", 5.0)
        z = pm.Categorical("z", p=w, shape=len(y))
        pm.Normal("y", mu_g[group] + delta[z], sigma, observed=y)
    return model, y, group, truth


def _log_posterior(theta, y, group):
    """The marginal log-posterior (z summed out, no Jacobian), by hand.

    ``theta``: mu0, log tau, mu_g (6), logit w[1], delta (2), log sigma.
    """
    mu0, tau = theta[0], np.exp(theta[1])
    mu_g = theta[2 : 2 + N_GROUPS]
    w1 = expit(theta[2 + N_GROUPS])
    delta = theta[3 + N_GROUPS : 5 + N_GROUPS]
    sigma = np.exp(theta[5 + N_GROUPS])
    log_w = np.log([1.0 - w1, w1])
    table = log_w + stats.norm.logpdf(y[:, None], mu_g[group][:, None] + delta, sigma)
    return (
        logsumexp(table, axis=1).sum()
        + stats.norm.logpdf(mu0, 0.0, 10.0)
        + stats.halfnorm.logpdf(tau, scale=5.0)
        + stats.norm.logpdf(mu_g, mu0, tau).sum()
        + stats.dirichlet.logpdf([1.0 - w1, w1], [1.0, 1.0])
        + stats.norm.logpdf(delta, 0.0, 5.0).sum()
        + stats.halfnorm.logpdf(sigma, scale=5.0)
    )


def _theta(p):
    w1 = float(np.ravel(p["w"])[1]) if "w" in p else p["w1"]
    return np.concatenate(
        [
            [float(p["mu0"]), np.log(float(p["tau"]))],
            np.ravel(p["mu_g"]),
            [np.log(w1 / (1.0 - w1))],
            np.ravel(p["delta"]),
            [np.log(float(p["sigma"]))],
        ]
    )


@pytest.fixture(scope="module")
def hierarchical_mode(hierarchical):
    """scipy's maximum of the hand-written log-posterior, from the true values."""
    _, y, group, truth = hierarchical
    result = optimize.minimize(
        lambda theta: -_log_posterior(theta, y, group),
        _theta(truth),
        method="BFGS",
        options={"gtol": 1e-7, "maxiter": 5000},
    )
    return -result.fun


def test_hierarchical_location_is_a_target(hierarchical):
    model, y, group, _ = hierarchical
    (target,) = kmeans_targets(analyze_model(model))
    assert (target.param, target.latent, target.n_clusters) == ("delta", "z", 2)
    (term,) = target.offset
    assert term.param == "mu_g"
    np.testing.assert_array_equal(term.index, group)


@pytest.mark.parametrize(
    "options",
    [{}, {"initvals": {"delta": [-1.0, 1.0]}}],
    ids=["default", "initvals"],
)
def test_hierarchical_mixture_reaches_the_mode(hierarchical, hierarchical_mode, options):
    """The old default start (jitter: sigma near HalfNormal(5)'s default, mu_g near
    0) gave flat first responsibilities, the M-step merged the two components, and
    EM stopped at the merged saddle, ~430 nats below the mode."""
    model, y, group, _ = hierarchical
    idata = pm_em.find_MAP(model, random_seed=0, progressbar=False, **options)
    post = {name: idata.posterior[name].values[0, 0] for name in idata.posterior.data_vars}
    reached = float(idata.em_stats["logp"][-1])
    # pm_em's objective is the hand-written one...
    np.testing.assert_allclose(_log_posterior(_theta(post), y, group), reached, rtol=0, atol=1e-6)
    # ...and its fit reaches scipy's maximum of it.
    np.testing.assert_allclose(reached, hierarchical_mode, rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.diff(post["delta"]), 4.0, atol=0.3)
    assert idata.em_stats.attrs["init"] == "kmeans"


def test_init_records_the_strategy_used():
    from examples import zero_inflated_poisson as zip_model

    zip_model = zip_model.build_model(zip_model.simulate_data(n=200))
    auto = pm_em.find_MAP(zip_model, random_seed=1, progressbar=False)
    assert auto.em_stats.attrs["init"] == "jitter"  # no location indexed by a latent
    prior = pm_em.find_MAP(zip_model, init="prior", random_seed=1, progressbar=False)
    assert prior.em_stats.attrs["init"] == "prior"

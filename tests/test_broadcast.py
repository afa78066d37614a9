"""Latent-indexed parameters broadcast against data axes, and rows of a coefficient
matrix picked by the latent.

* ``p=theta[z][:, None]`` against ``(n, m)`` data (and ``theta[z]`` against
  ``(m, n)``, ``mu[z, None]``): each element of the latent owns a row (column) of
  observations, as ``theta[z[row]]`` does with the data flattened. The two-coins
  data of the EM lecture notes (heads 5, 9, 8, 4, 7 in ten tosses each) written as
  Bernoulli tosses is checked against the hand-derived two-coins EM; Normal and
  Binomial repeated measures against brute-force enumeration and SciPy's
  maximization of the marginal likelihood.
* ``beta[z, :]`` (a mixture of regressions, ``(X * beta[z, :]).sum(-1)``) is fitted
  as ``beta[z]`` is, checked the same way.
"""

import numpy as np
import pymc as pm
import pytensor
import pytensor.tensor as pt
import pytest
from pytensor.graph.replace import vectorize_graph
from scipy import optimize, special, stats

import pm_em
from pm_em.compile import evaluate_once
from pm_em.estep.rewrites import split_advanced_indexing
from pm_em.model.dependence import build_owner_graphs
from tests.helpers import brute_force
from tests.references import em as ref

# The lecture notes' two coins: heads in ten tosses of the coin picked for each trial.
HEADS = np.array([5, 9, 8, 4, 7])
N_TOSSES = 10
THETA_START = np.array([0.6, 0.5])


def _tosses(heads, n_tosses, rng=None):
    """0/1 tosses with ``heads[i]`` heads in row ``i`` (in random order with ``rng``)."""
    tosses = (np.arange(n_tosses)[None, :] < np.asarray(heads)[:, None]).astype("int64")
    return tosses if rng is None else rng.permuted(tosses, axis=1)


def _log_comb(n, k):
    return special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)


# -- the two coins, toss by toss ------------------------------------------------------


def two_coins_model(form):
    tosses = _tosses(HEADS, N_TOSSES)
    coords = {"coin": [0, 1], "trial": np.arange(len(HEADS)), "toss": np.arange(N_TOSSES)}
    with pm.Model(coords=coords) as model:
        theta = pm.Uniform("theta", 0.0, 1.0, dims="coin")
        z = pm.Bernoulli("z", p=np.float64(0.5), dims="trial")
        if form == "column":
            data = pm.Data("tosses", tosses, dims=("trial", "toss"))
            pm.Bernoulli("x", p=theta[z][:, None], observed=data, dims=("trial", "toss"))
        elif form == "transposed":
            pm.Bernoulli("x", p=theta[z], observed=tosses.T, dims=("toss", "trial"))
        else:
            raise ValueError(form)
    return model


def _fit_coins(model):
    return pm_em.find_MAP(model, initvals={"theta": THETA_START}, tol=1e-12, progressbar=False)


@pytest.fixture(scope="module", params=["column", "transposed"])
def coins(request):
    model = two_coins_model(request.param)
    return request.param, model, _fit_coins(model)


@pytest.fixture(scope="module")
def coins_reference():
    """Hand-derived two-coins EM on the heads per trial (Binomial), from the same start."""
    return ref.two_coins_em(HEADS, N_TOSSES, THETA_START, tol=1e-14)


def test_two_coins_tosses_match_the_hand_derived_em(coins, coins_reference):
    _, _, idata = coins
    theta = idata.posterior["theta"].values[0, 0]
    np.testing.assert_allclose(theta, coins_reference.estimates["p"], rtol=1e-6)
    # Bernoulli tosses: the Binomial log-likelihood without its coefficients.
    expected = coins_reference.loglik - _log_comb(N_TOSSES, HEADS).sum()
    loglik = idata.posterior.attrs["log_likelihood"]
    np.testing.assert_allclose(loglik, expected, rtol=1e-9)
    # The numbers of the lecture notes.
    np.testing.assert_allclose(theta, [0.79679, 0.51958], atol=5e-6)
    assert round(loglik, 4) == -31.5702


def test_two_coins_tosses_layout(coins):
    form, _, idata = coins
    post = idata.posterior
    assert post["z"].dims == ("chain", "draw", "trial")
    assert post["lp_z"].dims == ("chain", "draw", "trial", "lp_z_dim")
    # The responsibilities at the returned parameters, by the hand-derived E-step.
    theta = post["theta"].values[0, 0]
    log_resp, _ = ref.two_coins_e_step(HEADS, N_TOSSES, theta, np.array([0.5, 0.5]))
    np.testing.assert_allclose(post["lp_z"].values[0, 0], log_resp, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(post["z"].values[0, 0], log_resp.argmax(axis=1))
    pointwise = idata.log_likelihood["x"]
    dims = ("trial", "toss") if form == "column" else ("toss", "trial")
    assert pointwise.dims == ("chain", "draw", *dims)
    np.testing.assert_allclose(float(pointwise.sum()), post.attrs["log_likelihood"], rtol=1e-12)


@pytest.mark.parametrize("coins", ["column"], indirect=True)  # the pm.Data form
def test_order_of_tosses_within_a_trial_does_not_matter(coins):
    _, model, idata = coins
    shuffled = _tosses(HEADS, N_TOSSES, rng=np.random.default_rng(7))
    assert not np.array_equal(shuffled, _tosses(HEADS, N_TOSSES))
    try:
        with model:
            pm.set_data({"tosses": shuffled})
        again = _fit_coins(model)
    finally:
        with model:
            pm.set_data({"tosses": _tosses(HEADS, N_TOSSES)})
    np.testing.assert_allclose(
        again.posterior["theta"].values, idata.posterior["theta"].values, rtol=1e-10
    )
    np.testing.assert_allclose(
        again.posterior.attrs["log_likelihood"], idata.posterior.attrs["log_likelihood"]
    )


# -- Binomial repeated counts per latent element ---------------------------------------

COUNTS = np.array([[5, 6, 4], [9, 8, 9], [8, 7, 9], [4, 3, 5], [7, 8, 6]])


@pytest.fixture(scope="module")
def binomial_fit():
    with pm.Model() as model:
        theta = pm.Uniform("theta", 0.0, 1.0, shape=2)
        z = pm.Bernoulli("z", p=np.float64(0.5), shape=len(COUNTS))
        pm.Binomial("h", n=N_TOSSES, p=theta[z][:, None], observed=COUNTS)
    return _fit_coins(model)


def test_binomial_repeated_counts_match_the_hand_derived_em(binomial_fit):
    # A trial's counts depend on its coin through their total only: the two-coins EM
    # on the totals of 3 * 10 tosses, up to the binomial coefficients.
    totals = COUNTS.sum(axis=1)
    n_total = N_TOSSES * COUNTS.shape[1]
    expected = ref.two_coins_em(totals, n_total, THETA_START, tol=1e-14)
    np.testing.assert_allclose(
        binomial_fit.posterior["theta"].values[0, 0], expected.estimates["p"], rtol=1e-6
    )
    loglik = expected.loglik - _log_comb(n_total, totals).sum()
    loglik += _log_comb(N_TOSSES, COUNTS).sum()
    np.testing.assert_allclose(binomial_fit.posterior.attrs["log_likelihood"], loglik, rtol=1e-9)
    np.testing.assert_allclose(float(binomial_fit.log_likelihood["h"].sum()), loglik, rtol=1e-9)


# -- Normal repeated measures: mu[z][:, None] against (n, m) data ----------------------

Y = np.array(
    [[-1.9, -2.4, -1.2], [2.1, 1.6, 2.8], [-2.2, -1.7, -2.6], [1.4, 2.3, 1.9], [-0.6, -1.5, 0.4]]
)
MU_START = np.array([-1.0, 1.0])


def repeated_normal_model(form):
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Normal("mu", 0, 10, shape=2)
        z = pm.Categorical("z", p=w, shape=len(Y))
        loc = mu[z][:, None] if form == "column" else mu[z, None]
        pm.Normal("y", loc, 1.0, observed=Y)
    return model


def _compiled_and_fitted(model, start):
    """The model's EM routine, and its fit from ``start`` and equal weights (the fit
    reuses the routine)."""
    em = pm_em.EM(model)
    initvals = {**start, "w": np.array([0.5, 0.5])}
    idata = pm_em.find_MAP(model, initvals=initvals, tol=1e-12, random_seed=1, progressbar=False)
    return em, idata


def _assert_e_step_exact(em, random_seed):
    point = em.initial_point(random_seed=random_seed)
    log_marginal, marginals, *_ = brute_force(em, point)
    np.testing.assert_allclose(em.logp(point), log_marginal, rtol=1e-10)
    np.testing.assert_allclose(np.exp(em.e_step(point)["z"]), np.exp(marginals["z"]), atol=1e-10)


@pytest.fixture(scope="module", params=["column", "newaxis"])
def repeated_normal(request):
    return _compiled_and_fitted(repeated_normal_model(request.param), {"mu": MU_START})


def _repeated_normal_log_posterior(params):
    """Observed-data log-posterior (no Jacobian), the latent summed out by hand."""
    mu, s = params[:2], params[2]
    w = np.array([s, 1.0 - s])
    per_row = np.log(w) + stats.norm.logpdf(Y[:, :, None], mu, 1.0).sum(axis=1)
    return special.logsumexp(per_row, axis=1).sum() + stats.norm.logpdf(mu, 0, 10).sum()


def test_repeated_normal_e_step_matches_brute_force(repeated_normal):
    _assert_e_step_exact(repeated_normal[0], random_seed=3)


def test_repeated_normal_fit_matches_scipy(repeated_normal):
    em, idata = repeated_normal
    assert "mu" in em.closed_form_params
    post = idata.posterior
    found = np.concatenate([post["mu"].values[0, 0], post["w"].values[0, 0, :1]])
    direct = optimize.minimize(
        lambda p: -_repeated_normal_log_posterior(p),
        x0=[*MU_START, 0.5],
        method="L-BFGS-B",
        bounds=[(None, None)] * 2 + [(1e-9, 1 - 1e-9)],
        options={"ftol": 1e-15, "gtol": 1e-10},
    )
    assert direct.success, direct.message
    np.testing.assert_allclose(found, direct.x, rtol=1e-5)
    np.testing.assert_allclose(float(idata.em_stats["logp"][-1]), -direct.fun, rtol=1e-8)
    assert post["lp_z"].dims == ("chain", "draw", "z_dim_0", "lp_z_dim")
    prior = stats.norm.logpdf(found[:2], 0, 10).sum()
    np.testing.assert_allclose(
        float(idata.log_likelihood["y"].sum()), -direct.fun - prior, rtol=1e-9
    )


# -- a mixture of regressions: beta[z, :] ---------------------------------------------

X = np.array([[1.0, -0.5], [1.0, 0.3], [1.0, 1.2], [1.0, -1.1], [1.0, 0.8], [1.0, 2.0]])
# Two lines, y = 1 + 2 x and y = -1 - x, alternating.
REG_Y = np.array([0.1, -1.2, 3.3, 0.0, 2.7, -3.1])
BETA_START = np.array([[0.5, 1.0], [-0.5, -0.5]])


def regression_mixture(form):
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        beta = pm.Normal("beta", 0, 5, shape=(2, 2))
        z = pm.Categorical("z", p=w, shape=len(REG_Y))
        if form == "row_slice":
            mu = (X * beta[z, :]).sum(-1)
        else:
            mu = pt.sum(X * beta[z, ...], axis=1)
        pm.Normal("y", mu, 0.5, observed=REG_Y)
    return model


@pytest.fixture(scope="module", params=["row_slice", "ellipsis_pt_sum"])
def regression(request):
    return _compiled_and_fitted(regression_mixture(request.param), {"beta": BETA_START})


def _regression_log_posterior(params):
    beta, s = params[:4].reshape(2, 2), params[4]
    w = np.array([s, 1.0 - s])
    per_obs = np.log(w) + stats.norm.logpdf(REG_Y[:, None], X @ beta.T, 0.5)
    return special.logsumexp(per_obs, axis=1).sum() + stats.norm.logpdf(beta, 0, 5).sum()


def test_coefficient_rows_e_step_matches_brute_force(regression):
    _assert_e_step_exact(regression[0], random_seed=4)


def test_coefficient_rows_fit_matches_scipy(regression):
    _, idata = regression
    post = idata.posterior
    found = np.concatenate([post["beta"].values[0, 0].ravel(), post["w"].values[0, 0, :1]])
    direct = optimize.minimize(
        lambda p: -_regression_log_posterior(p),
        x0=[*BETA_START.ravel(), 0.5],
        method="L-BFGS-B",
        bounds=[(None, None)] * 4 + [(1e-9, 1 - 1e-9)],
        options={"ftol": 1e-15, "gtol": 1e-10},
    )
    assert direct.success, direct.message
    np.testing.assert_allclose(found, direct.x, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(idata.em_stats["logp"][-1]), -direct.fun, rtol=1e-8)
    assert post["lp_z"].dims == ("chain", "draw", "z_dim_0", "lp_z_dim")
    total = float(idata.log_likelihood["y"].sum())
    np.testing.assert_allclose(total, post.attrs["log_likelihood"], rtol=1e-12)


# -- the graph pieces --------------------------------------------------------------------

_INDEXINGS = {
    "x[z, :]": lambda x, z: x[z, :],
    "x[z, ...]": lambda x, z: x[z, ...],
    "x[z, 1:]": lambda x, z: x[z, 1:],
    "x[z, None]": lambda x, z: x[z, None],
    "x[None, z]": lambda x, z: x[None, z],
    "x[:, z]": lambda x, z: x[:, z % 3],
    "x[::-1, z, None]": lambda x, z: x[::-1, z % 3, None],
    "x[z, z % 3, :]": lambda x, z: x[z, z % 3, :],
    "x[:, z[:, None], :]": lambda x, z: x[:, z[:, None] % 3, :],
}


@pytest.mark.parametrize("make", list(_INDEXINGS.values()), ids=list(_INDEXINGS))
def test_split_indexing_is_exact_and_vectorizes(make):
    x = pt.tensor3("x")
    z = pt.lvector("z")
    x_value = np.arange(24.0).reshape(2, 3, 4)
    z_value = np.array([1, 0, 1, 1, 0])
    indexed = make(x, z)
    (split,) = split_advanced_indexing([indexed])
    assert split is not indexed
    evaluate = pytensor.function([x, z], [indexed, split], mode="FAST_COMPILE")
    before, after = evaluate(x_value, z_value)
    np.testing.assert_array_equal(after, before)
    # Enumerating z: one batch of indices per configuration, which PyTensor cannot
    # vectorize through the original graph (slices or None beside the index).
    batch = np.stack([z_value, 1 - z_value])
    vectorized = vectorize_graph(split, replace={z: pt.constant(batch)})
    fn = pytensor.function([x], vectorized, mode="FAST_COMPILE")
    expected = [evaluate(x_value, b)[0] for b in batch]
    np.testing.assert_array_equal(fn(x_value), np.stack(expected))


def test_split_indexing_leaves_other_indexing_alone():
    x = pt.tensor3("x")
    z = pt.lvector("z")
    # A gather by index arrays alone; a scalar index beside the array (NumPy counts
    # it as an index array); index arrays split by a slice (NumPy moves their block
    # to the front).
    for indexed in (x[z], x[z, 0], x[z, :, z]):
        (same,) = split_advanced_indexing([indexed])
        assert same is indexed


def test_owner_of_a_latent_axis_broadcast_against_data():
    # Each entry of (5, 10) tosses is owned by its row's latent element.
    z = pt.lvector("z")
    theta = pt.vector("theta")
    data = pt.constant(np.zeros((5, 10)))
    for term, expected in [
        (pt.switch(data, pt.log(theta[z][:, None]), 0.0), np.repeat(np.arange(5), 10)),
        (pt.switch(data.T, pt.log(theta[z]), 0.0), np.tile(np.arange(5), 10)),
    ]:
        graphs = build_owner_graphs(z, [term])
        outputs = [graphs.owners[term]] + [c.ok for c in graphs.checks[term]]
        owner, *oks = evaluate_once([z, theta], outputs, [np.zeros(5, "int64"), np.ones(2)])
        np.testing.assert_array_equal(np.ravel(owner), expected)
        assert all(bool(ok) for ok in oks)

"""Closed-form M-step of MvNormal mixtures: means and Cholesky factors.

The M-step must match the textbook weighted moments (means, scatter matrices) and
their prior-adjusted (GLS) versions, each block must maximize Q given the others
(ECM), and a full fit must reach scikit-learn's and the numeric M-step's MAP.
Patterns that are not exactly closed-form (LKJ priors, parameters used elsewhere,
transformed factors) stay with the numeric M-step.
"""

from __future__ import annotations

import warnings

import numpy as np
import pymc as pm
import pytensor
import pytensor.tensor as pt
import pytest
from pytensor.compile.mode import Mode
from pytensor.graph.replace import graph_replace

import pm_em
from pm_em.fit.loop import run_em

N = 60
D = 2
DIAG = np.arange(D)
TRIL_ROWS, TRIL_COLS = np.tril_indices(D, -1)
TRUE_MU = np.array([[0.0, 0.0], [4.0, 1.0], [1.0, 4.0]])
TRUE_COV = np.array(
    [[[1.0, 0.5], [0.5, 1.0]], [[0.8, -0.3], [-0.3, 0.6]], [[1.5, 0.0], [0.0, 0.4]]]
)
RNG = np.random.default_rng(2024)
LABELS = RNG.choice(3, size=N, p=[0.45, 0.3, 0.25])
X = TRUE_MU[LABELS] + np.einsum(
    "nij,nj->ni", np.linalg.cholesky(TRUE_COV)[LABELS], RNG.standard_normal((N, D))
)
# Two components: the first two clusters only.
X2 = X[LABELS < 2]
PRIOR_COV = np.array([[4.0, 1.0], [1.0, 3.0]])

#: A graph evaluated as built: Python thunks, no rewrites (the reference gradients).
AS_BUILT = Mode(linker="py", optimizer=None)


def assemble(chol_diag, chol_offdiag, lead):
    """Lower-triangular factors ``(*lead, D, D)`` from their diagonal and strict lower
    triangle (``chol_offdiag=None``: diagonal factors)."""
    chol = pt.zeros((*lead, D, D))
    chol = pt.set_subtensor(chol[..., DIAG, DIAG], chol_diag)
    if chol_offdiag is not None:
        chol = pt.set_subtensor(chol[..., TRIL_ROWS, TRIL_COLS], chol_offdiag)
    return chol


def mvgmm(data=X, k=3, mean="flat", factor="full"):
    """``MvNormal(mu[z], chol=chol[z])``, written as in benchmarks/cases.py.

    mean: ``"flat"``, ``"normal"`` (Normal(1, 3)), ``"mvnormal"`` (rows
    MvNormal(0, PRIOR_COV)) or ``"shared"`` (one flat mean for every component, a
    scale mixture: its update weighs the components by their precisions).

    factor: ``"full"``, ``"shared"`` (one factor for every component),
    ``"diagonal"``, ``"upper"`` (``lower=False`` with the transposed factor),
    ``"lkj"`` (LKJCholeskyCov per component), ``"deterministic_cov"``
    (``cov=`` a Deterministic of the factor).
    """
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(k))
        if mean == "normal":
            mu = pm.Normal("mu", 1.0, 3.0, shape=(k, D))
        elif mean == "mvnormal":
            mu = pm.MvNormal("mu", np.zeros(D), cov=PRIOR_COV, shape=(k, D))
        elif mean == "shared":
            mu = pm.Flat("mu", shape=D)
        else:
            mu = pm.Flat("mu", shape=(k, D))
        z = pm.Categorical("z", p=w, shape=len(data))
        if mean == "shared":
            mu = pt.broadcast_to(mu, (k, D))
        if factor == "lkj":
            chols = [
                pm.LKJCholeskyCov(
                    f"chol{c}", n=D, eta=2.0, sd_dist=pm.Exponential.dist(1.0, shape=D)
                )[0]
                for c in range(k)
            ]
            pm.MvNormal("x", mu=mu[z], chol=pt.stack(chols)[z], observed=data)
            return model
        lead = () if factor == "shared" else (k,)
        chol_diag = pm.HalfFlat("chol_diag", shape=(*lead, D))
        chol_offdiag = None
        if factor != "diagonal":
            chol_offdiag = pm.Flat("chol_offdiag", shape=(*lead, TRIL_ROWS.size))
        chol = assemble(chol_diag, chol_offdiag, lead)
        if factor == "shared":
            pm.MvNormal("x", mu=mu[z], chol=chol, observed=data)
        elif factor == "upper":
            pm.MvNormal("x", mu=mu[z], chol=chol.mT[z], lower=False, observed=data)
        elif factor == "deterministic_cov":
            cov = pm.Deterministic("cov", chol @ chol.mT)
            pm.MvNormal("x", mu=mu[z], cov=cov[z], observed=data)
        else:
            pm.MvNormal("x", mu=mu[z], chol=chol[z], observed=data)
    return model


def cholesky_parts(cov):
    chol = np.linalg.cholesky(cov)
    return {"chol_diag": chol[..., DIAG, DIAG], "chol_offdiag": chol[..., TRIL_ROWS, TRIL_COLS]}


def covariance_of(point):
    chol = np.zeros((*point["chol_diag"].shape[:-1], D, D))
    chol[..., DIAG, DIAG] = point["chol_diag"]
    if "chol_offdiag" in point:
        chol[..., TRIL_ROWS, TRIL_COLS] = point["chol_offdiag"]
    return chol @ np.swapaxes(chol, -1, -2)


START_COV = np.tile(np.eye(D), (3, 1, 1))
START = {
    "w": np.full(3, 1.0 / 3.0),
    "mu": np.array([[0.5, -0.5], [3.0, 2.0], [2.0, 3.0]]),
    **cholesky_parts(START_COV),
}
# A start with unequal, correlated covariances (the GLS mean depends on them).
START_2 = {
    "w": np.array([0.4, 0.6]),
    "mu": np.array([[0.5, -0.5], [3.0, 2.0]]),
    **cholesky_parts(np.array([[[1.2, 0.4], [0.4, 0.9]], [[0.7, -0.2], [-0.2, 1.5]]])),
}

MODELS = {
    "full": (lambda: mvgmm(), {"w", "mu", "chol_diag", "chol_offdiag"}),
    "normal_prior": (
        lambda: mvgmm(X2, 2, mean="normal"),
        {"w", "mu", "chol_diag", "chol_offdiag"},
    ),
    "mvnormal_prior": (
        lambda: mvgmm(X2, 2, mean="mvnormal"),
        {"w", "mu", "chol_diag", "chol_offdiag"},
    ),
    "shared": (lambda: mvgmm(X2, 2, factor="shared"), {"w", "mu", "chol_diag", "chol_offdiag"}),
    "shared_mean": (lambda: mvgmm(X2, 2, mean="shared"), {"w", "mu", "chol_diag", "chol_offdiag"}),
    "diagonal": (lambda: mvgmm(X2, 2, factor="diagonal"), {"w", "mu", "chol_diag"}),
    "upper": (lambda: mvgmm(X2, 2, factor="upper"), {"w", "mu", "chol_diag", "chol_offdiag"}),
    # The covariance as a Deterministic: the mean is closed-form, the factor numeric.
    "deterministic_cov": (lambda: mvgmm(X2, 2, factor="deterministic_cov"), {"w", "mu"}),
    # LKJ priors: the mean is closed-form given the factors, which stay numeric.
    "lkj": (lambda: mvgmm(X2, 2, factor="lkj"), {"w", "mu"}),
}

_CACHE: dict = {}


def routine(name, closed_form=True):
    """A model's EM routine, compiled once per test module."""
    key = (name, closed_form)
    if key not in _CACHE:
        if (name, not closed_form) in _CACHE:
            model = _CACHE[(name, not closed_form)].model
        else:
            model = MODELS[name][0]()
        _CACHE[key] = pm_em.EM(model, closed_form=closed_form)
    return _CACHE[key]


@pytest.fixture(scope="module", autouse=True)
def _release_routines():
    yield
    _CACHE.clear()


def test_closed_form_params():
    assert set(routine("full").closed_form_params) == {"w", "mu", "chol_diag", "chol_offdiag"}


@pytest.mark.parametrize("name", sorted(set(MODELS) - {"full"}))
def test_recognized(name):
    assert set(routine(name).closed_form_params) == MODELS[name][1]


def test_lkj_factor_stays_numeric():
    claimed = set(routine("lkj").closed_form_params)
    assert "mu" in claimed
    assert not {"chol0", "chol1"} & claimed


def weighted_moments(data, resp):
    counts = resp.sum(axis=0)
    sums = resp.T @ data
    return counts, sums


def scatter(data, resp, means):
    return np.stack(
        [(resp[:, k, None] * (data - means[k])).T @ (data - means[k]) for k in range(resp.shape[1])]
    )


def test_step_matches_weighted_moments():
    """Flat priors: means are responsibility-weighted means, covariances the weighted
    scatter about them, returned as Cholesky parts."""
    em = routine("full")
    log_resp = em.e_step(START)
    resp = np.exp(log_resp["z"])
    new = em.m_step(START, log_resp)
    counts, sums = weighted_moments(X, resp)
    means = sums / counts[:, None]
    cov = scatter(X, resp, means) / counts[:, None, None]
    np.testing.assert_allclose(new["w"], counts / N, rtol=1e-12)
    np.testing.assert_allclose(new["mu"], means, rtol=1e-11, atol=1e-12)
    for key, value in cholesky_parts(cov).items():
        np.testing.assert_allclose(new[key], value, rtol=1e-10, atol=1e-12, err_msg=key)


def degenerate_responsibilities():
    """Log responsibilities: component 2 owns observation 0 alone (a zero scatter),
    component 1 nothing (no weight), component 0 the rest."""
    log_resp = np.full((N, 3), -np.inf)
    log_resp[1:, 0] = 0.0
    log_resp[0, 2] = 0.0
    return {"z": log_resp}


def test_degenerate_components_keep_their_values():
    """No weight (N_k = 0) or a singular scatter: the component keeps its mean or
    factor instead of 0 / 0 or a failed Cholesky."""
    em = routine("full")
    new = em.m_step(START, degenerate_responsibilities())
    assert all(np.isfinite(value).all() for value in new.values())
    np.testing.assert_allclose(new["mu"][2], X[0], rtol=1e-14)
    np.testing.assert_allclose(new["mu"][0], X[1:].mean(axis=0), rtol=1e-12)
    for key in ("mu", "chol_diag", "chol_offdiag"):
        np.testing.assert_allclose(new[key][1], START[key][1], rtol=1e-14, err_msg=key)
    for key in ("chol_diag", "chol_offdiag"):
        np.testing.assert_allclose(new[key][2], START[key][2], rtol=1e-14, err_msg=key)
    cov = np.cov(X[1:].T, bias=True)
    for key, value in cholesky_parts(cov).items():
        np.testing.assert_allclose(new[key][0], value, rtol=1e-10, err_msg=key)


@pytest.mark.parametrize("prior", ["normal_prior", "mvnormal_prior"])
def test_step_matches_gls_formula(prior):
    """A Normal / MvNormal prior on the means: the posterior mode given the current
    covariances, (N_k P_k + L0)^-1 (P_k S_k + L0 m0); then the scatter about it."""
    em = routine(prior)
    log_resp = em.e_step(START_2)
    resp = np.exp(log_resp["z"])
    new = em.m_step(START_2, log_resp)
    counts, sums = weighted_moments(X2, resp)
    precision = np.linalg.inv(covariance_of(START_2))
    if prior == "normal_prior":
        prior_precision, prior_mean = np.eye(D) / 9.0, np.ones(D)
    else:
        prior_precision, prior_mean = np.linalg.inv(PRIOR_COV), np.zeros(D)
    means = np.stack(
        [
            np.linalg.solve(
                counts[k] * precision[k] + prior_precision,
                precision[k] @ sums[k] + prior_precision @ prior_mean,
            )
            for k in range(2)
        ]
    )
    np.testing.assert_allclose(new["mu"], means, rtol=1e-10, atol=1e-12)
    cov = scatter(X2, resp, means) / counts[:, None, None]
    for key, value in cholesky_parts(cov).items():
        np.testing.assert_allclose(new[key], value, rtol=1e-10, atol=1e-12, err_msg=key)


def test_shared_factor_pools_the_scatter():
    """One factor for every component: the scatter matrices add up."""
    em = routine("shared")
    start = {k: v for k, v in START_2.items() if not k.startswith("chol")}
    start |= cholesky_parts(np.array([[1.2, 0.4], [0.4, 0.9]]))
    log_resp = em.e_step(start)
    resp = np.exp(log_resp["z"])
    new = em.m_step(start, log_resp)
    counts, sums = weighted_moments(X2, resp)
    means = sums / counts[:, None]
    cov = scatter(X2, resp, means).sum(axis=0) / counts.sum()
    np.testing.assert_allclose(new["mu"], means, rtol=1e-11, atol=1e-12)
    for key, value in cholesky_parts(cov).items():
        np.testing.assert_allclose(new[key], value, rtol=1e-10, atol=1e-12, err_msg=key)


def q_gradient(model):
    """The gradient of Q, ``sum_ik R_ik log p(x_i, z_i = k | theta) + log p(theta)``
    (no Jacobian), in every continuous value variable, as a function of their values
    and the responsibilities ``R`` ``(n, K)``; built from the model alone."""
    latent = model["z"]
    latent_value = model.rvs_to_values[latent]
    values = model.continuous_value_vars
    terms = model.logp(jacobian=False, sum=False)
    rvs = model.basic_RVs
    per_element = sum(t for rv, t in zip(rvs, terms) if rv.name in ("x", "z"))
    priors = sum(t.sum() for rv, t in zip(rvs, terms) if rv.name not in ("x", "z"))
    resp = pt.matrix("resp")
    n_configs = int(model["w"].type.shape[0])
    n_obs = int(model.rvs_to_values[model["x"]].type.shape[0])
    q = priors
    for c in range(n_configs):
        fixed = pt.full((n_obs,), c, dtype=latent_value.dtype)
        q = q + (resp[:, c] * graph_replace(per_element, {latent_value: fixed})).sum()
    # Called a few times: evaluated as built (Python thunks, no rewrites), which
    # halves the time FAST_COMPILE's rewrites of the gradient took (8 s -> 4 s).
    fn = pytensor.function([*values, resp], pytensor.grad(q, values), mode=AS_BUILT)
    names = [v.name for v in values]

    def gradient(point_values: dict, log_resp):
        grads = fn(*(point_values[name] for name in names), np.exp(log_resp))
        return {name: np.asarray(g) for name, g in zip(names, grads)}

    return gradient


@pytest.mark.parametrize("name", sorted(set(MODELS) - {"full"}))
def test_each_block_maximizes_q_given_the_others(name):
    """ECM: at the point each closed-form block saw, Q's gradient in it vanishes."""
    em = routine(name)
    gradient = q_gradient(em.model)
    start = em.initial_point(random_seed=3)
    log_resp = em.e_step(start)
    new = dict(zip([p.value.name for p in em.params], em.to_values(em.m_step(start, log_resp))))
    seen = dict(zip([p.value.name for p in em.params], em.to_values(start)))
    for update in em.graphs.closed_form:
        for p in update.params:
            seen[p.value.name] = new[p.value.name]
        grads = gradient(seen, log_resp["z"])
        for p in update.params:
            np.testing.assert_allclose(grads[p.value.name], 0.0, atol=1e-8 * N, err_msg=p.name)


@pytest.fixture(scope="module")
def fitted():
    """pm_em and scikit-learn from the same start, tightly converged."""
    from sklearn.mixture import GaussianMixture

    em = routine("full")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pm_em.EMConvergenceWarning)
        idata = pm_em.find_MAP(
            em.model, initvals=START, tol=1e-13, max_iter=5000, progressbar=False
        )
    gm = GaussianMixture(
        3,
        covariance_type="full",
        tol=1e-13,
        reg_covar=0.0,
        max_iter=10_000,
        weights_init=START["w"],
        means_init=START["mu"],
        precisions_init=np.linalg.inv(START_COV),
    ).fit(X)
    post = idata.posterior.squeeze(("chain", "draw"))
    ours = {name: post[name].values for name in ("w", "mu", "chol_diag", "chol_offdiag")}
    return idata, ours, gm


def test_find_map_matches_sklearn(fitted):
    idata, ours, gm = fitted
    assert bool(idata.em_stats["converged"])
    # Same start, same updates: the components keep their labels.
    loglik = float(idata.log_likelihood["x"].sum())
    assert loglik == pytest.approx(gm.score(X) * N, abs=1e-5)
    np.testing.assert_allclose(ours["w"], gm.weights_, atol=1e-5)
    np.testing.assert_allclose(ours["mu"], gm.means_, atol=1e-5)
    np.testing.assert_allclose(covariance_of(ours), gm.covariances_, atol=1e-5)


def test_map_is_stationary(fitted):
    """At the MAP, Q's gradient at its own E-step (the log-posterior's gradient)
    vanishes in every parameter."""
    _, ours, _ = fitted
    em = routine("full")
    values = dict(zip([p.value.name for p in em.params], em.to_values(ours)))
    grads = q_gradient(em.model)(values, em.e_step(ours)["z"])
    # EM converges linearly: at tol=1e-13 the gradient is small, not zero.
    for name, value in grads.items():
        np.testing.assert_allclose(value, 0.0, atol=1e-4, err_msg=name)


def test_map_is_a_fixed_point_of_the_numeric_m_step(fitted):
    """At the closed-form MAP, EM with the numeric M-step does not move."""
    idata, ours, _ = fitted
    numeric = routine("full", closed_form=False)
    point = numeric.m_step(ours, numeric.e_step(ours))
    for key, value in ours.items():
        np.testing.assert_allclose(point[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
    assert numeric.logp(point) == pytest.approx(float(idata.em_stats["logp"][-1]), abs=1e-9)


def test_same_map_as_numeric_m_step(fitted):
    """From the same start, both M-steps converge to the same point."""
    _, ours, _ = fitted
    em, numeric = routine("full"), routine("full", closed_form=False)
    fits = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pm_em.EMConvergenceWarning)
        for r in (em, numeric):
            state, history = run_em(r.routine, r.to_values(START), tol=1e-12, max_iter=3000)
            assert np.all(np.diff(history.logp) >= -1e-9 * abs(history.logp[-1]))
            fits.append((state.logp, r.to_point(state.values)))
    (logp_closed, closed), (logp_numeric, numeric_point) = fits
    assert logp_closed == pytest.approx(logp_numeric, rel=1e-10, abs=1e-7)
    for key, value in closed.items():
        np.testing.assert_allclose(value, numeric_point[key], rtol=1e-4, atol=1e-5, err_msg=key)
        np.testing.assert_allclose(value, ours[key], rtol=1e-4, atol=1e-5, err_msg=key)


def shared_elsewhere():
    model = mvgmm(X2, 2)
    with model:
        pm.Potential("pull", -(model["chol_offdiag"] ** 2).sum())
    return model


def halfflat_below_diagonal():
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Flat("mu", shape=(2, D))
        chol_diag = pm.HalfFlat("chol_diag", shape=(2, D))
        chol_offdiag = pm.HalfFlat("chol_offdiag", shape=(2, 1))
        z = pm.Categorical("z", p=w, shape=len(X2))
        chol = assemble(chol_diag, chol_offdiag, (2,))
        pm.MvNormal("x", mu=mu[z], chol=chol[z], observed=X2)
    return model


def scaled_factor():
    """``2 * chol``: not a selection of the parameters (the mean, whose covariance
    is still one matrix per component, stays closed-form)."""
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Flat("mu", shape=(2, D))
        chol_diag = pm.HalfFlat("chol_diag", shape=(2, D))
        chol_offdiag = pm.Flat("chol_offdiag", shape=(2, 1))
        z = pm.Categorical("z", p=w, shape=len(X2))
        chol = 2.0 * assemble(chol_diag, chol_offdiag, (2,))
        pm.MvNormal("x", mu=mu[z], chol=chol[z], observed=X2)
    return model


def lkj_shared():
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Flat("mu", shape=(2, D))
        chol, _, _ = pm.LKJCholeskyCov(
            "chol", n=D, eta=2.0, sd_dist=pm.Exponential.dist(1.0, shape=D)
        )
        z = pm.Categorical("z", p=w, shape=len(X2))
        pm.MvNormal("x", mu=mu[z], chol=chol, observed=X2)
    return model


def mean_inside_covariance():
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Flat("mu", shape=(2, D))
        z = pm.Categorical("z", p=w, shape=len(X2))
        cov = pt.eye(D) + pt.outer(mu[0], mu[0])
        pm.MvNormal("x", mu=mu[z], cov=cov, observed=X2)
    return model


@pytest.mark.parametrize(
    "build, numeric_params",
    [
        (shared_elsewhere, {"chol_diag", "chol_offdiag"}),
        (halfflat_below_diagonal, {"chol_diag", "chol_offdiag"}),
        (scaled_factor, {"chol_diag", "chol_offdiag"}),
        (lkj_shared, {"chol"}),
        (mean_inside_covariance, {"mu"}),
    ],
    ids=["used_elsewhere", "halfflat_below_diagonal", "scaled_factor", "lkj", "mean_in_cov"],
)
def test_unmatched_patterns_go_numeric(build, numeric_params):
    from pm_em.model.analysis import analyze_model
    from pm_em.mstep.closed_form import closed_form_updates
    from pm_em.mstep.inputs import ResponsibilityInputs

    structure = analyze_model(build())
    inputs = ResponsibilityInputs.for_structure(structure)
    updates = closed_form_updates(structure, inputs)
    claimed = {p.name for u in updates for p in u.params}
    assert not numeric_params & claimed

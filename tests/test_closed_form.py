"""Closed-form M-step blocks against the numeric M-step and the seeds' formulas.

Each closed-form block must be the exact maximizer of Q over its parameters given the
others (ECM): the gradient of Q with respect to the block, at the point the block saw
(earlier blocks updated, later ones not), is zero. Where the seeds give a formula it
is checked directly, and every model is fitted both ways to the same MAP.
"""

from __future__ import annotations

import warnings

import numpy as np
import pymc as pm
import pytest
from pytensor.graph.traversal import graph_inputs
from pytensor.tensor.random.type import RandomType
from scipy import optimize

import pm_em
from pm_em.fit.loop import run_em
from pm_em.model.analysis import analyze_model
from pm_em.mstep.inputs import join_flat
from pm_em.routine.graphs import build_em_graphs

RNG = np.random.default_rng(42)
N = 40
X_MIX = np.concatenate([RNG.normal(-2.0, 0.7, 15), RNG.normal(2.5, 1.3, 25)])
COUNTS = np.where(RNG.random(N) < 0.3, 0, RNG.poisson(3.0, N))
WAITS = np.concatenate([RNG.exponential(0.5, 20), RNG.exponential(4.0, 20)])
HEADS = np.concatenate([RNG.binomial(10, 0.8, 10), RNG.binomial(10, 0.35, 10)])


def gmm(mu_prior="normal", sigma_prior="halfnormal", shared_sigma=False, alpha=1.0):
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.full(2, alpha))
        if mu_prior == "normal":
            mu = pm.Normal("mu", 0.0, 3.0, shape=2)
        else:
            mu = pm.Flat("mu", shape=2)
        shape = () if shared_sigma else 2
        if sigma_prior == "halfnormal":
            sigma = pm.HalfNormal("sigma", 2.0, shape=shape)
        elif sigma_prior == "invgamma":
            sigma = pm.InverseGamma("sigma", 3.0, 2.0, shape=shape)
        elif sigma_prior == "halfcauchy":
            sigma = pm.HalfCauchy("sigma", 2.0, shape=shape)
        elif sigma_prior == "exponential":
            sigma = pm.Exponential("sigma", 0.7, shape=shape)
        elif sigma_prior == "halfstudentt":
            sigma = pm.HalfStudentT("sigma", nu=3, sigma=2.0, shape=shape)
        else:
            sigma = pm.HalfFlat("sigma", shape=shape)
        z = pm.Categorical("z", p=w, shape=N)
        pm.Normal("x", mu[z], sigma if shared_sigma else sigma[z], observed=X_MIX)
    return model


def known_scale():
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.array([2.0, 3.0]))
        mu = pm.Normal("mu", 1.0, 2.0, shape=2)
        z = pm.Categorical("z", p=w, shape=N)
        pm.Normal("x", mu[z], np.linspace(0.5, 1.5, N), observed=X_MIX)
    return model


def precision_mixture():
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Normal("mu", 0.0, 3.0, shape=2)
        tau = pm.Gamma("tau", 2.0, 1.0, shape=2)
        z = pm.Categorical("z", p=w, shape=N)
        pm.Normal("x", mu[z], tau=tau[z], observed=X_MIX)
    return model


def hierarchical():
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        center = pm.Normal("center", 0.0, 5.0)
        mu = pm.Normal("mu", center, 2.0, shape=2)
        z = pm.Categorical("z", p=w, shape=N)
        pm.Normal("x", mu[z], 1.0, observed=X_MIX)
    return model


def zip_model():
    with pm.Model() as model:
        psi = pm.Beta("psi", 2.0, 2.0)
        rate = pm.Gamma("rate", 2.0, 0.5)
        z = pm.Bernoulli("z", p=psi, shape=N)
        pm.Poisson("x", mu=z * rate, observed=COUNTS)
    return model


def exponential_mixture():
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        rate = pm.Gamma("rate", 1.5, 1.0, shape=2)
        z = pm.Categorical("z", p=w, shape=N)
        pm.Exponential("x", lam=rate[z], observed=WAITS)
    return model


def two_coins():
    with pm.Model() as model:
        p = pm.Beta("p", 2.0, 2.0, shape=2)
        coin = pm.Bernoulli("coin", p=np.float64(0.5), shape=len(HEADS))
        pm.Binomial("heads", n=10, p=p[coin], observed=HEADS)
    return model


def global_latent():
    """One scalar latent for the whole data set (a change of regime)."""
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.array([2.0, 2.0, 2.0]))
        mu = pm.Normal("mu", 0.0, 5.0, shape=3)
        sigma = pm.HalfNormal("sigma", 2.0)
        k = pm.Categorical("k", p=w)
        pm.Normal("x", mu[k], sigma, observed=X_MIX[:10])
    return model


def latent_trials():
    """The latent is the number of trials (a truncated count), support 1..6."""
    with pm.Model() as model:
        p = pm.Beta("p", 2.0, 2.0)
        n = pm.DiscreteUniform("n", 1, 6, shape=12)
        pm.Binomial("y", n=n, p=p, observed=np.array([0, 1, 2, 3, 1, 0, 2, 4, 5, 1, 3, 2]))
    return model


CLOSED_MODELS = {
    "gmm_normal_halfnormal": (gmm, {"w", "mu", "sigma"}),
    "gmm_flat_halfflat": (lambda: gmm("flat", "halfflat"), {"w", "mu", "sigma"}),
    "gmm_invgamma_shared": (lambda: gmm("normal", "invgamma", True), {"w", "mu", "sigma"}),
    "gmm_halfcauchy": (lambda: gmm(sigma_prior="halfcauchy"), {"w", "mu", "sigma"}),
    "gmm_exponential_shared": (lambda: gmm("flat", "exponential", True), {"w", "mu", "sigma"}),
    "known_scale": (known_scale, {"w", "mu"}),
    "hierarchical": (hierarchical, {"w", "mu", "center"}),
    "precision": (precision_mixture, {"w", "mu", "tau"}),
    "global_latent": (global_latent, {"w", "mu", "sigma"}),
    "latent_trials": (latent_trials, {"p"}),
    "zip": (zip_model, {"psi", "rate"}),
    "exponential": (exponential_mixture, {"w", "rate"}),
    "two_coins": (two_coins, {"p"}),
}

_CACHE: dict = {}


def routines(name):
    """(closed-form EM, all-numeric EM) of a model, compiled once per module."""
    if name not in _CACHE:
        model = CLOSED_MODELS[name][0]()
        _CACHE[name] = (pm_em.EM(model), pm_em.EM(model, closed_form=False))
    return _CACHE[name]


@pytest.mark.parametrize("name", sorted(CLOSED_MODELS))
def test_recognized(name):
    em, _ = routines(name)
    assert set(em.closed_form_params) == CLOSED_MODELS[name][1]


@pytest.mark.parametrize("name", sorted(CLOSED_MODELS))
def test_each_block_maximizes_q_given_the_others(name):
    """ECM: at the point each block saw, Q's gradient in that block vanishes."""
    em, numeric = routines(name)
    start = em.initial_point(random_seed=3)
    values = em.to_values(start)
    log_resp = em.e_step(start)
    new_values = em.to_values(em.m_step(start, log_resp))
    index = {p.name: i for i, p in enumerate(em.params)}
    seen = list(values)
    for update in em.graphs.closed_form:
        for p in update.params:
            seen[index[p.name]] = new_values[index[p.name]]
        theta = join_flat(numeric.params, {p.value.name: v for p, v in zip(em.params, seen)})
        stats = numeric.routine._stats_values(values, log_resp.joint)
        _, gradient = numeric.routine._objective(theta, [], log_resp.joint, stats)
        offset = 0
        for p in numeric.params:
            block = gradient[offset : offset + p.value_size]
            offset += p.value_size
            if p.name in {q.name for q in update.params}:
                np.testing.assert_allclose(block, 0.0, atol=1e-8 * N, err_msg=p.name)


@pytest.mark.parametrize("name", sorted(CLOSED_MODELS))
def test_closed_form_map_is_a_fixed_point_of_the_numeric_m_step(name):
    """EM with closed-form blocks climbs monotonically to a point that the all-numeric
    M-step, given the same responsibilities, leaves where it is."""
    em, numeric = routines(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pm_em.EMConvergenceWarning)
        state, history = run_em(
            em.routine, em.to_values(em.initial_point(5)), tol=1e-13, max_iter=5000
        )
    assert np.all(np.diff(history.logp) >= -1e-9 * abs(history.logp[-1]))
    point = em.to_point(state.values)
    after = numeric.m_step(point, numeric.e_step(point))
    for key, value in point.items():
        np.testing.assert_allclose(after[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert numeric.logp(point) == pytest.approx(state.logp, rel=1e-12)


def test_gmm_step_matches_seed_formulas():
    """Seed 001's M-step: weights are mean responsibilities, means and variances are
    responsibility-weighted moments (flat priors)."""
    em, _ = routines("gmm_flat_halfflat")
    start = em.initial_point(random_seed=1)
    resp = np.exp(em.e_step(start)["z"])
    new = em.m_step(start, em.e_step(start))
    counts = resp.sum(axis=0)
    means = resp.T @ X_MIX / counts
    variances = (resp * (X_MIX[:, None] - means) ** 2).sum(axis=0) / counts
    np.testing.assert_allclose(new["w"], counts / N, rtol=1e-12)
    np.testing.assert_allclose(new["mu"], means, rtol=1e-12)
    np.testing.assert_allclose(new["sigma"], np.sqrt(variances), rtol=1e-12)


def test_zip_step_matches_seed_formulas():
    """Seed's ZIP M-step with Beta(2, 2) and Gamma(2, 0.5) priors: MAP of expected
    counts plus pseudo-counts."""
    em, _ = routines("zip")
    start = {"psi": np.array(0.6), "rate": np.array(1.5)}
    p_poisson = np.exp(em.e_step(start)["z"])[:, 1]
    new = em.m_step(start, em.e_step(start))
    assert new["psi"] == pytest.approx((p_poisson.sum() + 1) / (N + 2), rel=1e-12)
    rate = (p_poisson @ COUNTS + 2 - 1) / (p_poisson.sum() + 0.5)
    assert new["rate"] == pytest.approx(rate, rel=1e-12)


NUMERIC_CASES = {
    # A Dirichlet below 1 can put the mode on the boundary: no closed form.
    "sparse_dirichlet": (lambda: gmm(alpha=0.5), "w"),
    # A HalfStudentT scale prior has no closed-form MAP update.
    "halfstudentt": (lambda: gmm(sigma_prior="halfstudentt"), "sigma"),
}


def shared_location():
    """mu also enters a Potential: it is not a pure Normal location any more."""
    model = gmm()
    with model:
        pm.Potential("pull", -((model["mu"][0] + model["mu"][1]) ** 2))
    return model


def transformed_location():
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Normal("mu", 0.0, 3.0, shape=2)
        z = pm.Categorical("z", p=w, shape=N)
        pm.Normal("x", 2 * mu[z], 1.0, observed=X_MIX)
    return model


@pytest.mark.parametrize(
    "build, numeric_param",
    [
        *NUMERIC_CASES.values(),
        (shared_location, "mu"),
        (transformed_location, "mu"),
    ],
    ids=[*NUMERIC_CASES, "shared_location", "transformed_location"],
)
def test_unmatched_patterns_go_numeric(build, numeric_param):
    from pm_em.model.analysis import analyze_model
    from pm_em.mstep.closed_form import closed_form_updates
    from pm_em.mstep.inputs import ResponsibilityInputs

    structure = analyze_model(build())
    inputs = ResponsibilityInputs.for_structure(structure)
    updates = closed_form_updates(structure, inputs)
    claimed = {p.name for u in updates for p in u.params}
    assert numeric_param not in claimed


@pytest.mark.parametrize("name", ["gmm_normal_halfnormal", "known_scale"])
def test_numeric_objective_reads_no_random_variable(name):
    """The numeric M-step's graph reads the value variables only. The core shape of
    the Categorical's ``p=w`` used to be read from the random variable ``w``, which
    kept its RNG in the objective: compiling for JAX then had to rewrite the whole
    graph to drop it (about 1 s per routine)."""
    model = CLOSED_MODELS[name][0]()
    # The graphs as built (compiling may rewrite them in place).
    graphs = build_em_graphs(analyze_model(model, None), closed_form=False)
    rngs = [
        v
        for v in graph_inputs([graphs.objective, graphs.gradient])
        if isinstance(v.type, RandomType)
    ]
    assert rngs == []


def test_numeric_objective_on_statistics_matches_q():
    """The numeric block's objective, evaluated on expected sufficient statistics, has
    the differences of Q computed entry by entry in NumPy."""
    from scipy import stats

    em = pm_em.EM(gmm(sigma_prior="halfstudentt"), closed_form=False)
    assert set(em.graphs.numeric.on_statistics) == {"x", "z"}
    start = em.initial_point(random_seed=2)
    log_resp = em.e_step(start)
    resp = np.exp(log_resp["z"])
    values = em.to_values(start)
    statistics = em.routine._stats_values(values, log_resp.joint)

    def objective(point):
        theta = join_flat(em.params, dict(zip([p.value.name for p in em.params], point)))
        return float(em.routine._objective(theta, [], log_resp.joint, statistics)[0])

    def q_numpy(point):
        w, mu, sigma = point["w"], point["mu"], point["sigma"]
        complete = np.log(w) + stats.norm.logpdf(X_MIX[:, None], mu, sigma)
        prior = stats.norm.logpdf(mu, 0, 3).sum() + stats.t.logpdf(sigma, 3, scale=2).sum()
        return (resp * complete).sum() + prior + stats.dirichlet.logpdf(w, np.ones(2))

    other = {"w": np.array([0.2, 0.8]), "mu": np.array([-1.0, 2.0]), "sigma": np.array([0.5, 2])}
    got = objective(em.to_values(other)) - objective(values)
    assert got == pytest.approx(q_numpy(other) - q_numpy(start), rel=1e-10)


def test_latent_term_collapses_to_expected_counts():
    """Peppered-moth style: a latent with a non-conjugate prior and discrete data."""
    with pm.Model() as model:
        freq = pm.Dirichlet("freq", np.ones(2))
        g = pm.Categorical(
            "g", p=pm.math.stack([freq[0] ** 2, 2 * freq[0] * freq[1], freq[1] ** 2]), shape=N
        )
        table = np.array([[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]])
        pm.Categorical("y", p=pm.math.constant(table)[g], observed=(X_MIX > 0).astype("int64"))
    em = pm_em.EM(model)
    assert em.closed_form_params == []
    # y does not involve freq given g: it only enters through the responsibilities.
    assert em.graphs.numeric.on_statistics == ["g"]
    state, history = run_em(
        em.routine, em.to_values({"freq": np.array([0.3, 0.7])}), tol=1e-12, max_iter=500
    )
    assert np.all(np.diff(history.logp) >= -1e-9 * abs(history.logp[-1]))
    # The MAP of a flat Dirichlet: the root of the observed-data score.
    y = (X_MIX > 0).astype(int)

    def score(p):
        hw = np.array([p**2, 2 * p * (1 - p), (1 - p) ** 2])
        d_hw = np.array([2 * p, 2 - 4 * p, -2 * (1 - p)])
        return sum(np.sum(y == v) * (d_hw @ table[:, v]) / (hw @ table[:, v]) for v in (0, 1))

    expected = optimize.brentq(score, 1e-6, 1 - 1e-6)
    assert history.converged
    assert em.to_point(state.values)["freq"][0] == pytest.approx(expected, abs=1e-5)


def test_discrete_observations_collapse_to_distinct_values():
    """A Poisson mixture with a prior that has no closed form: the counts enter the
    numeric objective as expected counts per distinct value."""
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        rate = pm.LogNormal("rate", 0.0, 1.0, shape=2)
        z = pm.Categorical("z", p=w, shape=N)
        pm.Poisson("x", mu=rate[z], observed=COUNTS)
    em = pm_em.EM(model)
    assert em.closed_form_params == ["w"]
    assert em.graphs.numeric.on_statistics == ["x"]
    state, history = run_em(em.routine, em.to_values(em.initial_point(1)), tol=1e-13, max_iter=2000)
    assert np.all(np.diff(history.logp) >= -1e-9 * abs(history.logp[-1]))
    numeric = pm_em.EM(model, closed_form=False)
    point = em.to_point(state.values)
    after = numeric.m_step(point, numeric.e_step(point))
    np.testing.assert_allclose(after["rate"], point["rate"], rtol=1e-5)

"""The engine on Markov-chain latents, checked against PyMC's own joint density.

Independent of any HMM code: on a tiny chain every state path can be listed, and
PyMC's compiled joint log-density (chain fixed to that path) summed over all paths
gives the observed-data log-posterior, the state marginals, the expected transition
counts and the Viterbi path exactly. Also: the closed-form Baum-Welch updates against
the numeric M-step, several sequences, the pointwise log-likelihood, and the models
the engine must refuse.
"""

import itertools

import numpy as np
import pymc as pm
import pytest
from scipy.special import logsumexp

import pm_em
from pm_em.errors import UnsupportedModelError
from tests.references.brute_force import enumerate_model

pmx = pytest.importorskip("pymc_extras")

N_STATES = 3
N_STEPS = 5
# One full start, so that fits of the same data in two forms take the same path.
BATCH_START = {
    "P": np.full((N_STATES, N_STATES), 0.2) + 0.4 * np.eye(N_STATES),
    "pi": np.full(N_STATES, 1 / N_STATES),
    "mu": np.array([-1.0, 0.1, 1.0]),
    "sigma": np.ones(N_STATES),
}


def _tiny_model(y, n_sequences=None):
    """A 3-state Gaussian HMM with proper priors (so the MAP is interior)."""
    dims = ("seq", "time") if n_sequences else ("time",)
    coords = {"time": range(y.shape[-1]), "state": range(N_STATES)}
    if n_sequences:
        coords["seq"] = range(n_sequences)
    with pm.Model(coords=coords) as model:
        P = pm.Dirichlet("P", a=np.full((N_STATES, N_STATES), 2.0) + 3 * np.eye(N_STATES))
        pi = pm.Dirichlet("pi", a=np.full(N_STATES, 2.0), dims="state")
        mu = pm.Normal("mu", 0.0, 5.0, dims="state")
        # Keeps every state's scale away from 0 (a state on one point is a spike).
        sigma = pm.InverseGamma("sigma", 3.0, 2.0, dims="state")
        s = pmx.DiscreteMarkovChain("s", P=P, init_dist=pm.Categorical.dist(p=pi), dims=dims)
        pm.Normal("y", mu=mu[s], sigma=sigma[s], observed=y, dims=dims)
    return model


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(5)
    y = rng.normal([-1.0, 0.5, 2.0, 2.2, -0.7], 0.3)
    model = _tiny_model(y)
    em = pm_em.EM(model)
    point = {
        "P": np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.25, 0.25, 0.5]]),
        "pi": np.array([0.5, 0.3, 0.2]),
        "mu": np.array([-1.0, 0.0, 2.0]),
        "sigma": np.array([0.5, 1.0, 0.8]),
    }
    return model, em, point


def _path_logps(model, point):
    """PyMC's joint log-density (no Jacobian) at ``point`` for every state path."""
    exact = enumerate_model(model, point, {"s": range(N_STATES)})
    return exact.configurations["s"], exact.log_joint


@pytest.fixture(scope="module")
def brute_force(tiny):
    model, _, point = tiny
    return _path_logps(model, point)


def test_logp_is_the_sum_over_paths(tiny, brute_force):
    _, em, point = tiny
    _, path_logps = brute_force
    np.testing.assert_allclose(em.logp(point), logsumexp(path_logps), rtol=1e-10)


def test_state_marginals_and_transition_counts(tiny, brute_force):
    _, em, point = tiny
    paths, path_logps = brute_force
    weights = np.exp(path_logps - logsumexp(path_logps))
    marginals = np.zeros((N_STEPS, N_STATES))
    counts = np.zeros((N_STATES, N_STATES))
    for path, weight in zip(paths, weights):
        marginals[np.arange(N_STEPS), path] += weight
        np.add.at(counts, (path[:-1], path[1:]), weight)
    log_resp = em.e_step(point)
    np.testing.assert_allclose(np.exp(log_resp["s"]), marginals, atol=1e-12)
    np.testing.assert_allclose(log_resp.transition_counts["s"], counts, atol=1e-12)


def test_viterbi_path_in_the_result(tiny):
    model, _, point = tiny
    idata = pm_em.find_MAP(model, initvals=point, progressbar=False)
    fitted = {name: idata.posterior[name].values[0, 0] for name in point}
    paths, path_logps = _path_logps(model, fitted)
    np.testing.assert_array_equal(idata.posterior["s"].values[0, 0], paths[np.argmax(path_logps)])
    assert idata.posterior["lp_s"].dims[-1] == "lp_s_dim"
    assert idata.posterior["s"].dims == ("chain", "draw", "time")


def test_closed_form_matches_numeric_m_step(tiny):
    """One M-step agrees on the chain's own parameters (their block of Q is separate
    from the others'); ECM and the joint numeric M-step share their fixed point."""
    model, em, point = tiny
    assert set(em.closed_form_params) == {"P", "pi", "mu", "sigma"}
    numeric = pm_em.EM(model, closed_form=False)
    closed = em.m_step(point, em.e_step(point))
    solved = numeric.m_step(point, numeric.e_step(point))
    for name in ("P", "pi"):
        np.testing.assert_allclose(closed[name], solved[name], rtol=1e-7)
    for _ in range(300):
        closed = em.m_step(closed, em.e_step(closed))
        solved = numeric.m_step(solved, numeric.e_step(solved))
    for name in point:
        np.testing.assert_allclose(closed[name], solved[name], rtol=1e-5, atol=1e-8)


def test_m_step_needs_the_e_step_object(tiny):
    _, em, point = tiny
    log_resp = em.e_step(point)
    with pytest.raises(ValueError, match="Markov chain"):
        em.m_step(point, dict(log_resp))


@pytest.fixture(scope="module")
def batch_fit():
    rng = np.random.default_rng(11)
    n_sequences, n_steps = 3, 40
    states = np.zeros((n_sequences, n_steps), dtype=int)
    transition = np.array([[0.85, 0.1, 0.05], [0.1, 0.8, 0.1], [0.05, 0.15, 0.8]])
    for b, t in itertools.product(range(n_sequences), range(1, n_steps)):
        states[b, t] = rng.choice(N_STATES, p=transition[states[b, t - 1]])
    y = rng.normal(np.array([-2.0, 0.0, 2.5])[states], 0.6)
    model = _tiny_model(y, n_sequences)
    start = BATCH_START
    idata = pm_em.find_MAP(model, initvals=start, tol=1e-12, progressbar=False)
    return model, y, idata


def test_several_sequences(batch_fit):
    model, y, idata = batch_fit
    logp = idata.em_stats["logp"].values
    assert np.all(np.diff(logp) >= -1e-9 * np.abs(logp[1:]))
    assert idata.posterior["lp_s"].shape == (1, 1, *y.shape, N_STATES)
    assert idata.posterior["s"].shape == (1, 1, *y.shape)
    # Each sequence's posterior state probabilities sum to one.
    np.testing.assert_allclose(np.exp(idata.posterior["lp_s"].values).sum(-1), 1.0, rtol=1e-10)


def test_pointwise_loglik_adds_up(batch_fit):
    model, y, idata = batch_fit
    em = pm_em.EM(model)
    fitted = {name: idata.posterior[name].values[0, 0] for name in ("P", "pi", "mu", "sigma")}
    priors = model.compile_logp(
        vars=[model[n] for n in fitted], jacobian=False, mode="FAST_COMPILE"
    )({**dict(zip([p.value.name for p in em.params], em.to_values(fitted))), "s": 0 * y})
    loglik = idata.log_likelihood["y"]
    assert loglik.dims == ("chain", "draw", "seq", "time")
    np.testing.assert_allclose(float(loglik.sum()) + priors, em.logp(fitted), rtol=1e-10)


# -- refused ------------------------------------------------------------------------


def test_second_order_chain_is_refused():
    with pm.Model() as model:
        P = pm.Dirichlet("P", a=np.ones((2, 2, 2)))
        s = pmx.DiscreteMarkovChain(
            "s", P=P, n_lags=2, init_dist=pm.Categorical.dist(p=[0.5, 0.5]), shape=(6,)
        )
        pm.Normal("y", mu=s, sigma=1.0, observed=np.zeros(6))
    with pytest.raises(UnsupportedModelError, match="n_lags=2"):
        pm_em.EM(model)


def test_chain_sharing_a_term_with_another_latent_is_refused():
    with pm.Model() as model:
        P = pm.Dirichlet("P", a=np.ones((2, 2)))
        s = pmx.DiscreteMarkovChain("s", P=P, init_dist=pm.Categorical.dist(p=[0.5, 0.5]), shape=4)
        z = pm.Bernoulli("z", 0.5, shape=4)
        pm.Normal("y", mu=s + z, sigma=1.0, observed=np.zeros(4))
    with pytest.raises(UnsupportedModelError, match="Markov chain 's'"):
        pm_em.EM(model)


def test_emission_on_two_states_is_refused():
    with pm.Model() as model:
        P = pm.Dirichlet("P", a=np.ones((2, 2)))
        s = pmx.DiscreteMarkovChain("s", P=P, init_dist=pm.Categorical.dist(p=[0.5, 0.5]), shape=5)
        pm.Normal("y", mu=s[1:] + s[:-1], sigma=1.0, observed=np.zeros(4))
    with pytest.raises(UnsupportedModelError, match="combines several elements"):
        pm_em.EM(model)


def test_separate_chains_equal_a_batch(batch_fit):
    """Sequences given as separate chain variables (how sequences of different
    lengths are declared) fit exactly as the same sequences batched."""
    _, y, batched = batch_fit
    with pm.Model(coords={"state": range(N_STATES)}) as model:
        P = pm.Dirichlet("P", a=np.full((N_STATES, N_STATES), 2.0) + 3 * np.eye(N_STATES))
        pi = pm.Dirichlet("pi", a=np.full(N_STATES, 2.0), dims="state")
        mu = pm.Normal("mu", 0.0, 5.0, dims="state")
        sigma = pm.InverseGamma("sigma", 3.0, 2.0, dims="state")
        for b, sequence in enumerate(y):
            s = pmx.DiscreteMarkovChain(
                f"s{b}", P=P, init_dist=pm.Categorical.dist(p=pi), shape=len(sequence)
            )
            pm.Normal(f"y{b}", mu=mu[s], sigma=sigma[s], observed=sequence)
    start = BATCH_START
    separate = pm_em.find_MAP(model, initvals=start, tol=1e-12, progressbar=False)
    for name in ("P", "pi", "mu", "sigma"):
        np.testing.assert_allclose(
            separate.posterior[name].values, batched.posterior[name].values, rtol=1e-5
        )
    np.testing.assert_allclose(
        separate.em_stats["logp"].values[-1], batched.em_stats["logp"].values[-1], rtol=1e-10
    )

"""Hidden Markov models: pm_em's Baum–Welch against a NumPy reference and hmmlearn.

A latent declared with ``pymc_extras.DiscreteMarkovChain`` is fitted by Baum–Welch:
a forward–backward E-step, closed-form Dirichlet updates of the transition rows and
of the initial distribution, emissions through the mixture machinery. Three layers,
each usable to locate a disagreement:

* the NumPy reference (``tests.references.hmm``) against brute-force enumeration of every
  state path and against hmmlearn 0.3 from the same start (no PyMC, no pm_em). The
  hmmlearn settings that give the plain MLE are listed in ``tests.references.hmm``'s
  docstring and pinned down by ``test_hmmlearn_*`` below;
* each PyMC model against the reference's complete-data log-density, with the chain
  fixed (PyMC and pymc-extras only: is the model the intended one?);
* ``pm_em.find_MAP`` on each model against the reference and hmmlearn from the same
  start, both run to their noise floor: parameters, log state marginals ``lp_s``,
  the Viterbi path ``s``, the ``em_stats`` trace.

The cases: a 3-state Gaussian HMM, a 2-state Poisson HMM, a batch of three Gaussian
sequences sharing ``P``, and a Gaussian HMM under informative priors (Dirichlet(2)
rows and initial distribution, a Normal prior on the means), which only the
reference covers (hmmlearn's mean prior is a Normal–inverse-gamma one, not PyMC's
independent Normal).

pymc-extras conventions checked here: ``dims="time"`` of length ``T`` gives a chain of
``T`` states (``steps = T - 1``, the last dimension is ``steps + 1``); ``P`` is
indexed ``[from, to]`` and needs coords for both of its dims.
"""

from collections.abc import Callable
from typing import NamedTuple

import arviz as az
import numpy as np
import pymc as pm
import pytest
from scipy import special

from tests.helpers import ENGINE_TOL, MAX_ITER, at_map
from tests.references import hmm as ref

pmx = pytest.importorskip("pymc_extras")
hmmlearn_hmm = pytest.importorskip("hmmlearn.hmm")


# pm_em's tol is on the change of the log-posterior per observation; the reference
# and hmmlearn take an absolute change, so they get ENGINE_TOL * N. At N of a few
# hundred that is a few 1e-12, the rounding floor of the summed log-likelihood: every
# method stops at its noise floor, where the parameters agree far inside RTOL (in a
# trial run, stopping at an absolute 1e-12 rather than 1e-13 moved no parameter by
# more than 4e-6 relative, and that one a mean near zero).
RTOL = 1e-5
# Probabilities that head for zero (a single sequence's initial distribution goes to
# a vertex geometrically) are compared on an absolute scale.
ATOL = 1e-8


# ==========================================================================
# Data, models and fits.
# ==========================================================================


def simulate_chain(rng, P, pi, n_steps):
    """One state path of a Markov chain with transition rows ``P`` and start ``pi``."""
    states = np.empty(n_steps, dtype=int)
    states[0] = rng.choice(len(pi), p=pi)
    for t in range(1, n_steps):
        states[t] = rng.choice(len(pi), p=P[states[t - 1]])
    return states


def build_gaussian_hmm(y, *, dirichlet_a=1.0, mean_prior=None):
    """K-state Gaussian HMM; ``y`` is ``(T,)`` or a batch ``(n_sequences, T)``.

    ``dirichlet_a`` is the concentration of ``P``'s rows and of ``pi``; ``mean_prior``
    ``(m0, s0)`` puts ``Normal(m0, s0)`` on each mean (``Flat`` otherwise).
    """
    n_states = 3
    time_dims = ("sequence", "time") if y.ndim == 2 else ("time",)
    coords = {
        "state": np.arange(n_states),
        "state_from": np.arange(n_states),
        "time": np.arange(y.shape[-1]),
    }
    if y.ndim == 2:
        coords["sequence"] = np.arange(y.shape[0])
    concentration = np.full((n_states, n_states), float(dirichlet_a))
    with pm.Model(coords=coords) as model:
        P = pm.Dirichlet("P", a=concentration, dims=("state_from", "state"))
        pi = pm.Dirichlet("pi", a=concentration[0], dims="state")
        if mean_prior is None:
            mu = pm.Flat("mu", dims="state")
        else:
            mu = pm.Normal("mu", mu=mean_prior[0], sigma=mean_prior[1], dims="state")
        sigma = pm.HalfFlat("sigma", dims="state")
        s = pmx.DiscreteMarkovChain("s", P=P, init_dist=pm.Categorical.dist(p=pi), dims=time_dims)
        pm.Normal("y", mu=mu[s], sigma=sigma[s], observed=y, dims=time_dims)
    return model


def build_poisson_hmm(y):
    """2-state Poisson HMM with flat priors."""
    coords = {"state": [0, 1], "state_from": [0, 1], "time": np.arange(len(y))}
    with pm.Model(coords=coords) as model:
        P = pm.Dirichlet("P", a=np.ones((2, 2)), dims=("state_from", "state"))
        pi = pm.Dirichlet("pi", a=np.ones(2), dims="state")
        lam = pm.HalfFlat("lam", dims="state")
        s = pmx.DiscreteMarkovChain("s", P=P, init_dist=pm.Categorical.dist(p=pi), dims="time")
        pm.Poisson("y", mu=lam[s], observed=y, dims="time")
    return model


GAUSSIAN_P = np.array([[0.90, 0.05, 0.05], [0.10, 0.80, 0.10], [0.05, 0.15, 0.80]])
GAUSSIAN_PI = np.array([0.5, 0.3, 0.2])
# Means away from zero, so that a relative tolerance means something for each.
GAUSSIAN_MU = np.array([-3.0, 1.0, 4.0])
GAUSSIAN_SIGMA = np.array([0.7, 0.5, 1.0])
GAUSSIAN_START = {
    "P": np.full((3, 3), 0.1) + 0.7 * np.eye(3),
    "pi": np.full(3, 1 / 3),
    "mu": np.array([-2.0, 0.5, 3.0]),
    "sigma": np.ones(3),
}


def simulate_gaussian(seed, n_steps, n_sequences=None):
    """Observations of the Gaussian HMM: ``(n_steps,)``, or ``(n_sequences, n_steps)``."""
    rng = np.random.default_rng(seed)
    shape = (n_sequences or 1, n_steps)
    states = np.stack(
        [simulate_chain(rng, GAUSSIAN_P, GAUSSIAN_PI, n_steps) for _ in range(shape[0])]
    )
    y = rng.normal(GAUSSIAN_MU[states], GAUSSIAN_SIGMA[states])
    return y if n_sequences else y[0]


POISSON_P = np.array([[0.95, 0.05], [0.10, 0.90]])
POISSON_LAM = np.array([2.0, 9.0])
POISSON_START = {
    "P": np.array([[0.8, 0.2], [0.2, 0.8]]),
    "pi": np.array([0.5, 0.5]),
    "lam": np.array([1.0, 5.0]),
}


def simulate_poisson(seed, n_steps):
    """Counts of the Poisson HMM, shape ``(n_steps,)``."""
    rng = np.random.default_rng(seed)
    states = simulate_chain(rng, POISSON_P, np.array([0.5, 0.5]), n_steps)
    return rng.poisson(POISSON_LAM[states])


class HMMCase(NamedTuple):
    """One fitted problem: data, model, common start, and the priors' settings."""

    y: np.ndarray
    model: pm.Model
    emission: str
    start: dict
    priors: dict  # keyword arguments of ref.baum_welch / ref.log_prior
    hmmlearn: bool  # whether hmmlearn fits the same posterior

    @property
    def n_obs(self) -> int:
        return self.y.size

    @property
    def sequences(self) -> list[np.ndarray]:
        return ref.as_sequences(self.y)


#: ``(m0, s0)`` of the prior case's Normal prior on each mean: tight enough to move
#: the outer means (-3 and 4) visibly from the MLE.
MEAN_PRIOR = (0.0, 1.5)


def gaussian_case() -> HMMCase:
    """3-state Gaussian HMM, T = 300, flat priors."""
    y = simulate_gaussian(11, 300)
    return HMMCase(y, build_gaussian_hmm(y), "gaussian", GAUSSIAN_START, {}, True)


def poisson_case() -> HMMCase:
    """2-state Poisson HMM, T = 400, flat priors."""
    y = simulate_poisson(12, 400)
    return HMMCase(y, build_poisson_hmm(y), "poisson", POISSON_START, {}, True)


def batch_case() -> HMMCase:
    """Three Gaussian sequences of 150 steps sharing every parameter."""
    y = simulate_gaussian(13, 150, n_sequences=3)
    return HMMCase(y, build_gaussian_hmm(y), "gaussian", GAUSSIAN_START, {}, True)


def prior_case() -> HMMCase:
    """Gaussian HMM under Dirichlet(2) rows and start, and Normal(0, 1.5) means."""
    y = simulate_gaussian(14, 300)
    model = build_gaussian_hmm(y, dirichlet_a=2.0, mean_prior=MEAN_PRIOR)
    priors = {"transition_prior": 2.0, "initial_prior": 2.0, "mean_prior": MEAN_PRIOR}
    return HMMCase(y, model, "gaussian", GAUSSIAN_START, priors, False)


CASE_BUILDERS: dict[str, Callable[[], HMMCase]] = {
    "gaussian": gaussian_case,
    "poisson": poisson_case,
    "batch": batch_case,
    "prior": prior_case,
}


def fit_hmmlearn(case: HMMCase, tol: float):
    """hmmlearn's Baum–Welch from ``case.start``, unregularised (see tests.references.hmm)."""
    n_states = len(case.start["pi"])
    common = {"init_params": "", "n_iter": MAX_ITER, "tol": tol}
    if case.emission == "gaussian":
        model = hmmlearn_hmm.GaussianHMM(
            n_states,
            covariance_type="diag",
            covars_prior=0.0,
            covars_weight=1.0,
            params="stmc",
            **common,
        )
        model.means_ = case.start["mu"][:, None]
        model.covars_ = case.start["sigma"][:, None] ** 2  # variances
    else:
        model = hmmlearn_hmm.PoissonHMM(n_states, params="stl", **common)
        model.lambdas_ = case.start["lam"][:, None]
    model.startprob_ = case.start["pi"]
    model.transmat_ = case.start["P"]
    lengths = [len(seq) for seq in case.sequences]
    return model.fit(np.concatenate(case.sequences)[:, None], lengths=lengths)


def hmmlearn_params(model) -> dict[str, np.ndarray]:
    """A fitted hmmlearn model's parameters under the PyMC models' names."""
    params = {"P": model.transmat_, "pi": model.startprob_}
    if isinstance(model, hmmlearn_hmm.GaussianHMM):
        params["mu"] = model.means_[:, 0]
        params["sigma"] = np.sqrt(model.covars_[:, 0, 0])  # covars_ are variances
    else:
        params["lam"] = model.lambdas_[:, 0]
    return params


@pytest.fixture(scope="module", params=list(CASE_BUILDERS))
def case(request) -> HMMCase:
    return CASE_BUILDERS[request.param]()


@pytest.fixture(scope="module")
def reference(case):
    """The reference Baum–Welch from the common start, to its noise floor."""
    return ref.baum_welch(
        case.y,
        case.start,
        emission=case.emission,
        tol=ENGINE_TOL * case.n_obs,
        max_iter=MAX_ITER,
        **case.priors,
    )


@pytest.fixture(scope="module")
def hmmlearn_fit(case):
    if not case.hmmlearn:
        pytest.skip("hmmlearn has no independent Normal prior on the means")
    return fit_hmmlearn(case, tol=ENGINE_TOL * case.n_obs)


def _fitted(case, idata):
    return {name: at_map(idata.posterior, name) for name in case.start}


def _assert_params_close(actual, expected, rtol=RTOL, atol=ATOL, what=""):
    assert set(actual) >= set(expected), (sorted(actual), sorted(expected))
    for name, value in expected.items():
        np.testing.assert_allclose(
            actual[name], value, rtol=rtol, atol=atol, err_msg=f"{what} parameter {name!r}"
        )


# ==========================================================================
# (a) The reference on its own: brute force and hmmlearn.
# ==========================================================================


@pytest.fixture
def tiny_chain(rng):
    """A 3-state chain of 6 steps (729 paths), with one forbidden transition."""
    P = rng.dirichlet(np.ones(3), size=3)
    P[0, 2] = 0.0
    P[0] /= P[0].sum()
    log_emission = rng.normal(scale=2.0, size=(6, 3))
    return ref.safe_log(np.array([0.2, 0.5, 0.3])), ref.safe_log(P), log_emission


def test_reference_forward_backward_matches_brute_force(tiny_chain):
    expected, _ = ref.brute_force(*tiny_chain)
    actual = ref.forward_backward(*tiny_chain)
    np.testing.assert_allclose(actual.loglik, expected.loglik, rtol=1e-12)
    np.testing.assert_allclose(actual.log_predictive, expected.log_predictive, rtol=1e-10)
    np.testing.assert_allclose(actual.log_gamma, expected.log_gamma, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        actual.transition_counts, expected.transition_counts, rtol=1e-10, atol=1e-14
    )
    assert actual.transition_counts[0, 2] == 0.0
    np.testing.assert_allclose(actual.transition_counts.sum(), 5.0, rtol=1e-12)


def test_reference_viterbi_matches_brute_force(tiny_chain):
    _, expected_path = ref.brute_force(*tiny_chain)
    path, log_joint = ref.viterbi(*tiny_chain)
    np.testing.assert_array_equal(path, expected_path)
    log_init, log_trans, log_emission = tiny_chain
    direct = (
        log_init[path[0]]
        + log_trans[path[:-1], path[1:]].sum()
        + log_emission[np.arange(len(path)), path].sum()
    )
    np.testing.assert_allclose(log_joint, direct, rtol=1e-12)


def test_reference_log_space_survives_long_chains(rng):
    """No underflow where a product of probabilities would reach 1e-300 long before."""
    y = rng.normal(size=5000) * 30.0
    params = {
        "pi": np.full(2, 0.5),
        "P": np.full((2, 2), 0.5),
        "mu": [0.0, 1.0],
        "sigma": [1.0, 2.0],
    }
    (post,) = ref.posteriors(y, params, "gaussian")
    assert np.isfinite(post.loglik) and post.loglik < -1e5
    # Normalised messages: the rounding error stays at machine precision, not at
    # eps * |log p(y)| (1e-8 here) as unnormalised log messages would give.
    np.testing.assert_allclose(special.logsumexp(post.log_gamma, axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(post.log_predictive.sum(), post.loglik, rtol=1e-15)


def test_reference_em_never_decreases_the_log_posterior(case, reference):
    assert reference.converged
    increments = np.diff(reference.logpost_trace)
    assert np.all(increments >= -1e-10 * abs(reference.logpost)), increments.min()


def test_reference_matches_hmmlearn(case, reference, hmmlearn_fit):
    """From the same start, to their noise floors, the two Baum–Welch agree."""
    _assert_params_close(hmmlearn_params(hmmlearn_fit), reference.estimates, what="hmmlearn")
    X = np.concatenate(case.sequences)[:, None]
    lengths = [len(seq) for seq in case.sequences]
    np.testing.assert_allclose(hmmlearn_fit.score(X, lengths), reference.loglik, rtol=1e-9)
    gamma = hmmlearn_fit.predict_proba(X, lengths)
    np.testing.assert_allclose(gamma, np.exp(np.concatenate(reference.log_gamma)), atol=1e-5)


def test_reference_viterbi_matches_hmmlearn(case, hmmlearn_fit):
    X = np.concatenate(case.sequences)[:, None]
    lengths = [len(seq) for seq in case.sequences]
    ours = ref.viterbi_paths(case.y, hmmlearn_params(hmmlearn_fit), case.emission)
    np.testing.assert_array_equal(np.concatenate(ours), hmmlearn_fit.predict(X, lengths))


def test_hmmlearn_default_covars_prior_is_not_the_mle():
    """One hmmlearn iteration against one reference M-step, from the same start.

    With ``covars_prior=0`` the variances are the reference's ``sigma**2``; with the
    default ``covars_prior=1e-2`` each is ``1e-2 / occupancy`` larger: the default
    regularises, so tests must switch it off.
    """
    case = CASE_BUILDERS["gaussian"]()
    post = ref.posteriors(case.y, case.start, "gaussian")
    expected = ref.m_step(case.y, case.start, post, "gaussian")
    occupancy = np.exp(post[0].log_gamma).sum(axis=0)
    for covars_prior in (0.0, 1e-2):
        model = hmmlearn_hmm.GaussianHMM(
            3, covariance_type="diag", covars_prior=covars_prior, init_params="", n_iter=1
        )
        model.startprob_, model.transmat_ = case.start["pi"], case.start["P"]
        model.means_, model.covars_ = case.start["mu"][:, None], case.start["sigma"][:, None] ** 2
        model.fit(case.y[:, None])
        np.testing.assert_allclose(
            model.covars_[:, 0, 0], expected["sigma"] ** 2 + covars_prior / occupancy, rtol=1e-8
        )
        np.testing.assert_allclose(model.means_[:, 0], expected["mu"], rtol=1e-8)
        np.testing.assert_allclose(model.transmat_, expected["P"], rtol=1e-8)


def test_hmmlearn_dirichlet_priors_are_pseudo_counts():
    """``startprob_prior = transmat_prior = a`` is the reference's Dirichlet(a) MAP."""
    case = CASE_BUILDERS["poisson"]()
    expected = ref.baum_welch(
        case.y, case.start, emission="poisson", tol=1e-11, transition_prior=2.0, initial_prior=2.0
    )
    model = hmmlearn_hmm.PoissonHMM(
        2, startprob_prior=2.0, transmat_prior=2.0, init_params="", n_iter=MAX_ITER, tol=1e-11
    )
    model.startprob_, model.transmat_ = case.start["pi"], case.start["P"]
    model.lambdas_ = case.start["lam"][:, None]
    model.fit(case.y[:, None])
    _assert_params_close(hmmlearn_params(model), expected.estimates, what="hmmlearn")


def test_reference_prior_case_is_a_stationary_point():
    """The ECM fixed point under the Normal mean prior zeroes the log-posterior's gradient.

    Checks the reference's MAP update (the case hmmlearn cannot) by central
    differences in ``mu`` and ``log sigma``, the other parameters at the fit.
    """
    case = CASE_BUILDERS["prior"]()
    fit = ref.baum_welch(case.y, case.start, emission="gaussian", tol=1e-11, **case.priors)

    def log_posterior(mu, log_sigma):
        params = fit.estimates | {"mu": mu, "sigma": np.exp(log_sigma)}
        loglik = sum(p.loglik for p in ref.posteriors(case.y, params, "gaussian"))
        return loglik + ref.log_prior(params, **case.priors)

    mu, log_sigma = fit.estimates["mu"], np.log(fit.estimates["sigma"])
    step = 1e-5
    for k in range(3):
        bump = step * np.eye(3)[k]
        d_mu = (log_posterior(mu + bump, log_sigma) - log_posterior(mu - bump, log_sigma)) / (
            2 * step
        )
        d_sigma = (log_posterior(mu, log_sigma + bump) - log_posterior(mu, log_sigma - bump)) / (
            2 * step
        )
        assert abs(d_mu) < 1e-4 and abs(d_sigma) < 1e-4, (k, d_mu, d_sigma)
    # The prior matters here: the MLE is elsewhere.
    mle = ref.baum_welch(case.y, case.start, emission="gaussian", tol=1e-11)
    assert np.max(np.abs(mle.estimates["mu"] - fit.estimates["mu"])) > 1e-3


# ==========================================================================
# (b) The PyMC models against the reference (no pm_em).
# ==========================================================================


def _unconstrained_point(model, point):
    """Constrained values to the value variables ``compile_logp`` takes.

    ``remove_value_transforms`` would do, but refuses models with initvals; this works
    for every model here.
    """
    values = {}
    for rv in model.free_RVs:
        value = np.asarray(point[rv.name])
        transform = model.rvs_to_transforms.get(rv)
        name = model.rvs_to_values[rv].name
        values[name] = (
            value
            if transform is None
            else transform.forward(value, *rv.owner.inputs).eval(mode="FAST_COMPILE")
        )
    return values


def test_chain_length_follows_dims(case):
    """``dims="time"`` of length T makes a chain of T states: ``steps = T - 1``."""
    s = case.model["s"]
    n_steps = s.owner.inputs[1]
    assert int(n_steps.eval(mode="FAST_COMPILE")) == case.y.shape[-1] - 1
    assert case.model.named_vars_to_dims["s"] == case.model.named_vars_to_dims["y"]


def test_model_complete_data_logp_matches_reference(case, reference):
    """With the chain fixed at its Viterbi path, the model's log-density (no Jacobian)
    is the reference's log joint plus its log prior."""
    params = reference.estimates
    paths = np.stack(ref.viterbi_paths(case.y, params, case.emission))
    point = dict(params) | {"s": paths.reshape(case.y.shape)}
    model_logp = case.model.compile_logp(jacobian=False, mode="FAST_COMPILE")(
        _unconstrained_point(case.model, point)
    )
    log_pi, log_P = ref.safe_log(params["pi"]), ref.safe_log(params["P"])
    expected = ref.log_prior(params, **case.priors)
    for seq, path in zip(case.sequences, paths):
        table = ref.EMISSIONS[case.emission](seq, params)
        expected += (
            log_pi[path[0]]
            + log_P[path[:-1], path[1:]].sum()
            + table[np.arange(len(path)), path].sum()
        )
    np.testing.assert_allclose(model_logp, expected, rtol=1e-10)


def test_batched_chain_needs_initvals_for_its_default_point():
    """pymc-extras 0.10: a chain with batch dims has no default initial point.

    Its support point (a greedy scan) rejects a batched init_dist, so
    ``model.initial_point()`` raises. ``find_MAP`` on such a model must not rely on
    the chain's default point (the batch case below gives initvals for every
    parameter, none for ``s``).
    """
    model = CASE_BUILDERS["batch"]().model
    with pytest.raises(ValueError, match="initial state"):
        model.initial_point()


# ==========================================================================
# (c) pm_em against the reference and hmmlearn.
# ==========================================================================


def test_map_matches_reference(case, reference, idata):
    _assert_params_close(_fitted(case, idata), reference.estimates, what="reference")


def test_map_matches_hmmlearn(case, hmmlearn_fit, idata):
    _assert_params_close(_fitted(case, idata), hmmlearn_params(hmmlearn_fit), what="hmmlearn")


def test_posterior_layout(case, idata):
    dims = case.model.named_vars_to_dims
    for name in [*case.start, "s"]:
        assert idata.posterior[name].dims == ("chain", "draw", *dims[name]), name
    lp = idata.posterior["lp_s"]
    assert lp.dims == ("chain", "draw", *dims["s"], "lp_s_dim")
    n_states = len(case.start["pi"])
    np.testing.assert_array_equal(lp["lp_s_dim"].values, np.arange(n_states))
    np.testing.assert_array_equal(idata.posterior["state_from"].values, np.arange(n_states))
    assert np.issubdtype(idata.posterior["s"].dtype, np.integer)


def test_lp_s_matches_reference_log_gamma(case, idata):
    """``lp_s`` is the reference's forward–backward at pm_em's own fitted parameters."""
    fitted = _fitted(case, idata)
    expected = np.stack([p.log_gamma for p in ref.posteriors(case.y, fitted, case.emission)])
    lp = at_map(idata.posterior, "lp_s").reshape(expected.shape)
    np.testing.assert_allclose(special.logsumexp(lp, axis=-1), 0.0, atol=1e-9)
    np.testing.assert_allclose(np.exp(lp), np.exp(expected), atol=1e-10)
    # On the log scale where the probability is not negligible.
    visible = expected > -30.0
    np.testing.assert_allclose(lp[visible], expected[visible], rtol=1e-7, atol=1e-9)


def test_lp_s_matches_reference_run(case, reference, idata):
    """Both runs at their noise floor: the state probabilities agree closely too."""
    lp = at_map(idata.posterior, "lp_s").reshape(reference.log_gamma.shape)
    np.testing.assert_allclose(np.exp(lp), np.exp(reference.log_gamma), atol=1e-5)


def test_s_is_the_viterbi_path(case, idata):
    fitted = _fitted(case, idata)
    expected = np.stack(ref.viterbi_paths(case.y, fitted, case.emission)).reshape(case.y.shape)
    np.testing.assert_array_equal(at_map(idata.posterior, "s"), expected)


def test_em_stats_trace(case, reference, idata):
    stats_group = idata.em_stats
    trace = stats_group["logp"].values.ravel()
    trace = trace[np.isfinite(trace)]
    assert bool(stats_group["converged"])
    assert int(stats_group["n_iter"]) >= 1
    assert "iteration" in stats_group["logp"].dims
    increments = np.diff(trace)
    assert np.all(increments >= -1e-10 * abs(trace[-1])), increments.min()
    # The final logp is the log-likelihood plus the log prior (no Jacobian), at
    # pm_em's parameters exactly, and the reference's optimum to rounding.
    fitted = _fitted(case, idata)
    at_fitted = sum(p.loglik for p in ref.posteriors(case.y, fitted, case.emission))
    np.testing.assert_allclose(
        trace[-1], at_fitted + ref.log_prior(fitted, **case.priors), rtol=1e-10
    )
    np.testing.assert_allclose(trace[-1], reference.logpost, rtol=1e-9)


def test_flat_priors_add_log_gamma_k_per_dirichlet(case, idata):
    """With Dirichlet(1) on ``pi`` and every row of ``P``, logp - loglik = (K + 1) log (K-1)!."""
    if case.priors:
        pytest.skip("informative priors")
    n_states = len(case.start["pi"])
    fitted = _fitted(case, idata)
    loglik = sum(p.loglik for p in ref.posteriors(case.y, fitted, case.emission))
    logp = idata.em_stats["logp"].values.ravel()
    logp = logp[np.isfinite(logp)][-1]
    expected = (n_states + 1) * special.gammaln(n_states)  # zero for K = 2
    np.testing.assert_allclose(logp - loglik, expected, rtol=1e-8, atol=1e-9)


def test_log_likelihood_group_is_one_step_predictive(case, idata):
    """The pointwise pieces are ``log p(y_t | y_1..y_{t-1})`` (the chain rule in time
    order, per sequence), and add up to the observed-data log-likelihood."""
    pointwise = at_map(idata.log_likelihood, "y")
    assert pointwise.shape == case.y.shape
    fitted = _fitted(case, idata)
    post = ref.posteriors(case.y, fitted, case.emission)
    expected = np.stack([p.log_predictive for p in post]).reshape(case.y.shape)
    np.testing.assert_allclose(pointwise, expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(pointwise.sum(), sum(p.loglik for p in post), rtol=1e-10)


def test_em_steps_stay_finite_as_pi_reaches_a_vertex(case, reference, pm_em):
    """Sixty EM steps through ``pm_em.EM``, past the point where a single sequence's
    initial distribution underflows (about 1e-300 after 20 steps in the Gaussian case):
    the log-posterior stays finite and the parameters stay on the reference's."""
    em = pm_em.EM(case.model)
    point = dict(case.start)
    for _ in range(60):
        point = em.m_step(point, em.e_step(point))
    expected = ref.baum_welch(
        case.y, case.start, emission=case.emission, tol=0.0, max_iter=60, **case.priors
    )
    assert np.isfinite(em.logp(point))
    _assert_params_close(point, expected.estimates, what="60 steps")
    np.testing.assert_allclose(em.logp(point), expected.logpost, rtol=1e-10)


def test_p_and_pi_are_closed_form(pm_em):
    """Baum–Welch: every Gaussian HMM parameter is updated in closed form."""
    em = pm_em.EM(CASE_BUILDERS["gaussian"]().model)
    assert set(em.closed_form_params) == {"P", "pi", "mu", "sigma"}


def test_engine_matches_brute_force_on_tiny_chain(pm_em):
    """logp, state marginals and expected transition counts of a 5-step chain against
    all 3**5 paths, away from any optimum."""
    y = np.array([-2.5, 0.3, 0.9, 4.2, -0.4])
    point = {
        "P": np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.25, 0.25, 0.5]]),
        "pi": np.array([0.2, 0.5, 0.3]),
        "mu": np.array([-2.0, 0.5, 3.0]),
        "sigma": np.array([0.8, 1.2, 1.5]),
    }
    model = build_gaussian_hmm(y)
    expected, _ = ref.brute_force(
        ref.safe_log(point["pi"]),
        ref.safe_log(point["P"]),
        ref.gaussian_log_emission(y, point["mu"], point["sigma"]),
    )
    em = pm_em.EM(model)
    np.testing.assert_allclose(em.logp(point), expected.loglik + ref.log_prior(point), rtol=1e-10)
    log_resp = em.e_step(point)
    np.testing.assert_allclose(log_resp["s"], expected.log_gamma, atol=1e-10)
    np.testing.assert_allclose(
        log_resp.transition_counts["s"], expected.transition_counts, rtol=1e-10, atol=1e-12
    )


# ==========================================================================
# (d) The example script.
# ==========================================================================


@pytest.fixture(scope="module")
def hmm_example():
    from examples import hmm

    return hmm


def test_example_em_matches_reference(hmm_example, pm_em):
    """The example's model, data and start: pm_em's fit is the reference's."""
    y, _ = hmm_example.simulate_data()
    start = hmm_example.initial_values(y)
    idata = pm_em.find_MAP(
        hmm_example.build_model(y),
        initvals=start,
        tol=ENGINE_TOL,
        max_iter=MAX_ITER,
        progressbar=False,
    )
    expected = ref.baum_welch(y, start, emission="gaussian", tol=ENGINE_TOL * y.size)
    fitted = {name: at_map(idata.posterior, name) for name in start}
    _assert_params_close(fitted, expected.estimates, what="reference")


@pytest.mark.slow
def test_example_nuts_agrees_with_em(hmm_example, pm_em):
    """NUTS on the marginalized chain (about a minute): finite gradients, no
    divergences, chains that agree, posterior means near the EM estimates."""
    y, _ = hmm_example.simulate_data()
    model = hmm_example.build_model(y)
    start = hmm_example.initial_values(y)
    idata = pm_em.find_MAP(model, initvals=start, tol=1e-10, progressbar=False)
    trace = hmm_example.sample_marginalized(model, start)
    assert int(trace.sample_stats["diverging"].sum()) == 0
    names = ["P", "mu", "sigma"]
    rhat = az.rhat(trace, var_names=names)
    assert max(float(rhat[name].max()) for name in names) < 1.05
    table = hmm_example.summary_beside_em(trace, idata, {name: start[name] for name in names})
    within = (table["EM (MAP)"] - table["mean"]).abs() <= 3 * table["sd"]
    assert within.all(), table[~within]

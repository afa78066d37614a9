"""The example models against independent NumPy EM references.

Three layers, each usable to locate a disagreement:

* the NumPy references in ``tests.references.em`` against literature values, closed
  forms, direct numerical maximisation, scikit-learn and brute-force
  enumeration (no PyMC, no ``pm_em``);
* each example's PyMC model against the reference's complete-data
  log-density, with the latent fixed (PyMC only: is the model the intended
  one?);
* ``pm_em`` on each example model against the reference from the same start:
  single E-, M- and log-posterior evaluations through ``pm_em.EM``, then the
  converged ``find_MAP`` result.

All example models use flat priors, so the MAP equals the MLE and the
engine's log-posterior is the log-likelihood plus a known constant
(``log Gamma(K)`` for a flat ``Dirichlet``).
"""

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pymc as pm
import pytest
from pymc.model.transform.conditioning import remove_value_transforms
from scipy import optimize, special, stats
from sklearn.mixture import GaussianMixture

from tests.helpers import MAX_ITER, at_map
from tests.references import em as ref
from tests.references.brute_force import enumerate_latent_posterior

# Reference EM runs stop once the log-likelihood changes by less than
# REFERENCE_TOL (absolute); the engine's tol is per observation, like
# scikit-learn's, so ENGINE_TOL allows an absolute change below n * 1e-14, still
# above rounding in a sum of n terms.  A per-observation 1e-12 left the
# multivariate means 1e-6 from the fixed point (EM contracts only by about 0.7
# per iteration there); these leave every parameter well within RTOL.
REFERENCE_TOL = 1e-12
RTOL = 1e-5


# ==========================================================================
# (a) The NumPy references on their own.
# ==========================================================================

PEPPERED_MOTH_LITERATURE = np.array([0.07084, 0.18874, 0.74043])


def _simulated_normal_mixture(rng, n=300):
    labels = rng.binomial(1, 0.6, size=n)
    return rng.normal(np.array([2.0, 5.0])[labels], np.array([0.5, 1.0])[labels])


def _simulated_gaussian_mixture(rng, n=300):
    means = np.array([[0.0, 0.0], [4.0, 0.0], [2.0, 3.5]])
    labels = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    return means[labels] + rng.normal(scale=[[0.8, 0.6]], size=(n, 2))


def _simulated_zip(rng, n=400):
    return rng.poisson(1.5, size=n) * (rng.random(n) < 0.4)


def _simulated_heads(rng, n_trials=60, n_tosses=10):
    coin = rng.integers(0, 2, size=n_trials)
    return rng.binomial(n_tosses, np.array([0.3, 0.8])[coin])


def _reference_runs(rng) -> dict[str, "ref.EMResult"]:
    x = _simulated_normal_mixture(rng)
    X = _simulated_gaussian_mixture(rng)
    phenotype = np.repeat(np.arange(3), [85, 196, 341])
    return {
        "two_coins": ref.two_coins_em(_simulated_heads(rng), 10, [0.4, 0.6], tol=REFERENCE_TOL),
        "normal_mixture": ref.normal_mixture_em(
            x,
            [0.5, 0.5],
            np.quantile(x, [0.25, 0.75]),
            [x.std()] * 2,
            tol=REFERENCE_TOL,
        ),
        "gaussian_mixture": ref.gaussian_mixture_em(
            X,
            np.full(3, 1 / 3),
            X[[0, 1, 2]] + [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]],
            np.tile(np.cov(X.T), (3, 1, 1)),
            tol=REFERENCE_TOL,
        ),
        "zero_inflated_poisson": ref.zero_inflated_poisson_em(
            _simulated_zip(rng), 0.5, 1.0, tol=REFERENCE_TOL
        ),
        "peppered_moth": ref.peppered_moth_em(phenotype, [1 / 3] * 3, tol=REFERENCE_TOL),
    }


REFERENCE_NAMES = [
    "two_coins",
    "normal_mixture",
    "gaussian_mixture",
    "zero_inflated_poisson",
    "peppered_moth",
]


@pytest.mark.parametrize("name", REFERENCE_NAMES, ids=REFERENCE_NAMES)
def test_reference_loglik_never_decreases(name, rng):
    result = _reference_runs(rng)[name]
    increments = np.diff(result.loglik_trace)
    # EM's ascent property, up to rounding in a sum of a few hundred terms.
    assert np.all(increments >= -1e-9 * abs(result.loglik)), increments.min()
    assert result.converged
    assert result.n_iter == len(result.loglik_trace) - 1


@pytest.mark.parametrize("name", REFERENCE_NAMES, ids=REFERENCE_NAMES)
def test_reference_responsibilities_are_normalised(name, rng):
    log_resp = _reference_runs(rng)[name].log_resp
    np.testing.assert_allclose(special.logsumexp(log_resp, axis=-1), 0.0, atol=1e-12)


def test_peppered_moth_reference_matches_literature():
    phenotype = np.repeat(np.arange(3), [85, 196, 341])
    result = ref.peppered_moth_em(phenotype, [1 / 3] * 3, tol=REFERENCE_TOL)
    np.testing.assert_allclose(result.estimates["allele_freq"], PEPPERED_MOTH_LITERATURE, atol=1e-4)


def test_peppered_moth_loglik_is_the_phenotype_multinomial(rng):
    """The per-moth log-likelihood equals the phenotype log-probabilities summed."""
    phenotype = np.repeat(np.arange(3), [85, 196, 341])
    p_c, p_i, p_t = allele_freq = rng.dirichlet(np.ones(3))
    phenotype_prob = np.array([1 - (1 - p_c) ** 2, p_i**2 + 2 * p_i * p_t, p_t**2])
    _, loglik = ref.peppered_moth_e_step(phenotype, allele_freq)
    expected = np.dot([85, 196, 341], np.log(phenotype_prob))
    np.testing.assert_allclose(loglik, expected, rtol=1e-12)


def test_zip_reference_matches_score_equations(rng):
    x = _simulated_zip(rng)
    result = ref.zero_inflated_poisson_em(x, 0.5, 1.0, tol=REFERENCE_TOL)
    direct = ref.zero_inflated_poisson_mle(x)
    for name in ("psi", "rate"):
        np.testing.assert_allclose(result.estimates[name], direct[name], rtol=RTOL)
    # A positive count cannot be a structural zero.
    assert np.all(np.isneginf(result.log_resp[x > 0, 0]))


def test_two_coins_reference_matches_direct_maximisation(rng):
    heads = _simulated_heads(rng)
    result = ref.two_coins_em(heads, 10, [0.4, 0.6], tol=REFERENCE_TOL)

    def negative_loglik(p_heads):
        return -ref.two_coins_e_step(heads, 10, p_heads, np.array([0.5, 0.5]))[1]

    direct = optimize.minimize(
        negative_loglik,
        x0=[0.4, 0.6],
        method="L-BFGS-B",
        bounds=[(1e-9, 1 - 1e-9)] * 2,
        options={"ftol": 1e-15, "gtol": 1e-10},
    )
    assert direct.success, direct.message
    np.testing.assert_allclose(result.estimates["p"], direct.x, rtol=RTOL)
    np.testing.assert_allclose(result.loglik, -direct.fun, rtol=1e-10)


def _fit_sklearn(X, weights, means, covariances):
    """scikit-learn's unregularised EM from the given start."""
    return GaussianMixture(
        len(weights),
        covariance_type="full",
        reg_covar=0.0,
        tol=1e-14,
        max_iter=MAX_ITER,
        weights_init=weights,
        means_init=means,
        precisions_init=np.linalg.inv(covariances),
    ).fit(X)


def test_normal_mixture_reference_matches_sklearn(rng):
    x = _simulated_normal_mixture(rng)
    start_mu, start_sigma = np.quantile(x, [0.25, 0.75]), np.full(2, x.std())
    result = ref.normal_mixture_em(x, [0.5, 0.5], start_mu, start_sigma, tol=REFERENCE_TOL)
    gm = _fit_sklearn(x[:, None], [0.5, 0.5], start_mu[:, None], start_sigma[:, None, None] ** 2)
    np.testing.assert_allclose(result.estimates["w"], gm.weights_, rtol=RTOL)
    np.testing.assert_allclose(result.estimates["mu"], gm.means_[:, 0], rtol=RTOL)
    np.testing.assert_allclose(
        result.estimates["sigma"], np.sqrt(gm.covariances_[:, 0, 0]), rtol=RTOL
    )
    np.testing.assert_allclose(result.loglik, gm.score(x[:, None]) * len(x), rtol=1e-9)


def test_gaussian_mixture_reference_matches_sklearn(rng):
    X = _simulated_gaussian_mixture(rng)
    weights = np.full(3, 1 / 3)
    means = X[[0, 1, 2]] + [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    covariances = np.tile(np.cov(X.T), (3, 1, 1))
    result = ref.gaussian_mixture_em(X, weights, means, covariances, tol=REFERENCE_TOL)
    gm = _fit_sklearn(X, weights, means, covariances)
    np.testing.assert_allclose(result.estimates["w"], gm.weights_, rtol=RTOL)
    np.testing.assert_allclose(result.estimates["mu"], gm.means_, rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(result.estimates["cov"], gm.covariances_, rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(np.exp(result.log_resp), gm.predict_proba(X), rtol=RTOL, atol=1e-7)


def test_brute_force_matches_reference_e_step(rng):
    x = rng.normal(size=4)
    w, mu, sigma = np.array([0.3, 0.7]), np.array([-0.5, 1.0]), np.array([0.8, 1.3])
    table = ref.normal_mixture_log_joint(x, w, mu, sigma)
    log_marginal, log_marginals = enumerate_latent_posterior(
        lambda labels: table[np.arange(len(x)), labels].sum(), [[0, 1]] * len(x)
    )
    log_resp, loglik = ref.normal_mixture_e_step(x, w, mu, sigma)
    np.testing.assert_allclose(log_marginal, loglik, rtol=1e-12)
    np.testing.assert_allclose(np.stack(log_marginals), log_resp, atol=1e-12)


def _coupled_log_marginal(y, n_latents=3):
    """``log p(y)`` for ``z_j ~ Bernoulli(0.5)``, ``y ~ Normal(sum(z), 1)``."""
    n_ones = np.arange(n_latents + 1)
    log_prior = stats.binom.logpmf(n_ones, n_latents, 0.5)
    return special.logsumexp(log_prior + stats.norm.logpdf(y, n_ones, 1.0))


def test_brute_force_handles_coupled_latents():
    """Latents that share one observation: no per-element factorisation exists."""
    y = 1.2

    def log_joint(labels):
        return 3 * np.log(0.5) + stats.norm.logpdf(y, sum(labels), 1.0)

    log_marginal, log_marginals = enumerate_latent_posterior(log_joint, [[0, 1]] * 3)
    np.testing.assert_allclose(log_marginal, _coupled_log_marginal(y), rtol=1e-12)
    # Exchangeable latents have identical marginals.
    np.testing.assert_allclose(log_marginals[0], log_marginals[2], atol=1e-12)


def test_brute_force_refuses_huge_problems():
    with pytest.raises(ValueError, match="expected at most 16 latent configurations"):
        enumerate_latent_posterior(lambda labels: 0.0, [[0, 1]] * 5, max_configurations=16)


# ==========================================================================
# (b) The example models, and pm_em on them.
# ==========================================================================


class ExampleCase(NamedTuple):
    """An example model together with its reference EM, in the model's own names."""

    model: pm.Model
    data: np.ndarray
    start: dict[str, np.ndarray]
    latent: str
    observed: str
    support: np.ndarray
    #: ``log_joint(params)``: ``(n, n_support)`` table of ``log P(x_i, z_i = k)``.
    log_joint: Callable[[dict], np.ndarray]
    #: ``m_step(log_resp)``: next parameters, keyed by model variable name.
    m_step: Callable[[np.ndarray], dict]
    #: Log-density of the (flat) priors, constant in the parameters.
    log_prior: float
    #: ``deterministics(params)``: expected values of the model's Deterministics.
    deterministics: Callable[[dict], dict] = lambda params: {}

    def e_step(self, params):
        log_joint = self.log_joint(params)
        log_marginal = special.logsumexp(log_joint, axis=-1, keepdims=True)
        return log_joint - log_marginal, float(log_marginal.sum())


def _two_coins_case() -> ExampleCase:
    from examples import two_coins as example

    heads, _ = example.simulate_data(n_trials=60, seed=11)
    coin_weights = np.array([0.5, 0.5])
    return ExampleCase(
        model=example.build_model(heads),
        data=heads,
        start=example.initial_values(),
        latent="coin",
        observed="heads",
        support=np.array([0, 1]),
        log_joint=lambda params: ref.two_coins_log_joint(
            heads, example.N_TOSSES, params["p"], coin_weights
        ),
        m_step=lambda log_resp: ref.two_coins_m_step(heads, example.N_TOSSES, log_resp),
        log_prior=0.0,
    )


def _gaussian_mixture_1d_case() -> ExampleCase:
    from examples import gaussian_mixture as example

    x = example.simulate_data(n=300, seed=12)
    return ExampleCase(
        model=example.build_model(x),
        data=x,
        start=example.initial_values(x),
        latent="z",
        observed="x",
        support=np.array([0, 1]),
        log_joint=lambda params: ref.normal_mixture_log_joint(
            x, params["w"], params["mu"], params["sigma"]
        ),
        m_step=lambda log_resp: ref.normal_mixture_m_step(x, log_resp),
        log_prior=ref.flat_dirichlet_logp(2),
    )


def _zero_inflated_poisson_case() -> ExampleCase:
    from examples import zero_inflated_poisson as example

    x = example.simulate_data(n=400, seed=13)
    return ExampleCase(
        model=example.build_model(x),
        data=x,
        start={"psi": np.array(0.5), "rate": np.array(1.0)},
        latent="z",
        observed="x",
        support=np.array([0, 1]),
        log_joint=lambda params: ref.zero_inflated_poisson_log_joint(
            x, params["psi"], params["rate"]
        ),
        m_step=lambda log_resp: ref.zero_inflated_poisson_m_step(x, log_resp),
        log_prior=0.0,
    )


def _hardy_weinberg(allele_freq):
    p_c, p_i, p_t = allele_freq
    return np.array([p_c**2, 2 * p_c * p_i, 2 * p_c * p_t, p_i**2, 2 * p_i * p_t, p_t**2])


def _peppered_moth_case() -> ExampleCase:
    from examples import peppered_moth as example

    phenotype = example.moth_phenotypes()
    return ExampleCase(
        model=example.build_model(phenotype),
        data=phenotype,
        # Away from the MLE so the first steps move visibly.
        start={"allele_freq": np.array([0.3, 0.3, 0.4])},
        latent="genotype",
        observed="phenotype",
        support=np.arange(6),
        log_joint=lambda params: ref.peppered_moth_log_joint(phenotype, params["allele_freq"]),
        m_step=ref.peppered_moth_m_step,
        log_prior=ref.flat_dirichlet_logp(3),
        deterministics=lambda params: {"genotype_freq": _hardy_weinberg(params["allele_freq"])},
    )


def _chol_params_to_cov(params):
    chol = np.zeros(params["chol_diag"].shape + (2,))
    chol[:, 0, 0], chol[:, 1, 1] = params["chol_diag"].T
    chol[:, 1, 0] = params["chol_offdiag"]
    return chol @ chol.transpose(0, 2, 1)


def _cov_to_chol_params(cov):
    chol = np.linalg.cholesky(cov)
    return {
        "chol_diag": np.stack([chol[:, 0, 0], chol[:, 1, 1]], axis=-1),
        "chol_offdiag": chol[:, 1, 0],
    }


def _multivariate_mixture_case() -> ExampleCase:
    from examples import multivariate_mixture as example

    X = example.simulate_data(n=300, seed=14)
    start, _ = example.kmeans_start(X)

    def m_step(log_resp):
        updated = ref.gaussian_mixture_m_step(X, log_resp)
        return {"w": updated["w"], "mu": updated["mu"]} | _cov_to_chol_params(updated["cov"])

    return ExampleCase(
        model=example.build_model(X),
        data=X,
        start=start,
        latent="z",
        observed="x",
        support=np.arange(3),
        log_joint=lambda params: ref.gaussian_mixture_log_joint(
            X, params["w"], params["mu"], _chol_params_to_cov(params)
        ),
        m_step=m_step,
        log_prior=ref.flat_dirichlet_logp(3),
        deterministics=lambda params: {"cov": _chol_params_to_cov(params)},
    )


CASE_BUILDERS = {
    "two_coins": _two_coins_case,
    "gaussian_mixture": _gaussian_mixture_1d_case,
    "zero_inflated_poisson": _zero_inflated_poisson_case,
    "peppered_moth": _peppered_moth_case,
    "multivariate_mixture": _multivariate_mixture_case,
}


# The full-covariance fit takes minutes (an M-step by gradient through an
# (n, 2, 2) gather of Cholesky factors), so it runs with the slow end-to-end fits.
SLOW_CASES = {"multivariate_mixture"}
CASE_PARAMS = [
    pytest.param(name, marks=[pytest.mark.slow] if name in SLOW_CASES else [], id=name)
    for name in CASE_BUILDERS
]


@pytest.fixture(scope="module", params=CASE_PARAMS)
def case(request) -> ExampleCase:
    return CASE_BUILDERS[request.param]()


@pytest.fixture(scope="module")
def reference(case):
    """The reference EM on the example's data from the example's start."""
    return ref.run_em(case.e_step, case.m_step, case.start, tol=REFERENCE_TOL, max_iter=MAX_ITER)


@pytest.fixture(scope="module")
def em(case, pm_em):
    """The compiled EM steps for the example model (compiled once per model)."""
    return pm_em.EM(case.model)


def _sample_latent(rng, log_resp):
    """One latent configuration drawn from given responsibilities (never impossible)."""
    cumulative = np.cumsum(np.exp(log_resp), axis=-1)
    labels = (rng.random((len(log_resp), 1)) > cumulative).sum(-1)
    # Rounding can leave the last cumulative sum a hair below one.
    return np.minimum(labels, log_resp.shape[-1] - 1)


# -- the models themselves (PyMC only) --------------------------------------


def test_model_complete_data_logp_matches_reference(case, rng):
    """With the latent fixed, the model's log-density is the reference's log-joint.

    Checks that each example builds the intended model, independently of pm_em.
    """
    log_resp, _ = case.e_step(case.start)
    labels = _sample_latent(rng, log_resp)
    constrained = remove_value_transforms(case.model)
    point = {name: np.asarray(value) for name, value in case.start.items()}
    point[case.latent] = case.support[labels]
    model_logp = constrained.compile_logp(jacobian=False, mode="FAST_COMPILE")(point)
    table = case.log_joint(case.start)
    expected = table[np.arange(len(labels)), labels].sum() + case.log_prior
    np.testing.assert_allclose(model_logp, expected, rtol=1e-10)


# -- single EM steps through pm_em.EM ----------------------------------------


def test_em_logp_at_start(case, em):
    """Observed-data log-posterior: latents summed out, flat priors' constant added."""
    _, loglik = case.e_step(case.start)
    np.testing.assert_allclose(em.logp(case.start), loglik + case.log_prior, rtol=1e-10)


def test_em_e_step_at_start(case, em):
    log_resp = em.e_step(case.start)
    assert set(log_resp) == {case.latent}
    expected, _ = case.e_step(case.start)
    assert log_resp[case.latent].shape == expected.shape
    # -inf (impossible values) must match exactly; finite entries closely.
    np.testing.assert_allclose(log_resp[case.latent], expected, rtol=1e-8, atol=1e-10)


def test_em_m_step_from_start(case, em):
    """One M-step from the reference's responsibilities equals the closed form."""
    log_resp, _ = case.e_step(case.start)
    updated = em.m_step(case.start, {case.latent: log_resp})
    expected = case.m_step(log_resp)
    for name, value in expected.items():
        np.testing.assert_allclose(
            updated[name], value, rtol=RTOL, atol=1e-8, err_msg=f"parameter {name!r}"
        )


def test_em_initial_point_covers_parameters(case, em):
    point = em.initial_point(random_seed=0)
    assert set(point) == set(case.start)
    for name, value in point.items():
        assert np.shape(value) == np.shape(case.start[name]), name
    assert np.isfinite(em.logp(point))


# -- the converged result of pm_em.find_MAP ----------------------------------


def test_map_matches_reference(case, reference, idata):
    expected = reference.estimates | case.deterministics(reference.estimates)
    for name, value in expected.items():
        np.testing.assert_allclose(
            at_map(idata.posterior, name),
            value,
            rtol=RTOL,
            atol=1e-8,
            err_msg=f"variable {name!r}",
        )


def test_map_dims_follow_model(case, idata):
    model_dims = case.model.named_vars_to_dims
    for name in list(case.start) + [case.latent]:
        assert idata.posterior[name].dims == (
            "chain",
            "draw",
            *model_dims.get(name, ()),
        ), name
    lp_dim = f"lp_{case.latent}_dim"
    lp = idata.posterior[f"lp_{case.latent}"]
    assert lp.dims == ("chain", "draw", *model_dims.get(case.latent, ()), lp_dim)
    np.testing.assert_array_equal(lp[lp_dim].values, case.support)


def test_log_responsibilities_match_reference(case, reference, idata):
    log_resp = at_map(idata.posterior, f"lp_{case.latent}")
    np.testing.assert_allclose(special.logsumexp(log_resp, axis=-1), 0.0, atol=1e-10)
    np.testing.assert_allclose(log_resp, reference.log_resp, rtol=RTOL, atol=RTOL)


def test_latent_estimate_is_most_probable_value(case, reference, idata):
    most_probable = at_map(idata.posterior, case.latent)
    resp = np.sort(np.exp(reference.log_resp), axis=-1)
    # Near-ties may legitimately resolve either way at 1e-5 agreement.
    clear = resp[:, -1] - resp[:, -2] > 1e-4
    expected = case.support[np.argmax(reference.log_resp, axis=-1)]
    np.testing.assert_array_equal(most_probable[clear], expected[clear])


def test_log_likelihood_group_matches_reference(case, reference, idata):
    pointwise = at_map(idata.log_likelihood, case.observed)
    expected = special.logsumexp(case.log_joint(reference.estimates), axis=-1)
    np.testing.assert_allclose(pointwise, expected, rtol=RTOL, atol=1e-8)
    np.testing.assert_allclose(pointwise.sum(), reference.loglik, rtol=1e-8)


def test_em_stats_trace(case, reference, idata):
    stats_group = idata.em_stats
    trace = stats_group["logp"].values.ravel()
    assert bool(stats_group["converged"])
    assert int(stats_group["n_iter"]) >= 1
    assert "iteration" in stats_group["logp"].dims
    increments = np.diff(trace)
    assert np.all(increments >= -1e-9 * abs(trace[-1])), increments.min()
    np.testing.assert_allclose(trace[-1], reference.loglik + case.log_prior, rtol=1e-8)


def test_observed_data_group(case, idata):
    np.testing.assert_array_equal(idata.observed_data[case.observed].values, case.data)


# ==========================================================================
# (c) pm_em against brute-force enumeration on tiny models.
# ==========================================================================


def test_engine_matches_brute_force_on_tiny_mixture(pm_em):
    x = np.array([-1.0, 0.3, 2.5])
    point = {
        "w": np.array([0.3, 0.7]),
        "mu": np.array([-0.5, 1.0]),
        "sigma": np.array([0.8, 1.3]),
    }
    with pm.Model(coords={"component": [0, 1], "obs": range(3)}) as model:
        w = pm.Dirichlet("w", a=np.ones(2), dims="component")
        mu = pm.Flat("mu", dims="component")
        sigma = pm.HalfFlat("sigma", dims="component")
        z = pm.Categorical("z", p=w, dims="obs")
        pm.Normal("x", mu=mu[z], sigma=sigma[z], observed=x, dims="obs")

    def log_joint(labels):
        labels = np.array(labels)
        return np.sum(
            np.log(point["w"][labels])
            + stats.norm.logpdf(x, point["mu"][labels], point["sigma"][labels])
        )

    log_marginal, log_marginals = enumerate_latent_posterior(log_joint, [[0, 1]] * 3)
    em = pm_em.EM(model)
    np.testing.assert_allclose(em.logp(point), log_marginal, rtol=1e-10)
    np.testing.assert_allclose(em.e_step(point)["z"], np.stack(log_marginals), atol=1e-10)


def test_engine_on_coupled_latents_is_exact_or_refuses(pm_em):
    """``y ~ Normal(mu + z.sum(), 1)`` couples the latents: factorising them is wrong.

    The engine may enumerate them jointly or refuse the model; it must not
    return a per-element answer (the pitfall recorded in PERF_NOTES for
    pymc-extras 0.10's batch-dimension analysis).
    """
    y = 1.5
    with pm.Model() as model:
        mu = pm.Flat("mu")
        # np.float64: PyTensor would store a literal 0.5 as float32.
        z = pm.Bernoulli("z", p=np.float64(0.5), shape=3)
        pm.Normal("y", mu=mu + z.sum(), sigma=1.0, observed=y)
    try:
        em = pm_em.EM(model)
    except pm_em.UnsupportedModelError as err:
        assert "z" in str(err)
        return
    np.testing.assert_allclose(em.logp({"mu": np.array(0.0)}), _coupled_log_marginal(y), rtol=1e-10)

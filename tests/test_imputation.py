"""Missing values of a finite discrete observed variable, which PyMC imputes as a free
variable ``c_unobserved``: EM marginalizes it as a latent, each missing entry one
element, against the marginal likelihood written by hand and maximized by scipy.

Every missing row i contributes ``log sum_k p(c = k) N(y_i | mean_k, sigma)``, every
observed row ``log p(c_i) + log N(y_i | mean_{c_i}, sigma)``.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pymc as pm
import pytensor.tensor as pt
import pytest
from scipy import optimize, stats
from scipy.special import expit, log_softmax, logsumexp

import pm_em
from pm_em.compile import evaluate_once
from pm_em.errors import UnsupportedModelError
from pm_em.model.analysis import analyze_model
from pm_em.model.dependence import build_owner_graphs

# PyMC casts NaN-holding data to the likelihood's integer dtype before it masks the
# NaNs out (pymc.model.core, make_obs_var): a harmless NumPy warning that users see too.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")

# Prior constants as float64: PyTensor computes log(10) of an integer (or of a float
# literal float32 represents exactly) in float32, 1e-8 off the scipy reference.
TWO, FIVE, TEN = np.float64(2), np.float64(5), np.float64(10)

FIT = {"tol": 1e-14, "max_iter": 5000, "random_seed": 1, "progressbar": False}


# -- the hand-written marginal likelihood --------------------------------------------


def log_joint_table(log_pc, means, sigma, y):
    """``log p(c = k) + log N(y_i | means[k], sigma)``, shape (n, K)."""
    return log_pc[None, :] + stats.norm.logpdf(y[:, None], means[None, :], sigma)


def marginal_loglik(log_pc, means, sigma, c, y):
    """Observed-data log-likelihood of (c, y); ``c`` is -1 where missing."""
    table = log_joint_table(log_pc, means, sigma, y)
    missing = c < 0
    observed = table[~missing, c[~missing]].sum()
    return observed + logsumexp(table[missing], axis=1).sum()


def reference_map(negative_log_posterior, starts):
    """scipy's maximum of the log-posterior over a few starts: BFGS on central-difference
    gradients (accurate to ~1e-10), run to a gradient norm of 1e-9."""
    fits = [
        optimize.minimize(
            negative_log_posterior, start, method="BFGS", jac="3-point", options={"gtol": 1e-9}
        )
        for start in starts
    ]
    return min(fits, key=lambda fit: fit.fun)


def with_missing(values, missing):
    """``values`` as float with NaN at ``missing``: how users pass missing data."""
    data = np.asarray(values, dtype=float).copy()
    data[missing] = np.nan
    return data


# -- the three covariates: Bernoulli, Categorical, Binomial(4) -----------------------


@dataclass
class Case:
    """A model with an imputed covariate ``c`` and its likelihood written by hand.

    ``unpack`` maps scipy's unconstrained vector to the parameters; ``pieces`` maps
    the parameters to ``(log p(c = k) over the support, mean of y per k, sigma)``.
    """

    model: pm.Model
    c: np.ndarray  # -1 where missing
    y: np.ndarray
    support: np.ndarray
    unpack: Callable
    pieces: Callable
    log_prior: Callable
    start: np.ndarray
    names: list[str]
    closed_form: list[str]  # updated in closed form despite the rows free of the latent

    def log_posterior(self, params):
        log_pc, means, sigma = self.pieces(params)
        return marginal_loglik(log_pc, means, sigma, self.c, self.y) + self.log_prior(params)


def _linear_case(model, c, y, support, pieces, prob, beta_prior):
    """The Bernoulli and Binomial cases: ``y ~ Normal(alpha + beta * c, sigma)`` with
    ``alpha, beta ~ Normal(0, 10)``, ``sigma ~ HalfNormal(5)``, and the probability
    ``prob ~ Beta(*beta_prior)`` of the covariate ``c``."""

    def unpack(theta):
        return {
            prob: expit(theta[0]),
            "alpha": theta[1],
            "beta": theta[2],
            "sigma": np.exp(theta[3]),
        }

    def log_prior(v):
        return (
            stats.beta.logpdf(v[prob], *beta_prior)
            + stats.norm.logpdf(v["alpha"], 0, 10)
            + stats.norm.logpdf(v["beta"], 0, 10)
            + stats.halfnorm.logpdf(v["sigma"], scale=5)
        )

    names = [prob, "alpha", "beta", "sigma"]
    return Case(
        model, c, y, support, unpack, pieces, log_prior, np.zeros(4), names, [prob, "sigma"]
    )


def bernoulli_case():
    rng = np.random.default_rng(5)
    n, missing = 16, [1, 4, 8, 11, 15]
    c = (rng.random(n) < 0.4).astype(int)
    y = 1.0 + 2.0 * c + rng.normal(0, 0.5, n)
    with pm.Model(coords={"obs": np.arange(n)}) as model, pytest.warns(pm.ImputationWarning):
        p = pm.Beta("p", 1, 1)
        cov = pm.Bernoulli("c", p=p, observed=with_missing(c, missing), dims="obs")
        alpha = pm.Normal("alpha", 0, TEN)
        beta = pm.Normal("beta", 0, TEN)
        sigma = pm.HalfNormal("sigma", FIVE)
        pm.Normal("y", alpha + beta * cov, sigma, observed=y, dims="obs")
    c = c.copy()
    c[missing] = -1

    def pieces(v):
        log_pc = np.log([1 - v["p"], v["p"]])
        return log_pc, v["alpha"] + v["beta"] * np.arange(2), v["sigma"]

    return _linear_case(model, c, y, np.arange(2), pieces, "p", (1, 1))


def categorical_case():
    rng = np.random.default_rng(7)
    n, missing = 15, [0, 6, 9, 13]
    c = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    y = np.array([-2.0, 0.0, 2.0])[c] + rng.normal(0, 0.6, n)
    coords = {"obs": np.arange(n), "level": ["a", "b", "c"]}
    with pm.Model(coords=coords) as model, pytest.warns(pm.ImputationWarning):
        w = pm.Dirichlet("w", np.ones(3), dims="level")
        cov = pm.Categorical("c", p=w, observed=with_missing(c, missing), dims="obs")
        mu = pm.Normal("mu", 0, TEN, dims="level")
        sigma = pm.HalfNormal("sigma", FIVE)
        pm.Normal("y", mu[cov], sigma, observed=y, dims="obs")
    c = c.copy()
    c[missing] = -1

    def unpack(theta):
        logits = np.concatenate([[0.0], theta[:2]])
        return {"w": np.exp(log_softmax(logits)), "mu": theta[2:5], "sigma": np.exp(theta[5])}

    def pieces(v):
        return np.log(v["w"]), v["mu"], v["sigma"]

    def log_prior(v):
        return (
            stats.dirichlet.logpdf(v["w"], np.ones(3))
            + stats.norm.logpdf(v["mu"], 0, 10).sum()
            + stats.halfnorm.logpdf(v["sigma"], scale=5)
        )

    start = np.array([0.0, 0.0, -1.0, 0.0, 1.0, 0.0])
    return Case(
        model,
        c,
        y,
        np.arange(3),
        unpack,
        pieces,
        log_prior,
        start,
        ["w", "mu", "sigma"],
        ["w", "mu", "sigma"],
    )


def binomial_case():
    rng = np.random.default_rng(9)
    n, missing = 14, [2, 3, 10]
    c = rng.binomial(4, 0.4, n)
    y = 0.5 + 1.0 * c + rng.normal(0, 0.7, n)
    with pm.Model() as model, pytest.warns(pm.ImputationWarning):
        q = pm.Beta("q", TWO, TWO)
        # A masked array: the other way PyMC takes missing values.
        observed = np.ma.masked_array(c, mask=np.isin(np.arange(n), missing))
        cov = pm.Binomial("c", n=4, p=q, observed=observed)
        alpha = pm.Normal("alpha", 0, TEN)
        beta = pm.Normal("beta", 0, TEN)
        sigma = pm.HalfNormal("sigma", FIVE)
        pm.Normal("y", alpha + beta * cov, sigma, observed=y)
    c = c.copy()
    c[missing] = -1

    def pieces(v):
        k = np.arange(5)
        return stats.binom.logpmf(k, 4, v["q"]), v["alpha"] + v["beta"] * k, v["sigma"]

    return _linear_case(model, c, y, np.arange(5), pieces, "q", (2, 2))


CASES = {
    "bernoulli": bernoulli_case,
    "categorical": categorical_case,
    "binomial": binomial_case,
}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def fitted(request):
    case = CASES[request.param]()
    em = pm_em.EM(case.model)  # find_MAP reuses it
    idata = pm_em.find_MAP(case.model, **FIT)
    rng = np.random.default_rng(0)
    starts = [case.start] + [case.start + rng.normal(0, 1, case.start.size) for _ in range(2)]
    reference = reference_map(lambda theta: -case.log_posterior(case.unpack(theta)), starts)
    return case, idata, case.unpack(reference.x), -reference.fun, em


def map_point(idata, names):
    return {name: idata.posterior[name].values[0, 0] for name in names}


def test_map_and_log_posterior_match_scipy(fitted):
    case, idata, mode, log_posterior, em = fitted
    assert sorted(em.closed_form_params) == sorted(case.closed_form)
    assert bool(idata.em_stats["converged"])
    point = map_point(idata, case.names)
    for name in case.names:
        np.testing.assert_allclose(point[name], mode[name], rtol=1e-5, atol=1e-7, err_msg=name)
    em_logp = float(idata.em_stats["logp"][-1])
    np.testing.assert_allclose(em_logp, log_posterior, rtol=1e-8)
    # The same quantity at pm_em's own point, by the hand formula: an identity.
    np.testing.assert_allclose(em_logp, case.log_posterior(point), rtol=1e-10)


def test_responsibilities_follow_bayes_rule(fitted):
    case, idata, *_ = fitted
    point = map_point(idata, case.names)
    table = log_joint_table(*case.pieces(point), case.y)[case.c < 0]
    expected = table - logsumexp(table, axis=1, keepdims=True)
    lp = idata.posterior["lp_c_unobserved"]
    assert lp.dims == ("chain", "draw", "c_unobserved_dim_0", "lp_c_unobserved_dim")
    np.testing.assert_array_equal(lp["lp_c_unobserved_dim"].values, case.support)
    np.testing.assert_allclose(lp.values[0, 0], expected, rtol=1e-9, atol=1e-12)
    # The imputed values: the most probable per missing row, written back into 'c'.
    imputed = idata.posterior["c_unobserved"].values[0, 0]
    np.testing.assert_array_equal(imputed, case.support[expected.argmax(axis=1)])
    full = case.c.copy()
    full[case.c < 0] = imputed
    np.testing.assert_array_equal(idata.posterior["c"].values[0, 0].ravel(), full)


def test_pointwise_log_likelihood_sums_the_missing_value_out(fitted):
    case, idata, *_ = fitted
    point = map_point(idata, case.names)
    log_pc, means, sigma = case.pieces(point)
    table = log_joint_table(log_pc, means, sigma, case.y)
    missing = case.c < 0
    observed_c = case.c[~missing]
    expected_y = np.where(
        missing,
        logsumexp(table, axis=1),
        stats.norm.logpdf(case.y, means[np.maximum(case.c, 0)], sigma),
    )
    ll = idata.log_likelihood
    np.testing.assert_allclose(ll["y"].values.ravel(), expected_y, rtol=1e-10)
    np.testing.assert_allclose(ll["c_observed"].values.ravel(), log_pc[observed_c], rtol=1e-10)


def test_each_missing_row_depends_on_its_own_element():
    case = categorical_case()
    structure = analyze_model(case.model)
    assert [lat.name for lat in structure.latents] == ["c_unobserved"]
    # y's missing rows depend on their own element of the latent; the others on none.
    (term,) = [t for t in structure.terms if t.name == "y"]
    owner = np.full(case.c.size, -1)
    owner[case.c < 0] = np.arange((case.c < 0).sum())
    np.testing.assert_array_equal(term.owners["c_unobserved"], owner)
    (observed,) = [t for t in structure.terms if t.name == "c_observed"]
    assert not observed.latents


def test_truncated_count_covariate_is_enumerated_over_its_bounds():
    """pm.Truncated is imputed through a PartialObservedRV (PyMC cannot split it into
    two random variables): its support is the truncated distribution's."""
    with pm.Model() as model, pytest.warns(pm.ImputationWarning):
        rate = pm.Exponential("rate", 1.0)
        counts = np.ma.masked_array([1, 2, 3, 0], mask=[False, True, False, True])
        k = pm.Truncated("k", pm.Poisson.dist(rate), upper=6, observed=counts)
        pm.Normal("y", k, 1.0, observed=np.array([1.0, 2.0, 3.0, 4.0]))
    structure = analyze_model(model)
    (latent,) = structure.latents
    assert latent.name == "k_unobserved"
    np.testing.assert_array_equal(latent.support, np.arange(7))
    (term,) = [t for t in structure.terms if t.name == "y"]
    np.testing.assert_array_equal(term.owners["k_unobserved"], [-1, 0, -1, 1])


# -- the owner rule for writes into an array -----------------------------------------

MASK = np.array([False, True, False, True, True])


def _write_cases():
    z = pt.vector("z", dtype="int64")
    zeros = pt.zeros(5, dtype="int64")
    # PyMC's imputation: missing entries from the latent, the others from the data.
    joined = pt.set_subtensor(pt.empty(5, dtype="int64")[MASK], z)
    joined = pt.set_subtensor(joined[~MASK], np.array([3, 4]))
    return z, {
        "pymc_imputation": (joined, [-1, 0, -1, 1, 2], True),
        "set_by_index": (pt.set_subtensor(zeros[[4, 0, 2]], z), [1, -1, 2, -1, 0], True),
        "set_slice": (pt.set_subtensor(zeros[1:4], z), [-1, 0, 1, 2, -1], True),
        "overwritten": (pt.set_subtensor(z[[1]], 7), [0, -1, 2], True),
        "set_2d_mask": (
            pt.set_subtensor(
                pt.zeros((2, 3), dtype="int64")[np.array([[1, 0, 0], [0, 1, 1]]) > 0], z
            ),
            [[0, -1, -1], [-1, 1, 2]],
            True,
        ),
        "inc_own_element": (pt.inc_subtensor(z[[0]], z[0:1]), [0, 1, 2], True),
        "inc_repeated_same": (
            pt.inc_subtensor(zeros[[0, 0]], z[[1, 1]]),
            [1, -1, -1, -1, -1],
            True,
        ),
        "inc_other_element": (pt.inc_subtensor(z[[0]], z[1:2]), None, False),
        "inc_repeated_index": (pt.inc_subtensor(zeros[[0, 0]], z[:2]), None, False),
    }


WRITE_IDS = list(_write_cases()[1])


@pytest.mark.parametrize("case", WRITE_IDS, ids=WRITE_IDS)
def test_written_entries_are_owned_by_what_was_written(case):
    z, cases = _write_cases()
    output, expected, enumerable = cases[case]
    graphs = build_owner_graphs(z, [output])
    checks = [c.ok for c in graphs.checks[output]]
    owner, *oks = evaluate_once([z], [graphs.owners[output], *checks], [np.zeros(3, "int64")])
    assert all(bool(ok) for ok in oks) == enumerable
    if enumerable:
        np.testing.assert_array_equal(owner, expected)


# -- what is still refused says so ---------------------------------------------------


def test_imputed_counts_with_infinite_support_say_truncate_or_drop():
    with pm.Model() as model, pytest.warns(pm.ImputationWarning):
        rate = pm.Exponential("rate", 1.0)
        pm.Poisson("y", rate, observed=np.ma.masked_array([1, 0, 3], mask=[False, True, False]))
    with pytest.raises(
        UnsupportedModelError,
        match=r"'y_unobserved' \(PoissonRV\) has infinite support.*missing values of 'y'.*"
        r"pm\.Truncated.*drop the rows",
    ):
        analyze_model(model)


def test_imputed_zero_inflated_counts_name_the_family():
    with pm.Model() as model, pytest.warns(pm.ImputationWarning):
        counts = np.ma.masked_array([1, 0, 3], mask=[False, True, False])
        pm.ZeroInflatedPoisson("y", psi=0.7, mu=2.0, observed=counts)
    with pytest.raises(
        UnsupportedModelError, match=r"'y_unobserved' \(MixtureRV\) has infinite.*drop the rows"
    ):
        analyze_model(model)


def test_imputed_values_combined_say_they_are_imputed():
    with pm.Model() as model, pytest.warns(pm.ImputationWarning):
        cov = pm.Bernoulli("c", 0.5, observed=np.ma.masked_array([1, 0, 1], mask=[0, 1, 1]))
        pm.Normal("total", cov.sum(), 1.0, observed=2.0)
    with pytest.raises(
        UnsupportedModelError,
        match=r"'total' combines several elements.*'c_unobserved' holds the missing values "
        r"of 'c'.*drop the rows",
    ):
        analyze_model(model)


def test_imputed_latent_left_out_of_latent_vars_says_where_it_comes_from():
    with pm.Model() as model, pytest.warns(pm.ImputationWarning):
        cov = pm.Bernoulli("c", 0.5, observed=np.ma.masked_array([1, 0, 1], mask=[0, 1, 0]))
        pm.Normal("y", cov, 1.0, observed=np.zeros(3))
    with pytest.raises(
        UnsupportedModelError, match=r"'c_unobserved' .*impute the missing values of 'c'.*add it"
    ):
        analyze_model(model, latent_vars=[])

"""Points outside the support during the numeric M-step, and parameters nothing
depends on.

Full-covariance mixtures with an ``LKJCholeskyCov`` prior go to the numeric M-step,
whose L-BFGS trial steps can reach covariances that are no longer numerically
positive definite (PyMC raises ``ParameterValueError: posdef covariance``). Such a
point must count as +inf and be stepped back from. References: the same model
written with ``pm.Mixture`` (the label summed out by PyMC), its marginal
log-posterior maximized by scipy, and closed-form minimizers.
"""

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pymc as pm
import pytest
from pymc.blocking import DictToArrayBijection, RaveledVars
from pymc.logprob.utils import ParameterValueError
from scipy import optimize
from sklearn.datasets import load_iris

import pm_em
from pm_em.routine.support import minimize_within_support, outside_support_as_inf

OPTIONS = {"maxiter": 500, "ftol": 0.0, "gtol": 1e-10, "maxcor": 20}


# -- the optimizer on its own --------------------------------------------------------


def test_minimizer_steps_back_from_points_outside_the_support():
    """``sum(a x - log x)``, refused for x <= 0 as PyMC refuses a parameter: scipy's
    L-BFGS-B alone stops at its first step (which leaves the support); the guarded
    minimizer reaches the minimizer ``1 / a``."""
    a = np.array([100.0, 1.0, 0.01])

    def negative(x):
        if np.any(x <= 0):
            raise ParameterValueError("x > 0")
        return float(np.sum(a * x - np.log(x))), a - 1 / x

    guarded = outside_support_as_inf(negative)
    start = np.full(3, 0.5)
    assert guarded(np.array([-1.0, 1.0, 1.0]))[0] == np.inf
    plain = optimize.minimize(guarded, start, jac=True, method="L-BFGS-B", options=OPTIONS)
    assert np.abs(plain.x - 1 / a).max() > 1.0  # what the M-step got before
    theta, value = minimize_within_support(guarded, start, OPTIONS)
    np.testing.assert_allclose(theta, 1 / a, rtol=1e-7)
    np.testing.assert_allclose(value, np.sum(1 - np.log(1 / a)), rtol=1e-12)


def test_minimizer_leaves_a_start_outside_the_support_alone():
    guarded = outside_support_as_inf(lambda x: (np.inf, np.zeros_like(x)))
    theta, value = minimize_within_support(guarded, np.ones(2), OPTIONS)
    np.testing.assert_array_equal(theta, np.ones(2))
    assert value == np.inf


# -- LKJ mixtures ----------------------------------------------------------------------


def _lkj_mixture(x, n_components, labelled):
    """K-component full-covariance mixture, an LKJ prior per component: the label
    written out (for pm_em) or summed out by ``pm.Mixture`` (the reference)."""
    n, d = x.shape
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(n_components))
        mu = pm.Normal("mu", x.mean(0), 10 * x.std(0), shape=(n_components, d))
        chols = [
            pm.LKJCholeskyCov(
                f"chol{k}",
                n=d,
                eta=2.0,
                sd_dist=pm.Exponential.dist(1.0, shape=d),
                compute_corr=True,
            )[0]
            for k in range(n_components)
        ]
        if labelled:
            z = pm.Categorical("z", p=w, shape=n)
            pm.MvNormal("x", mu=mu[z], chol=pm.math.stack(chols)[z], observed=x)
        else:
            components = [pm.MvNormal.dist(mu=mu[k], chol=c) for k, c in enumerate(chols)]
            pm.Mixture("x", w=w, comp_dists=components, observed=x)
    return model


class MarginalPosterior:
    """The reference: ``-log p(theta | x)`` of the ``pm.Mixture`` model (no Jacobian)
    and its gradient, on PyMC's flat unconstrained vector."""

    def __init__(self, model):
        self.logp = model.compile_logp(jacobian=False, mode="FAST_COMPILE")
        self.dlogp = model.compile_dlogp(jacobian=False, mode="FAST_COMPILE")
        start = model.initial_point()
        self.info = [(k, v.shape, v.size, v.dtype) for k, v in start.items()]

    def flat(self, em, point):
        """pm_em's constrained point on the reference's flat unconstrained vector."""
        values = dict(zip((p.value.name for p in em.params), em.to_values(point)))
        return DictToArrayBijection.map({k: values[k] for k, *_ in self.info}).data

    def __call__(self, theta):
        point = DictToArrayBijection.rmap(RaveledVars(theta, self.info))
        try:
            return -float(self.logp(point)), -np.asarray(self.dlogp(point))
        except ParameterValueError:
            return np.inf, np.zeros_like(theta)


def _estimates(em, idata):
    return {p.name: idata.posterior[p.name].values[0, 0] for p in em.params}


def _check_mode(em, reference, idata, grad_tol):
    """pm_em's log-posterior is the reference's at its point, never decreased along
    the fit, and scipy cannot improve it: a maximum of the marginal log-posterior."""
    trace = idata.em_stats["logp"].values
    assert np.all(np.diff(trace) >= -1e-9 * np.abs(trace[1:]))
    theta = reference.flat(em, _estimates(em, idata))
    value, grad = reference(theta)
    np.testing.assert_allclose(-value, trace[-1], rtol=1e-12)
    assert np.abs(grad).max() < grad_tol
    polished = optimize.minimize(reference, theta, jac=True, method="L-BFGS-B", options=OPTIONS)
    assert -polished.fun - trace[-1] < 1e-7 * abs(trace[-1])
    np.testing.assert_allclose(polished.x, theta, atol=1e-4)


@pytest.fixture(scope="module")
def iris_lkj():
    x = load_iris().data
    model = _lkj_mixture(x, 3, labelled=True)
    return model, pm_em.EM(model), MarginalPosterior(_lkj_mixture(x, 3, labelled=False))


def _single_gaussian_map(x):
    """The MAP of one component alone (its Normal mean prior and LKJ prior), by
    scipy on the marginal log-posterior of a one-Gaussian model."""
    n, d = x.shape
    with pm.Model() as model:
        mu = pm.Normal("mu", x.mean(0), 10 * x.std(0), shape=d)
        chol = pm.LKJCholeskyCov(
            "chol", n=d, eta=2.0, sd_dist=pm.Exponential.dist(1.0, shape=d), compute_corr=True
        )[0]
        pm.MvNormal("x", mu=mu, chol=chol, observed=x)
    reference = MarginalPosterior(model)
    start = DictToArrayBijection.map(model.initial_point()).data
    result = optimize.minimize(reference, start, jac=True, method="L-BFGS-B", options=OPTIONS)
    point = DictToArrayBijection.rmap(RaveledVars(result.x, reference.info))
    # The packed lower triangle, row by row, with the log of its diagonal.
    rows, cols = np.tril_indices(d)
    packed = point["chol_cholesky-cov-packed__"]
    chol_value = np.zeros((d, d))
    chol_value[rows, cols] = np.where(rows == cols, np.exp(packed), packed)
    return point["mu"], chol_value @ chol_value.T


@pytest.mark.filterwarnings("ignore:Empty component")
def test_lkj_mixture_on_iris_never_crashes_and_keeps_its_mode(iris_lkj):
    """A prior draw as the start (init="prior", seed 2): the numeric M-step's L-BFGS
    used to raise 'posdef covariance' here. Two components empty out (EM cannot
    leave a weight of 0); the third is then the MAP of one Gaussian on all the data,
    found independently by scipy."""
    model, em, reference = iris_lkj
    idata = pm_em.find_MAP(model, init="prior", random_seed=2, progressbar=False)
    trace = idata.em_stats["logp"].values
    assert np.all(np.diff(trace) >= -1e-9 * np.abs(trace[1:]))
    estimates = _estimates(em, idata)
    value, _ = reference(reference.flat(em, estimates))
    np.testing.assert_allclose(-value, trace[-1], rtol=1e-12)
    weights = estimates["w"]
    (full,) = np.flatnonzero(weights > 0.5)
    np.testing.assert_allclose(weights[full], 1.0, atol=1e-12)
    mu_ref, _ = _single_gaussian_map(load_iris().data)
    np.testing.assert_allclose(estimates["mu"][full], mu_ref, rtol=1e-6)
    # Not checked: its covariance, 1-5% off the reference's. The empty components'
    # scales run to 0 (their LKJ prior on the Cholesky factor has no mode), which
    # stalls the joint numeric block before the full component's factor is exact.


def _faithful_like(scale):
    """Two elongated clusters of very different scales, like Old Faithful (eruption
    minutes, waiting time), the waiting time multiplied by ``scale``."""
    rng = np.random.default_rng(0)
    short = rng.random(272) < 0.36
    a = rng.multivariate_normal([2.0, 54.5], [[0.07, 0.45], [0.45, 34.0]], size=272)
    b = rng.multivariate_normal([4.3, 80.0], [[0.17, 0.94], [0.94, 36.0]], size=272)
    return np.where(short[:, None], a, b) * np.array([1.0, scale])


@pytest.mark.slow
def test_lkj_mixture_with_waiting_times_in_seconds_never_crashes():
    """Waiting times in seconds (variance ~1e5 beside ~0.1): every jittered start
    used to end in 'posdef covariance'. The fit's log-posterior never decreases and
    is the pm.Mixture model's at its point. Both jittered starts end with one
    component collapsing onto a single observation (a Cholesky diagonal running to
    0, where the log-posterior is unbounded). Seed 1's diagonal moves by more than
    the collapse factor (1e8) and is flagged as degenerate; seed 0's stops at a
    factor ~1e7, below it (the README's LKJ note)."""
    x = _faithful_like(60.0)
    model = _lkj_mixture(x, 2, labelled=True)
    em = pm_em.EM(model)
    reference = MarginalPosterior(_lkj_mixture(x, 2, labelled=False))
    for seed in (0, 1):
        flagged = (
            pytest.warns(pm_em.DegenerateSolutionWarning, match=r"chol1\[2\] = ")
            if seed == 1
            else nullcontext()
        )
        with flagged:
            idata = pm_em.find_MAP(model, init="jitter", random_seed=seed, progressbar=False)
        trace = idata.em_stats["logp"].values
        assert np.all(np.diff(trace) >= -1e-9 * np.abs(trace[1:]))
        value, _ = reference(reference.flat(em, _estimates(em, idata)))
        np.testing.assert_allclose(-value, trace[-1], rtol=1e-12)
        assert trace[-1] > trace[0] + 1e4


@pytest.mark.slow
def test_lkj_mixture_on_faithful_like_data_reaches_the_map():
    """Minutes: pm_em's mode is a maximum of the pm.Mixture model's marginal
    log-posterior (scipy from there gains nothing, the gradient is ~0)."""
    x = _faithful_like(1.0)
    model = _lkj_mixture(x, 2, labelled=True)
    em = pm_em.EM(model)
    reference = MarginalPosterior(_lkj_mixture(x, 2, labelled=False))
    idata = pm_em.find_MAP(model, init="jitter", random_seed=1, tol=1e-12, progressbar=False)
    _check_mode(em, reference, idata, grad_tol=1e-4)


# -- Old Faithful (Azzalini & Bowman, 1990; R's datasets::faithful) -----------------

FAITHFUL = Path(__file__).parent / "data" / "faithful.csv"
#: scikit-learn's GaussianMixture(2, covariance_type="full", reg_covar=0), best of 10
#: starts at tol 1e-12: the maximum-likelihood fit of the real data.
FAITHFUL_MLE_LOGLIK = -1130.2639601847418
FAITHFUL_MLE_MEANS = np.array([[2.03638846, 54.47851644], [4.28966198, 79.96811524]])


@pytest.fixture(scope="module")
def faithful():
    return np.loadtxt(FAITHFUL, delimiter=",", skiprows=1)


def test_lkj_mixture_on_old_faithful_reaches_the_map(faithful):
    """Unstandardized Old Faithful, K = 2, the default start (k-means on the MvNormal
    means, then one M-step on its labels): this used to crash with 'posdef
    covariance' for every seed. The fit is a maximum of the pm.Mixture model's
    marginal log-posterior (scipy from there gains nothing), and, the priors being
    weak, lies beside the maximum-likelihood fit of scikit-learn."""
    model = _lkj_mixture(faithful, 2, labelled=True)
    em = pm_em.EM(model)
    reference = MarginalPosterior(_lkj_mixture(faithful, 2, labelled=False))
    idata = pm_em.find_MAP(model, random_seed=0, tol=1e-12, progressbar=False)
    assert idata.em_stats.attrs["init"] == "kmeans"
    _check_mode(em, reference, idata, grad_tol=1e-3)
    loglik = float(idata.log_likelihood["x"].sum())
    assert FAITHFUL_MLE_LOGLIK - 0.5 < loglik < FAITHFUL_MLE_LOGLIK
    means = idata.posterior["mu"].values[0, 0]
    np.testing.assert_allclose(means[np.argsort(means[:, 0])], FAITHFUL_MLE_MEANS, rtol=2e-3)

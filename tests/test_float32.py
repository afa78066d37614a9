"""pm_em under ``pytensor.config.floatX = "float32"``.

The model's value variables are then float32, while pm_em's own arithmetic (scipy's
optimizer, SQUAREM, the starts) is in float64: every value is cast to the compiled
graph's dtype as it enters it (:mod:`pm_em.compile`), log-densities are summed in
float64, and the loop's rounding allowances follow float32's precision
(:mod:`pm_em.fit.precision`). Each fit is compared with the float64 fit of the same model
from the same start, converged tightly (the mode itself), and must converge without
any warning (warnings are errors in this suite).
"""

import numpy as np
import pymc as pm
import pytensor
import pytest

import pm_em
from pm_em.compile import _cast
from pm_em.fit.loop import _DECREASE_TOLERANCE, _ROUNDING
from pm_em.fit.precision import loop_tolerances
from pm_em.model.analysis import analyze_model
from pm_em.routine.em import cached_routine

N = 200
# A float32 fit stops where its values have settled to ~64 eps32 (8e-6); it agrees
# with the float64 mode to ~2e-5 on these models.
RTOL = 1e-4
# For entries near 0 (a weight or a mean), where a relative tolerance says nothing.
ATOL = 1e-5

RNG = np.random.default_rng(11)
X = np.concatenate([RNG.normal(-2.0, 1.0, N // 2), RNG.normal(3.0, 1.0, N // 2)])
T = np.concatenate([RNG.standard_t(4, N // 2) - 2.0, 0.5 * RNG.standard_t(4, N // 2) + 2.0])
X2 = np.concatenate(
    [RNG.normal([-2.0, 0.0], 1.0, (N // 2, 2)), RNG.normal([2.0, 1.0], 0.7, (N // 2, 2))]
)


def _hmm_data():
    states = np.zeros(N, dtype=int)
    for t in range(1, N):
        states[t] = states[t - 1] if RNG.random() < 0.9 else 1 - states[t - 1]
    return RNG.normal(np.array([-1.0, 1.5])[states], 0.6)


Y_HMM = _hmm_data()


def normal_mixture():
    """The seed model: every parameter in closed form."""
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Normal("mu", 0.0, 10.0, shape=2)
        sigma = pm.HalfNormal("sigma", 5.0, shape=2)
        z = pm.Categorical("z", w, shape=N)
        pm.Normal("x", mu[z], sigma[z], observed=X)
    start = {"w": np.array([0.5, 0.5]), "mu": np.array([-1.0, 1.0]), "sigma": np.ones(2)}
    return model, start


def student_t_mixture():
    """Weights in closed form; locations and scales by the numeric M-step (scipy)."""
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Normal("mu", 0.0, 10.0, shape=2)
        sigma = pm.InverseGamma("sigma", 3.0, 2.0, shape=2)
        z = pm.Categorical("z", w, shape=N)
        pm.StudentT("t", nu=4, mu=mu[z], sigma=sigma[z], observed=T)
    start = {"w": np.array([0.5, 0.5]), "mu": np.array([-1.0, 1.0]), "sigma": np.ones(2)}
    return model, start


def mvnormal_mixture():
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Normal("mu", 0.0, 10.0, shape=(2, 2))
        z = pm.Categorical("z", w, shape=N)
        pm.MvNormal("x", mu[z], cov=np.eye(2), observed=X2)
    start = {"w": np.array([0.5, 0.5]), "mu": np.array([[-1.0, 0.0], [1.0, 0.0]])}
    return model, start


def hidden_markov_model():
    pmx = pytest.importorskip("pymc_extras")
    with pm.Model() as model:
        P = pm.Dirichlet("P", a=np.full((2, 2), 2.0) + 3 * np.eye(2))
        pi = pm.Dirichlet("pi", a=np.full(2, 2.0))
        mu = pm.Normal("mu", 0.0, 5.0, shape=2)
        sigma = pm.InverseGamma("sigma", 3.0, 2.0, shape=2)
        s = pmx.DiscreteMarkovChain("s", P=P, init_dist=pm.Categorical.dist(p=pi), shape=N)
        pm.Normal("y", mu=mu[s], sigma=sigma[s], observed=Y_HMM)
    start = {
        "P": np.array([[0.8, 0.2], [0.2, 0.8]]),
        "pi": np.array([0.5, 0.5]),
        "mu": np.array([-0.5, 0.5]),
        "sigma": np.ones(2),
    }
    return model, start


def _build(build, floatx):
    with pytensor.config.change_flags(floatX=floatx):
        return build()


class Case:
    """A model built in float32 and in float64 (each compiled once, then reused by
    every fit), and the float64 mode: the float64 fit from the same start, converged
    far below float32's resolution."""

    def __init__(self, build):
        self.model32, self.start = _build(build, "float32")
        self.model64, _ = _build(build, "float64")
        self.reference = self.fit(self.model64, tol=1e-12, accelerate="squarem")

    def fit(self, model, **kwargs):
        """find_MAP from the case's start, with ``floatX`` set as a user would."""
        floatx = "float32" if model is self.model32 else "float64"
        with pytensor.config.change_flags(floatX=floatx):
            return pm_em.find_MAP(model, initvals=self.start, progressbar=False, **kwargs)

    def check(self, closed_form: set[str], **kwargs):
        """Fit in float32 (default tol) and compare with the float64 mode."""
        fit32 = self.fit(self.model32, **kwargs)
        floats = [v for v in self.model32.value_vars if v.type.dtype.startswith("float")]
        assert floats and all(v.type.dtype == "float32" for v in floats)
        # The same closed-form blocks as in float64 (their pattern tests hold in float32).
        assert set(cached_routine(self.model32).closed_form_params) == closed_form
        assert bool(fit32.em_stats.converged)
        for name in [rv.name for rv in self.model32.free_RVs if rv.type.dtype == "float32"]:
            value = fit32.posterior[name].values
            assert value.dtype == np.float32
            np.testing.assert_allclose(
                value, self.reference.posterior[name].values, rtol=RTOL, atol=ATOL, err_msg=name
            )
        for group in (fit32.posterior, fit32.log_likelihood):
            for name, values in group.data_vars.items():
                assert np.isfinite(values.values).all(), name
        np.testing.assert_allclose(
            fit32.em_stats.logp.values[-1], self.reference.em_stats.logp.values[-1], rtol=1e-7
        )
        return fit32


@pytest.fixture(scope="module")
def normal():
    return Case(normal_mixture)


def test_normal_mixture_closed_form(normal):
    normal.check({"w", "mu", "sigma"})


def test_normal_mixture_squarem(normal):
    normal.check({"w", "mu", "sigma"}, accelerate="squarem")


def test_numeric_m_step():
    Case(student_t_mixture).check({"w"})


def test_mvnormal_mixture():
    Case(mvnormal_mixture).check({"w", "mu"})


def test_hidden_markov_model():
    Case(hidden_markov_model).check({"P", "pi", "mu", "sigma"})


def test_step_by_step_and_laplace(normal):
    """The step-by-step API takes float64 points, and the Laplace approximation (in
    float64 on the unconstrained space, the graph in float32) matches float64's."""
    em = cached_routine(normal.model32)
    point = normal.start
    logps = [em.logp(point)]
    for _ in range(5):
        point = em.m_step(point, em.e_step(point))
        logps.append(em.logp(point))
    assert np.all(np.diff(logps) > 0)
    laplace32 = pm_em.fit_laplace(normal.check({"w", "mu", "sigma"}), normal.model32, draws=10)
    laplace64 = pm_em.fit_laplace(normal.reference, normal.model64, draws=10)
    np.testing.assert_allclose(
        laplace32.fit["covariance_matrix"].values,
        laplace64.fit["covariance_matrix"].values,
        rtol=1e-3,
        atol=1e-6,
    )
    for name in ("w", "mu", "sigma"):
        np.testing.assert_allclose(
            laplace32.fit[f"{name}_se"].values, laplace64.fit[f"{name}_se"].values, rtol=1e-3
        )


def test_float64_tolerances_are_unchanged():
    """float64 runs exactly as before: its constants, no stall rule; also for a model
    with float32 terms (a density of literals alone, as ``Uniform(0.0, 1.0)``'s)."""
    eps64 = float(np.finfo(np.float64).eps)
    with pytensor.config.change_flags(floatX="float64"):
        with pm.Model() as model:
            p = pm.Uniform("p", 0.0, 1.0, shape=2)
            coin = pm.Bernoulli("coin", p=np.float64(0.5), shape=5)
            pm.Binomial("heads", n=10, p=p[coin], observed=np.arange(5))
        structure = analyze_model(model)
    assert structure.float_eps == eps64
    assert loop_tolerances(eps64, _ROUNDING, _DECREASE_TOLERANCE) == (
        _ROUNDING,
        _DECREASE_TOLERANCE,
        0.0,
        np.inf,
    )
    tolerances = loop_tolerances(float(np.finfo(np.float32).eps), _ROUNDING, _DECREASE_TOLERANCE)
    assert tolerances.blurred
    assert _ROUNDING < tolerances.rounding < tolerances.decrease < 1e-4


def test_cast_at_the_boundary():
    """float64 arrays pass into float64 inputs untouched; float32 inputs get a cast
    (inf beyond float32's range, without a warning); integer inputs are left alone."""
    value = np.array([1.0, 2.0])
    assert _cast(value, "float64") is value
    cast = _cast(np.array([1.0, 1e300]), "float32")
    assert cast.dtype == np.float32
    assert cast[0] == 1.0
    assert np.isinf(cast[1])
    labels = np.array([0, 1])
    assert _cast(labels, None) is labels

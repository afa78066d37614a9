"""Property-based tests (hypothesis) of EM on small models with random data and starts.

Properties
----------
1. **The E-step is exact.** On tiny models (3-5 observations, 2-3 support values),
   the responsibilities and the observed-data log-posterior equal a brute-force
   reference (``tests.references.brute_force``): PyMC's own joint log-density
   (``model.compile_logp(jacobian=False)``) evaluated at every joint configuration of
   all latents, normalized jointly, then summed into per-element marginals.
   Responsibilities sum to one. The models cover
   an element-wise mixture, two interacting latents (a global regime shifting every
   element's mixture; a latent whose distribution is indexed by another), repeated
   measures (one latent element per group, groups in any order) and a zero-inflated
   Poisson written with its label, where ``z_i = 0`` is impossible for ``y_i > 0``
   (its log responsibility must be exactly ``-inf``, never NaN).
2. **EM is monotone.** The ``em_stats`` trace of the observed-data log-posterior never
   decreases (beyond a relative rounding of 1e-10) for random data and random starts,
   with plain EM, ``accelerate="auto"`` and ``accelerate="squarem"``.
3. **EM is permutation equivariant.** Permuting the data permutes the
   responsibilities and leaves the estimates unchanged (same start, tight ``tol``).
4. **Fits are reproducible.** The same ``random_seed`` gives identical arrays, with
   one start and with several (``n_init > 1``), for every ``init`` strategy.
5. **A fit never changes the user's model**: its variables, value variables,
   transforms, initial values, initial point, log-probability graph, ``pm.Data``
   values and observed arrays; ``pm.sample`` still works on it afterwards.

The data live in ``pm.Data`` containers, so each model is compiled once per module and
hypothesis varies the data with ``pm.set_data`` (fixed shape) and the parameters as
points passed to the compiled routine. What the compiled routine caches from the data
is tested too: new values of the observations are picked up; after a new data length
an old ``EM`` refuses with a clear error while ``find_MAP`` rebuilds and matches PyMC's
density of a model built on the new data; new values of an index array (which
observation belongs to which latent element) are not picked up (strict ``xfail``: the
routine keeps the latent-element map of the data it was built with).
"""

import types
import warnings

import numpy as np
import pymc as pm
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.special import logsumexp

import pm_em
from pm_em.routine.em import cached_routine
from tests.helpers import latent_supports, sample_briefly, snapshot
from tests.references.brute_force import ModelEnumerator

# Hypothesis: reproducible examples (CI sees the same ones), no example database, no
# deadline (the first call of a compiled function is slower than the others).
E_STEP_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None)
FIT_SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None)

#: Fits capped at this many iterations: the properties hold at every iteration, and
#: random data can make EM slow to converge (the cap's warning is expected).
MAX_ITER = 60
#: A capped fit's only accepted warning (the others, e.g. a decrease of the
#: log-posterior or a degenerate solution, stay errors).
NOT_CONVERGED = "EM did not converge"


def _finite(low, high):
    return st.floats(low, high, allow_nan=False, allow_infinity=False)


def _unconstrained_point(data, em, bound=2.0):
    """A random parameter point: uniform-ish values on the unconstrained space (any
    value there is valid), mapped to the constrained space by the routine."""
    values = [
        data.draw(arrays(np.float64, p.value_shape, elements=_finite(-bound, bound)), label=p.name)
        for p in em.params
    ]
    return em.to_point(values)


# -- the models: compiled once per module -----------------------------------------------


N_MIXTURE, K_MIXTURE = 5, 3


def mixture_model(x=None):
    """Element-wise mixture, every parameter in closed form.

    The priors rule out degenerate solutions on any data in [-4, 4], so a fit must not
    warn. After an M-step, a component's weight is at least ``1 / (n + K)``
    (Dirichlet(2)), its location lies between the prior mean 0 and the data, and its
    scale is at least ``6 / (n + 4)`` (InverseGamma(3, 6): the closed-form scale with
    no spread): no scale collapses, and no component's responsibilities can all fall
    near 0 (which a narrower scale prior allows: with InverseGamma(3, 2), five equal
    observations at 3 leave a component empty, legitimately).
    """
    x = np.linspace(-2.0, 2.0, N_MIXTURE) if x is None else x
    coords = {"component": range(K_MIXTURE), "obs": range(len(x))}
    with pm.Model(coords=coords) as model:
        x = pm.Data("x_data", x, dims="obs")
        w = pm.Dirichlet("w", a=np.full(K_MIXTURE, 2.0), dims="component")
        mu = pm.Normal("mu", 0.0, 3.0, dims="component")
        sigma = pm.InverseGamma("sigma", 3.0, 6.0, dims="component")
        z = pm.Categorical("z", p=w, dims="obs")
        pm.Normal("x", mu=mu[z], sigma=sigma[z], observed=x, dims="obs")
        pm.Deterministic("spread", mu.max() - mu.min())
    return model


N_ZIP = 5


def zip_model():
    """Zero-inflated Poisson with its label written out: ``Poisson(z * rate)`` gives
    ``y_i > 0`` probability 0 under ``z_i = 0``."""
    with pm.Model() as model:
        y = pm.Data("y_data", np.array([0, 1, 0, 3, 2]))
        psi = pm.Beta("psi", 2.0, 2.0)
        rate = pm.Gamma("rate", 2.0, 0.5)
        z = pm.Bernoulli("z", p=psi, shape=N_ZIP)
        pm.Poisson("y", mu=z * rate, observed=y)
    return model


N_REGIME = 4


def regime_model():
    """A global (scalar) regime shifting every element of a mixture: the two latents
    interact, so all of them are enumerated jointly over all the data."""
    with pm.Model() as model:
        x = pm.Data("x_data", np.array([0.4, 2.1, 2.9, -0.3]))
        regime_p = pm.Beta("regime_p", 2.0, 2.0)
        w = pm.Dirichlet("w", a=np.full(2, 2.0))
        mu = pm.Normal("mu", 0.0, 3.0, shape=2)
        shift = pm.Normal("shift", 0.0, 2.0)
        regime = pm.Bernoulli("regime", p=regime_p)
        z = pm.Categorical("z", p=w, shape=N_REGIME)
        pm.Normal("x", mu=mu[z] + regime * shift, sigma=1.0, observed=x)
    return model


N_CHAINED = 3


def chained_model():
    """``z2[i] ~ Categorical(P[z1[i]])`` and ``x[i]`` depends on both: the product
    support (2 x 3) is enumerated per element."""
    with pm.Model() as model:
        x = pm.Data("x_data", np.array([0.2, 1.7, 3.1]))
        w = pm.Dirichlet("w", a=np.full(2, 2.0))
        transition = pm.Dirichlet("transition", a=np.full((2, 3), 2.0))
        mu = pm.Normal("mu", 0.0, 3.0, shape=(2, 3))
        z1 = pm.Categorical("z1", p=w, shape=N_CHAINED)
        z2 = pm.Categorical("z2", p=transition[z1], shape=N_CHAINED)
        pm.Normal("x", mu=mu[z1, z2], sigma=1.0, observed=x)
    return model


GROUP = np.array([2, 0, 1, 0, 2, 1])


def repeated_model():
    """Repeated measures in no particular order: observation ``j`` depends on the
    latent element ``group[j]`` (the index is a ``pm.Data`` too)."""
    with pm.Model() as model:
        group = pm.Data("group", GROUP)
        y = pm.Data("y_data", np.array([0.1, 2.2, 1.9, -0.4, 0.5, 0.2]))
        p = pm.Beta("p", 2.0, 2.0)
        mu = pm.Normal("mu", 0.0, 3.0, shape=2)
        z = pm.Bernoulli("z", p=p, shape=3)
        pm.Normal("y", mu=mu[z[group]], sigma=1.0, observed=y)
    return model


class Fixed(types.SimpleNamespace):
    """A model with its compiled EM routine, brute-force log-density and defaults."""

    def __repr__(self):  # hypothesis prints the fixtures of a failing example
        return f"Fixed({self.data_name})"


def _setup(build, data_name):
    model = build()
    before = snapshot(model)  # before pm_em has seen the model
    default = model[data_name].get_value().copy()
    em = pm_em.EM(model)
    return Fixed(
        model=model,
        em=em,
        exact=ModelEnumerator(model, latent_supports(em)),
        data_name=data_name,
        default=default,
        before=before,
    )


def _fixed_fixture(name, build, data_name):
    """The module-scoped fixture ``name``: :func:`_setup` of one model (compiled once)."""
    return pytest.fixture(scope="module", name=name)(lambda: _setup(build, data_name))


mixture = _fixed_fixture("mixture", mixture_model, "x_data")
zip_fixed = _fixed_fixture("zip_fixed", zip_model, "y_data")
regime = _fixed_fixture("regime", regime_model, "x_data")
chained = _fixed_fixture("chained", chained_model, "x_data")
repeated = _fixed_fixture("repeated", repeated_model, "y_data")


def set_data(fixed, values, **coords):
    pm.set_data({fixed.data_name: values}, model=fixed.model, coords=coords or None)


# -- the reference: brute-force enumeration of PyMC's joint density ----------------------


def brute_force(fixed, point):
    """Exact ``log p(data, theta)`` (latents summed out) and posterior marginal of
    every latent element, by enumerating all joint configurations of all latents."""
    exact = fixed.exact(point)
    return exact.log_marginal, {name: np.exp(lp) for name, lp in exact.log_marginals.items()}


def assert_e_step_exact(fixed, point):
    em = fixed.em
    log_marginal, marginals = brute_force(fixed, point)
    assert np.isfinite(log_marginal)
    np.testing.assert_allclose(em.logp(point), log_marginal, rtol=1e-10)
    log_resp = em.e_step(point)
    assert set(log_resp) == set(marginals)
    for name, expected in marginals.items():
        lp = log_resp[name]
        assert lp.shape == expected.shape
        assert not np.isnan(lp).any()
        np.testing.assert_allclose(logsumexp(lp, axis=-1), 0.0, atol=1e-12)
        np.testing.assert_allclose(np.exp(lp), expected, atol=1e-10)
    return log_resp


# -- 1. the E-step against brute force -----------------------------------------------------


@E_STEP_SETTINGS
@given(data=st.data(), x=arrays(np.float64, N_MIXTURE, elements=_finite(-4, 4)))
def test_mixture_e_step_matches_brute_force(mixture, data, x):
    set_data(mixture, x)
    assert_e_step_exact(mixture, _unconstrained_point(data, mixture.em))


@E_STEP_SETTINGS
@given(data=st.data(), x=arrays(np.float64, N_REGIME, elements=_finite(-4, 4)))
def test_global_and_element_latents_match_brute_force(regime, data, x):
    set_data(regime, x)
    log_resp = assert_e_step_exact(regime, _unconstrained_point(data, regime.em))
    assert log_resp["regime"].shape == (2,)


@E_STEP_SETTINGS
@given(data=st.data(), x=arrays(np.float64, N_CHAINED, elements=_finite(-4, 4)))
def test_chained_latents_match_brute_force(chained, data, x):
    set_data(chained, x)
    assert_e_step_exact(chained, _unconstrained_point(data, chained.em))


@E_STEP_SETTINGS
@given(data=st.data(), y=arrays(np.float64, len(GROUP), elements=_finite(-4, 4)))
def test_repeated_measures_match_brute_force(repeated, data, y):
    set_data(repeated, y)
    assert_e_step_exact(repeated, _unconstrained_point(data, repeated.em))


# Counts with at least one zero and one positive count, so both labels stay possible.
zip_counts = st.tuples(
    st.integers(1, 8), arrays(np.int64, N_ZIP - 2, elements=st.integers(0, 8))
).map(lambda t: np.concatenate([[0, t[0]], t[1]]))


@E_STEP_SETTINGS
@given(data=st.data(), y=zip_counts)
def test_impossible_configurations_get_minus_infinity(zip_fixed, data, y):
    set_data(zip_fixed, y)
    log_resp = assert_e_step_exact(zip_fixed, _unconstrained_point(data, zip_fixed.em))
    lp = log_resp["z"]
    # No zero inflation behind a positive count: exactly -inf, and 0 for z = 1 (to
    # rounding: XLA may round the two sides of log p - logsumexp(log p) differently).
    assert np.all(np.isneginf(lp[y > 0, 0]))
    np.testing.assert_allclose(lp[y > 0, 1], 0.0, rtol=0.0, atol=1e-12)
    assert np.all(np.isfinite(lp[y == 0]))


# -- 2. the log-posterior never decreases ------------------------------------------------


def fit(model, **kwargs):
    """find_MAP; a capped run may end unconverged, and starts on random data may end
    at different modes (tested in test_restarts.py); nothing else may warn."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=NOT_CONVERGED, category=pm_em.EMConvergenceWarning
        )
        warnings.filterwarnings("ignore", category=pm_em.MultimodalWarning)
        return pm_em.find_MAP(model, progressbar=False, **kwargs)


def assert_monotone(trace):
    trace = np.asarray(trace)
    assert np.all(np.isfinite(trace))
    assert np.all(np.diff(trace) >= -1e-10 * np.abs(trace[:-1])), np.diff(trace).min()


accelerations = st.sampled_from([None, "auto", "squarem"])


@FIT_SETTINGS
@given(
    data=st.data(),
    x=arrays(np.float64, N_MIXTURE, elements=_finite(-4, 4)),
    accelerate=accelerations,
)
def test_mixture_log_posterior_never_decreases(mixture, data, x, accelerate):
    set_data(mixture, x)
    start = _unconstrained_point(data, mixture.em)
    idata = fit(mixture.model, initvals=start, accelerate=accelerate, max_iter=MAX_ITER)
    trace = idata.em_stats["logp"].values
    assert_monotone(trace)
    np.testing.assert_allclose(trace[0], mixture.em.logp(start), rtol=1e-12)
    # The fit reads the data it was given: responsibilities exact at its end point.
    end = {p.name: idata.posterior[p.name].values[0, 0] for p in mixture.em.params}
    _, marginals = brute_force(mixture, end)
    np.testing.assert_allclose(
        np.exp(idata.posterior["lp_z"].values[0, 0]), marginals["z"], atol=1e-10
    )


@FIT_SETTINGS
@given(data=st.data(), y=zip_counts, accelerate=accelerations)
def test_zip_log_posterior_never_decreases(zip_fixed, data, y, accelerate):
    set_data(zip_fixed, y)
    start = _unconstrained_point(data, zip_fixed.em)
    idata = fit(zip_fixed.model, initvals=start, accelerate=accelerate, max_iter=MAX_ITER)
    assert_monotone(idata.em_stats["logp"].values)


# -- 3. permuting the data ---------------------------------------------------------------


@E_STEP_SETTINGS
@given(
    data=st.data(),
    x=arrays(np.float64, N_REGIME, elements=_finite(-4, 4)),
    order=st.permutations(range(N_REGIME)),
)
def test_e_step_is_permutation_equivariant(regime, data, x, order):
    order = np.asarray(order)
    point = _unconstrained_point(data, regime.em)
    set_data(regime, x)
    before = regime.em.e_step(point)
    logp = regime.em.logp(point)
    set_data(regime, x[order])
    after = regime.em.e_step(point)
    np.testing.assert_allclose(after["z"], before["z"][order], atol=1e-10)
    np.testing.assert_allclose(after["regime"], before["regime"], atol=1e-10)
    np.testing.assert_allclose(regime.em.logp(point), logp, rtol=1e-12)


@FIT_SETTINGS
@given(
    data=st.data(),
    x=arrays(np.float64, N_MIXTURE, elements=_finite(-4, 4)),
    order=st.permutations(range(N_MIXTURE)),
)
def test_fit_is_permutation_equivariant(mixture, data, x, order):
    order = np.asarray(order)
    start = _unconstrained_point(data, mixture.em)
    fits = []
    for values in (x, x[order]):
        set_data(mixture, values)
        fits.append(fit(mixture.model, initvals=start, tol=1e-12, max_iter=2000))
    original, permuted = fits
    for p in mixture.em.params:
        np.testing.assert_allclose(
            permuted.posterior[p.name].values,
            original.posterior[p.name].values,
            rtol=1e-6,
            atol=1e-8,
        )
    np.testing.assert_allclose(
        np.exp(permuted.posterior["lp_z"].values[0, 0]),
        np.exp(original.posterior["lp_z"].values[0, 0][order]),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        permuted.em_stats["logp"].values[-1], original.em_stats["logp"].values[-1], rtol=1e-10
    )


# -- 4. the same seed, the same fit -------------------------------------------------------


def assert_identical(first, second):
    for group in ("posterior", "log_likelihood", "em_stats"):
        a, b = first[group], second[group]
        assert set(a.data_vars) == set(b.data_vars)
        for name in a.data_vars:
            np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    assert first.em_stats.attrs == second.em_stats.attrs


@FIT_SETTINGS
@given(
    x=arrays(np.float64, N_MIXTURE, elements=_finite(-4, 4)),
    seed=st.integers(0, 2**32 - 1),
    n_init=st.integers(1, 3),
    init=st.sampled_from(["auto", "jitter", "prior"]),
    accelerate=accelerations,
)
def test_same_seed_same_fit(mixture, x, seed, n_init, init, accelerate):
    # init="auto" is k-means on the observations, read from the pm.Data container.
    set_data(mixture, x)
    kwargs = dict(random_seed=seed, n_init=n_init, init=init, accelerate=accelerate)
    first = fit(mixture.model, max_iter=MAX_ITER, **kwargs)
    second = fit(mixture.model, max_iter=MAX_ITER, **kwargs)
    assert_identical(first, second)
    assert first.em_stats["restart_logp"].shape[0] == n_init


# -- 5. the user's model is left as it was -----------------------------------------------


def test_fit_leaves_the_model_untouched_and_it_still_samples(mixture):
    set_data(mixture, mixture.default)
    assert snapshot(mixture.model) == mixture.before
    idata = fit(mixture.model, random_seed=3, n_init=2, accelerate="squarem", max_iter=MAX_ITER)
    assert snapshot(mixture.model) == mixture.before
    np.testing.assert_array_equal(idata.observed_data["x"].values, mixture.default)
    trace = sample_briefly(mixture.model)
    assert set(trace.posterior.data_vars) == {"w", "mu", "sigma", "z", "spread"}
    assert snapshot(mixture.model) == mixture.before


def test_implicit_mixture_model_untouched_and_still_samples():
    # pm_em rewrites a copy of a model with an observed mixture distribution: the
    # user's model, and the numpy array it was given, must not change.
    x = np.array([-1.2, -0.8, 0.1, 2.3, 2.9, 3.4])
    given_x = x.copy()
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.full(2, 2.0))
        mu = pm.Normal("mu", np.array([-1.0, 1.0]), 3.0, shape=2)
        sigma = pm.InverseGamma("sigma", 3.0, 2.0, shape=2)
        pm.NormalMixture("x", w=w, mu=mu, sigma=sigma, observed=x)
    before = snapshot(model)
    fit(model, random_seed=1, max_iter=MAX_ITER)
    assert snapshot(model) == before
    np.testing.assert_array_equal(x, given_x)
    trace = sample_briefly(model)
    assert set(trace.posterior.data_vars) == {"w", "mu", "sigma"}


# -- what the compiled routine caches from the data ---------------------------------------


def test_new_data_values_are_picked_up(mixture):
    # The same compiled routine, other observations: other responsibilities, and the
    # ones brute force gives for the new data.
    point = {
        "w": np.array([0.2, 0.3, 0.5]),
        "mu": np.array([-2.0, 0.0, 2.0]),
        "sigma": np.array([0.5, 1.0, 1.5]),
    }
    set_data(mixture, mixture.default)
    before = mixture.em.e_step(point)["z"]
    set_data(mixture, mixture.default[::-1] + 0.5)
    after = assert_e_step_exact(mixture, point)["z"]
    assert not np.allclose(after, before)
    set_data(mixture, mixture.default)


def test_new_index_values_rebuild_the_routine(repeated):
    """Which latent element each observation depends on is read from the index once:
    with new index values the old routine refuses, and a rebuilt one is exact."""
    point = {"p": np.array(0.4), "mu": np.array([0.0, 2.0])}
    set_data(repeated, repeated.default)
    try:
        pm.set_data({"group": GROUP[::-1].copy()}, model=repeated.model)
        with pytest.raises(ValueError, match=r"values of 'group' changed"):
            repeated.em.e_step(point)
        rebuilt = cached_routine(repeated.model)
        assert rebuilt is not repeated.em
        assert_e_step_exact(Fixed(**{**vars(repeated), "em": rebuilt}), point)
    finally:
        pm.set_data({"group": GROUP}, model=repeated.model)
    # Back to the values it was built for, the old routine is exact again.
    assert_e_step_exact(repeated, point)


def test_implicit_mixture_sees_new_data():
    """An observed mixture distribution is fitted on a rewritten copy of the model,
    with PyMC's copies of the pm.Data: new values set on the user's model must reach
    it."""
    with pm.Model() as model:
        data = pm.Data("x_data", np.array([-2.0, -1.9, -2.1, 2.0, 2.1, 1.9]))
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Normal("mu", 0.0, 10.0, shape=2)
        pm.NormalMixture("x", w=w, mu=mu, sigma=1.0, observed=data)
    em = pm_em.EM(model)
    point = {"w": np.array([0.4, 0.6]), "mu": np.array([-2.0, 2.0])}
    logp = model.compile_logp(jacobian=False, mode="FAST_COMPILE")
    unconstrained = {"w_simplex__": em.to_values(point)[0], "mu": point["mu"]}
    np.testing.assert_allclose(em.logp(point), logp(unconstrained), rtol=1e-12)
    pm.set_data({"x_data": np.array([0.5, -1.0, 3.0, 2.5, 1.0, -0.2])}, model=model)
    np.testing.assert_allclose(em.logp(point), logp(unconstrained), rtol=1e-12)


def test_new_data_length_matches_a_fresh_model(mixture):
    # Last in the module: the routine find_MAP rebuilds for the new length replaces
    # the fixture's in the cache (which still works once the length is restored).
    longer = np.array([-3.0, -2.5, 0.1, 0.4, 2.0, 2.6, 3.1])
    start = {
        "w": np.array([0.3, 0.3, 0.4]),
        "mu": np.array([-2.5, 0.0, 2.5]),
        "sigma": np.array([1.0, 1.0, 1.0]),
    }
    fresh = mixture_model(longer)
    try:
        set_data(mixture, longer, obs=range(len(longer)))
        with pytest.raises(ValueError, match="data changed shape"):
            mixture.em.e_step(start)
        idata = fit(mixture.model, initvals=start, tol=1e-10)
        routine = cached_routine(mixture.model)
        end = {p.name: idata.posterior[p.name].values[0, 0] for p in routine.params}
        # The reference: PyMC's density of a model built on the new data.
        reference = Fixed(
            model=fresh,
            em=routine,
            exact=ModelEnumerator(fresh, latent_supports(routine)),
            data_name="x_data",
        )
        log_marginal, marginals = brute_force(reference, end)
        np.testing.assert_allclose(idata.em_stats["logp"].values[-1], log_marginal, rtol=1e-10)
        np.testing.assert_allclose(
            np.exp(idata.posterior["lp_z"].values[0, 0]), marginals["z"], atol=1e-10
        )
        assert_monotone(idata.em_stats["logp"].values)
    finally:
        set_data(mixture, mixture.default, obs=range(N_MIXTURE))
    assert_e_step_exact(mixture, start)  # the old routine fits the old shape again

"""Latent structures EM cannot enumerate exactly are refused, with a message that
names the variable and the way out; bad options get a ValueError."""

import numpy as np
import pymc as pm
import pytest

import pm_em
from pm_em import UnsupportedModelError


def poisson_latent():
    with pm.Model() as model:
        rate = pm.Exponential("rate", 1.0)
        k = pm.Poisson("k", rate, shape=3)
        pm.Normal("y", k, 1.0, observed=np.zeros(3))
    return model


def summed_latent():
    with pm.Model() as model:
        z = pm.Bernoulli("z", 0.5, shape=3)
        pm.Normal("y", z.sum(), 1.0, observed=1.0)
    return model


def cumsum_latent():
    with pm.Model() as model:
        mu = pm.Normal("mu", 0, 1)
        z = pm.Bernoulli("z", 0.5, shape=3)
        pm.Normal("y", mu + z.cumsum(), 1.0, observed=np.zeros(3))
    return model


def imputed_continuous():
    with pm.Model() as model, pytest.warns(pm.ImputationWarning):
        mu = pm.Normal("mu", 0, 1)
        z = pm.Bernoulli("z", 0.5, shape=3)
        pm.Normal("y", mu + z, 1.0, observed=np.array([0.1, np.nan, 0.3]))
    return model


def parameter_dependent_support():
    with pm.Model() as model:
        upper = pm.Normal("upper", 3, 1)
        k = pm.DiscreteUniform("k", 0, upper.astype("int64"))
        pm.Normal("y", k, 1.0, observed=1.0)
    return model


def misaligned_latents():
    with pm.Model() as model:
        z1 = pm.Bernoulli("z1", 0.5, shape=2)
        z2 = pm.Bernoulli("z2", 0.5, shape=3)
        pm.Normal("y", z1[[0, 1, 1]] + z2, 1.0, observed=np.zeros(3))
    return model


def crossed_latents():
    with pm.Model() as model:
        z1 = pm.Bernoulli("z1", 0.5, shape=3)
        z2 = pm.Bernoulli("z2", 0.5, shape=3)
        pm.Normal("y", z1 + z2[::-1], 1.0, observed=np.zeros(3))
    return model


def split_parameter_index():
    # Index arrays on either side of a slice (NumPy moves their block to the front):
    # vectorize_graph cannot batch them. (beta[z, :] is fitted: tests/test_broadcast.py.)
    with pm.Model() as model:
        beta = pm.Normal("beta", 0, 2, shape=(2, 2, 2))
        z = pm.Bernoulli("z", np.float64(0.4), shape=3)
        pm.Normal("y", beta[z, :, z].sum(-1), 1.0, observed=np.zeros(3))
    return model


def many_coupled_latents():
    with pm.Model() as model:
        mu = pm.Normal("mu", 0, 1)
        flags = [pm.Bernoulli(f"z{i}", 0.5) for i in range(30)]
        pm.Normal("y", mu + sum(flags), 1.0, observed=np.zeros(3))
    return model


CASES = {
    "infinite_support": (poisson_latent, r"'k' \(PoissonRV\) has infinite support.*Truncate"),
    "sum_of_latent": (summed_latent, r"'y' combines several elements of the latent 'z'"),
    "cumsum_of_latent": (cumsum_latent, r"'y' combines several elements of the latent 'z'"),
    "imputed_data": (imputed_continuous, r"'y' has missing values.*'y_unobserved'"),
    "parameter_support": (parameter_dependent_support, r"support of latent 'k' depends"),
    "misaligned_sizes": (misaligned_latents, r"different numbers of elements"),
    "crossed_elements": (crossed_latents, r"links element .* of '(z1|z2)'.*aligned one"),
    "too_many_configurations": (
        many_coupled_latents,
        r"enumerates them jointly: 1,073,741,824 joint configurations.*limit 100,000,000",
    ),
    "split_index": (
        split_parameter_index,
        r"cannot enumerate the latent\(s\) \['z'\].*next to each other",
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_unsupported_structure_is_refused(case):
    build, message = CASES[case]
    with pytest.raises(UnsupportedModelError, match=message):
        pm_em.EM(build())


def test_latent_vars_validation():
    model = summed_latent()
    with pytest.raises(ValueError, match="'nope' is not a variable of the model"):
        pm_em.EM(model, latent_vars=["nope"])
    with pytest.raises(ValueError, match="'y' is not a free random variable"):
        pm_em.EM(model, latent_vars=["y"])
    with pm.Model() as two:
        mu = pm.Normal("mu")
        pm.Bernoulli("a", 0.5)
        pm.Bernoulli("b", 0.5)
        pm.Normal("y", mu, observed=0.0)
    with pytest.raises(ValueError, match="'mu' is continuous"):
        pm_em.EM(two, latent_vars=["mu"])
    with pytest.raises(UnsupportedModelError, match="'b' is a discrete free variable but not in"):
        pm_em.EM(two, latent_vars=["a"])


def test_no_model_in_context():
    with pytest.raises(TypeError, match="No model on context stack"):
        pm_em.find_MAP()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"tol": 0.0}, "tol must be a positive finite number"),
        ({"tol": float("nan")}, "tol must be a positive finite number"),
        ({"max_iter": 0}, "max_iter must be an integer >= 1"),
        ({"max_iter": 2.5}, "max_iter must be an integer >= 1"),
        ({"blas_cores": 0}, "blas_cores must be None or an integer >= 1"),
    ],
    ids=["tol_zero", "tol_nan", "max_iter_zero", "max_iter_float", "blas_cores_zero"],
)
def test_options_are_checked_before_any_work(options, message):
    with pytest.raises(ValueError, match=message):
        pm_em.find_MAP(summed_latent(), **options)


def test_no_latent_is_plain_map_and_says_so(caplog):
    x = np.random.default_rng(0).normal(1.0, 2.0, 40)
    with pm.Model() as model:
        mu = pm.Normal("mu", 0.0, 10.0)
        sigma = pm.HalfFlat("sigma")
        pm.Normal("x", mu, sigma, observed=x)
    with caplog.at_level("INFO", logger="pm_em"):
        idata = pm_em.find_MAP(model, progressbar=False, random_seed=1)
    assert "no discrete latent" in caplog.text
    # The MAP of a Normal mean (Normal prior) and scale (flat prior), by hand.
    n = len(x)
    sigma_hat = float(idata.posterior["sigma"].values.ravel()[0])
    mu_hat = float(idata.posterior["mu"].values.ravel()[0])
    expected_mu = x.sum() / sigma_hat**2 / (n / sigma_hat**2 + 1 / 100.0)
    np.testing.assert_allclose(mu_hat, expected_mu, rtol=1e-6)
    np.testing.assert_allclose(sigma_hat, np.sqrt(np.mean((x - mu_hat) ** 2)), rtol=1e-6)


def test_latent_without_dependents_is_reported(caplog):
    with pm.Model() as model:
        mu = pm.Normal("mu", 0.0, 10.0)
        pm.Bernoulli("z", p=np.float64(0.3), shape=3)
        pm.Normal("x", mu, 1.0, observed=np.array([0.5, 1.5]))
    with caplog.at_level("INFO", logger="pm_em"):
        idata = pm_em.find_MAP(model, progressbar=False, random_seed=1)
    assert "Latent 'z' has no dependents" in caplog.text
    # Its posterior is its prior.
    np.testing.assert_allclose(np.exp(idata.posterior["lp_z"].values[0, 0, :, 1]), 0.3)


# -- the data and the start values -------------------------------------------------


@pytest.fixture(scope="module")
def count_mixture():
    """A Poisson mixture whose data can be swapped (pm.Data, same length)."""
    with pm.Model() as model:
        counts = pm.Data("counts", np.array([0.0, 1.0, 3.0, 2.0, 3.0]))
        w = pm.Dirichlet("w", np.ones(2))
        log_rate = pm.Normal("log_rate", 0.0, 2.0, shape=2)
        z = pm.Categorical("z", w, shape=5)
        pm.Poisson("y", pm.math.exp(log_rate[z]), observed=counts)
    # Compiled once here; find_MAP reuses this routine.
    pm_em.EM(model)
    return model


@pytest.mark.parametrize(
    "data, message",
    [
        (
            [0.0, 1.0, -3.0, 2.0, 3.0],
            r"observation of 'y' at index \(2,\) \(observed value -3\) has probability 0 "
            r"under every value of the latent\(s\) \['z'\]",
        ),
        ([0.0, 1.0, 3.0, np.nan, 3.0], r"observed data of 'y' at index \(3,\) are NaN"),
        (
            [np.inf, 1.0, 3.0, 2.0, np.inf],
            r"observed data of 'y' at index \(0,\) \(and 1 more element\(s\)\) are infinite",
        ),
    ],
    ids=["outside_support", "nan", "inf"],
)
def test_bad_data_is_named_with_its_first_index(count_mixture, data, message):
    with count_mixture:
        pm.set_data({"counts": np.array(data)})
    try:
        with pytest.raises(ValueError, match=message):
            pm_em.find_MAP(count_mixture, progressbar=False, random_seed=1)
        # The step-by-step API says the same.
        em = pm_em.routine.em.cached_routine(count_mixture)
        with pytest.raises(ValueError, match=message):
            em.run(em.initial_point(random_seed=1))
    finally:
        with count_mixture:
            pm.set_data({"counts": np.array([0.0, 1.0, 3.0, 2.0, 3.0])})
    # The same routine fits once the data are fixed.
    idata = pm_em.find_MAP(count_mixture, progressbar=False, random_seed=1)
    assert bool(idata.em_stats["converged"])


@pytest.mark.parametrize(
    "initvals, message",
    [
        ({"w": np.array([1.5, -0.5])}, r"initvals\['w'\] = \[1.5, -0.5\] is outside the support"),
        ({"log_rate": np.array([np.inf, 0.0])}, r"initvals\['log_rate'\] contains NaN or inf"),
        ({"w": [0.5, 0.5, 0.0]}, r"point\['w'\] has shape \(3,\), expected \(2,\)"),
    ],
    ids=["outside_support", "inf", "wrong_shape"],
)
def test_bad_initvals_name_the_variable(count_mixture, initvals, message):
    with pytest.raises(ValueError, match=message):
        pm_em.find_MAP(count_mixture, initvals=initvals, progressbar=False)


def test_initvals_outside_a_bounded_prior_are_named():
    with pm.Model() as model:
        mu = pm.Uniform("mu", 0.0, 1.0, default_transform=None)
        z = pm.Bernoulli("z", 0.5, shape=2)
        pm.Normal("y", mu + z, 1.0, observed=np.zeros(2))
    with pytest.raises(ValueError, match=r"initvals\['mu'\] is outside the support of its prior"):
        pm_em.find_MAP(model, initvals={"mu": 2.0}, progressbar=False)


def test_imputed_discrete_values_with_infinite_support_say_where_they_come_from():
    with pm.Model() as model, pytest.warns(pm.ImputationWarning):
        rate = pm.Exponential("rate", 1.0)
        missing = np.ma.masked_array([1, 0, 3], mask=[False, True, False])
        pm.Poisson("y", rate, observed=missing)
    with pytest.raises(UnsupportedModelError, match=r"impute the missing values of 'y'"):
        pm_em.EM(model)


def test_no_model_says_how_to_pass_one():
    with pytest.raises(TypeError, match=r"call it inside `with model:` or pass model="):
        pm_em.EM()

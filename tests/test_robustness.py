"""Numbers stay finite where textbook EM underflows: observations far from every
component, and latent values of probability exactly 0. Each case is checked against
an independent log-space computation in NumPy/SciPy."""

import numpy as np
import pymc as pm
import pytest
from scipy import special, stats

import pm_em
from tests.models import normal_mixture, unit_scale_mixture

FAR = np.array([-0.3, 0.1, 0.4, 2.2, 2.9, 1.0e6, -3.0e6])


@pytest.fixture(scope="module")
def far_model():
    model = normal_mixture(FAR)
    pm_em.EM(model)
    return model


def test_far_observations_have_exact_finite_responsibilities(far_model):
    em = pm_em.routine.em.cached_routine(far_model)
    point = {"w": np.array([0.5, 0.5]), "mu": np.array([0.0, 2.5]), "sigma": np.ones(2)}
    log_resp = em.e_step(point)["z"]
    # With densities, both components give exp(-5e11) = 0 and 0/0: log space is exact.
    joint = np.log(point["w"]) + stats.norm.logpdf(FAR[:, None], point["mu"], point["sigma"])
    expected = joint - special.logsumexp(joint, axis=1, keepdims=True)
    assert np.all(np.isfinite(log_resp))
    np.testing.assert_allclose(log_resp, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(special.logsumexp(log_resp, axis=1), 0.0, atol=1e-12)
    # The far point belongs to the nearer component with probability 1 - exp(-huge).
    assert log_resp[5, 1] == 0.0 and log_resp[6, 0] == 0.0
    # The observed-data log-posterior: finite, and the log-space sum.
    prior = (
        stats.dirichlet.logpdf(point["w"], np.ones(2))
        + stats.norm.logpdf(point["mu"], 0.0, 10.0).sum()
        + stats.invgamma.logpdf(point["sigma"], 2.0, scale=1.0).sum()
    )
    expected_logp = special.logsumexp(joint, axis=1).sum() + prior
    np.testing.assert_allclose(em.logp(point), expected_logp, rtol=1e-12)
    assert np.isfinite(expected_logp) and expected_logp < -1e12


def test_far_observations_fit_to_a_finite_monotone_mode(far_model):
    idata = pm_em.find_MAP(
        far_model,
        initvals={"mu": np.array([0.0, 2.5]), "sigma": np.ones(2)},
        progressbar=False,
        random_seed=1,
    )
    logp = idata.em_stats["logp"].values
    assert bool(idata.em_stats["converged"])
    assert np.all(np.isfinite(logp)) and np.all(np.diff(logp) >= -1e-10 * np.abs(logp[1:]))
    for name in ("w", "mu", "sigma", "lp_z"):
        assert np.all(np.isfinite(idata.posterior[name].values)), name
    assert np.all(np.isfinite(idata.log_likelihood["x"].values))


def test_impossible_genotypes_get_exactly_zero_responsibility():
    """The peppered moth: a phenotype rules out genotypes (P(phenotype | genotype) =
    0), so those entries are log(0) = -inf in the tables; they must stay exactly
    -inf, and never turn the possible ones into NaN."""
    from examples import peppered_moth as moth

    phenotype = moth.moth_phenotypes()
    em = pm_em.EM(moth.build_model(phenotype))
    allele_freq = np.array([0.2, 0.3, 0.5])
    log_resp = em.e_step({"allele_freq": allele_freq})["genotype"]
    possible = moth.PHENOTYPE_GIVEN_GENOTYPE[:, phenotype].T > 0  # (moth, genotype)
    assert np.all(log_resp[~possible] == -np.inf)
    assert np.all(np.isfinite(log_resp[possible]))
    # Against Bayes' rule by hand for the three phenotypes.
    p_c, p_i, p_t = allele_freq
    hw = np.array([p_c**2, 2 * p_c * p_i, 2 * p_c * p_t, p_i**2, 2 * p_i * p_t, p_t**2])
    for code in range(3):
        mask = moth.PHENOTYPE_GIVEN_GENOTYPE[:, code] > 0
        expected = np.where(mask, hw, 0.0) / hw[mask].sum()
        row = np.exp(log_resp[np.flatnonzero(phenotype == code)[0]])
        np.testing.assert_allclose(row, expected, rtol=1e-12, atol=0.0)


def test_a_component_of_prior_probability_zero_is_left_at_its_prior_mode():
    """Weights fixed at (0.6, 0.4, 0): the third component can explain nothing. Its
    responsibilities are exactly 0, its mean gets no data and goes to its prior's mode
    (the M-step's zero-weight limit), with no NaN from 0/0."""
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.normal(-2.0, 1.0, 30), rng.normal(2.0, 1.0, 20)])
    with pm.Model() as model:
        mu = pm.Normal("mu", 0.5, 10.0, shape=3)
        z = pm.Categorical("z", np.array([0.6, 0.4, 0.0]), shape=len(x))
        pm.Normal("x", mu[z], 1.0, observed=x)
    start = {"mu": np.array([-1.0, 1.0, 0.0])}
    with pytest.warns(pm_em.DegenerateSolutionWarning, match=r"Empty component\(s\): z = 2"):
        idata = pm_em.find_MAP(model, initvals=start, tol=1e-14, progressbar=False)
    lp = idata.posterior["lp_z"].values[0, 0]
    assert np.all(lp[:, 2] == -np.inf)
    np.testing.assert_allclose(special.logsumexp(lp[:, :2], axis=1), 0.0, atol=1e-12)
    mu = idata.posterior["mu"].values[0, 0]
    assert mu[2] == pytest.approx(0.5, abs=1e-12)
    # The two live means: the weighted-mean update with the Normal(0.5, 10) prior.
    r = np.exp(lp[:, :2])
    expected = (r.T @ x + 0.5 / 100.0) / (r.sum(axis=0) + 1 / 100.0)
    np.testing.assert_allclose(mu[:2], expected, rtol=1e-8)


def test_data_of_a_new_length_rebuilds_the_routine(rng):
    """pm.set_data with a new length: find_MAP rebuilds (the latents' sizes come from
    the data) and matches a model built on the new data; an EM built before refuses."""
    x = np.concatenate([rng.normal(-2.0, 1.0, 20), rng.normal(2.0, 1.0, 20)])
    longer = np.concatenate([x, rng.normal(2.0, 1.0, 10)])

    model = unit_scale_mixture(x)
    start = {"mu": np.array([-1.0, 1.0])}
    options = {"initvals": start, "progressbar": False, "tol": 1e-12, "random_seed": 3}
    pm_em.find_MAP(model, **options)
    before = pm_em.routine.em.cached_routine(model)
    with model:
        pm.set_data({"data": longer}, coords={"obs": np.arange(len(longer))})
    idata = pm_em.find_MAP(model, **options)
    reference = pm_em.find_MAP(unit_scale_mixture(longer, mutable=False), **options)
    assert idata.posterior["lp_z"].shape == (1, 1, len(longer), 2)
    for name in ("w", "mu", "lp_z"):
        np.testing.assert_allclose(
            idata.posterior[name].values, reference.posterior[name].values, rtol=1e-10
        )
    with pytest.raises(ValueError, match=r"data changed shape since this EM routine was built"):
        before.e_step(before.initial_point(random_seed=1))

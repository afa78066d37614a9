"""EM over chunks of the data (pm_em.chunks): the same fit as in memory, from NumPy
arrays, memory maps and Dask arrays; exact refusals otherwise."""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytensor.tensor as pt
import pytest
import scipy.stats as st

import pm_em
from pm_em.chunks.fit import fit_chunked
from pm_em.chunks.kernel import check_additive
from pm_em.errors import EMConvergenceWarning, UnsupportedModelError

RNG = np.random.default_rng(16)
# 1-D Gaussian mixture: 1000 rows in chunks of 300 (the last one short: padded).
X1 = np.concatenate([RNG.normal(-2.0, 1.0, 400), RNG.normal(3.0, 0.7, 600)])
RNG.shuffle(X1)
# Zero-inflated Poisson, as in the EM lecture notes' exercise (psi = 0.4, mu = 1.5).
COUNTS = RNG.poisson(1.5, 500) * (RNG.random(500) < 0.4)
# 2-D MvNormal mixture.
MU2 = np.array([[0.0, 0.0], [4.0, 1.0]])
COV2 = np.array([[[1.0, 0.5], [0.5, 1.0]], [[0.8, -0.3], [-0.3, 0.6]]])
LABELS2 = RNG.choice(2, size=400, p=[0.6, 0.4])
X2 = MU2[LABELS2] + np.einsum(
    "nij,nj->ni", np.linalg.cholesky(COV2)[LABELS2], RNG.standard_normal((400, 2))
)


def gmm(data):
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Normal("mu", 0.0, 10.0, shape=2)
        sigma = pm.HalfNormal("sigma", 5.0, shape=2)
        z = pm.Categorical("z", w, shape=len(data))
        pm.Normal("x", mu[z], sigma[z], observed=data)
    return model


def zip_model(data):
    with pm.Model() as model:
        psi = pm.Beta("psi", 2.0, 2.0)
        rate = pm.Gamma("rate", 2.0, 0.5)
        z = pm.Bernoulli("z", p=psi, shape=len(data))
        pm.Poisson("x", mu=z * rate, observed=data)
    return model


def mvgmm(data):
    rows, cols = np.tril_indices(2, -1)
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Flat("mu", shape=(2, 2))
        z = pm.Categorical("z", p=w, shape=len(data))
        chol_diag = pm.HalfFlat("chol_diag", shape=(2, 2))
        chol_offdiag = pm.Flat("chol_offdiag", shape=(2, 1))
        chol = pt.zeros((2, 2, 2))
        chol = pt.set_subtensor(chol[..., [0, 1], [0, 1]], chol_diag)
        chol = pt.set_subtensor(chol[..., rows, cols], chol_offdiag)
        pm.MvNormal("x", mu=mu[z], chol=chol[z], observed=data)
    return model


def known_scales(data):
    """Known per-row scales, a pm.Data container chunked with the data."""
    rows = len(data)
    with pm.Model() as model:
        scale = pm.Data("scale", SCALES[:rows])
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Normal("mu", 0.0, 10.0, shape=2)
        z = pm.Categorical("z", w, shape=rows)
        pm.Normal("x", mu[z], scale, observed=data)
    return model


SCALES = 0.5 + RNG.random(len(X1))

CASES = {
    "gmm": (
        gmm,
        X1,
        300,
        {"w": np.array([0.5, 0.5]), "mu": np.array([-1.0, 1.0]), "sigma": np.ones(2)},
    ),
    "zip": (zip_model, COUNTS, 128, {"psi": np.array(0.5), "rate": np.array(1.0)}),
    "mvgmm": (
        mvgmm,
        X2,
        150,
        {
            "w": np.array([0.5, 0.5]),
            "mu": np.array([[1.0, 0.0], [3.0, 0.5]]),
            "chol_diag": np.ones((2, 2)),
            "chol_offdiag": np.zeros((2, 1)),
        },
    ),
}


def gaussian_hmm(data):
    """A 2-state Gaussian HMM over independent sequences (rows), time last."""
    pmx = pytest.importorskip("pymc_extras")
    with pm.Model() as model:
        P = pm.Dirichlet("P", a=np.full((2, 2), 2.0))
        pi = pm.Dirichlet("pi", a=np.ones(2))
        mu = pm.Normal("mu", 0.0, 10.0, shape=2)
        sigma = pm.HalfNormal("sigma", 5.0, shape=2)
        s = pmx.DiscreteMarkovChain("s", P=P, init_dist=pm.Categorical.dist(p=pi), shape=data.shape)
        pm.Normal("x", mu=mu[s], sigma=sigma[s], observed=data)
    return model


def simulate_hmm(n_sequences, n_steps, rng):
    P = np.array([[0.9, 0.1], [0.2, 0.8]])
    states = np.zeros((n_sequences, n_steps), dtype=int)
    states[:, 0] = rng.random(n_sequences) < 0.5
    for t in range(1, n_steps):
        states[:, t] = rng.random(n_sequences) < P[states[:, t - 1], 1]
    return np.array([-1.5, 2.0])[states] + np.array([0.8, 0.6])[states] * rng.standard_normal(
        states.shape
    )


CASES["hmm"] = (
    gaussian_hmm,
    simulate_hmm(12, 30, RNG),
    5,
    {
        "P": np.array([[0.7, 0.3], [0.3, 0.7]]),
        "pi": np.array([0.5, 0.5]),
        "mu": np.array([-1.0, 1.0]),
        "sigma": np.ones(2),
    },
)


def normal_mixture(data):
    """The mixture as pm.NormalMixture: its labels are written out by pm_em."""
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Normal("mu", 0.0, 10.0, shape=2)
        sigma = pm.HalfNormal("sigma", 5.0, shape=2)
        pm.NormalMixture("x", w=w, mu=mu, sigma=sigma, observed=data)
    return model


CASES["normal_mixture"] = (normal_mixture, X1, 300, CASES["gmm"][3])

CASES["known_scales"] = (
    known_scales,
    X1,
    300,
    {"w": np.array([0.5, 0.5]), "mu": np.array([-1.0, 1.0])},
)
EXTRA_DATA = {"known_scales": {"scale": SCALES}}


def fit_in_memory(case):
    build, data, _, start = CASES[case]
    return pm_em.find_MAP(
        build(data), initvals=start, init="jitter", accelerate=None, progressbar=False
    )


def fit_in_chunks(case, data=None, **kwargs):
    build, full, length, start = CASES[case]
    return pm_em.find_MAP(
        build(full[:length]),
        data={"x": full if data is None else data, **EXTRA_DATA.get(case, {})},
        initvals=start,
        progressbar=False,
        **kwargs,
    )


class _Fits(dict):
    """Case -> its in-memory fit, made when first asked for (a test run on a few
    cases fits only those)."""

    def __missing__(self, case):
        self[case] = fit_in_memory(case)
        return self[case]


@pytest.fixture(scope="module")
def in_memory():
    return _Fits()


def assert_same_fit(chunked, reference, atol=1e-10):
    assert int(chunked.em_stats.n_iter) == int(reference.em_stats.n_iter)
    assert bool(chunked.em_stats.converged)
    # Every parameter, with the in-memory result's dims and coords (the per-row
    # groups, labels and responsibilities, are not built in chunks).
    params = list(chunked.posterior.data_vars)
    assert params and set(params) <= set(reference.posterior.data_vars)
    for name in params:
        assert chunked.posterior[name].dims == reference.posterior[name].dims
        for dim in chunked.posterior[name].dims[2:]:
            np.testing.assert_array_equal(
                chunked.posterior[dim].values, reference.posterior[dim].values
            )
        np.testing.assert_allclose(
            chunked.posterior[name].values, reference.posterior[name].values, atol=atol
        )
    np.testing.assert_allclose(
        chunked.em_stats.logp.values, reference.em_stats.logp.values, rtol=1e-12
    )


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_chunks_match_in_memory_fit(case, in_memory):
    chunked = fit_in_chunks(case)
    assert chunked.em_stats.attrs["n_chunks"] == -(-len(CASES[case][1]) // CASES[case][2])
    assert chunked.em_stats.attrs["n_observations"] == CASES[case][1].size
    assert_same_fit(chunked, in_memory[case])
    # Every continuous free variable is in the result, none of the n x K tables.
    assert set(chunked.posterior.data_vars) == set(CASES[case][3])


def gamma_scales(data):
    """The mixture with scales under a prior no closed-form rule takes (``HalfCauchy``
    has one): the numeric M-step (its Normal term on expected moments)."""
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Normal("mu", 0.0, 10.0, shape=2)
        sigma = pm.Gamma("sigma", 2.0, 2.0, shape=2)  # no closed-form rule
        z = pm.Categorical("z", w, shape=len(data))
        pm.Normal("x", mu[z], sigma[z], observed=data)
    return model


def poisson_lognormal(data):
    """A Poisson mixture whose rates have a LogNormal prior (no closed form): numeric,
    on counts per distinct value in memory, on the entries in chunks."""
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        rate = pm.LogNormal("rate", 0.0, 1.5, shape=2)
        z = pm.Categorical("z", w, shape=len(data))
        pm.Poisson("x", rate[z], observed=data)
    return model


def sparse_transitions(data):
    """The HMM with transition rows under Dirichlet(0.8) (below 1: no closed form):
    the numeric block on the chunk's expected transition counts."""
    pmx = pytest.importorskip("pymc_extras")
    with pm.Model() as model:
        P = pm.Dirichlet("P", a=np.full((2, 2), 0.8))
        pi = pm.Dirichlet("pi", a=np.ones(2))
        mu = pm.Normal("mu", 0.0, 10.0, shape=2)
        sigma = pm.HalfNormal("sigma", 5.0, shape=2)
        s = pmx.DiscreteMarkovChain("s", P=P, init_dist=pm.Categorical.dist(p=pi), shape=data.shape)
        pm.Normal("x", mu=mu[s], sigma=sigma[s], observed=data)
    return model


POISSON = np.where(RNG.random(400) < 0.4, RNG.poisson(1.0, 400), RNG.poisson(6.0, 400))
NUMERIC_CASES = {
    "gamma_scales": (
        gamma_scales,
        X1,
        300,
        {"w": np.array([0.5, 0.5]), "mu": np.array([-1.0, 1.0]), "sigma": np.ones(2)},
    ),
    "poisson_lognormal": (
        poisson_lognormal,
        POISSON,
        150,
        {"w": np.array([0.5, 0.5]), "rate": np.array([0.5, 3.0])},
    ),
    "sparse_transitions": (sparse_transitions, *CASES["hmm"][1:]),
}
CASES.update(NUMERIC_CASES)
# Per case: the numeric parameters, and the terms of their objective on statistics.
NUMERIC_BLOCKS = {
    "gamma_scales": ({"sigma"}, ["x"]),
    "poisson_lognormal": ({"rate"}, ["x"]),
    "sparse_transitions": ({"P"}, []),
}


@pytest.mark.parametrize("case", list(NUMERIC_CASES), ids=list(NUMERIC_CASES))
def test_numeric_m_step_in_chunks_matches_in_memory_fit(case, in_memory):
    build, data, length, _ = CASES[case]
    em = pm_em.EM(build(data[:length]))
    numeric = {p.name for p in em.params} - set(em.closed_form_params)
    params, on_statistics = NUMERIC_BLOCKS[case]
    assert numeric == params
    # In memory the Poisson term is on counts per distinct value, in chunks a sum
    # over entries: equal sums in another order (measured agreement about 2e-15).
    assert em.routine.graphs.numeric.on_statistics == on_statistics
    chunked = fit_in_chunks(case)
    assert_same_fit(chunked, in_memory[case])


def test_memmap_source(in_memory, tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, X1)
    mapped = np.load(path, mmap_mode="r")
    assert_same_fit(fit_in_chunks("gmm", data=mapped), in_memory["gmm"])


def test_dask_array_source_in_process(in_memory):
    da = pytest.importorskip("dask.array")
    # Dask's own chunks need not be the fit's: blocks of 128 rows, chunks of 150.
    assert_same_fit(
        fit_in_chunks("mvgmm", data=da.from_array(X2, chunks=(128, 2))), in_memory["mvgmm"]
    )


def test_xarray_source(in_memory):
    xr = pytest.importorskip("xarray")
    da = pytest.importorskip("dask.array")
    array = xr.DataArray(da.from_array(X1, chunks=250), dims=["obs"])
    assert_same_fit(fit_in_chunks("gmm", data=array), in_memory["gmm"])


def test_jax_backend(in_memory):
    pytest.importorskip("jax")
    assert_same_fit(fit_in_chunks("gmm", backend="jax"), in_memory["gmm"])


def test_one_chunked_step_is_the_hand_derived_m_step():
    """One step from the start against the M-step written out with scipy's
    densities: responsibilities, then the MAP updates under the priors
    (Dirichlet(1, 1), Normal(0, 10) means, HalfNormal(5) scales)."""
    _, data, length, start = CASES["gmm"]
    with pytest.warns(EMConvergenceWarning, match="did not converge in 1"):
        one = fit_in_chunks("gmm", max_iter=1)
    dens = start["w"] * st.norm.pdf(data[:, None], start["mu"], start["sigma"])
    resp = dens / dens.sum(axis=1, keepdims=True)
    count = resp.sum(axis=0)
    mu = (resp * data[:, None]).sum(axis=0) / (count + 1 / 100)
    squares = (resp * (data[:, None] - mu) ** 2).sum(axis=0)
    # Root of v^2 / s^2 + N v - S = 0 in v = sigma^2 (HalfNormal(s) prior).
    variance = (-count + np.sqrt(count**2 + 4 * squares / 25)) / (2 / 25)
    np.testing.assert_allclose(one.posterior["w"].values.ravel(), count / count.sum(), rtol=1e-12)
    np.testing.assert_allclose(one.posterior["mu"].values.ravel(), mu, rtol=1e-12)
    np.testing.assert_allclose(one.posterior["sigma"].values.ravel(), np.sqrt(variance), rtol=1e-9)
    logp0 = (
        np.log(dens.sum(axis=1)).sum()
        + st.dirichlet.logpdf(start["w"], [1, 1])
        + st.norm.logpdf(start["mu"], 0, 10).sum()
        + st.halfnorm.logpdf(start["sigma"], scale=5).sum()
    )
    np.testing.assert_allclose(one.em_stats.logp.values[0], logp0, rtol=1e-9)


# -- refusals ------------------------------------------------------------------------


class RowStatistics:
    """A stand-in kernel: per level, the given functions of one chunk's rows."""

    def __init__(self, *levels):
        self.levels = levels
        self.n_levels = len(levels)

    def __call__(self, level, values, arrays, totals):
        return [np.asarray(f(arrays[0])) for f in self.levels[level]]


def test_additivity_check_passes_sums_and_refuses_row_mixing():
    x = np.arange(10.0)
    check_additive(RowStatistics([np.sum, lambda a: (a**2).sum()]), [], [x])
    with pytest.raises(UnsupportedModelError, match="level 1, statistic 0 of a chunk is not"):
        check_additive(RowStatistics([np.sum], [lambda a: (a / a.sum()).sum()]), [], [x + 1])


def test_global_latent_is_refused():
    with pm.Model() as model:
        mu = pm.Normal("mu", 0.0, 10.0, shape=2)
        z = pm.Categorical("z", np.ones(2) / 2)  # one label for every row
        pm.Normal("x", mu[z], 1.0, observed=X1[:100])
    with pytest.raises(UnsupportedModelError, match="'z'.*global latent"):
        fit_chunked(model, data={"x": X1}, progressbar=False)


def test_per_row_input_not_chunked_is_refused():
    covariate = np.linspace(0, 1, 100)
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Normal("mu", 0.0, 10.0, shape=2)
        z = pm.Categorical("z", w, shape=100)
        pm.Normal("x", mu[z] + covariate, 1.0, observed=X1[:100])
    with pytest.raises(UnsupportedModelError, match="one row per observation, which is not"):
        fit_chunked(model, data={"x": X1}, progressbar=False)


def test_per_row_data_container_not_chunked_is_refused():
    with pytest.raises(UnsupportedModelError, match="'scale' with one row per observation"):
        fit_chunked(known_scales(X1[:300]), data={"x": X1}, progressbar=False)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"x": X1[:, None]}, r"rows of shape \(\) were expected"),
        ({"mu": X1}, "neither an observed variable nor a pm.Data"),
        ({"x": np.where(np.arange(1000) == 700, np.nan, X1)}, "non-finite value at row 700"),
    ],
    ids=["row-shape", "not-data", "nan"],
)
def test_bad_data_is_refused(data, match):
    with pytest.raises(ValueError, match=match):
        fit_in_chunks("gmm", data=data["x"]) if "x" in data else fit_chunked(
            gmm(X1[:300]), data=data, progressbar=False
        )


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"laplace": True}, "laplace"),
        ({"init": "kmeans"}, "init"),
        ({"var_names": ["mu"]}, "var_names"),
    ],
    ids=["laplace", "init", "var_names"],
)
def test_options_without_chunked_meaning_are_refused(options, named):
    with pytest.raises(ValueError, match=rf"\['{named}'\] are not available with data="):
        pm_em.find_MAP(gmm(X1[:300]), data={"x": X1}, progressbar=False, **options)


def test_stepwise_em_approaches_the_batch_mle():
    """Online EM over a stream of 40 chunks, 3 passes: near scikit-learn's MLE
    (the priors are weak at n = 20,000)."""
    from sklearn.mixture import GaussianMixture

    from pm_em import EM
    from pm_em.chunks.fit import ChunkedEM
    from pm_em.chunks.online import stepwise_em

    rng = np.random.default_rng(3)
    data = np.where(rng.random(20_000) < 0.4, rng.normal(-2, 1, 20_000), rng.normal(3, 0.7, 20_000))
    em = EM(gmm(data[:500]))
    routine = ChunkedEM(em, {"x": data})
    start = CASES["gmm"][3]
    point = em.to_point(stepwise_em(routine, em.to_values(start), n_epochs=3))
    reference = GaussianMixture(2, means_init=start["mu"][:, None], tol=1e-10).fit(data[:, None])
    np.testing.assert_allclose(point["mu"], reference.means_.ravel(), atol=0.01)
    np.testing.assert_allclose(point["sigma"], np.sqrt(reference.covariances_.ravel()), atol=0.01)
    np.testing.assert_allclose(point["w"], reference.weights_, atol=0.005)


def test_restarts_match_in_memory_restarts():
    """n_init jittered starts (find_MAP's, from the same seed): the same traces and
    the same winner as in memory."""
    build, data, length, _ = CASES["zip"]
    options = {"n_init": 3, "random_seed": 7, "accelerate": None, "progressbar": False}
    reference = pm_em.find_MAP(build(data), init="jitter", **options)
    chunked = pm_em.find_MAP(build(data[:length]), data={"x": data}, **options)
    assert chunked.em_stats.attrs["best_restart"] == reference.em_stats.attrs["best_restart"]
    np.testing.assert_allclose(
        chunked.em_stats.restart_logp.values, reference.em_stats.restart_logp.values, rtol=1e-12
    )
    for name in ("psi", "rate"):
        np.testing.assert_allclose(
            chunked.posterior[name].values, reference.posterior[name].values, atol=1e-10
        )


def test_stepwise_em_refuses_a_numeric_m_step():
    """Online EM keeps running statistics, not the numeric block's Q: refused, not
    the numeric parameters silently left at their start."""
    from pm_em import EM
    from pm_em.chunks.fit import ChunkedEM
    from pm_em.chunks.online import stepwise_em

    build, data, length, start = CASES["gamma_scales"]
    em = EM(build(data[:length]))
    routine = ChunkedEM(em, {"x": data})
    with pytest.raises(UnsupportedModelError, match=r"\['sigma'\] have no closed-form"):
        stepwise_em(routine, em.to_values(start))

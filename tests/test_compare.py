"""EM beside MCMC: relabelling, the comparison table, model selection, plots.

References: known permutations applied to synthetic draws (relabelling must undo
them exactly), ArviZ's own ``az.summary`` on the same draws (the table), and
scikit-learn's ``GaussianMixture.aic/bic`` on the same data and solution (the
criteria). No MCMC runs by default: the "MCMC" posteriors are Gaussian draws around
the EM solution built with ``az.from_dict``; the one real ``pm.sample`` test is slow.
"""

from __future__ import annotations

import warnings

import arviz as az
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pymc as pm  # noqa: E402
import pytensor.tensor as pt  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402
from scipy.special import entr  # noqa: E402
from sklearn.mixture import GaussianMixture  # noqa: E402

import pm_em  # noqa: E402
from pm_em.results.compare import compare, compare_models, relabel  # noqa: E402
from pm_em.results.plots import plot_compare, plot_convergence  # noqa: E402

N_CHAINS, N_DRAWS = 2, 150
TRUE_MU_3 = np.array([0.0, 4.0, 8.0])
TRUE_SIGMA_3 = np.array([0.5, 1.0, 0.7])


# -- data, models, fits ----------------------------------------------------------------


@pytest.fixture(scope="module")
def x_1d():
    """Three well separated clusters, n = 300."""
    rng = np.random.default_rng(20261123)
    labels = rng.choice(3, size=300, p=[0.3, 0.3, 0.4])
    return rng.normal(TRUE_MU_3[labels], TRUE_SIGMA_3[labels])


@pytest.fixture(scope="module")
def x_2d():
    """Two clusters in 2-D with different full covariances, n = 200."""
    rng = np.random.default_rng(7)
    covariances = np.array([[[1.0, 0.6], [0.6, 1.0]], [[0.5, -0.2], [-0.2, 0.8]]])
    labels = rng.choice(2, size=200, p=[0.45, 0.55])
    means = np.array([[0.0, 0.0], [4.0, 2.0]])
    noise = np.einsum(
        "nij,nj->ni", np.linalg.cholesky(covariances)[labels], rng.normal(size=(200, 2))
    )
    return means[labels] + noise


def mixture_1d(x, k):
    """Flat priors (the MAP is the MLE): Dirichlet(1), Flat means, HalfFlat scales."""
    coords = {"component": np.arange(k), "obs": np.arange(len(x))}
    with pm.Model(coords=coords) as model:
        w = pm.Dirichlet("w", a=np.ones(k), dims="component")
        mu = pm.Flat("mu", dims="component")
        sigma = pm.HalfFlat("sigma", dims="component")
        z = pm.Categorical("z", p=w, dims="obs")
        pm.Normal("x", mu=mu[z], sigma=sigma[z], observed=x, dims="obs")
    return model


def mixture_2d(X, k=2):
    """Full covariances from Cholesky factors of d (d + 1) / 2 free elements each,
    so the parameter count is scikit-learn's: K - 1 + K d + K d (d + 1) / 2."""
    coords = {"component": np.arange(k), "axis": ["x0", "x1"], "axis_bis": ["x0", "x1"]}
    with pm.Model(coords=coords | {"obs": np.arange(len(X))}) as model:
        w = pm.Dirichlet("w", a=np.ones(k), dims="component")
        mu = pm.Flat("mu", dims=("component", "axis"))
        chol_diag = pm.HalfFlat("chol_diag", dims=("component", "axis"))
        chol_offdiag = pm.Flat("chol_offdiag", dims="component")
        chol = pt.zeros((k, 2, 2))[:, [0, 1], [0, 1]].set(chol_diag)
        chol = chol[:, 1, 0].set(chol_offdiag)
        pm.Deterministic("cov", chol @ chol.mT, dims=("component", "axis", "axis_bis"))
        z = pm.Categorical("z", p=w, dims="obs")
        pm.MvNormal("x", mu=mu[z], chol=chol[z], observed=X, dims=("obs", "axis"))
    return model


def start_1d(x, k):
    return {
        "w": np.full(k, 1.0 / k),
        "mu": np.quantile(x, (np.arange(k) + 0.5) / k),
        "sigma": np.full(k, x.std() / k),
    }


def start_2d(X):
    order = np.argsort(X[:, 0])
    halves = [X[order[: len(X) // 2]], X[order[len(X) // 2 :]]]
    chol = np.linalg.cholesky(np.stack([np.cov(h.T, bias=True) for h in halves]))
    return {
        "w": np.array([0.5, 0.5]),
        "mu": np.stack([h.mean(0) for h in halves]),
        "chol_diag": np.stack([chol[:, 0, 0], chol[:, 1, 1]], axis=-1),
        "chol_offdiag": chol[:, 1, 0],
    }


def fit_sklearn(X, weights, means, covariances):
    """Unregularised scikit-learn EM from the given start, tightly converged."""
    gm = GaussianMixture(
        len(weights),
        covariance_type="full",
        reg_covar=0.0,
        tol=1e-14,
        max_iter=10_000,
        weights_init=weights,
        means_init=means,
        precisions_init=np.linalg.inv(covariances),
    )
    return gm.fit(X)


def covariances_of(chol_diag, chol_offdiag):
    chol = np.zeros((*chol_diag.shape[:-1], 2, 2))
    chol[..., 0, 0], chol[..., 1, 1] = chol_diag[..., 0], chol_diag[..., 1]
    chol[..., 1, 0] = chol_offdiag
    return chol @ np.swapaxes(chol, -1, -2)


@pytest.fixture(scope="module")
def models_1d(x_1d):
    return {k: mixture_1d(x_1d, k) for k in (2, 3)}


@pytest.fixture(scope="module")
def fits_1d(x_1d, models_1d):
    """pm_em and scikit-learn from the same start, for K = 2 and 3."""
    fits = {}
    for k, model in models_1d.items():
        start = start_1d(x_1d, k)
        idata = pm_em.find_MAP(model, initvals=start, tol=1e-13, progressbar=False)
        gm = fit_sklearn(
            x_1d[:, None], start["w"], start["mu"][:, None], (start["sigma"] ** 2)[:, None, None]
        )
        fits[k] = (idata, gm)
    return fits


@pytest.fixture(scope="module")
def model_2d(x_2d):
    return mixture_2d(x_2d)


@pytest.fixture(scope="module")
def fit_2d(x_2d, model_2d):
    start = start_2d(x_2d)
    idata = pm_em.find_MAP(model_2d, initvals=start, tol=1e-13, progressbar=False)
    covariances = covariances_of(start["chol_diag"], start["chol_offdiag"])
    gm = fit_sklearn(x_2d, start["w"], start["mu"], covariances)
    return idata, gm


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


# -- synthetic "MCMC" draws -------------------------------------------------------------


def permute(values, permutations, axis):
    """``values`` (chain, draw, *core) with core axis ``axis`` of each draw reordered:
    entry ``j`` becomes the old entry ``permutations[c, d, j]``."""
    index_shape = [1] * values.ndim
    index_shape[:2] = permutations.shape[:2]
    index_shape[2 + axis] = permutations.shape[-1]
    index = np.moveaxis(
        permutations.reshape(*permutations.shape, *([1] * (values.ndim - 3))), 2, 2 + axis
    ).reshape(index_shape)
    return np.take_along_axis(values, index, axis=2 + axis)


def fake_draws(em_posterior, names, rng, k, relative_noise=0.02, permuted=True):
    """Gaussian draws around the EM solution (``truth``), and the same draws with each
    draw's components shuffled by its own random permutation (``shuffled``).

    Returns
    -------
    truth, shuffled : dict
        Variable name -> (chain, draw, *core) arrays.
    permutations : np.ndarray
        (chain, draw, K): shuffled component ``j`` is true component ``perm[j]``.
    """
    permutations = np.stack(
        [rng.permutation(k) if permuted else np.arange(k) for _ in range(N_CHAINS * N_DRAWS)]
    ).reshape(N_CHAINS, N_DRAWS, k)
    truth, shuffled = {}, {}
    for name in names:
        center = em_posterior[name].values[0, 0]
        noise = rng.normal(size=(N_CHAINS, N_DRAWS, *center.shape))
        truth[name] = center + relative_noise * (np.abs(center) + 0.1) * noise
        shuffled[name] = permute(truth[name], permutations, axis=0)
    return truth, shuffled, permutations


def latent_draws(em_posterior, permutations, truth, shuffled):
    """The EM result's ``z`` and ``lp_z`` in every draw, in the shuffled labelling too."""
    labels = np.broadcast_to(
        em_posterior["z"].values[0, 0], (N_CHAINS, N_DRAWS, em_posterior.sizes["obs"])
    )
    lp = np.broadcast_to(
        em_posterior["lp_z"].values[0, 0], (N_CHAINS, N_DRAWS, *em_posterior["lp_z"].shape[2:])
    )
    truth["z"], truth["lp_z"] = labels.copy(), lp.copy()
    inverse = np.argsort(permutations, axis=-1)
    shuffled["z"] = np.take_along_axis(inverse, labels, axis=-1)
    shuffled["lp_z"] = permute(lp, permutations, axis=1)


def as_idata(draws, em_posterior):
    dims = {name: list(em_posterior[name].dims[2:]) for name in draws}
    coords = {dim: em_posterior[dim].values for name in draws for dim in dims[name]}
    return az.from_dict(posterior=draws, dims=dims, coords=coords)


# -- relabelling -----------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["graph", "dims", "component_dims"])
def test_relabel_recovers_per_draw_permutations(fits_1d, models_1d, rule, rng):
    em_idata, _ = fits_1d[3]
    post = em_idata.posterior
    truth, shuffled, permutations = fake_draws(post, ["w", "mu", "sigma"], rng, k=3)
    latent_draws(post, permutations, truth, shuffled)
    mcmc = as_idata(shuffled, post)
    assert len({tuple(p) for p in permutations.reshape(-1, 3)}) == 6  # every permutation occurs
    options = {
        "graph": {"model": models_1d[3]},
        "dims": {},
        "component_dims": {"component_dims": {"z": "component"}},
    }[rule]
    relabelled = relabel(mcmc, reference=em_idata, **options)
    for name, values in truth.items():
        np.testing.assert_array_equal(relabelled.posterior[name].values, values, err_msg=name)
    # A new InferenceData: the input still holds the shuffled draws.
    np.testing.assert_array_equal(mcmc.posterior["mu"].values, shuffled["mu"])


def test_relabel_two_dimensional_recomputes_deterministics(fit_2d, model_2d, rng):
    """``chol[z]`` with ``chol`` assembled from ``chol_diag`` and ``chol_offdiag``: both
    are found in the graph (axis 0), and the Deterministic ``cov`` is recomputed."""
    em_idata, _ = fit_2d
    post = em_idata.posterior
    names = ["w", "mu", "chol_diag", "chol_offdiag"]
    truth, shuffled, permutations = fake_draws(post, names, rng, k=2)
    assert 0.3 < permutations[..., 0].mean() < 0.7
    shuffled["cov"] = covariances_of(shuffled["chol_diag"], shuffled["chol_offdiag"])
    relabelled = relabel(as_idata(shuffled, post), reference=em_idata, model=model_2d)
    for name in names:
        np.testing.assert_array_equal(relabelled.posterior[name].values, truth[name])
    np.testing.assert_allclose(
        relabelled.posterior["cov"].values,
        covariances_of(truth["chol_diag"], truth["chol_offdiag"]),
        rtol=1e-12,
    )


def test_relabel_bernoulli_latent_flips_its_probability(rng):
    """``z ~ Bernoulli(psi)`` with ``mu[z]``: swapping the labels maps psi to 1 - psi."""
    with pm.Model(coords={"component": [0, 1], "obs": np.arange(4)}) as model:
        psi = pm.Beta("psi", 1, 1)
        mu = pm.Normal("mu", 0, 10, dims="component")
        z = pm.Bernoulli("z", p=psi, dims="obs")
        pm.Normal("x", mu=mu[z], sigma=1, observed=[0.0, 0.1, 5.0, 5.2], dims="obs")
    lp = np.log(np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.3, 0.7]]))
    reference = az.from_dict(
        posterior={
            "psi": np.full((1, 1), 0.3),
            "mu": np.array([[[0.0, 5.0]]]),
            "lp_z": lp[None, None],
        },
        dims={"mu": ["component"], "lp_z": ["obs", "lp_z_dim"]},
        coords={"component": [0, 1], "obs": np.arange(4), "lp_z_dim": [0, 1]},
    )
    psi_true = 0.3 + 0.01 * rng.normal(size=(N_CHAINS, N_DRAWS))
    mu_true = np.array([0.0, 5.0]) + 0.1 * rng.normal(size=(N_CHAINS, N_DRAWS, 2))
    swapped = rng.random((N_CHAINS, N_DRAWS)) < 0.5
    draws = {
        "psi": np.where(swapped, 1 - psi_true, psi_true),
        "mu": np.where(swapped[..., None], mu_true[..., ::-1], mu_true),
    }
    mcmc = az.from_dict(posterior=draws, dims={"mu": ["component"]}, coords={"component": [0, 1]})
    relabelled = relabel(mcmc, reference=reference, model=model)
    np.testing.assert_allclose(relabelled.posterior["psi"].values, psi_true, rtol=1e-14)
    np.testing.assert_array_equal(relabelled.posterior["mu"].values, mu_true)


def test_relabel_markov_chain_permutes_both_axes_of_the_transition_matrix(rng):
    pmx = pytest.importorskip("pymc_extras")
    k = 3
    with pm.Model(coords={"state": range(k), "time": range(5)}) as model:
        P = pm.Dirichlet("P", a=np.ones((k, k)))
        pi = pm.Dirichlet("pi", a=np.ones(k), dims="state")
        mu = pm.Normal("mu", 0, 10, dims="state")
        s = pmx.DiscreteMarkovChain("s", P=P, init_dist=pm.Categorical.dist(p=pi), dims="time")
        pm.Normal("y", mu=mu[s], sigma=1, observed=np.arange(5.0), dims="time")
    P_hat = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.05, 0.05, 0.9]])
    center = {"P": P_hat, "pi": np.array([0.5, 0.3, 0.2]), "mu": np.array([-2.0, 0.0, 3.0])}
    reference = az.from_dict(
        posterior={
            **{n: v[None, None] for n, v in center.items()},
            "lp_s": np.log(np.full((1, 1, 5, k), 1 / k)),
        },
        dims={"pi": ["state"], "mu": ["state"], "lp_s": ["time", "lp_s_dim"]},
        coords={"state": range(k), "time": range(5), "lp_s_dim": range(k)},
    )
    permutations = np.stack([rng.permutation(k) for _ in range(N_CHAINS * N_DRAWS)]).reshape(
        N_CHAINS, N_DRAWS, k
    )
    truth = {
        n: v + 0.005 * rng.normal(size=(N_CHAINS, N_DRAWS, *v.shape)) for n, v in center.items()
    }
    shuffled = {
        "P": permute(permute(truth["P"], permutations, axis=0), permutations, axis=1),
        "pi": permute(truth["pi"], permutations, axis=0),
        "mu": permute(truth["mu"], permutations, axis=0),
    }
    mcmc = az.from_dict(
        posterior=shuffled, dims={"pi": ["state"], "mu": ["state"]}, coords={"state": range(k)}
    )
    relabelled = relabel(mcmc, reference=reference, model=model)
    for name, values in truth.items():
        np.testing.assert_array_equal(relabelled.posterior[name].values, values, err_msg=name)


def test_relabel_observed_mixture_implicit_labels(rng):
    """``pm.NormalMixture``: no latent in the model, ``lp_x`` in the EM result; the
    labels pm_em writes out (``mu[x__component]``) show which variables to permute."""
    with pm.Model(coords={"component": [0, 1], "obs": range(4)}) as model:
        w = pm.Dirichlet("w", np.ones(2), dims="component")
        mu = pm.Normal("mu", 0, 10, dims="component")
        sigma = pm.HalfNormal("sigma", 1, dims="component")
        pm.NormalMixture("x", w=w, mu=mu, sigma=sigma, observed=[0.0, 1, 5, 6], dims="obs")
    center = {"w": np.array([0.3, 0.7]), "mu": np.array([0.5, 5.5]), "sigma": np.array([0.4, 0.9])}
    reference = az.from_dict(
        posterior={
            **{n: v[None, None] for n, v in center.items()},
            "lp_x": np.log(np.full((1, 1, 4, 2), 0.5)),
            "x_component": np.zeros((1, 1, 4), dtype=int),
        },
        dims={
            **{n: ["component"] for n in center},
            "lp_x": ["obs", "lp_x_dim"],
            "x_component": ["obs"],
        },
        coords={"component": [0, 1], "obs": range(4), "lp_x_dim": [0, 1]},
    )
    truth = {n: v * (1 + 0.02 * rng.normal(size=(N_CHAINS, N_DRAWS, 2))) for n, v in center.items()}
    swapped = (rng.random((N_CHAINS, N_DRAWS)) < 0.5)[..., None]
    draws = {n: np.where(swapped, v[..., ::-1], v) for n, v in truth.items()}
    mcmc = az.from_dict(
        posterior=draws, dims={n: ["component"] for n in draws}, coords={"component": [0, 1]}
    )
    relabelled = relabel(mcmc, reference=reference, model=model)
    for name, values in truth.items():
        np.testing.assert_array_equal(relabelled.posterior[name].values, values, err_msg=name)


def string_coords_reference():
    return az.from_dict(
        posterior={
            "mu": np.array([[[1.0, 6.0]]]),
            "lp_z": np.log(np.full((1, 1, 3, 2), 0.5)),
        },
        dims={"mu": ["component"], "lp_z": ["obs", "lp_z_dim"]},
        coords={"component": ["a", "b"], "obs": range(3), "lp_z_dim": [0, 1]},
    )


def test_relabel_by_dims_needs_to_know_the_component_dim(rng):
    """Coordinates ``["a", "b"]`` do not say which support value each is: the dims
    rule refuses to guess, and ``component_dims`` says it."""
    reference = string_coords_reference()
    truth = np.array([1.0, 6.0]) + 0.1 * rng.normal(size=(N_CHAINS, N_DRAWS, 2))
    swapped = rng.random((N_CHAINS, N_DRAWS)) < 0.5
    draws = {"mu": np.where(swapped[..., None], truth[..., ::-1], truth)}
    mcmc = az.from_dict(
        posterior=draws, dims={"mu": ["component"]}, coords={"component": ["a", "b"]}
    )
    with pytest.raises(ValueError, match="component_dims"):
        relabel(mcmc, reference=reference)
    relabelled = relabel(mcmc, reference=reference, component_dims={"z": "component"})
    np.testing.assert_array_equal(relabelled.posterior["mu"].values, truth)
    table = compare(reference, mcmc, component_dims={"z": "component"})
    assert list(table.index) == ["mu[a]", "mu[b]"]


def test_relabel_refuses_a_model_without_the_latent(fits_1d):
    em_idata, _ = fits_1d[2]
    with pm.Model() as other:
        pm.Normal("mu", shape=2)
    with pytest.raises(ValueError, match="no latent 'z'"):
        relabel(em_idata, reference=em_idata, model=other)


# -- the comparison table --------------------------------------------------------------


@pytest.fixture(scope="module")
def shuffled_3(fits_1d):
    """Draws around the K = 3 solution, shuffled per draw, and their true labelling."""
    em_idata, _ = fits_1d[3]
    truth, shuffled, _ = fake_draws(
        em_idata.posterior, ["w", "mu", "sigma"], np.random.default_rng(6), k=3
    )
    return as_idata(truth, em_idata.posterior), as_idata(shuffled, em_idata.posterior)


def test_compare_matches_az_summary(fits_1d, models_1d, shuffled_3):
    em_idata, _ = fits_1d[3]
    truth, shuffled = shuffled_3
    table = compare(em_idata, shuffled, model=models_1d[3])
    summary = az.summary(truth, var_names=["w", "mu", "sigma"], kind="all", round_to="none")
    assert list(table.index) == list(summary.index)
    assert list(table.index[:3]) == ["w[0]", "w[1]", "w[2]"]
    for column in ["mean", "sd", "hdi_3%", "hdi_97%", "r_hat"]:
        np.testing.assert_allclose(table[column], summary[column], rtol=1e-12, err_msg=column)
    em = np.concatenate([em_idata.posterior[n].values.ravel() for n in ["w", "mu", "sigma"]])
    np.testing.assert_array_equal(table["em"], em)
    np.testing.assert_allclose(table["z_score"], (em - summary["mean"]) / summary["sd"])
    inside = (em >= summary["hdi_3%"]) & (em <= summary["hdi_97%"])
    np.testing.assert_array_equal(table["in_hdi"], inside)
    assert table["em_se"].isna().all()
    # Draws centred on the EM solution: it is inside every HDI, |z| small.
    assert table["in_hdi"].all() and (table["z_score"].abs() < 1).all()


def test_compare_without_relabelling_sees_switched_labels(fits_1d, models_1d, shuffled_3):
    em_idata, _ = fits_1d[3]
    _, shuffled = shuffled_3
    switched = compare(em_idata, shuffled, model=models_1d[3], undo_label_switching=False)
    relabelled = compare(em_idata, shuffled, model=models_1d[3])
    mu = ["mu[0]", "mu[1]", "mu[2]"]
    # Every draw's components shuffled: each mu[k] mixes all three clusters.
    assert (switched.loc[mu, "sd"] > 10 * relabelled.loc[mu, "sd"]).all()
    np.testing.assert_allclose(
        switched.loc[mu, "mean"], relabelled.loc[mu, "mean"].mean(), atol=0.5
    )


def test_compare_other_hdi_prob_and_var_names(fits_1d, models_1d, shuffled_3):
    em_idata, _ = fits_1d[3]
    truth, shuffled = shuffled_3
    table = compare(em_idata, shuffled, "mu", model=models_1d[3], hdi_prob=0.5)
    summary = az.summary(truth, var_names=["mu"], hdi_prob=0.5, kind="stats", round_to="none")
    np.testing.assert_allclose(table[["hdi_25%", "hdi_75%"]], summary[["hdi_25%", "hdi_75%"]])
    with pytest.raises(ValueError, match="not in both posteriors"):
        compare(em_idata, shuffled, ["tau"], model=models_1d[3])


def test_compare_uses_standard_errors_when_present(fits_1d, models_1d, shuffled_3):
    """A ``<name>_se`` variable (as a Laplace approximation would add) fills ``em_se``."""
    em_idata, _ = fits_1d[3]
    _, shuffled = shuffled_3
    with_se = em_idata.copy()
    se = np.array([0.1, 0.2, 0.3])
    with_se.posterior["mu_se"] = (("chain", "draw", "component"), se[None, None])
    table = compare(with_se, shuffled, model=models_1d[3])
    np.testing.assert_array_equal(table.loc[["mu[0]", "mu[1]", "mu[2]"], "em_se"], se)
    assert table.loc[["w[0]", "sigma[2]"], "em_se"].isna().all()


def laplace_layout(em_idata, se):
    """An EM result laid out as pm_em.results.laplace.fit_laplace lays its output out: the MAP
    in ``map``, draws from the approximation in ``posterior``, ``<name>_se`` in ``fit``."""
    draws = em_idata.posterior[["mu"]].isel(draw=[0, 0, 0]) + 100.0  # not the MAP
    fit = xr.Dataset({"mu_se": ("component", se)}, coords={"component": np.arange(3)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # map and fit are not ArviZ groups
        return az.InferenceData(posterior=draws, map=em_idata.posterior, fit=fit)


def test_compare_reads_a_laplace_fit(fits_1d, models_1d, shuffled_3):
    em_idata, _ = fits_1d[3]
    _, shuffled = shuffled_3
    se = np.array([0.01, 0.02, 0.03])
    laplace = laplace_layout(em_idata, se)
    table = compare(laplace, shuffled, model=models_1d[3])
    plain = compare(em_idata, shuffled, model=models_1d[3])
    np.testing.assert_array_equal(table["em"], plain["em"])
    np.testing.assert_array_equal(table.loc[["mu[0]", "mu[1]", "mu[2]"], "em_se"], se)
    ranked = compare_models({"laplace": laplace, "K=2": fits_1d[2][0]})
    assert ranked.loc["laplace", "bic"] == em_idata.posterior.attrs["bic"]


# -- model selection -------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3], ids=["K=2", "K=3"])
def test_criteria_match_sklearn_1d(fits_1d, x_1d, k):
    idata, gm = fits_1d[k]
    attrs = idata.posterior.attrs
    X = x_1d[:, None]
    np.testing.assert_allclose(
        idata.posterior["mu"].values.ravel(), gm.means_.ravel(), rtol=1e-6, atol=1e-6
    )
    assert attrs["n_params"] == gm._n_parameters() == 3 * k - 1
    assert attrs["n_observations"] == len(x_1d)
    np.testing.assert_allclose(attrs["log_likelihood"], gm.score(X) * len(X), rtol=1e-10)
    np.testing.assert_allclose(attrs["aic"], gm.aic(X), rtol=1e-10)
    np.testing.assert_allclose(attrs["bic"], gm.bic(X), rtol=1e-10)
    entropy = entr(gm.predict_proba(X)).sum()
    np.testing.assert_allclose(attrs["icl"], gm.bic(X) + 2 * entropy, rtol=1e-7)


def test_criteria_match_sklearn_2d_full_covariance(fit_2d, x_2d):
    """n is the number of rows (200), not of scalars (400); k = 1 + 4 + 6 = 11."""
    idata, gm = fit_2d
    attrs = idata.posterior.attrs
    np.testing.assert_allclose(idata.posterior["cov"].values[0, 0], gm.covariances_, rtol=1e-6)
    assert attrs["n_params"] == gm._n_parameters() == 11
    assert attrs["n_observations"] == len(x_2d) == 200
    np.testing.assert_allclose(attrs["aic"], gm.aic(x_2d), rtol=1e-10)
    np.testing.assert_allclose(attrs["bic"], gm.bic(x_2d), rtol=1e-10)
    entropy = entr(gm.predict_proba(x_2d)).sum()
    np.testing.assert_allclose(attrs["icl"], gm.bic(x_2d) + 2 * entropy, rtol=1e-7)


@pytest.mark.parametrize("criterion", ["aic", "bic", "icl"])
def test_compare_models_ranks_as_sklearn(fits_1d, x_1d, criterion):
    table = compare_models({f"K={k}": fits_1d[k][0] for k in (2, 3)}, criterion=criterion)
    X = x_1d[:, None]
    sklearn_values = {}
    for k in (2, 3):
        gm = fits_1d[k][1]
        sklearn_values[f"K={k}"] = {
            "aic": gm.aic(X),
            "bic": gm.bic(X),
            "icl": gm.bic(X) + 2 * entr(gm.predict_proba(X)).sum(),
        }[criterion]
    assert list(table.index) == sorted(sklearn_values, key=sklearn_values.get)
    # Three clusters in the data: three components win on every criterion here.
    assert table.index[0] == "K=3"
    assert list(table["rank"]) == [0, 1]
    assert table[f"d_{criterion}"].iloc[0] == 0 and table[f"d_{criterion}"].iloc[1] > 0
    assert {"log_likelihood", "n_params", "aic", "bic", "icl"} <= set(table.columns)


def test_criteria_of_certain_and_impossible_responsibilities():
    """A responsibility of exactly 0 (log -inf) adds nothing to the entropy."""
    from pm_em.results.criteria import model_selection_attrs

    with np.errstate(divide="ignore"):
        log_resp = np.log(np.array([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]]))
    attrs = model_selection_attrs({"x": np.array([-1.0, -2.0, -3.0])}, [1, 2], {"z": log_resp})
    entropy = entr(np.exp(log_resp)).sum()
    assert attrs["entropy"] == pytest.approx(entropy)
    assert attrs["bic"] == pytest.approx(12.0 + 3 * np.log(3))
    assert attrs["icl"] == pytest.approx(attrs["bic"] + 2 * entropy)
    assert attrs["aic"] == 18.0 and attrs["n_observations"] == 3


def fake_fit(**attrs):
    idata = az.from_dict(posterior={"mu": np.zeros((1, 1))})
    idata.posterior.attrs.update(attrs)
    return idata


def test_compare_models_orders_and_refuses():
    fits = {
        "a": fake_fit(
            log_likelihood=-10.0, n_params=2, n_observations=50, aic=24.0, bic=30.0, icl=40.0
        ),
        "b": fake_fit(
            log_likelihood=-8.0, n_params=4, n_observations=50, aic=24.5, bic=25.0, icl=45.0
        ),
        "c": fake_fit(
            log_likelihood=-9.0, n_params=3, n_observations=50, aic=20.0, bic=35.0, icl=41.0
        ),
    }
    assert list(compare_models(fits).index) == ["b", "a", "c"]
    assert list(compare_models(fits, criterion="aic").index) == ["c", "a", "b"]
    assert list(compare_models(fits, criterion="icl").index) == ["a", "c", "b"]
    np.testing.assert_allclose(compare_models(fits)["d_bic"], [0.0, 5.0, 10.0])
    with pytest.raises(ValueError, match="criterion must be one of"):
        compare_models(fits, criterion="waic")
    with pytest.raises(ValueError, match="no \\['log_likelihood'"):
        compare_models({"a": fits["a"], "bare": az.from_dict(posterior={"mu": np.zeros((1, 1))})})
    different = fake_fit(log_likelihood=-9.0, n_params=3, n_observations=60, aic=1.0, bic=1.0)
    with pytest.raises(ValueError, match="different numbers of observations"):
        compare_models({"a": fits["a"], "other data": different})


# -- plots -----------------------------------------------------------------------------


def test_plot_convergence_every_start(models_1d, tmp_path):
    with models_1d[2]:
        idata = pm_em.find_MAP(n_init=3, random_seed=1, progressbar=False)
    ax = plot_convergence(idata)
    lines = ax.get_lines()
    assert len(lines) == 3
    best = int(idata.em_stats.attrs["best_restart"])
    winner = lines[-1]
    assert winner.get_label() == f"start {best} (best)"
    np.testing.assert_allclose(winner.get_ydata(), idata.em_stats["logp"].values)
    ax.figure.savefig(tmp_path / "convergence.png")
    assert (tmp_path / "convergence.png").stat().st_size > 0
    gap = plot_convergence(idata, kind="gap")
    assert gap.get_yscale() == "log"
    logp = idata.em_stats["logp"].values
    expected = logp[-1] - logp
    np.testing.assert_allclose(gap.get_lines()[-1].get_ydata(), expected[expected > 0])


def test_plot_compare_marks_em_and_laplace_interval(fits_1d, models_1d, shuffled_3, tmp_path):
    em_idata, _ = fits_1d[3]
    _, shuffled = shuffled_3
    with_se = em_idata.copy()
    with_se.posterior["mu_se"] = (("chain", "draw", "component"), np.full((1, 1, 3), 0.05))
    axes = plot_compare(with_se, shuffled, model=models_1d[3])
    assert axes.size >= 9
    table = compare(with_se, shuffled, model=models_1d[3])
    panels = {panel.get_title(): panel for panel in axes.flat}
    for title, label in [("mu\n1", "mu[1]"), ("w\n0", "w[0]"), ("sigma\n2", "sigma[2]")]:
        em_lines = [line for line in panels[title].get_lines() if line.get_label() == "EM (MAP)"]
        assert len(em_lines) == 1
        np.testing.assert_allclose(em_lines[0].get_xdata(), table.loc[label, "em"])
    # The Laplace band only where standard errors exist.
    assert len(panels["mu\n1"].patches) > len(panels["w\n0"].patches)
    axes.flat[0].figure.savefig(tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 0


# -- a real MCMC run -------------------------------------------------------------------


@pytest.mark.slow
def test_em_inside_nuts_posterior(x_1d):
    """NUTS on the marginalized model (proper priors): after relabelling, every EM
    estimate lies in the 94% HDI and the chains agree (r_hat < 1.05)."""
    pmx = pytest.importorskip("pymc_extras")
    x = x_1d[:150]
    with pm.Model(coords={"component": np.arange(3), "obs": np.arange(len(x))}) as model:
        w = pm.Dirichlet("w", a=np.full(3, 2.0), dims="component")
        mu = pm.Normal("mu", 4.0, 10.0, dims="component")
        sigma = pm.InverseGamma("sigma", 2.0, 1.0, dims="component")
        z = pm.Categorical("z", p=w, dims="obs")
        pm.Normal("x", mu=mu[z], sigma=sigma[z], observed=x, dims="obs")
    em_idata = pm_em.find_MAP(model, random_seed=1, progressbar=False)
    trace = pm.sample(
        300,
        tune=300,
        chains=2,
        random_seed=2,
        progressbar=False,
        model=pmx.marginalize(model, ["z"]),
    )
    table = compare(em_idata, trace, model=model)
    assert table["in_hdi"].all(), table
    assert (table["r_hat"] < 1.05).all(), table

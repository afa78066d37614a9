"""Benchmark pm_em on a 2-D three-component full-covariance Gaussian mixture.

Compared in the same run with a textbook NumPy EM and scikit-learn's
``GaussianMixture(covariance_type="full", reg_covar=0)``, all from the same start
and with the same stopping rule. The PyMC model is written the natural way,
``MvNormal(mu[z], chol=chol[z])``, with flat priors on the weights (Dirichlet of
ones), the means and the Cholesky factors (positive diagonal, free lower triangle), so
its MAP is the maximum-likelihood estimate the peers compute.

Run from the repository root (pm_em installed, e.g. ``pip install -e .``)::

    python benchmarks/bench_mvgmm.py --n 100000 --repeats 3 --json mvgmm.json
"""

from __future__ import annotations

import numpy as np
from _common import (
    Params,
    Problem,
    parse_settings,
    point_estimate,
    report,
    run_numpy,
    run_pm_em,
    run_sklearn,
)
from scipy.linalg import solve_triangular

N_COMPONENTS = 3
N_DIMS = 2
TRUE_W = np.array([0.5, 0.3, 0.2])
TRUE_MU = np.array([[0.0, 0.0], [4.0, 1.0], [1.0, 4.0]])
TRUE_COV = np.array(
    [
        [[1.0, 0.5], [0.5, 1.0]],
        [[0.8, -0.3], [-0.3, 0.6]],
        [[1.5, 0.0], [0.0, 0.4]],
    ]
)

# Common start: distinct means near (not at) the truth, unit covariances, equal weights.
START = {
    "w": np.full(N_COMPONENTS, 1.0 / N_COMPONENTS),
    "mu": np.array([[0.5, -0.5], [3.0, 2.0], [2.0, 3.0]]),
    "cov": np.tile(np.eye(N_DIMS), (N_COMPONENTS, 1, 1)),
}

LOG_2PI = np.log(2.0 * np.pi)
TRIL_ROWS, TRIL_COLS = np.tril_indices(N_DIMS, -1)
DIAG = np.arange(N_DIMS)


def simulate(n: int, seed: int) -> np.ndarray:
    """Draw ``n`` observations from the true mixture.

    Parameters
    ----------
    n : int
        Number of observations.
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    numpy.ndarray of shape (n, 2)
    """
    rng = np.random.default_rng(seed)
    z = rng.choice(N_COMPONENTS, size=n, p=TRUE_W)
    chol = np.linalg.cholesky(TRUE_COV)
    noise = rng.standard_normal((n, N_DIMS))
    return TRUE_MU[z] + np.einsum("nij,nj->ni", chol[z], noise)


def log_joint(x: np.ndarray, params: Params) -> np.ndarray:
    """Table of ``log w_k + log MvNormal(x_i | mu_k, cov_k)``, shape (n, K)."""
    table = np.empty((x.shape[0], N_COMPONENTS))
    for k in range(N_COMPONENTS):  # a loop over components, never over observations
        chol = np.linalg.cholesky(params["cov"][k])
        whitened = solve_triangular(chol, (x - params["mu"][k]).T, lower=True)
        log_det = 2.0 * np.log(np.diag(chol)).sum()
        table[:, k] = np.log(params["w"][k]) - 0.5 * (
            N_DIMS * LOG_2PI + log_det + np.einsum("dn,dn->n", whitened, whitened)
        )
    return table


def m_step(x: np.ndarray, resp: np.ndarray) -> Params:
    """Closed-form maximizer of the expected complete-data log-likelihood."""
    counts = resp.sum(axis=0)
    mu = resp.T @ x / counts[:, None]
    cov = np.empty((N_COMPONENTS, N_DIMS, N_DIMS))
    for k in range(N_COMPONENTS):
        centered = x - mu[k]
        cov[k] = (resp[:, k, None] * centered).T @ centered / counts[k]
    return {"w": counts / x.shape[0], "mu": mu, "cov": cov}


def canonical(params: Params) -> Params:
    """Sort components by their mean, first coordinate first."""
    order = np.lexsort(np.asarray(params["mu"]).T[::-1])
    return {key: np.asarray(value)[order] for key, value in params.items()}


def cholesky_parts(cov: np.ndarray) -> Params:
    """Split covariances into the model's ``chol_diag`` and ``chol_offdiag``."""
    chol = np.linalg.cholesky(cov)
    return {
        "chol_diag": chol[:, DIAG, DIAG],
        "chol_offdiag": chol[:, TRIL_ROWS, TRIL_COLS],
    }


def covariance_from_parts(chol_diag: np.ndarray, chol_offdiag: np.ndarray) -> np.ndarray:
    """Inverse of `cholesky_parts`."""
    chol = np.zeros((chol_diag.shape[0], N_DIMS, N_DIMS))
    chol[:, DIAG, DIAG] = chol_diag
    chol[:, TRIL_ROWS, TRIL_COLS] = chol_offdiag
    return chol @ np.swapaxes(chol, 1, 2)


def build_model(x: np.ndarray):
    """Build the PyMC model: flat priors (so MAP = MLE), latent labels left in.

    Parameters
    ----------
    x : numpy.ndarray of shape (n, 2)
        Observations.

    Returns
    -------
    pymc.Model
    """
    import pymc as pm
    import pytensor.tensor as pt

    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(N_COMPONENTS))
        mu = pm.Flat("mu", shape=(N_COMPONENTS, N_DIMS))
        chol_diag = pm.HalfFlat("chol_diag", shape=(N_COMPONENTS, N_DIMS))
        chol_offdiag = pm.Flat("chol_offdiag", shape=(N_COMPONENTS, TRIL_ROWS.size))
        chol = pt.zeros((N_COMPONENTS, N_DIMS, N_DIMS))
        chol = pt.set_subtensor(chol[:, DIAG, DIAG], chol_diag)
        chol = pt.set_subtensor(chol[:, TRIL_ROWS, TRIL_COLS], chol_offdiag)
        z = pm.Categorical("z", p=w, shape=x.shape[0])
        pm.MvNormal("x", mu=mu[z], chol=chol[z], observed=x)
    return model


def params_from_idata(idata) -> Params:
    """Read pm_em's estimates and turn the Cholesky parts back into covariances."""
    parts = {name: point_estimate(idata, name) for name in ("w", "mu", "chol_diag", "chol_offdiag")}
    cov = covariance_from_parts(parts["chol_diag"], parts["chol_offdiag"])
    return {"w": parts["w"], "mu": parts["mu"], "cov": cov}


def main() -> None:
    """Parse the command line, run every method and print the comparison."""
    settings = parse_settings(__doc__.splitlines()[0], default_n=100_000, n_dims=N_DIMS)
    problem = Problem(
        x=simulate(settings.n, settings.seed),
        start=START,
        log_joint=log_joint,
        m_step=m_step,
        canonical=canonical,
    )
    results = [
        run_numpy(problem, settings),
        run_sklearn(
            problem,
            settings,
            {
                "n_components": N_COMPONENTS,
                "covariance_type": "full",
                "weights_init": START["w"],
                "means_init": START["mu"],
                "precisions_init": np.linalg.inv(START["cov"]),
            },
            lambda gm: {"w": gm.weights_, "mu": gm.means_, "cov": gm.covariances_},
        ),
    ]
    if not settings.skip_pm_em:
        initvals = {"w": START["w"], "mu": START["mu"], **cholesky_parts(START["cov"])}
        results.append(
            run_pm_em(
                problem,
                settings,
                lambda: build_model(problem.x),
                initvals,
                params_from_idata,
            )
        )
    report("2-D three-component full-covariance Gaussian mixture", results, settings)


if __name__ == "__main__":
    main()

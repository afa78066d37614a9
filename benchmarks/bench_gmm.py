"""Benchmark pm_em on a 1-D two-component Gaussian mixture vs NumPy and scikit-learn.

Data as in the project's seed example: ``z ~ Bernoulli(0.6)``,
``x ~ Normal(mu[z], sigma[z])`` with ``mu = (2, 5)`` and ``sigma = (0.5, 1)``, so the
weights are (0.4, 0.6). The PyMC model has flat priors, so its MAP is the
maximum-likelihood estimate that the peers compute. Every method starts from the same
point and stops by the same rule.

Run from the repository root (pm_em installed, e.g. ``pip install -e .``)::

    python benchmarks/bench_gmm.py --n 100000 --repeats 3 --json gmm.json
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

TRUE_MU = np.array([2.0, 5.0])
TRUE_SIGMA = np.array([0.5, 1.0])
WEIGHT_OF_SECOND = 0.6

# Common start: asymmetric, so no method sits on the symmetric saddle where both
# components are identical.
START = {
    "w": np.array([0.5, 0.5]),
    "mu": np.array([1.0, 6.0]),
    "sigma": np.array([1.5, 1.5]),
}

LOG_2PI = np.log(2.0 * np.pi)


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
    numpy.ndarray of shape (n,)
    """
    rng = np.random.default_rng(seed)
    z = (rng.random(n) < WEIGHT_OF_SECOND).astype(int)
    return rng.normal(TRUE_MU[z], TRUE_SIGMA[z])


def log_joint(x: np.ndarray, params: Params) -> np.ndarray:
    """Table of ``log w_k + log Normal(x_i | mu_k, sigma_k)``, shape (n, 2)."""
    standardized = (x[:, None] - params["mu"]) / params["sigma"]
    return np.log(params["w"]) - np.log(params["sigma"]) - 0.5 * (LOG_2PI + standardized**2)


def m_step(x: np.ndarray, resp: np.ndarray) -> Params:
    """Closed-form maximizer of the expected complete-data log-likelihood."""
    counts = resp.sum(axis=0)
    mu = x @ resp / counts
    variance = np.einsum("nk,nk->k", resp, (x[:, None] - mu) ** 2) / counts
    return {"w": counts / x.shape[0], "mu": mu, "sigma": np.sqrt(variance)}


def canonical(params: Params) -> Params:
    """Sort components by their mean."""
    order = np.argsort(params["mu"])
    return {key: np.asarray(value)[order] for key, value in params.items()}


def build_model(x: np.ndarray):
    """Build the PyMC model: flat priors (so MAP = MLE), latent labels left in.

    Parameters
    ----------
    x : numpy.ndarray
        Observations.

    Returns
    -------
    pymc.Model
    """
    import pymc as pm

    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Flat("mu", shape=2)
        sigma = pm.HalfFlat("sigma", shape=2)
        z = pm.Categorical("z", p=w, shape=x.shape[0])
        pm.Normal("x", mu[z], sigma[z], observed=x)
    return model


def main() -> None:
    """Parse the command line, run every method and print the comparison."""
    settings = parse_settings(__doc__.splitlines()[0], default_n=100_000, n_dims=1)
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
                "n_components": 2,
                "covariance_type": "diag",
                "weights_init": START["w"],
                "means_init": START["mu"][:, None],
                "precisions_init": 1.0 / START["sigma"][:, None] ** 2,
            },
            lambda gm: {
                "w": gm.weights_,
                "mu": gm.means_[:, 0],
                "sigma": np.sqrt(gm.covariances_[:, 0]),
            },
        ),
    ]
    if not settings.skip_pm_em:
        results.append(
            run_pm_em(
                problem,
                settings,
                lambda: build_model(problem.x),
                START,
                lambda idata: {name: point_estimate(idata, name) for name in START},
            )
        )
    report("1-D two-component Gaussian mixture", results, settings)


if __name__ == "__main__":
    main()

"""Two-component normal mixture fitted by EM, checked against scikit-learn.

From the "Expectation Maximization Algorithm" notes (mixture of normals): x is
drawn from N(2, 0.5) or N(5, 1), the second with probability 0.6, and the
component label z is never seen.  The priors are flat, so pm_em's MAP is the
maximum-likelihood estimate that scikit-learn's GaussianMixture finds from the
same start.
"""

import numpy as np
import pymc as pm
from sklearn.mixture import GaussianMixture

import pm_em

TRUE_W = np.array([0.4, 0.6])
TRUE_MU = np.array([2.0, 5.0])
TRUE_SIGMA = np.array([0.5, 1.0])


def simulate_data(n=1000, seed=20240501):
    """Draw ``n`` points from the mixture in the notes."""
    rng = np.random.default_rng(seed)
    z = rng.binomial(1, TRUE_W[1], size=n)
    return rng.normal(TRUE_MU[z], TRUE_SIGMA[z])


def build_model(x):
    """Mixture with an explicit latent label per observation and flat priors."""
    coords = {"component": [0, 1], "obs": np.arange(len(x))}
    with pm.Model(coords=coords) as model:
        w = pm.Dirichlet("w", a=np.ones(2), dims="component")  # flat on the simplex
        mu = pm.Flat("mu", dims="component")
        sigma = pm.HalfFlat("sigma", dims="component")
        z = pm.Categorical("z", p=w, dims="obs")
        pm.Normal("x", mu=mu[z], sigma=sigma[z], observed=x, dims="obs")
    return model


def initial_values(x):
    """Distinct start from the data: the default point is a symmetric saddle."""
    return {
        "w": np.array([0.5, 0.5]),
        "mu": np.quantile(x, [0.25, 0.75]),
        "sigma": np.full(2, x.std()),
    }


def fit_sklearn(x, start):
    """scikit-learn's EM from the same start, unregularised, tightly converged."""
    gm = GaussianMixture(
        2,
        covariance_type="full",
        reg_covar=0.0,
        tol=1e-12,
        max_iter=10_000,
        weights_init=start["w"],
        means_init=start["mu"][:, None],
        precisions_init=(1.0 / start["sigma"] ** 2)[:, None, None],
    )
    return gm.fit(x[:, None])


def main():
    x = simulate_data()
    start = initial_values(x)
    idata = pm_em.find_MAP(
        build_model(x), initvals=start, tol=1e-12, random_seed=1, progressbar=False
    )
    post = idata.posterior.squeeze(("chain", "draw"))
    gm = fit_sklearn(x, start)
    sklearn_sigma = np.sqrt(gm.covariances_[:, 0, 0])
    print(f"{'':<9}{'pm_em':>10}{'sklearn':>10}{'truth':>7}   (n = {len(x)})")
    for name, theirs, truth in [
        ("w", gm.weights_, TRUE_W),
        ("mu", gm.means_[:, 0], TRUE_MU),
        ("sigma", sklearn_sigma, TRUE_SIGMA),
    ]:
        for k, ours in enumerate(post[name].values):
            print(f"{name}[{k}]".ljust(9) + f"{ours:>10.5f}{theirs[k]:>10.5f}{truth[k]:>7.2f}")
    print(
        f"log-likelihood: pm_em {float(idata.log_likelihood['x'].sum()):.4f}, "
        f"sklearn {gm.score(x[:, None]) * len(x):.4f}; "
        f"{int(idata.em_stats['n_iter'])} EM iterations"
    )


if __name__ == "__main__":
    main()

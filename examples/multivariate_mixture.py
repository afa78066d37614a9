"""Two-dimensional, three-component Gaussian mixture with full covariances.

The general mixture of "Lecture 15" and of the 10-701 recitation notes, whose
M-step updates weights, means and full covariance matrices.  Each component's
covariance is parameterised by its Cholesky factor built from flat free
variables (HalfFlat diagonal, Flat off-diagonal), so with a flat Dirichlet on
the weights the MAP is the MLE.  The reference is scikit-learn's
GaussianMixture (covariance_type="full", reg_covar=0) from the same start.
"""

import numpy as np
import pymc as pm
import pytensor.tensor as pt
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

import pm_em

TRUE_W = np.array([0.5, 0.3, 0.2])
TRUE_MU = np.array([[0.0, 0.0], [4.0, 0.0], [2.0, 3.5]])
TRUE_COV = np.array(
    [[[1.0, 0.3], [0.3, 0.5]], [[0.6, -0.2], [-0.2, 1.2]], [[0.4, 0.0], [0.0, 0.4]]]
)


def simulate_data(n=300, seed=1010):
    """``n`` points from the three-component mixture, shape (n, 2)."""
    rng = np.random.default_rng(seed)
    z = rng.choice(3, size=n, p=TRUE_W)
    return np.stack([rng.multivariate_normal(TRUE_MU[k], TRUE_COV[k]) for k in z])


def build_model(X, n_components=3):
    """Latent component per point; MvNormal with a per-component Cholesky factor."""
    axis = ["x0", "x1"]
    coords = {"component": np.arange(n_components), "axis": axis, "axis_bis": axis}
    with pm.Model(coords=coords | {"obs": np.arange(len(X))}) as model:
        w = pm.Dirichlet("w", a=np.ones(n_components), dims="component")
        mu = pm.Flat("mu", dims=("component", "axis"))
        chol_diag = pm.HalfFlat("chol_diag", dims=("component", "axis"))
        chol_offdiag = pm.Flat("chol_offdiag", dims="component")
        # Lower-triangular [[d0, 0], [off, d1]] per component; flat in each entry.
        chol = pt.zeros((n_components, 2, 2))[:, [0, 1], [0, 1]].set(chol_diag)
        chol = chol[:, 1, 0].set(chol_offdiag)
        pm.Deterministic("cov", chol @ chol.mT, dims=("component", "axis", "axis_bis"))
        z = pm.Categorical("z", p=w, dims="obs")
        pm.MvNormal("x", mu=mu[z], chol=chol[z], observed=X, dims=("obs", "axis"))
    return model


def kmeans_start(X, n_components=3, seed=0):
    """scikit-learn's default start (k-means labels); returns initvals and covariances."""
    labels = KMeans(n_components, n_init=10, random_state=seed).fit_predict(X)
    members = [X[labels == k] for k in range(n_components)]
    cov = np.stack([np.cov(points.T, bias=True) for points in members])
    chol = np.linalg.cholesky(cov)
    initvals = {
        "w": np.array([len(points) for points in members]) / len(X),
        "mu": np.stack([points.mean(0) for points in members]),
        "chol_diag": np.stack([chol[:, 0, 0], chol[:, 1, 1]], axis=-1),
        "chol_offdiag": chol[:, 1, 0],
    }
    return initvals, cov


def fit_sklearn(X, start, cov):
    """Unregularised scikit-learn EM from the same start, tightly converged."""
    options = {
        "covariance_type": "full",
        "reg_covar": 0.0,
        "tol": 1e-12,
        "max_iter": 10_000,
    }
    gm = GaussianMixture(
        len(cov),
        weights_init=start["w"],
        means_init=start["mu"],
        precisions_init=np.linalg.inv(cov),
        **options,
    )
    return gm.fit(X)


def main():
    X = simulate_data()
    start, cov = kmeans_start(X)
    idata = pm_em.find_MAP(
        build_model(X), initvals=start, tol=1e-12, random_seed=6, progressbar=False
    )
    post = idata.posterior.squeeze(("chain", "draw"))
    gm = fit_sklearn(X, start, cov)
    np.set_printoptions(precision=4, suppress=True)
    for name, ours, theirs in [
        ("weights", post["w"].values, gm.weights_),
        ("means", post["mu"].values, gm.means_),
        ("covariances", post["cov"].values, gm.covariances_),
    ]:
        print(f"{name}\n  pm_em:\n{ours}\n  scikit-learn:\n{theirs}")
        print(f"  max abs difference: {np.max(np.abs(ours - theirs)):.2e}")


if __name__ == "__main__":
    main()

"""The benchmark problems: data, common start, NumPy EM pieces and PyMC models.

Each `Case` knows how to simulate its data, the start every method begins from, the
E-step (for mixtures a log-space table; for the hidden Markov model a forward-backward
pass) and the closed-form M-step of its textbook EM, and how to build the PyMC model
that pm_em (and, after marginalizing ``z``, pymc-extras) fits.
All models have flat priors (a Dirichlet of ones on the weights, ``Flat`` /
``HalfFlat`` / ``Uniform(0, 1)`` on the rest) and both PyMC-based peers maximize the
log-density without Jacobian terms, so every method's target is the maximum-likelihood
estimate.

PyMC, PyTensor and scikit-learn are imported inside functions: the cold-start worker
must set ``PYTENSOR_FLAGS`` before PyTensor is first imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.linalg import solve_triangular
from scipy.special import gammaln

Params = dict[str, np.ndarray]

LOG_2PI = np.log(2.0 * np.pi)


@dataclass(frozen=True)
class Case:
    """One benchmark problem.

    Parameters
    ----------
    key : str
        Short name used on the command line and in the table.
    title : str
        Human-readable description.
    d : int
        Observed elements per row (pm_em's tolerance is per observed element).
    simulate : callable
        ``simulate(n, seed)`` returns the data, first axis over observations.
    start : dict of str to numpy.ndarray
        Common start, in the NumPy parameterization (``log_joint``'s).
    log_joint : callable or None
        ``log_joint(x, params)`` returns the ``(n, K)`` table ``log p(x_i, z_i = k)`` of
        a mixture; ``None`` when ``posterior_stats`` gives the E-step instead.
    m_step : callable
        ``m_step(x, stats)`` returns the closed-form M-step from the E-step's
        statistics (a mixture's responsibilities, shape ``(n, K)``).
    canonical : callable
        Puts components in a canonical order (mixtures can switch labels).
    build_model : callable
        ``build_model(x)`` returns the PyMC model with the latent ``z`` written out.
    initvals : callable
        ``initvals(start)`` returns the start in the PyMC model's variable names.
    from_posterior : callable
        ``from_posterior(get)`` maps ``get(name) -> array`` (a posterior reader) to
        parameters in the NumPy parameterization.
    sklearn : dict or None
        Keyword arguments of ``sklearn.mixture.GaussianMixture`` (start included);
        ``None`` when scikit-learn has no such model.
    from_sklearn : callable or None
        Fitted ``GaussianMixture`` to parameters.
    peers : tuple of str
        The methods measured on this case.
    posterior_stats : callable or None
        ``posterior_stats(x, params)`` returns ``(loglik, stats)``: the observed-data
        log-likelihood and what ``m_step`` consumes. ``None`` for mixtures, whose
        E-step normalizes ``log_joint``.
    hmmlearn : callable or None
        ``hmmlearn(tol, max_iter)`` returns an unfitted hmmlearn model set to the
        start, unregularized; ``None`` when hmmlearn has no such model.
    from_hmmlearn : callable or None
        Fitted hmmlearn model to parameters.
    """

    key: str
    title: str
    d: int
    simulate: Callable[[int, int], np.ndarray]
    start: Params
    log_joint: Callable[[np.ndarray, Params], np.ndarray] | None
    m_step: Callable[[np.ndarray, Any], Params]
    canonical: Callable[[Params], Params]
    build_model: Callable[[np.ndarray], Any]
    initvals: Callable[[Params], Params]
    from_posterior: Callable[[Callable[[str], np.ndarray]], Params]
    sklearn: dict[str, Any] | None
    from_sklearn: Callable[[Any], Params] | None
    peers: tuple[str, ...]
    posterior_stats: Callable[[np.ndarray, Params], tuple[float, Any]] | None = None
    hmmlearn: Callable[[float, int], Any] | None = None
    from_hmmlearn: Callable[[Any], Params] | None = None

    def e_step(self, x: np.ndarray, params: Params) -> tuple[float, Any]:
        """The textbook E-step: observed-data log-likelihood and ``m_step``'s input."""
        if self.posterior_stats is not None:
            return self.posterior_stats(x, params)
        log_norm, resp = log_normalize(self.log_joint(x, params))
        return float(log_norm.sum()), resp

    def loglik(self, x: np.ndarray, params: Params) -> float:
        """Observed-data log-likelihood of ``params``: one function for every method."""
        return self.e_step(x, params)[0]


def log_normalize(log_joint: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max-shifted log-sum-exp over the last axis.

    Parameters
    ----------
    log_joint : numpy.ndarray of shape (n, K)
        ``log p(x_i, z_i = k)``; entries may be ``-inf``, not a whole row.

    Returns
    -------
    log_norm : numpy.ndarray of shape (n,)
        ``log p(x_i)``.
    resp : numpy.ndarray of shape (n, K)
        Responsibilities ``p(z_i = k | x_i)``.
    """
    shift = log_joint.max(axis=1, keepdims=True)
    resp = np.exp(log_joint - shift)
    total = resp.sum(axis=1, keepdims=True)
    resp /= total
    return (shift + np.log(total))[:, 0], resp


def by_first_mean(params: Params) -> Params:
    """Sort mixture components by their mean (lexicographically in several dimensions)."""
    mu = np.asarray(params["mu"])
    order = np.argsort(mu) if mu.ndim == 1 else np.lexsort(mu.T[::-1])
    return {key: np.asarray(value)[order] for key, value in params.items()}


# --- 1-D two-component normal mixture (seed 001) ------------------------------------
# The seed's values: mu = (2, 5), sigma = (0.5, 1), z ~ Bernoulli(psi = 0.6), so the
# weights are (0.4, 0.6).

GMM1D_MU = np.array([2.0, 5.0])
GMM1D_SIGMA = np.array([0.5, 1.0])
GMM1D_PSI = 0.6


def gmm1d_simulate(n: int, seed: int) -> np.ndarray:
    """Draw ``n`` points of seed 001's mixture."""
    rng = np.random.default_rng(seed)
    z = (rng.random(n) < GMM1D_PSI).astype(int)
    return rng.normal(GMM1D_MU[z], GMM1D_SIGMA[z])


def gmm1d_log_joint(x: np.ndarray, params: Params) -> np.ndarray:
    """``log w_k + log Normal(x_i | mu_k, sigma_k)``, shape (n, 2)."""
    standardized = (x[:, None] - params["mu"]) / params["sigma"]
    return np.log(params["w"]) - np.log(params["sigma"]) - 0.5 * (LOG_2PI + standardized**2)


def gmm1d_m_step(x: np.ndarray, resp: np.ndarray) -> Params:
    """Weights, means and standard deviations maximizing the expected log-likelihood."""
    counts = resp.sum(axis=0)
    mu = x @ resp / counts
    variance = np.einsum("nk,nk->k", resp, (x[:, None] - mu) ** 2) / counts
    return {"w": counts / x.shape[0], "mu": mu, "sigma": np.sqrt(variance)}


def gmm1d_model(x: np.ndarray, n_components: int = 2):
    """``Normal(mu[z], sigma[z])`` with flat priors (``n_components`` components)."""
    import pymc as pm

    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(n_components))
        mu = pm.Flat("mu", shape=n_components)
        sigma = pm.HalfFlat("sigma", shape=n_components)
        z = pm.Categorical("z", p=w, shape=x.shape[0])
        pm.Normal("x", mu[z], sigma[z], observed=x)
    return model


GMM1D_START = {
    "w": np.array([0.5, 0.5]),
    "mu": np.array([1.0, 6.0]),
    "sigma": np.array([1.5, 1.5]),
}

GMM1D = Case(
    key="gmm1d",
    title="1-D 2-component normal mixture",
    d=1,
    simulate=gmm1d_simulate,
    start=GMM1D_START,
    log_joint=gmm1d_log_joint,
    m_step=gmm1d_m_step,
    canonical=by_first_mean,
    build_model=gmm1d_model,
    initvals=lambda start: dict(start),
    from_posterior=lambda get: {name: get(name) for name in ("w", "mu", "sigma")},
    sklearn={
        "n_components": 2,
        "covariance_type": "diag",
        "weights_init": GMM1D_START["w"],
        "means_init": GMM1D_START["mu"][:, None],
        "precisions_init": 1.0 / GMM1D_START["sigma"][:, None] ** 2,
    },
    from_sklearn=lambda gm: {
        "w": gm.weights_,
        "mu": gm.means_[:, 0],
        "sigma": np.sqrt(gm.covariances_[:, 0]),
    },
    peers=("numpy", "sklearn", "pm_em", "pm_em-jax", "pymc-extras"),
)


# --- 1-D five-component normal mixture (issue 14) ------------------------------------
# Neighbouring components overlap (means 2-2.7 apart, scales 0.6-1.2), so the
# likelihood has a ridge along which plain EM crawls: several hundred iterations at
# tol 1e-8 from a k-means start, where SQUAREM pays off (benchmarks/accelerate.py).

GMM5_W = np.array([0.25, 0.2, 0.2, 0.2, 0.15])
GMM5_MU = np.array([-3.5, -1.2, 0.8, 2.8, 5.5])
GMM5_SIGMA = np.array([0.8, 0.6, 0.7, 0.9, 1.2])


def gmm5_simulate(n: int, seed: int) -> np.ndarray:
    """Draw ``n`` points of the five-component mixture."""
    rng = np.random.default_rng(seed)
    z = rng.choice(len(GMM5_W), size=n, p=GMM5_W)
    return rng.normal(GMM5_MU[z], GMM5_SIGMA[z])


GMM5_START = {
    "w": np.full(5, 0.2),
    "mu": np.array([-4.0, -1.0, 1.0, 3.0, 6.0]),
    "sigma": np.ones(5),
}

GMM5 = Case(
    key="gmm5",
    title="1-D 5-component normal mixture",
    d=1,
    simulate=gmm5_simulate,
    start=GMM5_START,
    log_joint=gmm1d_log_joint,
    m_step=gmm1d_m_step,
    canonical=by_first_mean,
    build_model=lambda x: gmm1d_model(x, n_components=5),
    initvals=lambda start: dict(start),
    from_posterior=lambda get: {name: get(name) for name in ("w", "mu", "sigma")},
    sklearn={
        "n_components": 5,
        "covariance_type": "diag",
        "weights_init": GMM5_START["w"],
        "means_init": GMM5_START["mu"][:, None],
        "precisions_init": 1.0 / GMM5_START["sigma"][:, None] ** 2,
    },
    from_sklearn=lambda gm: {
        "w": gm.weights_,
        "mu": gm.means_[:, 0],
        "sigma": np.sqrt(gm.covariances_[:, 0]),
    },
    peers=("numpy", "sklearn", "pm_em"),
)


# --- 2-D three-component full-covariance mixture ------------------------------------

MV_K = 3
MV_D = 2
MV_W = np.array([0.5, 0.3, 0.2])
MV_MU = np.array([[0.0, 0.0], [4.0, 1.0], [1.0, 4.0]])
MV_COV = np.array(
    [
        [[1.0, 0.5], [0.5, 1.0]],
        [[0.8, -0.3], [-0.3, 0.6]],
        [[1.5, 0.0], [0.0, 0.4]],
    ]
)
MV_TRIL = np.tril_indices(MV_D, -1)
MV_DIAG = np.arange(MV_D)


def mvgmm_simulate(n: int, seed: int) -> np.ndarray:
    """Draw ``n`` points, shape (n, 2)."""
    rng = np.random.default_rng(seed)
    z = rng.choice(MV_K, size=n, p=MV_W)
    chol = np.linalg.cholesky(MV_COV)
    return MV_MU[z] + np.einsum("nij,nj->ni", chol[z], rng.standard_normal((n, MV_D)))


def mvgmm_log_joint(x: np.ndarray, params: Params) -> np.ndarray:
    """``log w_k + log MvNormal(x_i | mu_k, cov_k)``, shape (n, 3), looping over k only."""
    table = np.empty((x.shape[0], MV_K))
    for k in range(MV_K):
        chol = np.linalg.cholesky(params["cov"][k])
        whitened = solve_triangular(chol, (x - params["mu"][k]).T, lower=True)
        log_det = 2.0 * np.log(np.diag(chol)).sum()
        table[:, k] = np.log(params["w"][k]) - 0.5 * (
            MV_D * LOG_2PI + log_det + np.einsum("dn,dn->n", whitened, whitened)
        )
    return table


def mvgmm_m_step(x: np.ndarray, resp: np.ndarray) -> Params:
    """Weights, means and full covariances maximizing the expected log-likelihood."""
    counts = resp.sum(axis=0)
    mu = resp.T @ x / counts[:, None]
    cov = np.empty((MV_K, MV_D, MV_D))
    for k in range(MV_K):
        centered = x - mu[k]
        cov[k] = (resp[:, k, None] * centered).T @ centered / counts[k]
    return {"w": counts / x.shape[0], "mu": mu, "cov": cov}


def mvgmm_model(x: np.ndarray):
    """``MvNormal(mu[z], chol=chol[z])``, flat priors on the Cholesky factors' entries.

    The diagonal of each factor is ``HalfFlat``, the strict lower triangle ``Flat``:
    the log-density is then the likelihood alone, whose maximum over Cholesky factors
    is scikit-learn's full-covariance MLE (with ``reg_covar=0``).
    """
    import pymc as pm
    import pytensor.tensor as pt

    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(MV_K))
        mu = pm.Flat("mu", shape=(MV_K, MV_D))
        chol_diag = pm.HalfFlat("chol_diag", shape=(MV_K, MV_D))
        chol_offdiag = pm.Flat("chol_offdiag", shape=(MV_K, MV_TRIL[0].size))
        chol = pt.zeros((MV_K, MV_D, MV_D))
        chol = pt.set_subtensor(chol[:, MV_DIAG, MV_DIAG], chol_diag)
        chol = pt.set_subtensor(chol[:, MV_TRIL[0], MV_TRIL[1]], chol_offdiag)
        z = pm.Categorical("z", p=w, shape=x.shape[0])
        pm.MvNormal("x", mu=mu[z], chol=chol[z], observed=x)
    return model


def mvgmm_initvals(start: Params) -> Params:
    """Covariances to the model's Cholesky parts."""
    chol = np.linalg.cholesky(start["cov"])
    return {
        "w": start["w"],
        "mu": start["mu"],
        "chol_diag": chol[:, MV_DIAG, MV_DIAG],
        "chol_offdiag": chol[:, MV_TRIL[0], MV_TRIL[1]],
    }


def mvgmm_from_posterior(get: Callable[[str], np.ndarray]) -> Params:
    """The model's Cholesky parts back to covariances."""
    chol = np.zeros((MV_K, MV_D, MV_D))
    chol[:, MV_DIAG, MV_DIAG] = get("chol_diag")
    chol[:, MV_TRIL[0], MV_TRIL[1]] = get("chol_offdiag")
    return {"w": get("w"), "mu": get("mu"), "cov": chol @ np.swapaxes(chol, 1, 2)}


MVGMM_START = {
    "w": np.full(MV_K, 1.0 / MV_K),
    "mu": np.array([[0.5, -0.5], [3.0, 2.0], [2.0, 3.0]]),
    "cov": np.tile(np.eye(MV_D), (MV_K, 1, 1)),
}

MVGMM = Case(
    key="mvgmm2d",
    title="2-D 3-component full-covariance mixture",
    d=MV_D,
    simulate=mvgmm_simulate,
    start=MVGMM_START,
    log_joint=mvgmm_log_joint,
    m_step=mvgmm_m_step,
    canonical=by_first_mean,
    build_model=mvgmm_model,
    initvals=mvgmm_initvals,
    from_posterior=mvgmm_from_posterior,
    sklearn={
        "n_components": MV_K,
        "covariance_type": "full",
        "weights_init": MVGMM_START["w"],
        "means_init": MVGMM_START["mu"],
        "precisions_init": np.linalg.inv(MVGMM_START["cov"]),
    },
    from_sklearn=lambda gm: {"w": gm.weights_, "mu": gm.means_, "cov": gm.covariances_},
    peers=("numpy", "sklearn", "pm_em", "pm_em-jax", "pymc-extras"),
)


# --- zero-inflated Poisson (the seed's exercise) ------------------------------------
# A count is Poisson(rate = 1.5) with probability psi = 0.4, a structural zero
# otherwise; the seed's run_em starts at rate 1, psi 0.5.

ZIP_RATE = 1.5
ZIP_PSI = 0.4


def zip_simulate(n: int, seed: int) -> np.ndarray:
    """Draw ``n`` zero-inflated counts."""
    rng = np.random.default_rng(seed)
    return rng.poisson(ZIP_RATE, size=n) * (rng.random(n) < ZIP_PSI)


def zip_log_joint(x: np.ndarray, params: Params) -> np.ndarray:
    """Columns: structural zero (z = 0), Poisson draw (z = 1); shape (n, 2)."""
    psi, rate = float(params["psi"]), float(params["rate"])
    with np.errstate(divide="ignore"):
        structural = np.log1p(-psi) + np.log(x == 0)
    poisson = np.log(psi) + x * np.log(rate) - rate - gammaln(x + 1.0)
    return np.column_stack([structural, poisson])


def zip_m_step(x: np.ndarray, resp: np.ndarray) -> Params:
    """The seed's M-step: psi = mean(w), rate = sum(w x) / sum(w)."""
    w = resp[:, 1]
    return {"psi": np.asarray(w.mean()), "rate": np.asarray(w @ x / w.sum())}


def zip_model(x: np.ndarray):
    """``Poisson(z * rate)`` with a Bernoulli(psi) latent, flat priors."""
    import pymc as pm

    with pm.Model() as model:
        psi = pm.Uniform("psi", 0.0, 1.0)
        rate = pm.HalfFlat("rate")
        z = pm.Bernoulli("z", p=psi, shape=x.shape[0])
        pm.Poisson("x", mu=z * rate, observed=x)
    return model


ZIP = Case(
    key="zip",
    title="zero-inflated Poisson",
    d=1,
    simulate=zip_simulate,
    start={"psi": np.asarray(0.5), "rate": np.asarray(1.0)},
    log_joint=zip_log_joint,
    m_step=zip_m_step,
    canonical=lambda params: params,
    build_model=zip_model,
    initvals=lambda start: dict(start),
    from_posterior=lambda get: {"psi": get("psi"), "rate": get("rate")},
    sklearn=None,
    from_sklearn=None,
    peers=("numpy", "pm_em", "pm_em-jax", "pymc-extras"),
)


# --- 3-state Gaussian hidden Markov model -------------------------------------------
# Sticky regimes with overlapping emissions: P's diagonal 0.9, 0.9, 0.7; means -2, 0,
# 2.5 with standard deviations 0.8, 0.6, 1.0 (neighbouring states overlap by about
# 10 %). The start has distinct means, unit spreads, diagonal 0.8.

HMM_K = 3
HMM_P = np.array([[0.90, 0.05, 0.05], [0.05, 0.90, 0.05], [0.10, 0.20, 0.70]])
HMM_PI = np.array([0.5, 0.3, 0.2])
HMM_MU = np.array([-2.0, 0.0, 2.5])
HMM_SIGMA = np.array([0.8, 0.6, 1.0])


def hmm_simulate(n: int, seed: int) -> np.ndarray:
    """One sequence of ``n`` observations, shape (n,)."""
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(HMM_P, axis=1).tolist()
    uniforms = rng.random(n).tolist()
    states = np.empty(n, dtype=int)
    state = int(np.searchsorted(np.cumsum(HMM_PI), uniforms[0]))
    for t in range(n):
        if t:
            row = cumulative[state]
            state = 0 if uniforms[t] < row[0] else 1 if uniforms[t] < row[1] else 2
        states[t] = state
    return rng.normal(HMM_MU[states], HMM_SIGMA[states])


def hmm_posterior_stats(x: np.ndarray, params: Params) -> tuple[float, tuple]:
    """Forward-backward with per-step normalization (Rabiner's scaling).

    The emission densities are shifted by their largest log-density at each step
    before ``exp`` (the same max shift as the mixtures' log-sum-exp), and the forward
    messages are normalized at every step, so nothing under- or overflows; the
    normalizers and shifts add up to the log-likelihood. The recursions are loops over
    time in Python (each step a few NumPy calls on length-3 vectors); the expected
    transition counts are one matrix product over all steps.

    Returns
    -------
    loglik : float
    stats : tuple
        ``(gamma, transition_counts)``: state probabilities ``(n, 3)`` and expected
        ``i -> j`` moves ``(3, 3)``.
    """
    P, pi = params["P"], params["pi"]
    standardized = (x[:, None] - params["mu"]) / params["sigma"]
    log_density = -0.5 * (LOG_2PI + standardized**2) - np.log(params["sigma"])
    shift = log_density.max(axis=1)
    density = np.exp(log_density - shift[:, None])
    n_steps = len(x)
    filtered = np.empty((n_steps, HMM_K))
    normalizer = np.empty(n_steps)
    message = pi * density[0]
    for t in range(n_steps):
        if t:
            message = (filtered[t - 1] @ P) * density[t]
        normalizer[t] = message.sum()
        filtered[t] = message / normalizer[t]
    backward = np.empty((n_steps, HMM_K))
    backward[-1] = 1.0
    for t in range(n_steps - 2, -1, -1):
        backward[t] = P @ (density[t + 1] * backward[t + 1]) / normalizer[t + 1]
    gamma = filtered * backward
    ahead = density[1:] * backward[1:] / normalizer[1:, None]
    transition_counts = P * (filtered[:-1].T @ ahead)
    loglik = float(np.log(normalizer).sum() + shift.sum())
    return loglik, (gamma, transition_counts)


def hmm_m_step(x: np.ndarray, stats: tuple) -> Params:
    """Baum-Welch: normalized expected counts, weighted means and spreads."""
    gamma, transition_counts = stats
    occupancy = gamma.sum(axis=0)
    mu = x @ gamma / occupancy
    variance = np.einsum("nk,nk->k", gamma, (x[:, None] - mu) ** 2) / occupancy
    return {
        "P": transition_counts / transition_counts.sum(axis=1, keepdims=True),
        "pi": gamma[0] / gamma[0].sum(),
        "mu": mu,
        "sigma": np.sqrt(variance),
    }


def hmm_canonical(params: Params) -> Params:
    """States sorted by mean: ``P``'s rows and columns permuted together."""
    order = np.argsort(params["mu"])
    return {
        "P": np.asarray(params["P"])[np.ix_(order, order)],
        **{name: np.asarray(params[name])[order] for name in ("pi", "mu", "sigma")},
    }


def hmm_model(x: np.ndarray):
    """``pymc_extras.DiscreteMarkovChain`` latent with Gaussian emissions, flat priors.

    ``shape=(n,)`` makes a chain of ``n`` states (``n - 1`` transitions).
    """
    import pymc as pm
    import pymc_extras as pmx

    with pm.Model() as model:
        P = pm.Dirichlet("P", np.ones((HMM_K, HMM_K)))
        pi = pm.Dirichlet("pi", np.ones(HMM_K))
        mu = pm.Flat("mu", shape=HMM_K)
        sigma = pm.HalfFlat("sigma", shape=HMM_K)
        s = pmx.DiscreteMarkovChain("s", P=P, init_dist=pm.Categorical.dist(p=pi), shape=x.shape[0])
        pm.Normal("x", mu[s], sigma[s], observed=x)
    return model


HMM_START = {
    "P": np.full((HMM_K, HMM_K), 0.1) + 0.7 * np.eye(HMM_K),
    "pi": np.full(HMM_K, 1.0 / HMM_K),
    "mu": np.array([-1.0, 0.5, 1.5]),
    "sigma": np.ones(HMM_K),
}


def hmm_hmmlearn(tol: float, max_iter: int):
    """hmmlearn's ``GaussianHMM`` at the start, unregularized.

    ``covars_prior=0`` (its default 1e-2 is added to every variance), ``init_params=""``
    so that nothing is re-initialized, ``covars_`` set as variances. ``tol`` is absolute
    on the total log-likelihood.
    """
    from hmmlearn.hmm import GaussianHMM

    model = GaussianHMM(
        HMM_K,
        covariance_type="diag",
        covars_prior=0.0,
        covars_weight=1.0,
        init_params="",
        params="stmc",
        n_iter=max_iter,
        tol=tol,
    )
    model.startprob_ = HMM_START["pi"]
    model.transmat_ = HMM_START["P"]
    model.means_ = HMM_START["mu"][:, None]
    model.covars_ = HMM_START["sigma"][:, None] ** 2
    return model


HMM = Case(
    key="hmm",
    title="3-state Gaussian HMM",
    d=1,
    simulate=hmm_simulate,
    start=HMM_START,
    log_joint=None,
    m_step=hmm_m_step,
    canonical=hmm_canonical,
    build_model=hmm_model,
    initvals=lambda start: dict(start),
    from_posterior=lambda get: {name: get(name) for name in ("P", "pi", "mu", "sigma")},
    sklearn=None,
    from_sklearn=None,
    peers=("numpy", "hmmlearn", "pm_em", "pm_em-jax"),
    posterior_stats=hmm_posterior_stats,
    hmmlearn=hmm_hmmlearn,
    from_hmmlearn=lambda model: {
        "P": model.transmat_,
        "pi": model.startprob_,
        "mu": model.means_[:, 0],
        "sigma": np.sqrt(model.covars_[:, 0, 0]),  # covars_ are variances
    },
)

CASES = {case.key: case for case in (GMM1D, GMM5, MVGMM, ZIP, HMM)}

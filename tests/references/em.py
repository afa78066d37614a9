"""Independent NumPy/SciPy EM references for the examples and tests.

Every algorithm here is written from the closed-form updates in the lecture
notes (two coins, normal mixtures, zero-inflated Poisson, peppered moths) and
works in log space throughout: densities are combined as sums of log-densities
and normalised with :func:`scipy.special.logsumexp`, never as products of pdfs.
Nothing here imports ``pm_em`` or PyMC, so a disagreement between these
functions and the engine points at one side or the other, not at shared code.

Each ``*_em`` function takes an explicit start and tolerance and returns an
:class:`EMResult` whose ``loglik_trace`` holds the observed-data
log-likelihood at the start and after every M-step.  The per-model
``*_e_step`` and ``*_m_step`` functions are public too, so a single engine step
can be checked against a single reference step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

__all__ = [
    "PEPPERED_MOTH_GENOTYPES",
    "PEPPERED_MOTH_PHENOTYPES",
    "EMResult",
    "flat_dirichlet_logp",
    "gaussian_mixture_e_step",
    "gaussian_mixture_em",
    "gaussian_mixture_log_joint",
    "gaussian_mixture_m_step",
    "normal_mixture_e_step",
    "normal_mixture_em",
    "normal_mixture_log_joint",
    "normal_mixture_m_step",
    "peppered_moth_e_step",
    "peppered_moth_em",
    "peppered_moth_log_joint",
    "peppered_moth_m_step",
    "run_em",
    "two_coins_e_step",
    "two_coins_em",
    "two_coins_log_joint",
    "two_coins_m_step",
    "zero_inflated_poisson_e_step",
    "zero_inflated_poisson_em",
    "zero_inflated_poisson_log_joint",
    "zero_inflated_poisson_m_step",
    "zero_inflated_poisson_mle",
]

#: Genotype order used by the peppered-moth functions.
PEPPERED_MOTH_GENOTYPES = ("CC", "CI", "CT", "II", "IT", "TT")
#: Phenotype order used by the peppered-moth functions (codes 0, 1, 2).
PEPPERED_MOTH_PHENOTYPES = ("carbonaria", "insularia", "typica")


@dataclass(frozen=True)
class EMResult:
    """Outcome of a reference EM run.

    Attributes
    ----------
    estimates : dict of str to numpy.ndarray
        Parameter values at the last iterate.
    log_resp : numpy.ndarray
        Log responsibilities at ``estimates`` (a final E-step), shape
        ``(n, n_support)``.
    loglik_trace : numpy.ndarray
        Observed-data log-likelihood at the start (entry 0) and after each
        M-step; the last entry belongs to ``estimates``.
    n_iter : int
        Number of E/M iterations performed.
    converged : bool
        Whether the last log-likelihood increase fell below ``tol``.
    """

    estimates: dict[str, np.ndarray]
    log_resp: np.ndarray
    loglik_trace: np.ndarray
    n_iter: int
    converged: bool

    @property
    def loglik(self) -> float:
        """Observed-data log-likelihood at ``estimates``."""
        return float(self.loglik_trace[-1])


EStep = Callable[[Mapping[str, np.ndarray]], tuple[np.ndarray, float]]
MStep = Callable[[np.ndarray], dict[str, np.ndarray]]


def run_em(
    e_step: EStep,
    m_step: MStep,
    start: Mapping[str, np.ndarray],
    *,
    tol: float,
    max_iter: int,
) -> EMResult:
    """Alternate E- and M-steps until the log-likelihood stops increasing.

    Parameters
    ----------
    e_step : callable
        ``e_step(params) -> (log_resp, loglik)``: log responsibilities at
        ``params`` and the observed-data log-likelihood there.
    m_step : callable
        ``m_step(log_resp) -> params``: the maximiser of the expected
        complete-data log-likelihood.
    start : mapping of str to array_like
        Initial parameter values.
    tol : float
        Stop once the absolute increase of the log-likelihood in one
        iteration is below ``tol``.
    max_iter : int
        Maximum number of iterations.

    Returns
    -------
    EMResult
    """
    params = {name: np.asarray(value, dtype=float) for name, value in start.items()}
    log_resp, loglik = e_step(params)
    trace = [loglik]
    converged = False
    n_iter = 0
    while n_iter < max_iter:
        params = m_step(log_resp)
        # The E-step at the new parameters also yields their log-likelihood,
        # which is what the convergence test needs: one pass per iteration.
        log_resp, loglik = e_step(params)
        trace.append(loglik)
        n_iter += 1
        if abs(trace[-1] - trace[-2]) < tol:
            converged = True
            break
    return EMResult(params, log_resp, np.asarray(trace), n_iter, converged)


def _normalise(log_joint: np.ndarray) -> tuple[np.ndarray, float]:
    """Turn a ``(n, n_support)`` log-joint table into log-resp and log-lik."""
    log_marginal = special.logsumexp(log_joint, axis=-1, keepdims=True)
    return log_joint - log_marginal, float(log_marginal.sum())


def flat_dirichlet_logp(n_categories: int) -> float:
    """Log-density of ``Dirichlet(ones(K))``, constant on the simplex.

    A flat Dirichlet leaves the MAP equal to the MLE but still adds
    ``log Gamma(K)`` to the log-posterior, which the engine's ``logp`` includes.

    Parameters
    ----------
    n_categories : int
        Number of categories ``K``.

    Returns
    -------
    float
        ``log((K - 1)!)``.
    """
    return float(special.gammaln(n_categories))


# --------------------------------------------------------------------------
# Two coins: a latent coin per trial, Binomial(m, p[coin]) heads per trial.
# --------------------------------------------------------------------------


def two_coins_log_joint(
    heads: np.ndarray, n_tosses: int, p_heads: np.ndarray, coin_weights: np.ndarray
) -> np.ndarray:
    """``log P(heads_i, coin_i = k)`` as an ``(n, 2)`` table.

    Binomial coefficients are included, as in PyMC's ``Binomial`` log-pmf.
    """
    return np.log(coin_weights) + stats.binom.logpmf(
        heads[:, None], n_tosses, np.asarray(p_heads)[None, :]
    )


def two_coins_e_step(
    heads: np.ndarray, n_tosses: int, p_heads: np.ndarray, coin_weights: np.ndarray
) -> tuple[np.ndarray, float]:
    """Posterior log-probability of each coin for each trial.

    Parameters
    ----------
    heads : numpy.ndarray
        Number of heads in each trial, shape ``(n,)``.
    n_tosses : int
        Tosses per trial.
    p_heads : numpy.ndarray
        Probability of heads of each coin, shape ``(2,)``.
    coin_weights : numpy.ndarray
        Probability of picking each coin, shape ``(2,)``.

    Returns
    -------
    log_resp : numpy.ndarray
        Shape ``(n, 2)``.
    loglik : float
        Observed-data log-likelihood (binomial coefficients included).
    """
    return _normalise(two_coins_log_joint(heads, n_tosses, p_heads, coin_weights))


def two_coins_m_step(
    heads: np.ndarray, n_tosses: int, log_resp: np.ndarray
) -> dict[str, np.ndarray]:
    """Heads per toss attributed to each coin (the coin choice stays fixed).

    Returns
    -------
    dict
        ``{"p": ...}`` with shape ``(2,)``.
    """
    resp = np.exp(log_resp)
    return {"p": (resp * heads[:, None]).sum(0) / (n_tosses * resp.sum(0))}


def two_coins_em(
    heads: np.ndarray,
    n_tosses: int,
    p_start: Sequence[float],
    *,
    coin_weights: Sequence[float] = (0.5, 0.5),
    tol: float = 1e-10,
    max_iter: int = 10_000,
) -> EMResult:
    """EM for the two-coin problem with a known coin-picking probability.

    Parameters
    ----------
    heads : numpy.ndarray
        Number of heads in each trial.
    n_tosses : int
        Tosses per trial.
    p_start : sequence of float
        Starting probability of heads for each coin.
    coin_weights : sequence of float, default (0.5, 0.5)
        Probability of picking each coin; the seed picks uniformly.
    tol, max_iter
        See :func:`run_em`.

    Returns
    -------
    EMResult
        ``estimates["p"]`` holds the probabilities of heads.
    """
    heads = np.asarray(heads)
    weights = np.asarray(coin_weights, dtype=float)
    return run_em(
        lambda params: two_coins_e_step(heads, n_tosses, params["p"], weights),
        lambda log_resp: two_coins_m_step(heads, n_tosses, log_resp),
        {"p": p_start},
        tol=tol,
        max_iter=max_iter,
    )


# --------------------------------------------------------------------------
# 1-D normal mixture with K components.
# --------------------------------------------------------------------------


def normal_mixture_log_joint(
    x: np.ndarray, w: np.ndarray, mu: np.ndarray, sigma: np.ndarray
) -> np.ndarray:
    """``log P(x_i, z_i = k)`` as an ``(n, K)`` table."""
    return np.log(w) + stats.norm.logpdf(x[:, None], mu, sigma)


def normal_mixture_e_step(
    x: np.ndarray, w: np.ndarray, mu: np.ndarray, sigma: np.ndarray
) -> tuple[np.ndarray, float]:
    """Log responsibilities of each component for each point.

    Parameters
    ----------
    x : numpy.ndarray
        Observations, shape ``(n,)``.
    w, mu, sigma : numpy.ndarray
        Mixture weights, means and standard deviations, shape ``(K,)``.

    Returns
    -------
    log_resp : numpy.ndarray
        Shape ``(n, K)``.
    loglik : float
    """
    return _normalise(normal_mixture_log_joint(x, w, mu, sigma))


def normal_mixture_m_step(x: np.ndarray, log_resp: np.ndarray) -> dict[str, np.ndarray]:
    """Weighted proportions, means and standard deviations.

    Returns
    -------
    dict
        ``{"w", "mu", "sigma"}``, each of shape ``(K,)``.
    """
    resp = np.exp(log_resp)
    n_k = resp.sum(0)
    mu = (resp * x[:, None]).sum(0) / n_k
    variance = (resp * (x[:, None] - mu) ** 2).sum(0) / n_k
    return {"w": n_k / len(x), "mu": mu, "sigma": np.sqrt(variance)}


def normal_mixture_em(
    x: np.ndarray,
    w_start: Sequence[float],
    mu_start: Sequence[float],
    sigma_start: Sequence[float],
    *,
    tol: float = 1e-10,
    max_iter: int = 10_000,
) -> EMResult:
    """EM for a univariate normal mixture (maximum likelihood).

    Parameters
    ----------
    x : numpy.ndarray
        Observations, shape ``(n,)``.
    w_start, mu_start, sigma_start : sequence of float
        Starting weights, means and standard deviations, length ``K``.
    tol, max_iter
        See :func:`run_em`.

    Returns
    -------
    EMResult
        ``estimates`` has keys ``"w"``, ``"mu"``, ``"sigma"``.
    """
    x = np.asarray(x, dtype=float)
    return run_em(
        lambda params: normal_mixture_e_step(x, params["w"], params["mu"], params["sigma"]),
        lambda log_resp: normal_mixture_m_step(x, log_resp),
        {"w": w_start, "mu": mu_start, "sigma": sigma_start},
        tol=tol,
        max_iter=max_iter,
    )


# --------------------------------------------------------------------------
# Multivariate normal mixture with full covariances.
# --------------------------------------------------------------------------


def _mvn_logpdf_per_component(x: np.ndarray, mu: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """``log N(x_i | mu_k, cov_k)`` as an ``(n, K)`` table via Cholesky factors."""
    chol = np.linalg.cholesky(cov)
    n_dims = x.shape[1]
    table = np.empty((x.shape[0], mu.shape[0]))
    for k in range(mu.shape[0]):
        # Solving L y = (x - mu) gives the Mahalanobis term without an inverse.
        standardised = np.linalg.solve(chol[k], (x - mu[k]).T)
        log_det = 2.0 * np.log(np.diag(chol[k])).sum()
        table[:, k] = -0.5 * ((standardised**2).sum(0) + log_det + n_dims * np.log(2.0 * np.pi))
    return table


def gaussian_mixture_log_joint(
    x: np.ndarray, w: np.ndarray, mu: np.ndarray, cov: np.ndarray
) -> np.ndarray:
    """``log P(x_i, z_i = k)`` as an ``(n, K)`` table for full covariances."""
    return np.log(w) + _mvn_logpdf_per_component(x, mu, cov)


def gaussian_mixture_e_step(
    x: np.ndarray, w: np.ndarray, mu: np.ndarray, cov: np.ndarray
) -> tuple[np.ndarray, float]:
    """Log responsibilities for a full-covariance Gaussian mixture.

    Parameters
    ----------
    x : numpy.ndarray
        Observations, shape ``(n, d)``.
    w : numpy.ndarray
        Weights, shape ``(K,)``.
    mu : numpy.ndarray
        Means, shape ``(K, d)``.
    cov : numpy.ndarray
        Covariances, shape ``(K, d, d)``.

    Returns
    -------
    log_resp : numpy.ndarray
        Shape ``(n, K)``.
    loglik : float
    """
    return _normalise(gaussian_mixture_log_joint(x, w, mu, cov))


def gaussian_mixture_m_step(x: np.ndarray, log_resp: np.ndarray) -> dict[str, np.ndarray]:
    """Weighted proportions, means and covariances (no regularisation).

    Returns
    -------
    dict
        ``{"w": (K,), "mu": (K, d), "cov": (K, d, d)}``.
    """
    resp = np.exp(log_resp)
    n_k = resp.sum(0)
    mu = resp.T @ x / n_k[:, None]
    centred = x[None, :, :] - mu[:, None, :]
    cov = np.einsum("nk,kni,knj->kij", resp, centred, centred) / n_k[:, None, None]
    return {"w": n_k / x.shape[0], "mu": mu, "cov": cov}


def gaussian_mixture_em(
    x: np.ndarray,
    w_start: np.ndarray,
    mu_start: np.ndarray,
    cov_start: np.ndarray,
    *,
    tol: float = 1e-10,
    max_iter: int = 10_000,
) -> EMResult:
    """EM for a full-covariance Gaussian mixture (maximum likelihood).

    Parameters
    ----------
    x : numpy.ndarray
        Observations, shape ``(n, d)``.
    w_start, mu_start, cov_start : numpy.ndarray
        Starting weights ``(K,)``, means ``(K, d)``, covariances ``(K, d, d)``.
    tol, max_iter
        See :func:`run_em`.

    Returns
    -------
    EMResult
        ``estimates`` has keys ``"w"``, ``"mu"``, ``"cov"``.
    """
    x = np.asarray(x, dtype=float)
    return run_em(
        lambda params: gaussian_mixture_e_step(x, params["w"], params["mu"], params["cov"]),
        lambda log_resp: gaussian_mixture_m_step(x, log_resp),
        {"w": w_start, "mu": mu_start, "cov": cov_start},
        tol=tol,
        max_iter=max_iter,
    )


# --------------------------------------------------------------------------
# Zero-inflated Poisson: z = 1 is the Poisson component, z = 0 a structural 0.
# --------------------------------------------------------------------------


def zero_inflated_poisson_log_joint(x: np.ndarray, psi: float, rate: float) -> np.ndarray:
    """``log P(x_i, z_i)`` as an ``(n, 2)`` table; column 0 is the structural zero."""
    with np.errstate(divide="ignore"):
        # log(1[x == 0]) is -inf for positive counts: they cannot be structural.
        log_structural = np.log1p(-psi) + np.log((x == 0).astype(float))
    log_poisson = np.log(psi) + stats.poisson.logpmf(x, rate)
    return np.stack([log_structural, log_poisson], axis=-1)


def zero_inflated_poisson_e_step(
    x: np.ndarray, psi: float, rate: float
) -> tuple[np.ndarray, float]:
    """Log-probability that each count is a structural zero (column 0) or Poisson.

    Parameters
    ----------
    x : numpy.ndarray
        Counts, shape ``(n,)``.
    psi : float
        Probability of the Poisson component.
    rate : float
        Poisson rate.

    Returns
    -------
    log_resp : numpy.ndarray
        Shape ``(n, 2)``; column 0 is ``-inf`` wherever ``x > 0``.
    loglik : float
    """
    return _normalise(zero_inflated_poisson_log_joint(x, psi, rate))


def zero_inflated_poisson_m_step(x: np.ndarray, log_resp: np.ndarray) -> dict[str, np.ndarray]:
    """Fraction of Poisson draws and their weighted mean.

    Returns
    -------
    dict
        ``{"psi": (), "rate": ()}``.
    """
    resp_poisson = np.exp(log_resp[:, 1])
    return {
        "psi": np.asarray(resp_poisson.mean()),
        "rate": np.asarray((resp_poisson * x).sum() / resp_poisson.sum()),
    }


def zero_inflated_poisson_em(
    x: np.ndarray,
    psi_start: float,
    rate_start: float,
    *,
    tol: float = 1e-10,
    max_iter: int = 10_000,
) -> EMResult:
    """EM for the zero-inflated Poisson model.

    Parameters
    ----------
    x : numpy.ndarray
        Counts.
    psi_start, rate_start : float
        Starting probability of the Poisson component and rate.
    tol, max_iter
        See :func:`run_em`.

    Returns
    -------
    EMResult
        ``estimates`` has keys ``"psi"`` and ``"rate"``.
    """
    x = np.asarray(x)
    return run_em(
        lambda params: zero_inflated_poisson_e_step(x, params["psi"], params["rate"]),
        lambda log_resp: zero_inflated_poisson_m_step(x, log_resp),
        {"psi": psi_start, "rate": rate_start},
        tol=tol,
        max_iter=max_iter,
    )


def zero_inflated_poisson_mle(x: np.ndarray) -> dict[str, float]:
    """Zero-inflated Poisson MLE from its score equations, without EM.

    Setting the score to zero gives ``psi * rate = mean(x)`` and
    ``mean(x) * (1 - exp(-rate)) = rate * (1 - n_0 / n)``, where ``n_0`` counts
    the zeros; the second equation has one positive root, found by bracketing.

    Parameters
    ----------
    x : numpy.ndarray
        Counts with some zeros and some positive values.

    Returns
    -------
    dict
        ``{"psi": float, "rate": float}``.
    """
    x = np.asarray(x)
    mean = x.mean()
    positive_fraction = np.mean(x > 0)

    def score(rate: float) -> float:
        return mean * -np.expm1(-rate) - rate * positive_fraction

    # score > 0 near 0 whenever the data carry extra zeros; score(mean / pf) < 0.
    rate = optimize.brentq(score, 1e-12, mean / positive_fraction, xtol=1e-15, rtol=1e-15)
    return {"psi": mean / rate, "rate": rate}


# --------------------------------------------------------------------------
# Peppered moths: latent genotype per moth, observed phenotype.
# --------------------------------------------------------------------------

# Phenotype code of each genotype: C dominates I and T, I dominates T.
_PHENOTYPE_OF_GENOTYPE = np.array([0, 0, 0, 1, 1, 2])
# Copies of (C, I, T) carried by each genotype, for the allele-counting M-step.
_ALLELE_COUNTS = np.array(
    [[2, 0, 0], [1, 1, 0], [1, 0, 1], [0, 2, 0], [0, 1, 1], [0, 0, 2]], dtype=float
)


def _hardy_weinberg_log_probs(allele_freq: np.ndarray) -> np.ndarray:
    """Log genotype probabilities in ``PEPPERED_MOTH_GENOTYPES`` order."""
    log_p = np.log(allele_freq)
    # Heterozygotes arise in two orders, hence the log(2).
    is_heterozygous = _ALLELE_COUNTS.max(1) == 1
    return _ALLELE_COUNTS @ log_p + np.log(2.0) * is_heterozygous


def peppered_moth_log_joint(phenotype: np.ndarray, allele_freq: np.ndarray) -> np.ndarray:
    """``log P(phenotype_i, genotype_i = g)`` as an ``(n, 6)`` table."""
    with np.errstate(divide="ignore"):
        # A genotype that cannot show the observed phenotype has log-prob -inf.
        log_compatible = np.log(
            (_PHENOTYPE_OF_GENOTYPE[None, :] == phenotype[:, None]).astype(float)
        )
    return _hardy_weinberg_log_probs(allele_freq) + log_compatible


def peppered_moth_e_step(
    phenotype: np.ndarray, allele_freq: np.ndarray
) -> tuple[np.ndarray, float]:
    """Posterior log-probability of each genotype for each moth.

    Parameters
    ----------
    phenotype : numpy.ndarray
        Phenotype code per moth (0 carbonaria, 1 insularia, 2 typica).
    allele_freq : numpy.ndarray
        Frequencies of alleles C, I, T.

    Returns
    -------
    log_resp : numpy.ndarray
        Shape ``(n, 6)`` in ``PEPPERED_MOTH_GENOTYPES`` order.
    loglik : float
        Sum over moths of ``log P(phenotype)`` (no multinomial coefficient).
    """
    return _normalise(peppered_moth_log_joint(phenotype, allele_freq))


def peppered_moth_m_step(log_resp: np.ndarray) -> dict[str, np.ndarray]:
    """Allele frequencies from the expected genotype counts (gene counting).

    Returns
    -------
    dict
        ``{"allele_freq": (3,)}`` in C, I, T order.
    """
    expected_alleles = np.exp(log_resp).sum(0) @ _ALLELE_COUNTS
    return {"allele_freq": expected_alleles / expected_alleles.sum()}


def peppered_moth_em(
    phenotype: np.ndarray,
    allele_freq_start: Sequence[float],
    *,
    tol: float = 1e-10,
    max_iter: int = 10_000,
) -> EMResult:
    """EM (gene counting) for the peppered-moth allele frequencies.

    Parameters
    ----------
    phenotype : numpy.ndarray
        Phenotype code per moth (0 carbonaria, 1 insularia, 2 typica).
    allele_freq_start : sequence of float
        Starting frequencies of C, I, T.
    tol, max_iter
        See :func:`run_em`.

    Returns
    -------
    EMResult
        ``estimates["allele_freq"]`` holds ``(p_C, p_I, p_T)``.
    """
    phenotype = np.asarray(phenotype)
    return run_em(
        lambda params: peppered_moth_e_step(phenotype, params["allele_freq"]),
        peppered_moth_m_step,
        {"allele_freq": allele_freq_start},
        tol=tol,
        max_iter=max_iter,
    )

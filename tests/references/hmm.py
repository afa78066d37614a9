"""Independent NumPy reference for hidden Markov models: Baum–Welch in log space.

Written from the textbook recursions (forward, backward, Viterbi, and the
Baum–Welch re-estimation of the transition rows, the initial distribution and the
emission parameters), with every probability kept as a log and combined with
:func:`scipy.special.logsumexp` (in the time-step loops, with :func:`step_logsumexp`,
the same formula without scipy's per-call overhead). Nothing here imports
``pm_em``, PyMC or hmmlearn, so a disagreement with either points at one side, not
at shared code.

Conventions
-----------
A chain has ``K`` states and ``T`` time steps. ``log_init`` is ``log pi`` (shape
``(K,)``), ``log_trans[i, j]`` is ``log P(s_t = j | s_{t-1} = i)`` (rows sum to one on
the probability scale: the "from" state is the first axis, as in
``pymc_extras.DiscreteMarkovChain``), and ``log_emission[t, k]`` is
``log p(y_t | s_t = k)``. Several independent sequences share ``pi``, ``P`` and the
emission parameters; they are given as a 2-D array ``(n_sequences, T)`` or a list of
1-D arrays of any lengths.

The EM loop (:func:`baum_welch`) follows ``tests.references.em.run_em``: an E-step at the
start, then M-step, E-step, and a stop once the observed-data log-*posterior* changed
by less than ``tol`` (absolute) in one iteration. Priors enter as in PyMC without
Jacobian terms: ``Dirichlet(a)`` pseudo-counts ``a - 1`` on each transition row and
on ``pi``, an optional ``Normal(m0, s0)`` prior on the Gaussian means, flat priors on
the rest (``Flat`` / ``HalfFlat``, log-density 0).

Findings about hmmlearn 0.3.3, checked in ``tests/test_hmm.py``
---------------------------------------------------------------
* ``GaussianHMM(covariance_type="diag")`` gives the plain MLE only with
  ``covars_prior=0`` (the default ``1e-2`` is added to every variance's numerator)
  and ``covars_weight=1`` (its denominator adds ``max(covars_weight - 1, 0)``, so 0 and
  1 both add nothing); ``means_weight=0`` (the default) leaves the means
  unregularised; ``startprob_prior=1`` and ``transmat_prior=1`` (the defaults) are
  flat Dirichlets, and an ``a`` there is exactly PyMC's ``Dirichlet(a)`` MAP update.
  ``min_covar`` is used only when hmmlearn initialises the covariances itself, so it
  has no effect with ``init_params=""``.
* ``covars_`` are variances (``sigma**2``). The setter takes shape ``(K, n_features)``
  for ``"diag"``; the getter returns full matrices ``(K, n_features, n_features)``.
* ``PoissonHMM`` gives the MLE with its defaults ``lambdas_prior=0``,
  ``lambdas_weight=0``.
* Same start: ``init_params=""`` (nothing overwritten by k-means or random draws),
  ``params="stmc"`` (``"stl"`` for Poisson), and ``startprob_``, ``transmat_``,
  ``means_``, ``covars_`` / ``lambdas_`` set by hand before ``fit``.
* Stopping: ``n_iter`` is the maximum number of iterations (default only 10) and
  ``tol`` an absolute bound on the change of the *total* log-likelihood (all
  sequences), so pm_em's per-observation ``tol`` is hmmlearn's ``tol / N`` for ``N``
  observations. hmmlearn's iteration is E-step (log-likelihood of the current
  parameters), M-step, test: the parameters it returns are one M-step past the
  log-likelihoods it tested, and its ``monitor_.history`` holds the log-likelihood
  *before* each M-step. Its ``monitor_.converged`` is also true when ``n_iter`` is
  reached.
* Its ``fit(X, lengths)`` takes the sequences stacked as a column, ``X`` of shape
  ``(N, 1)``, with ``lengths`` the length of each sequence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special

from tests.references.brute_force import enumerate_paths, log_posterior_marginals

__all__ = [
    "BaumWelchResult",
    "Posterior",
    "as_sequences",
    "baum_welch",
    "brute_force",
    "dirichlet_logpdf",
    "forward_backward",
    "gaussian_log_emission",
    "log_backward",
    "log_forward",
    "log_prior",
    "m_step",
    "poisson_log_emission",
    "posteriors",
    "safe_log",
    "viterbi",
    "viterbi_paths",
]

LOG_2PI = np.log(2.0 * np.pi)


def safe_log(p) -> np.ndarray:
    """``log p`` with ``log 0 = -inf`` and no warning (a forbidden transition)."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(p, dtype=float))


def step_logsumexp(a: np.ndarray, axis: int | None = None) -> np.ndarray:
    """``log(sum(exp(a), axis))``, shifted by the maximum, for the few numbers of one
    time step: what :func:`scipy.special.logsumexp` computes, in about a tenth of the
    time (its per-call overhead, ~80 us here, was most of the tests' time in the
    reference's forward and backward loops). All ``-inf`` gives ``-inf``."""
    top = np.max(a, axis=axis, keepdims=True)
    top[~np.isfinite(top)] = 0.0
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(a - top), axis=axis)) + np.squeeze(top, axis=axis)


# --------------------------------------------------------------------------
# One chain: forward, backward, posteriors, Viterbi, brute force.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Posterior:
    """E-step of one sequence.

    Attributes
    ----------
    log_gamma : numpy.ndarray of shape (T, K)
        ``log p(s_t = k | y)``, the log state marginals.
    transition_counts : numpy.ndarray of shape (K, K)
        ``sum_t p(s_{t-1} = i, s_t = j | y)``, the expected number of ``i -> j`` moves.
    loglik : float
        ``log p(y)``, the states summed out.
    log_predictive : numpy.ndarray of shape (T,)
        ``log p(y_t | y_1..y_{t-1})``: the chain-rule pieces of ``loglik``.
    """

    log_gamma: np.ndarray
    transition_counts: np.ndarray
    loglik: float
    log_predictive: np.ndarray


def log_forward(
    log_init: np.ndarray, log_trans: np.ndarray, log_emission: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Forward pass, normalised at every step (Rabiner's scaling, in log space).

    Normalising keeps every message near zero, so the rounding error of a message
    stays at machine precision instead of growing with ``|log p(y_1..y_t)|``.

    Parameters
    ----------
    log_init : numpy.ndarray of shape (K,)
    log_trans : numpy.ndarray of shape (K, K)
        Row ``i`` holds the log probabilities of moving from ``i``.
    log_emission : numpy.ndarray of shape (T, K)

    Returns
    -------
    log_filtered : numpy.ndarray of shape (T, K)
        ``log p(s_t = k | y_1..y_t)``.
    log_predictive : numpy.ndarray of shape (T,)
        ``log p(y_t | y_1..y_{t-1})``, the normaliser of step ``t``; their sum is
        ``log p(y_1..y_T)``.
    """
    n_steps, _ = log_emission.shape
    log_filtered = np.empty_like(log_emission, dtype=float)
    log_predictive = np.empty(n_steps)
    unnormalised = log_init + log_emission[0]
    for t in range(n_steps):
        if t > 0:
            # sum_i p(s_{t-1} = i | y_1..y_{t-1}) P[i, j] p(y_t | j): reduce over "from".
            unnormalised = (
                step_logsumexp(log_filtered[t - 1][:, None] + log_trans, axis=0) + log_emission[t]
            )
        log_predictive[t] = step_logsumexp(unnormalised)
        log_filtered[t] = unnormalised - log_predictive[t]
    return log_filtered, log_predictive


def log_backward(
    log_trans: np.ndarray, log_emission: np.ndarray, log_predictive: np.ndarray
) -> np.ndarray:
    """Backward pass, scaled by the forward pass's normalisers.

    Parameters
    ----------
    log_trans : numpy.ndarray of shape (K, K)
    log_emission : numpy.ndarray of shape (T, K)
    log_predictive : numpy.ndarray of shape (T,)
        From :func:`log_forward`.

    Returns
    -------
    log_beta : numpy.ndarray of shape (T, K)
        ``log p(y_{t+1}..y_T | s_t = k) - log p(y_{t+1}..y_T | y_1..y_t)``; the last
        row is zero (an empty future).
    """
    n_steps, _ = log_emission.shape
    log_beta = np.zeros_like(log_emission, dtype=float)
    for t in range(n_steps - 2, -1, -1):
        future = log_emission[t + 1] + log_beta[t + 1]
        log_beta[t] = step_logsumexp(log_trans + future[None, :], axis=1) - log_predictive[t + 1]
    return log_beta


def forward_backward(
    log_init: np.ndarray, log_trans: np.ndarray, log_emission: np.ndarray
) -> Posterior:
    """State marginals and expected transition counts of one sequence.

    Parameters
    ----------
    log_init : numpy.ndarray of shape (K,)
    log_trans : numpy.ndarray of shape (K, K)
    log_emission : numpy.ndarray of shape (T, K)

    Returns
    -------
    Posterior
    """
    log_filtered, log_predictive = log_forward(log_init, log_trans, log_emission)
    log_beta = log_backward(log_trans, log_emission, log_predictive)
    log_gamma = log_filtered + log_beta
    loglik = float(log_predictive.sum())
    if len(log_emission) == 1:  # a single step has no transitions
        return Posterior(log_gamma, np.zeros_like(log_trans), loglik, log_predictive)
    # log p(s_{t-1} = i, s_t = j | y) for t = 1..T-1, summed over t on the
    # probability scale.
    log_xi = (
        log_filtered[:-1, :, None]
        + log_trans[None, :, :]
        + (log_emission[1:] + log_beta[1:] - log_predictive[1:, None])[:, None, :]
    )
    transition_counts = np.exp(special.logsumexp(log_xi, axis=0))
    return Posterior(log_gamma, transition_counts, loglik, log_predictive)


def viterbi(
    log_init: np.ndarray, log_trans: np.ndarray, log_emission: np.ndarray
) -> tuple[np.ndarray, float]:
    """Most probable state path, by max-product dynamic programming.

    Parameters
    ----------
    log_init : numpy.ndarray of shape (K,)
    log_trans : numpy.ndarray of shape (K, K)
    log_emission : numpy.ndarray of shape (T, K)

    Returns
    -------
    path : numpy.ndarray of int, shape (T,)
        Ties go to the lowest state index.
    log_joint : float
        ``log p(y, s = path)``.
    """
    n_steps, n_states = log_emission.shape
    best = log_init + log_emission[0]
    came_from = np.zeros((n_steps, n_states), dtype=int)
    for t in range(1, n_steps):
        candidates = best[:, None] + log_trans  # [from, to]
        came_from[t] = np.argmax(candidates, axis=0)
        best = candidates[came_from[t], np.arange(n_states)] + log_emission[t]
    path = np.empty(n_steps, dtype=int)
    path[-1] = int(np.argmax(best))
    for t in range(n_steps - 1, 0, -1):
        path[t - 1] = came_from[t, path[t]]
    return path, float(best[path[-1]])


def brute_force(
    log_init: np.ndarray,
    log_trans: np.ndarray,
    log_emission: np.ndarray,
    *,
    max_paths: int = 2**16,
) -> tuple[Posterior, np.ndarray]:
    """The E-step and the Viterbi path by enumerating every one of the ``K**T`` paths.

    For checking :func:`forward_backward` and :func:`viterbi` (and an engine) on
    tiny chains.

    Parameters
    ----------
    log_init : numpy.ndarray of shape (K,)
    log_trans : numpy.ndarray of shape (K, K)
    log_emission : numpy.ndarray of shape (T, K)
    max_paths : int, default 2**16
        Refuse larger problems: the cost is exponential in ``T``.

    Returns
    -------
    posterior : Posterior
    map_path : numpy.ndarray of int, shape (T,)

    Raises
    ------
    ValueError
        If ``K**T`` exceeds ``max_paths``.
    """
    n_steps, n_states = log_emission.shape
    paths, log_joint = enumerate_paths(
        log_init, log_trans, log_emission, max_configurations=max_paths
    )
    loglik, log_gamma = log_posterior_marginals(paths, log_joint, [n_states] * n_steps)
    # log p(y_1..y_t): each path's prior times only the first t emissions (the later
    # moves sum to one over the paths sharing a prefix).
    log_emitted = np.cumsum(log_emission[np.arange(n_steps), paths], axis=1)
    log_path_prior = log_joint - log_emitted[:, -1]
    log_prefix = special.logsumexp(log_path_prior[:, None] + log_emitted, axis=0)
    log_predictive = np.diff(log_prefix, prepend=0.0)
    weights = np.exp(log_joint - loglik)
    transition_counts = np.zeros((n_states, n_states))
    for t in range(1, n_steps):
        np.add.at(transition_counts, (paths[:, t - 1], paths[:, t]), weights)
    posterior = Posterior(np.stack(log_gamma), transition_counts, loglik, log_predictive)
    return posterior, paths[int(np.argmax(log_joint))]


# --------------------------------------------------------------------------
# Emissions.
# --------------------------------------------------------------------------


def gaussian_log_emission(y: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """``log Normal(y_t | mu_k, sigma_k)``, shape ``(T, K)``."""
    standardized = (np.asarray(y, dtype=float)[:, None] - mu) / sigma
    return -0.5 * (LOG_2PI + standardized**2) - np.log(sigma)


def poisson_log_emission(y: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """``log Poisson(y_t | lam_k)``, shape ``(T, K)``."""
    counts = np.asarray(y, dtype=float)[:, None]
    return counts * np.log(lam) - lam - special.gammaln(counts + 1.0)


#: Emission families: log-density table and the names of their parameters.
EMISSIONS = {
    "gaussian": (lambda y, params: gaussian_log_emission(y, params["mu"], params["sigma"])),
    "poisson": (lambda y, params: poisson_log_emission(y, params["lam"])),
}


def as_sequences(y) -> list[np.ndarray]:
    """One sequence (1-D), a batch ``(n_sequences, T)``, or a list: a list of 1-D arrays."""
    if isinstance(y, np.ndarray) and y.ndim == 1:
        return [y]
    if isinstance(y, np.ndarray) and y.ndim == 2:
        return list(y)
    return [np.asarray(seq) for seq in y]


def posteriors(y, params: Mapping[str, np.ndarray], emission: str) -> list[Posterior]:
    """The E-step of every sequence at ``params`` (keys ``pi``, ``P`` and the emission's).

    Parameters
    ----------
    y : array_like or list of array_like
        One sequence, a batch ``(n_sequences, T)``, or a list of sequences.
    params : mapping
        ``pi`` (K,), ``P`` (K, K) and ``mu``, ``sigma`` (Gaussian) or ``lam`` (Poisson).
    emission : {"gaussian", "poisson"}

    Returns
    -------
    list of Posterior
        One per sequence.
    """
    log_init, log_trans = safe_log(params["pi"]), safe_log(params["P"])
    return [
        forward_backward(log_init, log_trans, EMISSIONS[emission](seq, params))
        for seq in as_sequences(y)
    ]


def viterbi_paths(y, params: Mapping[str, np.ndarray], emission: str) -> list[np.ndarray]:
    """:func:`viterbi` of every sequence at ``params``."""
    log_init, log_trans = safe_log(params["pi"]), safe_log(params["P"])
    return [
        viterbi(log_init, log_trans, EMISSIONS[emission](seq, params))[0] for seq in as_sequences(y)
    ]


# --------------------------------------------------------------------------
# Priors and the M-step.
# --------------------------------------------------------------------------


def dirichlet_logpdf(p: np.ndarray, a) -> np.ndarray:
    """``log Dirichlet(p | a)`` over the last axis, with ``0 * log 0 = 0`` where ``a = 1``.

    Parameters
    ----------
    p : numpy.ndarray of shape (..., K)
        Points on the simplex.
    a : float or array_like broadcasting to ``p``
        Concentrations.

    Returns
    -------
    numpy.ndarray of shape (...)
    """
    a = np.broadcast_to(np.asarray(a, dtype=float), np.shape(p))
    with np.errstate(invalid="ignore"):  # 0 * log 0, replaced by 0 below
        kernel = np.where(a == 1.0, 0.0, (a - 1.0) * safe_log(p))
    return special.gammaln(a.sum(-1)) - special.gammaln(a).sum(-1) + kernel.sum(-1)


def log_prior(
    params: Mapping[str, np.ndarray],
    *,
    transition_prior=1.0,
    initial_prior=1.0,
    mean_prior: tuple[float, float] | None = None,
) -> float:
    """Log prior density (no Jacobian) of the HMM's parameters.

    ``Dirichlet(transition_prior)`` on each row of ``P``, ``Dirichlet(initial_prior)``
    on ``pi``, ``Normal(m0, s0)`` on each mean when ``mean_prior = (m0, s0)``; the
    other parameters are ``Flat`` / ``HalfFlat`` (log-density 0). With flat Dirichlets
    this is ``(K + 1) log Gamma(K)``.
    """
    total = dirichlet_logpdf(params["P"], transition_prior).sum()
    total += dirichlet_logpdf(params["pi"], initial_prior)
    if mean_prior is not None:
        m0, s0 = mean_prior
        total += np.sum(-0.5 * (LOG_2PI + ((params["mu"] - m0) / s0) ** 2) - np.log(s0))
    return float(total)


def _dirichlet_mode(counts: np.ndarray, a) -> np.ndarray:
    """Maximizer of ``sum_k (counts_k + a_k - 1) log p_k`` on the simplex (last axis).

    Negative weights (``a < 1``) are clipped at zero, which is where the maximum lies
    then. The pseudo-counts ``a - 1`` are formed first: ``counts + a - 1`` evaluated left
    to right would round a count below ``1e-16`` to zero when ``a = 1``, and a single
    sequence's initial distribution heads for a vertex through such counts.
    """
    pseudo_counts = np.asarray(a, dtype=float) - 1.0
    weights = np.maximum(counts + pseudo_counts, 0.0)
    return weights / weights.sum(axis=-1, keepdims=True)


def m_step(
    y,
    params: Mapping[str, np.ndarray],
    post: Sequence[Posterior],
    emission: str,
    *,
    transition_prior=1.0,
    initial_prior=1.0,
    mean_prior: tuple[float, float] | None = None,
) -> dict[str, np.ndarray]:
    """Baum–Welch re-estimation (MAP under the priors of :func:`log_prior`).

    Parameters
    ----------
    y : array_like or list of array_like
        The sequences, as in :func:`posteriors`.
    params : mapping
        The current parameters: the Gaussian mean's conditional update under a
        ``Normal`` prior needs the current ``sigma``.
    post : sequence of Posterior
        The E-step of each sequence.
    emission : {"gaussian", "poisson"}
    transition_prior, initial_prior : float or array_like
        Dirichlet concentrations of the rows of ``P`` and of ``pi``.
    mean_prior : (float, float), optional
        ``(m0, s0)`` of a ``Normal`` prior on each Gaussian mean.

    Returns
    -------
    dict of str to numpy.ndarray

    Notes
    -----
    Without a mean prior the Gaussian update is the joint maximizer over ``(mu,
    sigma)``. With one, the two do not separate, so the update is one ECM cycle:
    ``mu`` given the current ``sigma``, then ``sigma`` given the new ``mu``. Every
    fixed point of either is the same stationary point of the log-posterior.
    """
    sequences = as_sequences(y)
    gamma = [np.exp(p.log_gamma) for p in post]
    transition_counts = sum(p.transition_counts for p in post)
    initial_counts = sum(g[0] for g in gamma)
    updated = {
        "P": _dirichlet_mode(transition_counts, transition_prior),
        "pi": _dirichlet_mode(initial_counts, initial_prior),
    }
    occupancy = sum(g.sum(axis=0) for g in gamma)  # expected time spent in each state
    weighted_sum = sum(seq @ g for seq, g in zip(sequences, gamma))
    if emission == "poisson":
        updated["lam"] = weighted_sum / occupancy
        return updated
    if mean_prior is None:
        mu = weighted_sum / occupancy
    else:
        m0, s0 = mean_prior
        precision = occupancy / params["sigma"] ** 2 + 1.0 / s0**2
        mu = (weighted_sum / params["sigma"] ** 2 + m0 / s0**2) / precision
    squares = sum(((seq[:, None] - mu) ** 2 * g).sum(axis=0) for seq, g in zip(sequences, gamma))
    updated["mu"] = mu
    updated["sigma"] = np.sqrt(squares / occupancy)
    return updated


# --------------------------------------------------------------------------
# The EM loop.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class BaumWelchResult:
    """Outcome of :func:`baum_welch`.

    Attributes
    ----------
    estimates : dict of str to numpy.ndarray
        Parameters at the last iterate.
    posterior : list of Posterior
        The E-step of each sequence at ``estimates``.
    loglik_trace : numpy.ndarray
        Observed-data log-likelihood at the start (entry 0) and after each M-step.
    logpost_trace : numpy.ndarray
        The same plus the log prior: the quantity EM never decreases.
    n_iter : int
        M-steps taken.
    converged : bool
        Whether the last change of the log-posterior fell below ``tol``.
    """

    estimates: dict[str, np.ndarray]
    posterior: list[Posterior]
    loglik_trace: np.ndarray
    logpost_trace: np.ndarray
    n_iter: int
    converged: bool

    @property
    def loglik(self) -> float:
        """Observed-data log-likelihood at ``estimates``."""
        return float(self.loglik_trace[-1])

    @property
    def logpost(self) -> float:
        """Observed-data log-posterior at ``estimates``."""
        return float(self.logpost_trace[-1])

    @property
    def log_gamma(self) -> np.ndarray:
        """Log state marginals stacked over sequences, ``(n_sequences, T, K)``.

        Only for sequences of equal length; a single sequence gives ``(1, T, K)``.
        """
        return np.stack([p.log_gamma for p in self.posterior])


def baum_welch(
    y,
    start: Mapping[str, np.ndarray],
    *,
    emission: str,
    tol: float,
    max_iter: int = 10_000,
    transition_prior=1.0,
    initial_prior=1.0,
    mean_prior: tuple[float, float] | None = None,
) -> BaumWelchResult:
    """Baum–Welch from ``start`` until the log-posterior stops increasing.

    Parameters
    ----------
    y : array_like or list of array_like
        One sequence, a batch ``(n_sequences, T)``, or a list of sequences.
    start : mapping
        ``pi``, ``P`` and the emission parameters (``mu``, ``sigma`` or ``lam``).
    emission : {"gaussian", "poisson"}
    tol : float
        Stop once the log-posterior changes by less than ``tol`` (absolute, summed
        over all observations) in one iteration.
    max_iter : int, default 10000
    transition_prior, initial_prior, mean_prior
        As in :func:`m_step`.

    Returns
    -------
    BaumWelchResult
    """
    if emission not in EMISSIONS:
        raise ValueError(f"emission must be one of {sorted(EMISSIONS)}, got {emission!r}")
    priors = {
        "transition_prior": transition_prior,
        "initial_prior": initial_prior,
        "mean_prior": mean_prior,
    }
    params = {name: np.asarray(value, dtype=float) for name, value in start.items()}
    post = posteriors(y, params, emission)
    loglik = [sum(p.loglik for p in post)]
    logpost = [loglik[-1] + log_prior(params, **priors)]
    converged = False
    n_iter = 0
    while n_iter < max_iter:
        params = m_step(y, params, post, emission, **priors)
        post = posteriors(y, params, emission)
        loglik.append(sum(p.loglik for p in post))
        logpost.append(loglik[-1] + log_prior(params, **priors))
        n_iter += 1
        if abs(logpost[-1] - logpost[-2]) < tol:
            converged = True
            break
    return BaumWelchResult(params, post, np.asarray(loglik), np.asarray(logpost), n_iter, converged)

"""Model-selection criteria of an EM fit: AIC, BIC and ICL, as scikit-learn defines them.

All three are on the deviance scale, so **lower is better**:

* ``aic = -2 ll + 2 k``;
* ``bic = -2 ll + k log n``;
* ``icl = bic + 2 H``, with ``H = -sum r log r`` the entropy of the responsibilities
  (Biernacki, Celeux & Govaert, 2000): BIC penalized by how unclearly the data are
  classified.

``ll`` is the observed-data log-likelihood at the fit (latents summed out; the
maximum-likelihood value when the priors are flat, the likelihood at the MAP
otherwise). ``k`` is the number of free parameters on the unconstrained space, the
sum of the value variables' sizes: a ``K``-simplex counts ``K - 1``, a Cholesky
factor assembled from ``d (d + 1) / 2`` free elements counts those. ``n`` is the
number of observations in the sense of scikit-learn's ``GaussianMixture.bic(X)``
(``n_samples``): one per entry of the pointwise ``log_likelihood`` group, i.e. one per
row, so a ``d``-dimensional ``MvNormal`` observation counts once, not ``d`` times.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

__all__ = [
    "CRITERIA",
    "aic",
    "bic",
    "classification_entropy",
    "icl",
    "model_selection_attrs",
]

#: The criteria :func:`pm_em.compare_models` can rank by.
CRITERIA = ("aic", "bic", "icl")

#: Rows of a responsibility table taken at a time (a few MB of temporaries).
_BLOCK_ROWS = 1 << 16


def aic(log_likelihood: float, n_params: int) -> float:
    """Akaike's information criterion, ``-2 ll + 2 k`` (lower is better)."""
    return float(-2.0 * log_likelihood + 2.0 * n_params)


def bic(log_likelihood: float, n_params: int, n_observations: int) -> float:
    """Schwarz's Bayesian information criterion, ``-2 ll + k log n`` (lower is better)."""
    return float(-2.0 * log_likelihood + n_params * np.log(n_observations))


def icl(bic_value: float, entropy: float) -> float:
    """Integrated completed likelihood, ``bic + 2 H`` (lower is better)."""
    return float(bic_value + 2.0 * entropy)


def classification_entropy(log_resp: Iterable[np.ndarray]) -> float:
    """Entropy of the responsibilities, ``-sum r log r`` over every element and value.

    Parameters
    ----------
    log_resp : iterable of np.ndarray
        Log responsibilities of each latent, the support on the last axis. For a
        Markov chain these are the per-step state marginals, so the sum of their
        entropies is an upper bound on the entropy of the path's posterior.

    Returns
    -------
    float
        ``>= 0``; 0 when every element is classified with certainty.
    """
    total = 0.0
    for table in log_resp:
        table = np.asarray(table, dtype=float)
        rows = table.reshape(1, -1) if table.ndim < 2 else table
        # Block by block over the leading axis: the temporaries are a block, not
        # copies of the whole (n x K) table.
        for start in range(0, rows.shape[0], _BLOCK_ROWS):
            block = rows[start : start + _BLOCK_ROWS]
            # r log r -> 0 as r -> 0: a value with zero responsibility (log r = -inf)
            # adds nothing, and is left out rather than evaluated as 0 * -inf.
            counted = ~np.isneginf(block)
            total -= float(np.sum(np.exp(block[counted]) * block[counted]))
    return total


def model_selection_attrs(
    pointwise: Mapping[str, np.ndarray],
    value_sizes: Iterable[int],
    log_resp: Mapping[str, np.ndarray],
) -> dict[str, float | int]:
    """The criteria stored in an EM result's ``posterior.attrs``.

    Parameters
    ----------
    pointwise : dict
        Observed variable name -> pointwise observed-data log-likelihood (one entry
        per observation row).
    value_sizes : iterable of int
        Size of each continuous free variable's value variable (unconstrained space).
    log_resp : dict
        Latent name -> log responsibilities (support on the last axis); empty for a
        model without latents, which then gets no ``icl``.

    Returns
    -------
    dict
        ``log_likelihood``, ``n_params``, ``n_observations``, ``aic``, ``bic`` and,
        when there are latents, ``entropy`` and ``icl``.

    Examples
    --------
    >>> attrs = model_selection_attrs({"x": np.full(10, -1.0)}, [1, 2, 2], {})
    >>> attrs["n_params"], attrs["aic"]
    (5, 30.0)
    """
    log_likelihood = float(sum(np.sum(np.asarray(v, dtype=float)) for v in pointwise.values()))
    n_params = int(sum(value_sizes))
    n_observations = int(sum(np.size(v) for v in pointwise.values()))
    attrs: dict[str, float | int] = {
        "log_likelihood": log_likelihood,
        "n_params": n_params,
        "n_observations": n_observations,
        "aic": aic(log_likelihood, n_params),
        "bic": bic(log_likelihood, n_params, max(n_observations, 1)),
    }
    if log_resp:
        entropy = classification_entropy(log_resp.values())
        attrs["entropy"] = entropy
        attrs["icl"] = icl(attrs["bic"], entropy)
    return attrs

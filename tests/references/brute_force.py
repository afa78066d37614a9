"""Exact posteriors of tiny models by enumerating every latent configuration.

The one brute force of the test suite. Every configuration of the latent elements is
listed (``itertools.product`` order), its log joint density with the data is computed,
and :func:`scipy.special.logsumexp` over the configurations gives the exact
observed-data log-posterior; the log posterior marginal of each element sums the
configurations that give it each value. The cost is exponential, so each entry point
refuses problems above ``max_configurations``.

Three ways to give the log joint:

* :func:`enumerate_model`: a PyMC model, evaluated by PyMC itself (``compile_logp``
  without Jacobian on the model with its value transforms removed), so a test can hand
  it any small model and a point in the model's own (constrained) space;
* :func:`enumerate_latent_posterior`: any callable of a configuration (NumPy only);
* :func:`enumerate_paths`: the state paths of a hidden Markov chain, vectorized.

Nothing here imports ``pm_em``, and PyMC only through the model it is handed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
from scipy import special

__all__ = [
    "ModelEnumeration",
    "configuration_grid",
    "enumerate_latent_posterior",
    "enumerate_model",
    "enumerate_paths",
    "log_posterior_marginals",
]

MAX_CONFIGURATIONS = 2**16


def configuration_grid(
    n_values: Sequence[int], *, max_configurations: int = MAX_CONFIGURATIONS
) -> np.ndarray:
    """Every configuration of elements with ``n_values[i]`` values, as value indices.

    Returns
    -------
    numpy.ndarray of int, shape (n_configurations, len(n_values))
        In ``itertools.product`` order (the last element varies fastest).

    Raises
    ------
    ValueError
        If there are more than ``max_configurations`` configurations.
    """
    n_configurations = int(np.prod(n_values, dtype=np.int64))
    if n_configurations > max_configurations:
        raise ValueError(
            f"expected at most {max_configurations} latent configurations, got {n_configurations}"
        )
    grid = list(itertools.product(*(range(n) for n in n_values)))
    return np.array(grid, dtype=np.int64).reshape(n_configurations, len(n_values))


def log_posterior_marginals(
    grid: np.ndarray, log_joint: np.ndarray, n_values: Sequence[int]
) -> tuple[float, list[np.ndarray]]:
    """The log normalizer of a table of log joints and each element's log marginals.

    Parameters
    ----------
    grid : numpy.ndarray of int, shape (n_configurations, n_elements)
        Value index of each element in each configuration (:func:`configuration_grid`).
    log_joint : numpy.ndarray, shape (n_configurations,)
    n_values : sequence of int
        Number of values of each element.

    Returns
    -------
    log_marginal : float
        ``logsumexp(log_joint)``.
    log_marginals : list of numpy.ndarray
        For each element, the log posterior probability of each of its values (NaN when
        every configuration is impossible).
    """
    log_marginal = float(special.logsumexp(log_joint))
    with np.errstate(invalid="ignore"):  # -inf - -inf: nothing is possible
        log_posterior = log_joint - log_marginal
    log_marginals = [
        np.array([special.logsumexp(log_posterior[grid[:, e] == v]) for v in range(n)])
        for e, n in enumerate(n_values)
    ]
    return log_marginal, log_marginals


def enumerate_latent_posterior(
    log_joint: Callable[[tuple], float],
    supports: Sequence[Sequence],
    *,
    max_configurations: int = MAX_CONFIGURATIONS,
) -> tuple[float, list[np.ndarray]]:
    """Exact posterior marginals by summing over every joint latent configuration.

    Parameters
    ----------
    log_joint : callable
        ``log_joint(config) -> float``: log-density of the observed data and of
        the latent configuration ``config`` (a tuple with one value per latent
        element), parameters held fixed.
    supports : sequence of sequences
        Support of each scalar latent element, in the order of ``config``.
    max_configurations : int, default 2**16
        Refuse problems larger than this: the cost is exponential.

    Returns
    -------
    log_marginal_likelihood : float
        ``log sum_config exp(log_joint(config))``.
    log_marginals : list of numpy.ndarray
        For each latent element, the log posterior probability of each value
        of its support.

    Raises
    ------
    ValueError
        If the number of configurations exceeds ``max_configurations``.
    """
    supports = [np.asarray(support) for support in supports]
    n_values = [len(support) for support in supports]
    grid = configuration_grid(n_values, max_configurations=max_configurations)
    table = np.array(
        [log_joint(tuple(s[i] for s, i in zip(supports, row, strict=True))) for row in grid]
    )
    return log_posterior_marginals(grid, table, n_values)


class ModelEnumeration(NamedTuple):
    """Everything :func:`enumerate_model` enumerated."""

    #: The observed-data log-posterior: every latent summed out, priors included.
    log_marginal: float
    #: Per latent, the log posterior marginals, shape ``(*latent_shape, n_support)``.
    log_marginals: dict[str, np.ndarray]
    #: Per latent, its value in each configuration, shape ``(n_configurations, *shape)``.
    configurations: dict[str, np.ndarray]
    #: The log joint of each configuration, shape ``(n_configurations,)``.
    log_joint: np.ndarray


def enumerate_model(
    model,
    point: Mapping[str, np.ndarray],
    supports: Mapping[str, Sequence],
    *,
    max_configurations: int = MAX_CONFIGURATIONS,
) -> ModelEnumeration:
    """Exact posterior of the latents of a small PyMC model at ``point``.

    Parameters
    ----------
    model : pymc.Model
    point : mapping
        The value of every other free variable, by name, in its own (constrained)
        space; extra entries are ignored.
    supports : mapping
        The support of each latent, by name; every element of a latent takes the
        same support (values outside an element's own support get log-density
        ``-inf`` from PyMC and drop out).
    max_configurations : int, default 2**16

    Returns
    -------
    ModelEnumeration

    Raises
    ------
    ValueError
        If a free variable is neither in ``point`` nor in ``supports``, or if there are
        more than ``max_configurations`` configurations.
    """
    from pymc.model.transform.conditioning import remove_value_transforms

    plain = remove_value_transforms(model)
    names = [rv.name for rv in plain.free_RVs]
    missing = [name for name in names if name not in point and name not in supports]
    if missing:
        raise ValueError(f"expected a value or a support for {missing}, got neither")
    latents = [name for name in names if name in supports]
    shapes = {}
    for name in latents:
        shape = plain[name].type.shape
        if None in shape:
            shape = tuple(plain.eval_rv_shapes()[name])
        shapes[name] = tuple(int(n) for n in shape)
    dtypes = {name: plain.rvs_to_values[plain[name]].type.dtype for name in latents}
    sizes = {name: int(np.prod(shapes[name], dtype=np.int64)) for name in latents}
    values = {name: np.asarray(supports[name]) for name in latents}
    n_values = [len(values[name]) for name in latents for _ in range(sizes[name])]
    grid = configuration_grid(n_values, max_configurations=max_configurations)

    # The reference runs each configuration once: Python's linker, no C compilation.
    logp = plain.compile_logp(jacobian=False, mode="FAST_COMPILE")
    fixed = {name: np.asarray(point[name]) for name in names if name not in supports}
    configurations = {}
    start = 0
    for name in latents:
        columns = grid[:, start : start + sizes[name]]
        configurations[name] = values[name][columns].astype(dtypes[name])
        configurations[name] = configurations[name].reshape(len(grid), *shapes[name])
        start += sizes[name]
    log_joint = np.array(
        [
            logp({**fixed, **{name: configurations[name][c] for name in latents}})
            for c in range(len(grid))
        ]
    )
    log_marginal, flat = log_posterior_marginals(grid, log_joint, n_values)
    log_marginals, start = {}, 0
    for name in latents:
        per_element = np.stack(flat[start : start + sizes[name]])
        log_marginals[name] = per_element.reshape(*shapes[name], len(values[name]))
        start += sizes[name]
    return ModelEnumeration(log_marginal, log_marginals, configurations, log_joint)


def enumerate_paths(
    log_init: np.ndarray,
    log_trans: np.ndarray,
    log_emission: np.ndarray,
    *,
    max_configurations: int = MAX_CONFIGURATIONS,
) -> tuple[np.ndarray, np.ndarray]:
    """Every state path of a hidden Markov chain and its log joint with the data.

    Parameters
    ----------
    log_init : numpy.ndarray of shape (K,)
    log_trans : numpy.ndarray of shape (K, K)
        ``log P(s_t = j | s_{t-1} = i)`` at ``[i, j]``.
    log_emission : numpy.ndarray of shape (T, K)
        Pass the first ``t`` rows for the paths of the first ``t`` steps.
    max_configurations : int, default 2**16

    Returns
    -------
    paths : numpy.ndarray of int, shape (K**T, T)
        In ``itertools.product`` order.
    log_joint : numpy.ndarray of shape (K**T,)
    """
    n_steps, n_states = log_emission.shape
    paths = configuration_grid([n_states] * n_steps, max_configurations=max_configurations)
    log_joint = log_init[paths[:, 0]] + log_emission[np.arange(n_steps), paths].sum(axis=1)
    return paths, log_joint + log_trans[paths[:, :-1], paths[:, 1:]].sum(axis=1)

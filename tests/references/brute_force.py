"""Exact posteriors of tiny models by enumerating every latent configuration.

The one brute force of the test suite. Every configuration of the latent elements is
listed (``itertools.product`` order), its log joint density with the data is computed,
and :func:`scipy.special.logsumexp` over the configurations gives the exact
observed-data log-posterior; the log posterior marginal of each element sums the
configurations that give it each value. The cost is exponential, so each entry point
refuses problems above ``max_configurations``.

Three ways to give the log joint:

* :class:`ModelEnumerator` / :func:`enumerate_model`: a PyMC model, evaluated by PyMC
  itself (``compile_logp`` without Jacobian), so a test can hand it any small model and
  a point in the variables' own (constrained) space;
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
    "ModelEnumerator",
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


class ModelEnumerator:
    """The exact posterior of the latents of a small PyMC model, at any point.

    Compiled once (PyMC's joint log-density without Jacobian, on the model's own value
    variables, and the map from a point to them), so that one enumerator serves many
    points; the data may change between calls (``pm.set_data``, also to a new length:
    the latents' shapes are read from the model at each call).

    Parameters
    ----------
    model : pymc.Model
    supports : mapping
        The support of each latent, by name; every element of a latent takes the
        same support (values outside an element's own support get log-density
        ``-inf`` from PyMC and drop out).
    max_configurations : int, default 2**16
    """

    def __init__(
        self,
        model,
        supports: Mapping[str, Sequence],
        *,
        max_configurations: int = MAX_CONFIGURATIONS,
    ):
        import pytensor
        from pytensor.graph.replace import clone_replace

        self.model = model
        self.supports = {name: np.asarray(support) for name, support in supports.items()}
        self.max_configurations = max_configurations
        unknown = set(supports) - {rv.name for rv in model.free_RVs}
        if unknown:
            raise ValueError(f"expected supports of free variables, got {sorted(unknown)}")
        self.latents = [rv for rv in model.free_RVs if rv.name in supports]
        self.params = [rv for rv in model.free_RVs if rv.name not in supports]
        # The point is given in each variable's own space; the log-density takes the
        # value variables, so each transformed one goes through its forward transform,
        # the other variables it depends on replaced by their given values.
        given = {rv: rv.type(name=rv.name) for rv in self.params}
        values = []
        for rv in self.params:
            transform = model.rvs_to_transforms.get(rv)
            value = given[rv]
            values.append(
                value if transform is None else transform.forward(value, *rv.owner.inputs)
            )
        shapes = [rv.shape for rv in self.latents]
        outputs = clone_replace([*values, *shapes], replace=given)
        self._values_and_shapes = pytensor.function(
            list(given.values()), outputs, mode="FAST_COMPILE", on_unused_input="ignore"
        )
        # The reference runs each configuration once: Python's linker, no C compilation.
        self._logp = model.compile_logp(jacobian=False, mode="FAST_COMPILE")

    def __call__(self, point: Mapping[str, np.ndarray]) -> ModelEnumeration:
        """Enumerate at ``point``: the value of every free variable that is not a
        latent, by name, in its own (constrained) space; extra entries are ignored.

        Raises
        ------
        ValueError
            If a variable is missing from ``point``, or if there are more than
            ``max_configurations`` configurations.
        """
        missing = [rv.name for rv in self.params if rv.name not in point]
        if missing:
            raise ValueError(f"expected a value for {missing} in the point, got none")
        outputs = self._values_and_shapes(*(point[rv.name] for rv in self.params))
        n_params = len(self.params)
        fixed = {
            self.model.rvs_to_values[rv].name: value
            for rv, value in zip(self.params, outputs[:n_params], strict=True)
        }
        names = [rv.name for rv in self.latents]
        shapes = {
            name: tuple(int(n) for n in shape)
            for name, shape in zip(names, outputs[n_params:], strict=True)
        }
        sizes = {name: int(np.prod(shapes[name], dtype=np.int64)) for name in names}
        n_values = [len(self.supports[name]) for name in names for _ in range(sizes[name])]
        grid = configuration_grid(n_values, max_configurations=self.max_configurations)

        configurations, start = {}, 0
        for rv, name in zip(self.latents, names, strict=True):
            labels = self.supports[name][grid[:, start : start + sizes[name]]]
            dtype = self.model.rvs_to_values[rv].type.dtype
            configurations[name] = labels.astype(dtype).reshape(len(grid), *shapes[name])
            start += sizes[name]
        value_names = {name: self.model.rvs_to_values[self.model[name]].name for name in names}
        log_joint = np.array(
            [
                self._logp({**fixed, **{value_names[n]: configurations[n][c] for n in names}})
                for c in range(len(grid))
            ]
        )
        log_marginal, flat = log_posterior_marginals(grid, log_joint, n_values)
        log_marginals, start = {}, 0
        for name in names:
            per_element = np.stack(flat[start : start + sizes[name]])
            log_marginals[name] = per_element.reshape(*shapes[name], len(self.supports[name]))
            start += sizes[name]
        return ModelEnumeration(log_marginal, log_marginals, configurations, log_joint)


def enumerate_model(
    model,
    point: Mapping[str, np.ndarray],
    supports: Mapping[str, Sequence],
    *,
    max_configurations: int = MAX_CONFIGURATIONS,
) -> ModelEnumeration:
    """The exact posterior of the latents of ``model`` at ``point``, once.

    See :class:`ModelEnumerator` (which compiles once for many points).
    """
    return ModelEnumerator(model, supports, max_configurations=max_configurations)(point)


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

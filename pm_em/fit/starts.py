"""Where EM starts: jittered default point, a prior draw, k-means on the data, or
values given by the user; one seed per start, as PyMC splits seeds per chain.

EM climbs to the nearest mode, and mixture likelihoods have many, so the start
matters. From the model's default point every component is identical (a saddle EM
cannot leave); jitter breaks the symmetry, a prior draw spreads the starts, and for
locations indexed by a latent on the data (``x ~ Normal(mu[z], ...)``, also
``Normal(mu_g[group] + delta[z], ...)``) k-means puts them where the data are and
labels every observation, and one M-step on those labels starts everything else
(scales, weights, the other location terms), as scikit-learn's ``GaussianMixture``
starts from k-means.

The M-step on the labels is what makes the start: with only the locations set and a
scale jittered around the model's default (``HalfNormal(5)`` starts near 5), the
first E-step sees every component as equally likely for every observation, and the
M-step then gives all components the same location: EM is left on the saddle where
they are merged.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from pymc.distributions.continuous import FlatRV, HalfFlatRV
from pymc.initial_point import make_initial_point_fn
from pymc.util import _get_seeds_per_chain

from pm_em.compile import evaluate_once
from pm_em.model.chains import is_markov_chain
from pm_em.model.locations import LocationTarget, location_targets

__all__ = [
    "INIT_STRATEGIES",
    "KMeansTarget",
    "kmeans_targets",
    "resolve_init",
    "start_points",
]

INIT_STRATEGIES = ("auto", "jitter", "prior", "kmeans")

#: The k-means target of a start (kept under its former name).
KMeansTarget = LocationTarget

_LLOYD_ITERATIONS = 100
# Share of a label's responsibility spread over the other components: a little, so
# that the M-step on the labels never takes the log of an exact 0.
_LABEL_SMOOTHING = 1e-3


def kmeans_targets(em) -> list[LocationTarget]:
    """The parameters a k-means start applies to
    (:func:`pm_em.model.locations.location_targets`)."""
    return location_targets(em)


def _kmeans(
    data: np.ndarray, n_clusters: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """k-means++ seeding, then Lloyd iterations until the assignment is stable.

    Returns
    -------
    centers : np.ndarray
        ``(n_clusters, *core)``, sorted along the first coordinate (a reproducible,
        readable labelling).
    labels : np.ndarray
        Each row's center, ``(n_rows,)``.
    """
    points = data.reshape(len(data), -1)
    centers = [points[rng.integers(len(points))]]
    distance = ((points - centers[0]) ** 2).sum(axis=1)
    for _ in range(1, n_clusters):
        total = distance.sum()
        if total > 0:
            chosen = rng.choice(len(points), p=distance / total)
        else:
            chosen = rng.integers(len(points))
        centers.append(points[chosen])
        distance = np.minimum(distance, ((points - points[chosen]) ** 2).sum(axis=1))
    centers = np.array(centers)
    labels = None
    for _ in range(_LLOYD_ITERATIONS):
        previous = labels
        labels = _nearest(points, centers)
        if previous is not None and np.array_equal(labels, previous):
            break
        for k in range(n_clusters):
            members = points[labels == k]
            if len(members):
                centers[k] = members.mean(axis=0)
    order = np.argsort(centers[:, 0], kind="stable")
    relabel = np.empty_like(order)
    relabel[order] = np.arange(n_clusters)
    return centers[order].reshape(n_clusters, *data.shape[1:]), relabel[labels]


def _nearest(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of each row's nearest center (squared Euclidean distance)."""
    points = points.reshape(len(points), -1)
    centers = centers.reshape(len(centers), -1)
    return np.argmin(((points[:, None, :] - centers[None]) ** 2).sum(axis=2), axis=1)


def _prior_start(em, seed: int) -> dict[str, np.ndarray]:
    """A draw from the prior of the continuous variables (those with a proper prior;
    Flat and HalfFlat ones take the model's default point, jittered)."""
    rng = np.random.default_rng(seed)
    jittered = em.initial_point(random_seed=rng)
    overrides = {
        p.rv: ("prior" if not isinstance(p.rv.owner.op, FlatRV | HalfFlatRV) else None)
        for p in em.params
    }
    overrides = {rv: strategy for rv, strategy in overrides.items() if strategy}
    for rv in em.model.free_RVs:
        if is_markov_chain(rv):
            overrides[rv] = np.zeros(tuple(int(s) for s in rv.shape.eval()), rv.type.dtype)
    for p in em.params:
        if p.rv not in overrides:
            overrides[p.rv] = jittered[p.name]
    point_fn = make_initial_point_fn(model=em.model, overrides=overrides)
    values = point_fn(int(rng.integers(2**31)))
    return em.to_point([np.asarray(values[p.value.name]) for p in em.params])


def resolve_init(init, em) -> str:
    """The start strategy ``init`` stands for: ``"auto"`` becomes ``"kmeans"`` when
    the model has a location parameter indexed by a latent on the data, else
    ``"jitter"``; a dict is ``"values"``.

    Raises
    ------
    ValueError
        For an unknown strategy, or ``"kmeans"`` on a model without such a location.
    """
    if isinstance(init, Mapping):
        return "values"
    if not isinstance(init, str) or init not in INIT_STRATEGIES:
        raise ValueError(
            f"init must be one of {INIT_STRATEGIES} or a dict of start values, got {init!r}."
        )
    if init == "auto":
        return "kmeans" if kmeans_targets(em) else "jitter"
    if init == "kmeans" and not kmeans_targets(em):
        raise ValueError(
            "init='kmeans' needs a location parameter indexed by a latent on observed "
            "data (x ~ Normal(mu[z], ...), or mu[z] as one term of a sum such as "
            "Normal(a + mu[z], ...)); this model has none. Use init='jitter' or 'prior'."
        )
    return init


def start_points(em, init="auto", n_init: int = 1, random_seed=None, fixed=()) -> list[dict]:
    """One start per restart (constrained space, by parameter name).

    Parameters
    ----------
    em : EM
    init : {"auto", "jitter", "prior", "kmeans"} or dict
        ``"jitter"``: the model's initial point jittered on the unconstrained space.
        ``"prior"``: a draw from the prior of the continuous variables (Flat ones
        jittered). ``"kmeans"``: for each location parameter indexed by a latent on
        observed data, k-means++ (then Lloyd iterations) on the data, minus the
        location's other terms when it is a sum (those that are an intercept or a
        selection by a constant index start at group means of the data); then one
        M-step on the k-means labels for every other parameter. A dict: those
        values, jitter for the rest. ``"auto"``: :func:`resolve_init`.
    n_init : int
    random_seed : int, sequence or Generator, optional
        Split into one seed per start.
    fixed : mapping or collection of str
        Parameters the caller sets itself (``initvals``): k-means leaves them
        alone. Given as a mapping with their values, a fixed location still labels
        the data (each row to its nearest given center) for the M-step.

    Returns
    -------
    list of dict
    """
    strategy = resolve_init(init, em)
    seeds = _get_seeds_per_chain(random_seed, n_init)
    fixed_values = _usable_values(em, fixed) if isinstance(fixed, Mapping) else {}
    fixed_names = set(fixed)
    # With every parameter given, the data-driven start would be overwritten whole:
    # not derived (its k-means targets and label M-step compile functions of their own).
    everything_given = {p.name for p in em.params} <= fixed_names
    targets = kmeans_targets(em) if strategy == "kmeans" and not everything_given else []
    starts = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        if strategy == "prior":
            point = _prior_start(em, int(rng.integers(2**31)))
        else:
            point = em.initial_point(random_seed=rng)
        if targets:
            point = _data_driven_start(em, point, targets, fixed_names, fixed_values, rng)
        if strategy == "values":
            point.update({name: np.asarray(value) for name, value in init.items()})
        starts.append(point)
    return starts


def _usable_values(em, values: Mapping) -> dict[str, np.ndarray]:
    """The user's start values a data-driven start can build on: known parameters,
    of the right shape, finite. (The others are refused later, with a message,
    where they are applied.)"""
    shapes = {p.name: p.shape for p in em.params}
    usable = {}
    for name, value in values.items():
        try:
            array = np.asarray(value, dtype=float)
        except (TypeError, ValueError):
            continue
        if shapes.get(name) == array.shape and np.all(np.isfinite(array)):
            usable[name] = array
    return usable


def _data_driven_start(em, point, targets, fixed_names, fixed_values, rng) -> dict:
    """``point`` with every target's locations at k-means centers, the offsets'
    simple terms at group means, and the other parameters from one M-step on the
    k-means labels."""
    point = {**point, **fixed_values}
    labels, centers = {}, {}
    for target in targets:
        if target.param in fixed_names and target.param not in fixed_values:
            continue
        residual = _residual(em, point, target, fixed_names)
        if residual is None:
            continue
        if target.param in fixed_names:
            given = fixed_values[target.param]
            assignment = _nearest(residual, given)
        else:
            given, assignment = _kmeans(residual, target.n_clusters, rng)
            centers[target.param] = (given, not target.offset)
        point[target.param] = given
        if target.aligned and target.latent not in labels:
            labels[target.latent] = assignment
    point = _label_m_step(em, point, labels)
    # The locations that are the whole location start at the k-means centers
    # exactly; within a sum the M-step's values are kept (consistent with the
    # other terms). User-given values always win.
    point.update({name: value for name, (value, alone) in centers.items() if alone})
    point.update(fixed_values)
    return point


def _residual(em, point, target: LocationTarget, fixed_names) -> np.ndarray | None:
    """The target's data minus the location's other terms, ``(n_rows, *core)``,
    after starting those of the other terms a group mean can start (in ``point``).
    None when the other terms are not finite at ``point``."""
    rows = target.data
    if not target.offset:
        return rows
    values = em.to_values(point)
    if not all(np.all(np.isfinite(v)) for v in values):
        return None
    terms = evaluate_once([p.value for p in em.params], [t.graph for t in target.offset], values)
    terms = [_as_rows(np.asarray(v, dtype=float), target) for v in terms]
    if not all(np.all(np.isfinite(v)) for v in terms):
        return None
    current = {p.name: np.asarray(point[p.name], dtype=float) for p in em.params}
    for i, term in enumerate(target.offset):
        if term.param is None or term.param in fixed_names:
            continue
        rest = rows - sum((v for j, v in enumerate(terms) if j != i), np.zeros_like(rows))
        value = _group_means(rest, term.index, current[term.param])
        point[term.param] = value
        terms[i] = _as_rows(value if term.index is None else value[term.index], target)
    return rows - sum(terms, np.zeros_like(rows))


def _as_rows(value: np.ndarray, target: LocationTarget) -> np.ndarray:
    """A term's value broadcast to the data (as the location broadcasts it) and laid
    out as the data's rows."""
    return np.broadcast_to(value, target.shape).reshape(target.data.shape)


def _group_means(rest: np.ndarray, index, current: np.ndarray) -> np.ndarray:
    """The mean of ``rest`` (an intercept) or of each group of its rows (a selection
    by ``index``); a group without rows keeps its current value."""
    if index is None:
        return np.asarray(rest.mean() if current.ndim == 0 else rest.mean(axis=0))
    counts = np.bincount(index, minlength=len(current))
    sums = np.zeros_like(current)
    np.add.at(sums, index, rest)
    present = counts > 0
    value = current.copy()
    value[present] = sums[present] / counts[present].reshape(-1, *([1] * (current.ndim - 1)))
    return value


def _label_m_step(em, point, labels: dict[str, np.ndarray]) -> dict:
    """One M-step with the k-means labels as responsibilities (the other latents at
    their E-step's); ``point`` unchanged when the model's latents are not each
    enumerated on their own, or the result is not a finite start."""
    components = em.structure.components
    if not labels or any(c.chain is not None or len(c.latents) != 1 for c in components):
        return point
    if any(c.globals and c.groups for c in components):
        return point
    # A user's value outside its support: refused with a message where it is applied.
    if not all(np.all(np.isfinite(v)) for v in em.to_values(point)):
        return point
    log_resp = {}
    if set(labels) != {lat.name for lat in em.latents}:
        log_resp.update(em.e_step(point))
    for latent in em.latents:
        if latent.name in labels:
            log_resp[latent.name] = _label_log_resp(labels[latent.name], latent)
    new = em.m_step(point, log_resp)
    if not np.isfinite(em.logp(new)):
        return point
    return new


def _label_log_resp(labels: np.ndarray, latent) -> np.ndarray:
    """Log responsibilities that put (almost) all weight on each element's label,
    ``(*latent.shape, n_support)``."""
    k = latent.n_support
    resp = np.full((labels.size, k), _LABEL_SMOOTHING / k)
    resp[np.arange(labels.size), labels] += 1.0 - _LABEL_SMOOTHING
    return np.log(resp).reshape(*latent.shape, k)

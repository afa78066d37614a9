"""Where EM starts: jittered default point, a prior draw, k-means++ on the data, or
values given by the user; one seed per start, as PyMC splits seeds per chain.

EM climbs to the nearest mode, and mixture likelihoods have many, so the start
matters. From the model's default point every component is identical (a saddle EM
cannot leave); jitter breaks the symmetry, a prior draw spreads the starts, and for
locations that index the data directly (``x ~ Normal(mu[z], ...)``) k-means++ puts
them where the data are, as scikit-learn's ``GaussianMixture`` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from pymc.distributions.continuous import FlatRV, HalfFlatRV
from pymc.distributions.multivariate import MvNormalRV
from pymc.initial_point import make_initial_point_fn
from pymc.util import _get_seeds_per_chain
from pytensor.tensor.random.basic import LaplaceRV, NormalRV
from pytensor.tensor.subtensor import AdvancedSubtensor, AdvancedSubtensor1

from pm_em.analysis import observed_data
from pm_em.chains import is_markov_chain

__all__ = ["INIT_STRATEGIES", "KMeansTarget", "kmeans_targets", "start_points"]

INIT_STRATEGIES = ("auto", "jitter", "prior", "kmeans")

# Families whose first parameter is a location the data scatter around.
_LOCATION_FAMILIES = (NormalRV, MvNormalRV, LaplaceRV)
_LLOYD_ITERATIONS = 100


@dataclass(frozen=True)
class KMeansTarget:
    """A location parameter indexed by a latent directly on observed data
    (``x ~ Normal(mu[z], ...)``): k-means on ``data`` with ``n_clusters`` centers."""

    param: str
    data: np.ndarray
    n_clusters: int


def kmeans_targets(em) -> list[KMeansTarget]:
    """The parameters a k-means start applies to."""
    model = em.model
    params = {p.rv: p for p in em.params}
    latents = {lat.rv: lat for lat in em.latents}
    targets = {}
    for rv in model.observed_RVs:
        node = rv.owner
        if node is None or not isinstance(node.op, _LOCATION_FAMILIES):
            continue
        location = node.op.dist_params(node)[0]
        index_node = location.owner
        if index_node is None or not isinstance(
            index_node.op, AdvancedSubtensor | AdvancedSubtensor1
        ):
            continue
        if len(index_node.inputs) != 2:
            continue
        base, index = index_node.inputs
        param, latent = params.get(base), latents.get(index)
        if param is None or latent is None or param.name in targets:
            continue
        data = np.asarray(observed_data(model)[rv.name], dtype=float)
        n_clusters = latent.n_support
        core = data.shape[latent.value.ndim :] if data.ndim > latent.value.ndim else ()
        if param.shape != (n_clusters, *core) or not np.all(np.isfinite(data)):
            continue
        targets[param.name] = KMeansTarget(param.name, data.reshape(-1, *core), n_clusters)
    return list(targets.values())


def _kmeans(data: np.ndarray, n_clusters: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding, then Lloyd iterations until the assignment is stable;
    ``(n_clusters, *core)``."""
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
        labels = np.argmin(((points[:, None, :] - centers[None]) ** 2).sum(axis=2), axis=1)
        if previous is not None and np.array_equal(labels, previous):
            break
        for k in range(n_clusters):
            members = points[labels == k]
            if len(members):
                centers[k] = members.mean(axis=0)
    # Sorted along the first coordinate: a reproducible, readable labelling.
    centers = centers[np.argsort(centers[:, 0], kind="stable")]
    return centers.reshape(n_clusters, *data.shape[1:])


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


def _resolve(init, em):
    if isinstance(init, Mapping):
        return "values"
    if init not in INIT_STRATEGIES:
        raise ValueError(
            f"init must be one of {INIT_STRATEGIES} or a dict of start values, got {init!r}."
        )
    if init == "auto":
        return "kmeans" if kmeans_targets(em) else "jitter"
    if init == "kmeans" and not kmeans_targets(em):
        raise ValueError(
            "init='kmeans' needs a location parameter indexed by a latent directly on "
            "observed data (x ~ Normal(mu[z], ...)); this model has none. Use "
            "init='jitter' or 'prior'."
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
        jittered). ``"kmeans"``: k-means++ (then Lloyd iterations) on the data
        for each location parameter indexed by a latent directly on observed data,
        jitter for the rest. A dict: those values, jitter for the rest.
        ``"auto"``: ``"kmeans"`` when the model has such a location, else
        ``"jitter"``.
    n_init : int
    random_seed : int, sequence or Generator, optional
        Split into one seed per start.
    fixed : collection of str
        Parameters the caller sets itself (``initvals``): no k-means for them.

    Returns
    -------
    list of dict
    """
    strategy = _resolve(init, em)
    seeds = _get_seeds_per_chain(random_seed, n_init)
    targets = kmeans_targets(em) if strategy == "kmeans" else []
    targets = [target for target in targets if target.param not in fixed]
    starts = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        if strategy == "prior":
            point = _prior_start(em, int(rng.integers(2**31)))
        else:
            point = em.initial_point(random_seed=rng)
        for target in targets:
            point[target.param] = _kmeans(target.data, target.n_clusters, rng)
        if strategy == "values":
            point.update({name: np.asarray(value) for name, value in init.items()})
        starts.append(point)
    return starts

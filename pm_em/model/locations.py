"""Location parameters indexed by a latent on observed data, read off the graph:
what a data-driven (k-means) start can set.

A location is the first parameter of a family the data scatter around
(``x ~ Normal(loc, ...)``, ``MvNormal``, ``Laplace``). It is a *target* when it is
``mu[z]`` for a parameter ``mu`` and a latent ``z``, alone or as one term of a sum
(``mu_g[group] + delta[z]``): k-means on the data (on the data minus the other
terms, for a sum) then gives ``mu`` its centers and each observation a label.
Among the other terms, those a group mean of the data can start (an intercept
``a``, a selection ``mu_g[group]`` by a constant index) are listed too.

Graph reading only: nothing here compiles or evaluates a graph of parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pymc.distributions.multivariate import MvNormalRV
from pytensor.graph.basic import Constant, Variable
from pytensor.graph.traversal import ancestors
from pytensor.scalar.basic import Add, Second
from pytensor.tensor.basic import Alloc
from pytensor.tensor.elemwise import Elemwise
from pytensor.tensor.random.basic import LaplaceRV, NormalRV
from pytensor.tensor.random.var import RandomGeneratorSharedVariable
from pytensor.tensor.sharedvar import TensorSharedVariable
from pytensor.tensor.subtensor import AdvancedSubtensor, AdvancedSubtensor1

from pm_em.model.analysis import observed_data

__all__ = ["LocationTarget", "OffsetTerm", "location_targets"]

# Families whose first parameter is a location the data scatter around.
_LOCATION_FAMILIES = (NormalRV, MvNormalRV, LaplaceRV)
_SELECTIONS = (AdvancedSubtensor, AdvancedSubtensor1)


@dataclass(frozen=True)
class OffsetTerm:
    """One term of a location besides the latent-indexed one (``mu_g[group]`` in
    ``mu_g[group] + delta[z]``).

    Attributes
    ----------
    graph : Variable
        The term, a graph of the value variables (broadcastable to the data).
    param : str or None
        When a group mean of the data can start it: the parameter, which enters
        alone (an intercept) or selected by a constant index.
    index : np.ndarray or None
        That index, one entry per data row (None for an intercept).
    """

    graph: Variable
    param: str | None = None
    index: np.ndarray | None = None


@dataclass(frozen=True)
class LocationTarget:
    """A location parameter indexed by a latent on observed data: k-means on
    ``data`` (minus the ``offset`` terms) with ``n_clusters`` centers.

    Attributes
    ----------
    param : str
        The latent-indexed parameter (``mu`` of ``mu[z]``), of shape
        ``(n_clusters, *core)``.
    latent : str
        The latent indexing it.
    observed : str
        The observed variable.
    data : np.ndarray
        Its data, ``(n_rows, *core)``: one row per element of the latent when
        ``aligned``.
    shape : tuple of int
        The data's own shape, to which the location broadcasts its terms.
    n_clusters : int
        The latent's number of support values.
    offset : tuple of OffsetTerm
        The other terms of the location (empty when ``mu[z]`` is the location).
    aligned : bool
        True when the rows of ``data`` are the latent's elements in order and its
        support is ``0 .. n_clusters - 1`` (so a row's cluster is the latent's value).
    """

    param: str
    latent: str
    observed: str
    data: np.ndarray
    shape: tuple[int, ...]
    n_clusters: int
    offset: tuple[OffsetTerm, ...] = ()
    aligned: bool = False


def location_targets(em) -> list[LocationTarget]:
    """The latent-indexed location parameters of ``em``'s model, one per parameter
    (the first observed variable using it wins).

    Parameters
    ----------
    em : EM or ModelStructure
        Anything with the model (``model``), its ``params`` and ``latents``.

    Returns
    -------
    list of LocationTarget
    """
    model = em.model
    params = {p.rv: p for p in em.params}
    latents = {lat.rv: lat for lat in em.latents}
    data_by_name = None
    targets = {}
    for rv in model.observed_RVs:
        node = rv.owner
        if node is None or not isinstance(node.op, _LOCATION_FAMILIES):
            continue
        found = _split_location(node.op.dist_params(node)[0], params, latents)
        if found is None:
            continue
        param, latent, others = found
        if param.name in targets:
            continue
        if data_by_name is None:
            data_by_name = observed_data(model)
        data = np.asarray(data_by_name[rv.name], dtype=float)
        n_clusters = latent.n_support
        batch_ndim = len(latent.shape)
        core = data.shape[batch_ndim:] if data.ndim > batch_ndim else ()
        if param.shape != (n_clusters, *core) or not np.all(np.isfinite(data)):
            continue
        rows = data.reshape(-1, *core)
        aligned = data.shape[:batch_ndim] == tuple(latent.shape) and np.array_equal(
            latent.support, np.arange(n_clusters)
        )
        offset = _offset_terms(model, others, params, len(rows), core, param)
        if offset is None:
            continue
        targets[param.name] = LocationTarget(
            param.name, latent.name, rv.name, rows, data.shape, n_clusters, offset, aligned
        )
    return list(targets.values())


def _strip_broadcast(var: Variable) -> Variable:
    """``var`` without the broadcasting wrapped around it: PyMC broadcasts
    ``MvNormal``'s ``mu`` against the covariance (``second(cov[..., -1], mu)``), and
    ``pt.broadcast_to`` is an ``Alloc``. The data broadcast the same way."""
    while var.owner is not None:
        op = var.owner.op
        if isinstance(op, Elemwise) and isinstance(op.scalar_op, Second):
            var = var.owner.inputs[1]
        elif isinstance(op, Alloc):
            var = var.owner.inputs[0]
        else:
            return var
    return var


def _summands(var: Variable) -> list[Variable]:
    """The terms of a (nested) sum, each without its broadcasting."""
    var = _strip_broadcast(var)
    node = var.owner
    if node is not None and isinstance(node.op, Elemwise) and isinstance(node.op.scalar_op, Add):
        return [term for inp in node.inputs for term in _summands(inp)]
    return [var]


def _selection(var: Variable) -> tuple[Variable, Variable] | None:
    """``(base, index)`` when ``var`` is ``base[index]`` (one advanced index)."""
    node = var.owner
    if node is None or not isinstance(node.op, _SELECTIONS) or len(node.inputs) != 2:
        return None
    return node.inputs[0], node.inputs[1]


def _split_location(location, params, latents):
    """``(param, latent, other terms)`` when the location is ``param[latent]`` plus
    terms that involve no latent; else None."""
    terms = _summands(location)
    indexed = []
    for i, term in enumerate(terms):
        selection = _selection(term)
        if selection is not None and selection[0] in params and selection[1] in latents:
            indexed.append((i, params[selection[0]], latents[selection[1]]))
    if len(indexed) != 1:
        return None
    position, param, latent = indexed[0]
    others = [t for i, t in enumerate(terms) if i != position]
    # The other terms must not move with any latent (else they are no offset).
    if any(a in latents for a in ancestors(others)):
        return None
    return param, latent, others


def _offset_terms(model, others, params, n_rows, core, target) -> tuple[OffsetTerm, ...] | None:
    """The other terms as graphs of the value variables, with those a group mean
    can start marked; None when one of them uses the target parameter."""
    if not others:
        return ()
    uses = [set(ancestors([t])) for t in others]
    if any(target.rv in used for used in uses):
        return None
    graphs = model.replace_rvs_by_values(others)
    terms = []
    for i, (term, graph) in enumerate(zip(others, graphs)):
        # A parameter another term also uses would move that term too.
        elsewhere = set().union(*(u for j, u in enumerate(uses) if j != i))
        param, index = _simple_term(term, params, n_rows, core)
        if param is None or param.rv in elsewhere:
            terms.append(OffsetTerm(graph))
        else:
            terms.append(OffsetTerm(graph, param.name, index))
    return tuple(terms)


def _simple_term(term, params, n_rows, core):
    """``(param, index)`` when ``term`` is an untransformed parameter alone (index
    None, of shape ``()`` or ``core``) or selected by a constant integer index with
    one entry per data row (the parameter of shape ``(n_groups, *core)``)."""
    if term in params:
        param = params[term]
        if param.transform is None and param.shape in ((), tuple(core)):
            return param, None
        return None, None
    selection = _selection(term)
    if selection is None or selection[0] not in params:
        return None, None
    param, index = params[selection[0]], selection[1]
    if param.transform is None and len(param.shape) == 1 + len(core):
        values = _constant_value(index)
        if (
            values is not None
            and values.shape == (n_rows,)
            and np.issubdtype(values.dtype, np.integer)
            and values.min(initial=0) >= 0
            and values.max(initial=0) < param.shape[0]
            and tuple(param.shape[1:]) == tuple(core)
        ):
            return param, values
    return None, None


def _constant_value(var: Variable) -> np.ndarray | None:
    """The value of a constant or a ``pm.Data`` (shared) variable; None for anything
    computed."""
    if isinstance(var, Constant):
        return np.asarray(var.data)
    if isinstance(var, TensorSharedVariable) and not isinstance(var, RandomGeneratorSharedVariable):
        return np.asarray(var.get_value(borrow=True))
    return None

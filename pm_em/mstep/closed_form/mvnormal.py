"""MvNormal likelihoods: mean vectors and Cholesky factors selected by the latent
(``MvNormal(mu[z], chol=chol[z])`` with ``chol`` assembled from flat parameters).

Given the responsibilities ``R[k, j]`` of entry ``j`` under configuration ``k``, and
per configuration ``N_k = sum_j R`` and ``S_k = sum_j R x_j``:

* mean ``M``: each configuration's mean vector ``m_k`` must pick elements of ``M``
  (or constants), and its covariance ``Sigma_k`` must be the same for every entry.
  Under a flat prior, when every mean row goes with one covariance, the update is
  the weighted mean ``S / N`` of the configurations that share the row, whatever the
  covariance; otherwise (a ``Normal`` or ``MvNormal`` prior, rows shared by
  different covariances, partial rows) it is the generalized-least-squares solution
  ``(sum N_k P_k + L0) m = sum P_k (S_k - N_k c_k) + L0 m0``, ``P = Sigma^-1``,
  solved per connected block of elements;
* Cholesky factor: PyMC stores ``cov = A @ A.mT``. When ``A`` picks elements of flat
  parameters (``Flat`` / ``HalfFlat``, used nowhere else) that fill each
  configuration's lower triangle (or its diagonal, the strict lower triangle being
  zero), the update is ``L = cholesky(sum R (x - m)(x - m)^T / N)`` per covariance
  (configurations picking the same elements pool their scatter: a shared
  covariance), each parameter element taking its entry of ``L``.

Degenerate cases (no weight, a scatter that is not positive definite) keep the
current value.
"""

from __future__ import annotations

import numpy as np
import pytensor.tensor as pt
from pytensor.graph.traversal import ancestors
from pytensor.scalar.basic import Second
from pytensor.tensor.blockwise import Blockwise
from pytensor.tensor.elemwise import DimShuffle, Elemwise
from pytensor.tensor.math import Dot
from pytensor.tensor.random.basic import MvNormalRV
from pytensor.tensor.slinalg import cholesky
from pytensor.tensor.subtensor import AdvancedSubtensor, AdvancedSubtensor1

from pm_em.chunks.statistic import additive
from pm_em.compile import evaluate_once
from pm_em.model.connectivity import connected_labels
from pm_em.model.initial_point import model_initial_point
from pm_em.mstep.closed_form.base import ClosedFormUpdate, finite
from pm_em.mstep.closed_form.priors import prior_family

__all__ = ["mvnormal_covariance", "mvnormal_mean"]


# -- reading the MvNormal graph ---------------------------------------------------


def _strip_broadcasts(x):
    """``x`` without the broadcasts PyMC wraps around an argument: leading new axes
    (``ExpandDims``) and ``Second(other, x)`` (``pt.broadcast_arrays``). The tables
    broadcast anyway; ``Second`` would also make ``mu`` depend on the covariance."""
    while x.owner is not None:
        op = x.owner.op
        if isinstance(op, DimShuffle) and op.is_left_expand_dims:
            x = x.owner.inputs[0]
        elif isinstance(op, Elemwise) and isinstance(op.scalar_op, Second):
            x = x.owner.inputs[1]
        else:
            break
    return x


def _mvnormal_args(rv):
    """``(mu, cov)`` of an MvNormal term, broadcasts stripped, or None."""
    if rv.owner is None or not isinstance(rv.owner.op, MvNormalRV):
        return None
    mu, cov = rv.owner.inputs[2:4]
    return _strip_broadcasts(mu), _strip_broadcasts(cov)


def _gram_factor(cov):
    """``A`` when ``cov`` is ``A @ A.mT`` (how PyMC stores ``chol=``), else None."""
    node = cov.owner
    if node is None:
        return None
    op = node.op
    is_matmul = isinstance(op, Dot) or (isinstance(op, Blockwise) and isinstance(op.core_op, Dot))
    if not is_matmul:
        return None
    left, right = node.inputs
    if left.ndim < 2 or right.owner is None or not isinstance(right.owner.op, DimShuffle):
        return None
    nd = left.ndim
    transposed = (*range(nd - 2), nd - 1, nd - 2)
    if tuple(right.owner.op.new_order) != transposed or right.owner.inputs[0] is not left:
        return None
    return left


def _core_size(ctx, rv) -> int:
    """``d``, the length of the MvNormal's vectors."""
    static = rv.type.shape[-1]
    if static is not None:
        return int(static)
    (graph,) = ctx.model.replace_rvs_by_values([rv.shape[-1]])
    point = model_initial_point(ctx.model)
    inputs = ctx.model.value_vars
    (value,) = evaluate_once(inputs, [graph], [point[v.name] for v in inputs])
    return int(value)


def _per_config(selection, n_configs):
    """``(ids, constants)`` per configuration, ``(K, *core)``, when every entry picks
    the same elements (and constants) under a configuration; else None."""
    if selection is None or selection.ids.shape[1] == 0:
        return None
    ids = selection.per_config()
    constants = selection.constants
    if ids is None or not (constants == constants[:, :1]).all():
        return None
    # Free of the latent: the same under every configuration.
    shape = (n_configs, *ids.shape[1:])
    return np.broadcast_to(ids, shape), np.broadcast_to(constants[:, 0], shape)


def _upstream(ctx, exprs) -> set:
    """The variables ``exprs`` depend on, not looking past the latents (whose values
    the E-step fixes, so their own parameters do not enter)."""
    return set(ancestors(exprs, blockers=[lat.rv for lat in ctx.structure.latents]))


def _params_in(ctx, expr):
    """The parameters ``expr`` depends on, in model order."""
    found = _upstream(ctx, [expr])
    return [p for p in ctx.structure.params if p.rv in found]


def _gather(ctx, params, ids, constants):
    """The picked elements of ``params`` at their latest values (constants where
    ``ids`` is -1), shaped like ``ids``."""
    if not params:
        return pt.constant(constants)
    flat = pt.concatenate([ctx.constrained(p).ravel() for p in params])
    picked = flat[pt.constant(np.maximum(ids, 0))]
    return pt.switch(pt.constant(ids >= 0), picked, pt.constant(constants))


def _config_matrix(ctx, expr, entries, d):
    """A ``(d, d)`` matrix argument that is the same for every entry under each
    configuration: its ``(K, d, d)`` values at the latest point and a hashable key
    per configuration (equal keys: the same matrix whatever the values); or None.

    Recognized: ``A @ A.mT`` of such an ``A``; a selection of parameters and
    constants; a single matrix free of the latent; ``X[z]`` with ``X`` free of the
    latent.
    """
    n_configs = entries.n_configs
    expr = _strip_broadcasts(expr)
    factor = _gram_factor(expr)
    if factor is not None:
        found = _config_matrix(ctx, factor, entries, d)
        if found is None:
            return None
        table, keys = found
        return table @ table.mT, [("gram", key) for key in keys]
    latent = entries.latent
    depends = latent is not None and latent.rv in ancestors([expr])
    if not depends and expr.ndim == 2:
        table = pt.broadcast_to(ctx.evaluate(expr), (n_configs, d, d))
        return table, [("shared", id(expr))] * n_configs
    params = _params_in(ctx, expr)
    if params:
        per_config = _per_config(ctx.selection(expr, params, entries, (d, d)), n_configs)
        if per_config is not None:
            ids, constants = per_config
            keys = [("pick", ids[k].tobytes(), constants[k].tobytes()) for k in range(n_configs)]
            return _gather(ctx, params, ids, constants), keys
    node = expr.owner
    if (
        depends
        and node is not None
        and isinstance(node.op, AdvancedSubtensor | AdvancedSubtensor1)
        and len(node.inputs) == 2
        and node.inputs[1] is latent.rv
        and node.inputs[0].ndim == 3
        and latent.rv not in ancestors([node.inputs[0]])
    ):
        base = node.inputs[0]
        support = pt.constant(latent.support.astype("int64"))
        return ctx.evaluate(base)[support], [("index", id(base), int(s)) for s in latent.support]
    return None


def _weighted_sums(entries, values):
    """``N_k = sum_j R`` ``(K,)`` and ``S_k = sum_j R x_j`` ``(K, d)``."""
    weights = entries.weights
    count = additive(weights.sum(axis=1))
    if values.type.shape[0] == 1:
        total = additive(pt.dot(weights, values[0]))
    else:
        total = additive((weights[:, :, None] * values).sum(axis=1))
    return count, total


# -- the mean ---------------------------------------------------------------------


def _mean_uses(ctx, param):
    """Per MvNormal term using ``param`` as its mean only: entries, ``d``, the
    per-configuration mean ids and constants, the covariance tables and keys."""
    uses = []
    for term in ctx.users(param):
        args = _mvnormal_args(ctx.rv_of(term))
        if args is None:
            return None
        mu, cov = args
        if param.rv in _upstream(ctx, [cov]):
            return None
        entries = ctx.entries(term)
        if entries is None:
            return None
        d = _core_size(ctx, ctx.rv_of(term))
        per_config = _per_config(ctx.selection(mu, [param], entries, (d,)), entries.n_configs)
        if per_config is None:
            return None
        covariance = _config_matrix(ctx, cov, entries, d)
        if covariance is None:
            return None
        uses.append((entries, d, *per_config, *covariance))
    return uses or None


def _weighted_mean_groups(uses, size):
    """For a flat prior: the groups of (use, configuration) sharing a whole mean row
    with one covariance, as ``{row: [(use index, config)]}``; None when some element
    is picked by different rows, covariances or with constants."""
    groups: dict[tuple, list] = {}
    covariance_of: dict[tuple, object] = {}
    owner: dict[int, tuple] = {}
    for u, (entries, _, ids, _, _, keys) in enumerate(uses):
        for k in range(entries.n_configs):
            row = tuple(int(i) for i in ids[k])
            if min(row) < 0 or len(set(row)) != len(row):
                return None
            if row in groups:
                if covariance_of[row] != keys[k]:
                    return None
            else:
                for i in row:
                    if i in owner:
                        return None
                    owner[i] = row
                covariance_of[row] = keys[k]
                groups[row] = []
            groups[row].append((u, k))
    return groups


def _blocks(size, rows):
    """Connected blocks of the elements linked by ``rows``: each element's block and
    position in it, and the largest block size."""
    block = connected_labels(size, rows)
    position = np.empty(size, dtype=np.int64)
    counts = [0] * (int(block.max()) + 1 if size else 0)
    for i in range(size):
        position[i] = counts[block[i]]
        counts[block[i]] += 1
    return block, position, max(counts)


def mvnormal_mean(ctx, param) -> ClosedFormUpdate | None:
    """Closed-form update of an MvNormal mean parameter (flat, Normal or MvNormal
    prior), given the current covariances."""
    family = prior_family(param)
    if family not in ("flat", "normal", "mvnormal"):
        return None
    uses = _mean_uses(ctx, param)
    if uses is None:
        return None
    size = int(param.value_size)
    current = ctx.constrained(param).ravel()
    sums = []
    for entries, d, *_ in uses:
        sums.append(_weighted_sums(entries, ctx.value_table(entries, (d,))))

    groups = _weighted_mean_groups(uses, size) if family == "flat" else None
    if groups is not None:
        # Each row with one covariance: the weighted mean, free of the covariance.
        new = current
        for row, members in groups.items():
            count = sum(sums[u][0][k] for u, k in members)
            total = sum(sums[u][1][k] for u, k in members)
            index = pt.constant(np.array(row, dtype=np.int64))
            new = pt.set_subtensor(new[index], pt.switch(count > 0, total / count, current[index]))
        new = pt.switch(finite(new), new, current)
        return ClosedFormUpdate([param], [ctx.set_value(param, new)], "mvnormal mean")

    # Generalized least squares, block by block.
    rows = [ids[k] for _, _, ids, *_ in uses for k in range(ids.shape[0])]
    if family == "mvnormal":
        prior_d = param.shape[-1]
        rows += list(np.arange(size).reshape(-1, prior_d))
    block, position, width = _blocks(size, rows)
    n_blocks = int(block.max()) + 1
    slot = block * width + position  # element -> place in the (n_blocks, width) system
    hessian = pt.zeros((n_blocks * width * width,))
    gradient = pt.zeros((n_blocks * width,))
    for (_, _, ids, constants, covariance, _), (count, total) in zip(uses, sums):
        precision = pt.linalg.inv(covariance)  # (K, d, d)
        offset = pt.constant(np.where(ids >= 0, 0.0, constants))
        residual = total - count[:, None] * offset
        pick = ids >= 0
        pairs = np.flatnonzero(pick[:, :, None] & pick[:, None, :])
        safe = np.maximum(ids, 0)
        flat_pairs = block[safe][:, :, None] * width * width + (
            position[safe][:, :, None] * width + position[safe][:, None, :]
        )
        hessian = pt.inc_subtensor(
            hessian[pt.constant(flat_pairs.ravel()[pairs])],
            (count[:, None, None] * precision).ravel()[pt.constant(pairs)],
        )
        picked = np.flatnonzero(pick)
        gradient = pt.inc_subtensor(
            gradient[pt.constant(slot[safe].ravel()[picked])],
            (precision @ residual[:, :, None]).ravel()[pt.constant(picked)],
        )
    if family == "normal":
        # In float64: PyTensor keeps literals such as 3.0 as float32 constants.
        prior_mu, prior_sigma = (
            pt.broadcast_to(ctx.evaluate(a).astype("float64"), param.shape).ravel()
            for a in param.rv.owner.inputs[2:4]
        )
        diagonal = pt.constant(slot * width + position)
        hessian = pt.inc_subtensor(hessian[diagonal], prior_sigma**-2)
        gradient = pt.inc_subtensor(gradient[pt.constant(slot)], prior_mu / prior_sigma**2)
    elif family == "mvnormal":
        prior_mu, prior_cov = param.rv.owner.inputs[2:4]
        prior_rows = np.arange(size).reshape(-1, prior_d)
        prior_mu = ctx.evaluate(prior_mu).astype("float64")
        prior_mu = pt.broadcast_to(prior_mu, param.shape).reshape((-1, prior_d))
        prior_cov = ctx.evaluate(prior_cov).astype("float64")
        prior_cov = pt.broadcast_to(prior_cov, (*param.shape, prior_d))
        prior_cov = prior_cov.reshape((-1, prior_d, prior_d))
        prior_precision = pt.linalg.inv(prior_cov)
        flat_pairs = block[prior_rows][:, :, None] * width * width + (
            position[prior_rows][:, :, None] * width + position[prior_rows][:, None, :]
        )
        hessian = pt.inc_subtensor(
            hessian[pt.constant(flat_pairs.ravel())], prior_precision.ravel()
        )
        gradient = pt.inc_subtensor(
            gradient[pt.constant(slot[prior_rows].ravel())],
            (prior_precision @ prior_mu[:, :, None]).ravel(),
        )
    # Elements no term informs (flat prior, no weight) keep their value: an identity
    # row in the system. So do the padding slots of blocks narrower than ``width``.
    hessian = hessian.reshape((n_blocks * width, width))
    slot_diagonal = hessian[pt.arange(n_blocks * width), pt.arange(n_blocks * width) % width]
    active = finite(slot_diagonal) & (slot_diagonal > 0)
    hessian = hessian.reshape((n_blocks, width, width))
    active_b = active.reshape((n_blocks, width))
    mask = active_b[:, :, None] & active_b[:, None, :]
    eye = pt.eye(width)[None]
    hessian = pt.switch(mask, hessian, 0.0) + pt.switch(active_b[:, :, None], 0.0, eye)
    start = pt.zeros((n_blocks * width,))
    start = pt.set_subtensor(start[pt.constant(slot)], current)
    rhs = pt.switch(active, gradient, start).reshape((n_blocks, width))
    solution = pt.linalg.solve(hessian, rhs, assume_a="sym", b_ndim=1, check_finite=False)
    new = solution.reshape((n_blocks * width,))[pt.constant(slot)]
    new = pt.switch(finite(new), new, current)
    return ClosedFormUpdate([param], [ctx.set_value(param, new)], "mvnormal mean")


# -- the Cholesky factor ------------------------------------------------------------


def _factor_uses(ctx, param):
    """The block of flat parameters whose elements fill the Cholesky factor of the
    MvNormal terms using ``param``, and per term: entries, ``d``, mean, the
    per-configuration ids and constants of the factor; or None."""
    users = ctx.users(param)
    if not users:
        return None
    block = None
    uses = []
    for term in users:
        rv = ctx.rv_of(term)
        args = _mvnormal_args(rv)
        if args is None:
            return None
        mu, cov = args
        factor = _gram_factor(cov)
        if factor is None:
            return None
        involved = _params_in(ctx, factor)
        names = [p.name for p in involved]
        if param.name not in names or any(p.rv in _upstream(ctx, [mu]) for p in involved):
            return None
        if block is None:
            block = involved
        elif names != [p.name for p in block]:
            return None
        entries = ctx.entries(term)
        if entries is None:
            return None
        d = _core_size(ctx, rv)
        per_config = _per_config(ctx.selection(factor, block, entries, (d, d)), entries.n_configs)
        if per_config is None:
            return None
        uses.append((entries, d, mu, *per_config))
    user_names = {t.name for t in users}
    for p in block:
        if p.name in ctx.claimed or prior_family(p) not in ("flat", "halfflat"):
            return None
        if {t.name for t in ctx.users(p)} != user_names:
            return None
    return block, uses


def _triangle_kind(ids, constants, positive_only):
    """``"full"`` when the factor's lower triangle is all parameter elements, and
    ``"diagonal"`` when only its diagonal is (the strict lower triangle constant 0);
    None otherwise (constants other than 0, an element twice, a positive-only
    parameter below the diagonal)."""
    d = ids.shape[-1]
    upper = np.triu(np.ones((d, d), dtype=bool), 1)
    lower = upper.T
    diagonal = np.eye(d, dtype=bool)
    if (ids[upper] != -1).any() or (constants[upper] != 0).any():
        return None
    if (ids[diagonal] < 0).any():
        return None
    picked = ids[ids >= 0]
    if len(set(picked.tolist())) != picked.size:
        return None
    if (ids[lower] >= 0).all():
        if positive_only[ids[lower]].any():
            return None
        return "full"
    if (ids[lower] == -1).all() and (constants[lower] == 0).all():
        return "diagonal"
    return None


def mvnormal_covariance(ctx, param) -> ClosedFormUpdate | None:
    """Closed-form update of the flat parameters that make up an MvNormal's
    Cholesky factor, given the (just updated) mean."""
    if prior_family(param) not in ("flat", "halfflat"):
        return None
    found = _factor_uses(ctx, param)
    if found is None:
        return None
    block, uses = found
    sizes = [int(np.prod(p.shape, dtype=int)) for p in block]
    total_size = sum(sizes)
    positive_only = np.concatenate(
        [np.full(s, prior_family(p) == "halfflat") for p, s in zip(block, sizes)]
    )

    # Covariances: configurations (of any term) picking the same elements, in the same
    # places, share one; different covariances must pick disjoint elements.
    tables: dict[bytes, int] = {}
    group_ids, group_kinds, group_d = [], [], []
    owner = np.full(total_size, -1, dtype=np.int64)
    memberships = []
    for entries, d, _, ids, constants in uses:
        assignment = []
        for k in range(entries.n_configs):
            kind = _triangle_kind(ids[k], constants[k], positive_only)
            if kind is None:
                return None
            key = ids[k].tobytes() + constants[k].tobytes() + bytes([d % 256])
            if key not in tables:
                picked = ids[k][ids[k] >= 0]
                if (owner[picked] != -1).any():
                    return None
                tables[key] = len(group_ids)
                owner[picked] = len(group_ids)
                group_ids.append(ids[k])
                group_kinds.append(kind)
                group_d.append(d)
            assignment.append(tables[key])
        memberships.append(assignment)
    if len(set(group_d)) != 1:
        return None
    d = group_d[0]
    n_groups = len(group_ids)

    count = pt.zeros((n_groups,))
    scatter = pt.zeros((n_groups, d, d))
    for (entries, _, mu, _, _), assignment in zip(uses, memberships):
        membership = np.zeros((n_groups, entries.n_configs))
        membership[assignment, np.arange(entries.n_configs)] = 1.0
        membership = pt.constant(membership)
        residual = ctx.value_table(entries, (d,)) - ctx.table(mu, entries, (d,))
        weighted = entries.weights[:, :, None] * residual
        config_scatter = additive(weighted.transpose(0, 2, 1) @ residual)  # (K, d, d)
        count += pt.dot(membership, additive(entries.weights.sum(axis=1)))
        scatter += pt.tensordot(membership, config_scatter, axes=1)
    covariance = scatter / count[:, None, None]
    keep = np.stack([np.ones((d, d)) if kind == "full" else np.eye(d) for kind in group_kinds])
    covariance = covariance * pt.constant(keep)
    factor = cholesky(covariance, lower=True, check_finite=False, on_error="nan")
    diagonal = pt.diagonal(factor, axis1=1, axis2=2)
    valid = (
        (count > 0)
        & pt.all(finite(factor.reshape((n_groups, d * d))), axis=1)
        & pt.all(diagonal > 0, axis=1)
    )

    # Each parameter element takes its place in its covariance's factor.
    source = np.full(total_size, -1, dtype=np.int64)
    for g, ids in enumerate(group_ids):
        places = np.flatnonzero(ids.ravel() >= 0)
        source[ids.ravel()[places]] = g * d * d + places
    current = pt.concatenate([ctx.constrained(p).ravel() for p in block])
    safe = np.maximum(source, 0)
    picked = factor.ravel()[pt.constant(safe)]
    ok = pt.constant(source >= 0) & valid[pt.constant(safe // (d * d))]
    new = pt.switch(ok, picked, current)
    bounds = np.cumsum([0, *sizes])
    new_values = [
        ctx.set_value(p, new[start:stop]) for p, start, stop in zip(block, bounds, bounds[1:])
    ]
    return ClosedFormUpdate(list(block), new_values, "mvnormal covariance")

"""Graph rewrites for the enumerated log-probability tables.

With the latents enumerated through broadcastable stand-ins (see
:mod:`pm_em.estep.standins`), ``MvNormal(mu[z], chol=chol[z])`` becomes a Blockwise
triangular solve of the factors ``a``, batch shape ``(C, 1)`` (one per
configuration), against the centred data ``b``, batch shape ``(C, n)``. Blockwise
would loop over ``C * n`` vector solves in Python. :func:`local_matrix_b_solve`
turns it into ``C`` matrix solves, ``a`` squeezed to ``(C, d, d)`` and ``b``
transposed to ``(C, d, n)``: each observation becomes a column of the right-hand
side. It generalizes PyTensor's ``batched_vector_b_solve_to_matrix_b_solve``, which
requires ``a`` to have no batch axis at all.

A second rewrite, :func:`local_split_advanced_index` (applied with
:func:`split_advanced_indexing` to the terms and to the closed-form rules' graphs),
writes ``beta[z, :]``, ``mu[z, None]`` and ``x[:, z]`` as a gather by ``z`` alone
and basic indexing, which PyTensor can vectorize over the latent's configurations.

Apply the first with :func:`batch_solves` (what :mod:`pm_em.estep.enumeration` does to the
tables it builds), or enable it in a compile mode::

    from pytensor.compile.mode import get_mode
    import pm_em.estep.rewrites

    mode = get_mode(None).including(pm_em.estep.rewrites.REWRITE_TAG)
"""

from __future__ import annotations

from collections.abc import Sequence

import pytensor.tensor as pt
from pytensor.compile import optdb
from pytensor.graph.basic import Variable
from pytensor.graph.fg import FunctionGraph
from pytensor.graph.rewriting.basic import copy_stack_trace, in2out, node_rewriter
from pytensor.graph.rewriting.unify import OpPattern
from pytensor.graph.traversal import applys_between, graph_inputs
from pytensor.tensor.basic import Alloc
from pytensor.tensor.blockwise import Blockwise
from pytensor.tensor.elemwise import DimShuffle
from pytensor.tensor.rewriting.blockwise import blockwise_of
from pytensor.tensor.slinalg import SolveBase
from pytensor.tensor.subtensor import AdvancedSubtensor
from pytensor.tensor.type import TensorType, integer_dtypes
from pytensor.tensor.type_other import MakeSlice, NoneTypeT, SliceConstant

__all__ = [
    "REWRITE_TAG",
    "batch_solves",
    "local_matrix_b_solve",
    "local_split_advanced_index",
    "split_advanced_indexing",
    "strip_leading_broadcast",
]

#: Tag under which :func:`local_matrix_b_solve` is registered in PyTensor's
#: ``specialize`` database. It is not part of ``fast_run``: include it explicitly.
REWRITE_TAG = "pm_em_matrix_b_solve"


def _matrix_b_axes(a: Variable, b: Variable, batch_ndim: int) -> list[int]:
    """Batch axes (of the output) along which ``a`` is broadcast and ``b`` is not:
    those can become columns of a matrix right-hand side."""
    a_batch = (True,) * (batch_ndim - (a.type.ndim - 2)) + a.type.broadcastable[:-2]
    b_batch = (True,) * (batch_ndim - (b.type.ndim - 1)) + b.type.broadcastable[:-1]
    return [axis for axis in range(batch_ndim) if a_batch[axis] and not b_batch[axis]]


@node_rewriter([blockwise_of(OpPattern(SolveBase, b_ndim=1))])
def local_matrix_b_solve(fgraph, node):
    """Replace ``Blockwise(Solve(b_ndim=1))(a, b)`` by matrix solves over the batch
    axes ``a`` is not broadcast along.

    The batch axes where ``a`` has length one (statically) and ``b`` does not are
    moved to the end of ``b`` and flattened into the columns of a matrix right-hand
    side; ``a`` loses them. A solve with several right-hand sides solves each column
    independently with the same ``a``, so the result is the same, computed with one
    factorization or triangular solve per remaining batch entry.
    """
    a, b = node.inputs
    batch_ndim = node.op.batch_ndim(node)
    moved = _matrix_b_axes(a, b, batch_ndim)
    if not moved:
        return None
    kept = [axis for axis in range(batch_ndim) if axis not in moved]

    a_full = pt.shape_padleft(a, batch_ndim - (a.type.ndim - 2))
    a_kept = a_full.squeeze(axis=tuple(moved))
    b_full = pt.shape_padleft(b, batch_ndim - (b.type.ndim - 1))
    b_moved = b_full.transpose(*kept, *moved, batch_ndim)
    kept_shape = [b_moved.shape[i] for i in range(len(kept))]
    moved_shape = [b_full.shape[axis] for axis in moved]
    n_columns = moved_shape[0]
    for length in moved_shape[1:]:
        n_columns = n_columns * length
    core_length = b_full.shape[-1]
    b_matrix = b_moved.reshape((*kept_shape, n_columns, core_length)).swapaxes(-1, -2)

    props = node.op.core_op._props_dict()
    props["b_ndim"] = 2
    solved = Blockwise(type(node.op.core_op)(**props))(a_kept, b_matrix)

    # Columns back to batch axes, in the original order.
    solved = solved.swapaxes(-1, -2)
    solved_kept = [solved.shape[i] for i in range(len(kept))]
    solved = solved.reshape((*solved_kept, *moved_shape, core_length))
    order = kept + moved
    inverse = [order.index(axis) for axis in range(batch_ndim)] + [batch_ndim]
    new_out = solved.transpose(*inverse)
    copy_stack_trace(node.outputs[0], new_out)
    return [new_out]


def _rewritable(node) -> bool:
    """Whether :func:`local_matrix_b_solve` would rewrite ``node``."""
    op = node.op
    if not (isinstance(op, Blockwise) and isinstance(op.core_op, SolveBase)):
        return False
    if op.core_op.b_ndim != 1:
        return False
    return bool(_matrix_b_axes(*node.inputs, op.batch_ndim(node)))


def batch_solves(outputs: Sequence[Variable]) -> list[Variable]:
    """``outputs`` with :func:`local_matrix_b_solve` applied throughout.

    When there is something to rewrite, the graph is copied first (its inputs and
    constants are kept), so graphs shared with the model are never modified in
    place; otherwise ``outputs`` are returned as they are.
    """
    outputs = list(outputs)
    if not any(_rewritable(node) for node in applys_between(graph_inputs(outputs), outputs)):
        return outputs
    fgraph = FunctionGraph(outputs=outputs, clone=True, copy_inputs=False, copy_orphans=False)
    in2out(local_matrix_b_solve, ignore_newtrees=False).rewrite(fgraph)
    return list(fgraph.outputs)


optdb["specialize"].register("pm_em_local_matrix_b_solve", local_matrix_b_solve, REWRITE_TAG)


def strip_leading_broadcast(expr: Variable) -> Variable:
    """``expr`` without the leading axes PyMC adds when it resizes a distribution
    (``pi[None]``, ``broadcast_to(pi, ...)``), which leave each row equal to ``pi``."""
    while expr.owner is not None:
        op = expr.owner.op
        if (
            isinstance(op, DimShuffle)
            and op.is_expand_dims
            and all(d == "x" for d in op.new_order[: op.new_order.count("x")])
        ):
            expr = expr.owner.inputs[0]
        elif isinstance(op, Alloc):
            expr = expr.owner.inputs[0]
        else:
            break
    return expr


def _basic_index(index: Variable):
    """The basic index (slice or ``None``) that ``index`` stands for in an
    ``AdvancedSubtensor``, or ``NotImplemented`` for anything else."""
    if isinstance(index.type, NoneTypeT):
        return None
    if isinstance(index, SliceConstant):
        return index.data
    if index.owner is not None and isinstance(index.owner.op, MakeSlice):
        parts = [None if isinstance(p.type, NoneTypeT) else p for p in index.owner.inputs]
        return slice(*parts)
    return NotImplemented


def _index_split(node) -> tuple | None:
    """For an ``AdvancedSubtensor`` node that :func:`local_split_advanced_index`
    rewrites: the positions of the first and last index arrays, and the basic
    indices before and after them. None for any other node."""
    if not isinstance(node.op, AdvancedSubtensor):
        return None
    indices = node.inputs[1:]
    arrays = [
        position
        for position, index in enumerate(indices)
        if isinstance(index.type, TensorType)
        and index.type.ndim > 0
        and index.type.dtype in integer_dtypes
    ]
    if not arrays or len(arrays) == len(indices):
        return None
    first, last = arrays[0], arrays[-1]
    if arrays != list(range(first, last + 1)):
        return None
    leading = [_basic_index(index) for index in indices[:first]]
    trailing = [_basic_index(index) for index in indices[last + 1 :]]
    if any(index is NotImplemented for index in leading + trailing):
        return None
    return first, last, leading, trailing


@node_rewriter([AdvancedSubtensor])
def local_split_advanced_index(fgraph, node):
    """Split ``x[..., idx, ...]`` into a gather by the index arrays alone and basic
    indexing: ``beta[z, :]`` becomes ``beta[z][:, :]``, ``mu[z, None]`` becomes
    ``mu[z][:, None]``, ``x[:, z]`` becomes ``x.T[z].T``.

    PyTensor vectorizes a gather whose indices are all arrays, but not one that mixes
    batched index arrays with slices or ``None``, which is how users write a row of
    a coefficient matrix. Applies when the integer index arrays are consecutive
    (so NumPy keeps their block in place) and every other index is a slice or
    ``None``; scalar and boolean indices are left alone.
    """
    split = _index_split(node)
    if split is None:
        return None
    x, *indices = node.inputs
    first, last, leading, trailing = split
    arrays = range(first, last + 1)
    # Axes of x before the block (a None consumes none), moved after it for the gather.
    n_before = sum(isinstance(index, slice) for index in leading)
    n_block = len(arrays)
    axes = list(range(x.type.ndim))
    moved = x
    if n_before:
        moved = x.transpose(
            *axes[n_before : n_before + n_block], *axes[:n_before], *axes[n_before + n_block :]
        )
    gathered = moved[tuple(indices[first : last + 1])]
    block_ndim = max(indices[p].type.ndim for p in arrays)
    out = gathered[(slice(None),) * block_ndim + tuple(leading) + tuple(trailing)]
    if leading:
        # The block's axes back to where NumPy puts them: after the leading ones.
        n_lead = len(leading)
        out = out.transpose(
            *range(block_ndim, block_ndim + n_lead),
            *range(block_ndim),
            *range(block_ndim + n_lead, out.type.ndim),
        )
    out = pt.specify_broadcastable(
        out, *[axis for axis, b in enumerate(node.outputs[0].type.broadcastable) if b]
    )
    copy_stack_trace(node.outputs[0], out)
    return [out]


def split_advanced_indexing(outputs: Sequence[Variable]) -> list[Variable]:
    """``outputs`` with :func:`local_split_advanced_index` applied throughout.

    As :func:`batch_solves`: the graph is copied first when there is something to
    rewrite (inputs and constants kept), else ``outputs`` are returned as they are.
    """
    outputs = list(outputs)
    nodes = applys_between(graph_inputs(outputs), outputs)
    if not any(_index_split(node) is not None for node in nodes):
        return outputs
    fgraph = FunctionGraph(outputs=outputs, clone=True, copy_inputs=False, copy_orphans=False)
    in2out(local_split_advanced_index, ignore_newtrees=False).rewrite(fgraph)
    return list(fgraph.outputs)

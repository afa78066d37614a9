"""How the elements of a graph depend on the elements of one latent variable.

EM enumerates each element of a latent independently of the others, which is exact
only when every element of every dependent log-probability term depends on at most
one element of the latent. This module builds, for a latent value variable ``z`` and
any graph downstream of it, an integer *owner* graph of the same shape: entry ``j``
is the flat index of the element of ``z`` that entry ``j`` depends on, or ``-1`` when
it depends on none. Alongside it comes a list of *checks*: boolean graphs that are
true when no element depends on two different elements of ``z`` (``z.sum()`` fails).

The owner graph mirrors the original op by op, through :func:`propagate_owner`,
dispatched on the ``Op`` type. Data-movement ops (dimshuffles, subtensors,
reshapes, ...) are applied to the owner array itself; ops that use the latent as an
index (``mu[z]``) broadcast the owner of the index over the output. An op without a
rule is still accepted when each latent-dependent input depends on a single latent
element at most (checked), and refused otherwise.

Everything here only builds graphs; the analysis evaluates them once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import singledispatch

import pytensor.tensor as pt
from pytensor.graph.basic import Apply, Variable
from pytensor.graph.traversal import io_toposort
from pytensor.raise_op import CheckAndRaise
from pytensor.tensor.basic import (
    Alloc,
    ExtractDiag,
    Join,
    MakeVector,
    ScalarFromTensor,
    TensorFromScalar,
)
from pytensor.tensor.blockwise import Blockwise
from pytensor.tensor.elemwise import CAReduce, DimShuffle, Elemwise
from pytensor.tensor.shape import Reshape, Shape, Shape_i, SpecifyShape
from pytensor.tensor.subtensor import (
    AdvancedIncSubtensor,
    AdvancedIncSubtensor1,
    AdvancedSubtensor,
    AdvancedSubtensor1,
    IncSubtensor,
    Subtensor,
)
from pytensor.tensor.type import TensorType

__all__ = ["OwnerCheck", "OwnerGraphs", "build_owner_graphs"]

NO_OWNER = -1


@dataclass(frozen=True)
class OwnerCheck:
    """A boolean graph that must evaluate to True, and what it means when it does not."""

    ok: Variable
    op_name: str


@dataclass
class OwnerGraphs:
    """Owner graphs of the requested outputs, and the checks made on the way.

    Attributes
    ----------
    owners : dict
        Output variable -> int64 owner graph of the same shape. Outputs that do not
        depend on the latent are absent.
    checks : dict
        Output variable -> list of :class:`OwnerCheck` made on the path to it.
    """

    owners: dict[Variable, Variable] = field(default_factory=dict)
    checks: dict[Variable, list[OwnerCheck]] = field(default_factory=dict)


def build_owner_graphs(latent_value: Variable, outputs: list[Variable]) -> OwnerGraphs:
    """Owner graphs of ``outputs`` with respect to the elements of ``latent_value``.

    Parameters
    ----------
    latent_value : Variable
        The latent's value variable.
    outputs : list of Variable
        Graphs downstream of it (log-probability terms).

    Returns
    -------
    OwnerGraphs
    """
    owner_of: dict[Variable, Variable] = {
        latent_value: pt.arange(latent_value.size, dtype="int64").reshape(latent_value.shape)
    }
    checks_of: dict[Variable, list[OwnerCheck]] = {latent_value: []}

    for node in io_toposort([latent_value], outputs):
        if not any(inp in owner_of for inp in node.inputs):
            continue
        input_owners = [owner_of.get(inp) for inp in node.inputs]
        new_owners, new_checks = propagate_owner(node.op, node, input_owners)
        # A check's conditions only decide whether to raise: what they combine does
        # not reach the output.
        contributing = node.inputs[:1] if isinstance(node.op, CheckAndRaise) else node.inputs
        inherited = [c for inp in contributing for c in checks_of.get(inp, [])]
        op_name = str(node.op)
        for out, owner in zip(node.outputs, new_owners):
            if owner is None:
                continue
            owner_of[out] = owner
            checks_of[out] = inherited + [OwnerCheck(ok, op_name) for ok in new_checks]

    result = OwnerGraphs()
    for out in outputs:
        if out in owner_of:
            result.owners[out] = owner_of[out]
            result.checks[out] = _dedupe(checks_of[out])
    return result


def _dedupe(checks: list[OwnerCheck]) -> list[OwnerCheck]:
    seen, unique = set(), []
    for check in checks:
        if check.ok not in seen:
            seen.add(check.ok)
            unique.append(check)
    return unique


# -- helpers -----------------------------------------------------------------------


def _filled_like(var: Variable) -> Variable:
    """An owner array of ``NO_OWNER`` shaped like ``var``."""
    return pt.full_like(var, NO_OWNER, dtype="int64")


def _shape_of(var: Variable) -> tuple:
    """``var``'s shape, with the lengths its type knows as constants.

    A length that is 1 statically stays the constant 1 rather than a symbolic
    ``var.shape[i]``, which PyTensor's rewrites could not tell is 1 (see
    :func:`_broadcast`).
    """
    return tuple(
        length if length is not None else var.shape[axis]
        for axis, length in enumerate(var.type.shape)
    )


def _unbroadcast(owner: Variable) -> Variable:
    """``owner`` without the broadcasts (``Alloc``) at its output: the same values,
    broadcastable to its shape."""
    while owner.owner is not None and isinstance(owner.owner.op, Alloc):
        value = owner.owner.inputs[0]
        owner = pt.shape_padleft(value, owner.type.ndim - value.type.ndim)
    return owner


def _broadcast(owner: Variable, shape) -> Variable:
    """``pt.broadcast_to(owner, shape)``, never stacked on another broadcast.

    PyTensor's ``local_merge_alloc`` rewrite turns ``Alloc(Alloc(x, n, s), n, m)``
    into an assertion that ``s == m`` unless ``s`` is the constant 1: a length-one
    axis whose length is symbolic (``var.shape[1]`` of a ``p[:, None]``) broadcast
    against data then failed with "You have a shape error in your graph". A latent
    -owned axis broadcast against data axes (``theta[z][:, None]`` with ``(n, m)``
    observations) is exactly that.
    """
    return pt.broadcast_to(_unbroadcast(owner), shape)


def _combine(owners: list[Variable], shape) -> tuple[Variable, list[Variable]]:
    """Elementwise combination of broadcastable owner arrays into ``shape`` (None:
    their own broadcast shape).

    Returns the combined owner and a check that, wherever two arrays both name an
    owner, they name the same one.
    """
    owners = [_unbroadcast(o) for o in owners]
    if shape is None:
        owners = list(pt.broadcast_arrays(*owners))
    else:
        owners = [_broadcast(o, shape) for o in owners]
    combined = owners[0]
    for o in owners[1:]:
        combined = pt.maximum(combined, o)
    checks = []
    if len(owners) > 1:
        agree = [pt.all(pt.eq(o, NO_OWNER) | pt.eq(o, combined)) for o in owners]
        checks.append(pt.all(pt.stack(agree)))
    return combined, checks


def _uniform_owner(owner: Variable, axes=None) -> tuple[Variable, Variable]:
    """Reduce an owner array over ``axes``, checking it names one owner there.

    Returns the reduced owner (``NO_OWNER`` where nothing depended on the latent) and
    the check that no reduced slice mixes two different owners.
    """
    highest = pt.max(owner, axis=axes)
    lowest_named = pt.min(pt.switch(pt.eq(owner, NO_OWNER), highest.max() + 1, owner), axis=axes)
    ok = pt.all(pt.eq(highest, NO_OWNER) | pt.eq(lowest_named, highest))
    return highest, ok


def _is_tensor(var: Variable) -> bool:
    return isinstance(var.type, TensorType)


# -- rules -------------------------------------------------------------------------


@singledispatch
def propagate_owner(op, node: Apply, input_owners: list[Variable | None]):
    """Owner graphs of ``node``'s outputs given those of its inputs.

    Parameters
    ----------
    op : Op
        Dispatch is on its type.
    node : Apply
        The node.
    input_owners : list
        Owner graph of each input, or None for inputs that do not depend on the
        latent.

    Returns
    -------
    owners : list
        Owner graph per output (None for outputs that do not depend on the latent).
    checks : list of Variable
        Boolean graphs that must all be true for the latent to be enumerable
        element by element.

    Notes
    -----
    The fallback accepts any op whose latent-dependent inputs each depend on a
    single latent element at most, and gives every output that element as owner.
    """
    checks, uniform = [], []
    for inp, owner in zip(node.inputs, input_owners):
        if owner is None or not _is_tensor(inp):
            continue
        reduced, ok = _uniform_owner(owner)
        uniform.append(reduced)
        checks.append(ok)
    if not uniform:
        return [None] * len(node.outputs), []
    combined, agree = _combine(uniform, ())
    outputs = [
        _broadcast(combined, _shape_of(out)) if _is_tensor(out) else None for out in node.outputs
    ]
    return outputs, checks + agree


@propagate_owner.register(Shape)
@propagate_owner.register(Shape_i)
def _shape_owner(op, node, input_owners):
    # A shape does not depend on the values of the latent.
    return [None] * len(node.outputs), []


@propagate_owner.register(Elemwise)
def _elemwise_owner(op, node, input_owners):
    (out,) = node.outputs[:1]
    dependent = [o for o in input_owners if o is not None]
    combined, checks = _combine(dependent, _shape_of(out))
    return [combined] * len(node.outputs), checks


@propagate_owner.register(CheckAndRaise)
def _check_owner(op, node, input_owners):
    # The output is the first input; the conditions only decide whether to raise.
    return [input_owners[0]], []


@propagate_owner.register(DimShuffle)
@propagate_owner.register(ExtractDiag)
@propagate_owner.register(ScalarFromTensor)
@propagate_owner.register(TensorFromScalar)
def _unary_movement_owner(op, node, input_owners):
    return [op(input_owners[0])], []


@propagate_owner.register(Reshape)
@propagate_owner.register(SpecifyShape)
def _reshape_owner(op, node, input_owners):
    if any(o is not None for o in input_owners[1:]):
        return propagate_owner.dispatch(object)(op, node, input_owners)
    return [op(input_owners[0], *node.inputs[1:])], []


@propagate_owner.register(Alloc)
def _alloc_owner(op, node, input_owners):
    if input_owners[0] is None:
        return [None], []
    return [_broadcast(input_owners[0], node.inputs[1:])], []


@propagate_owner.register(Join)
def _join_owner(op, node, input_owners):
    axis, *tensors = node.inputs
    owners = [o if o is not None else _filled_like(t) for t, o in zip(tensors, input_owners[1:])]
    return [op(axis, *owners)], []


@propagate_owner.register(MakeVector)
def _make_vector_owner(op, node, input_owners):
    owners = [o if o is not None else _filled_like(t) for t, o in zip(node.inputs, input_owners)]
    return [pt.stack(owners)], []


@propagate_owner.register(CAReduce)
def _reduce_owner(op, node, input_owners):
    reduced, ok = _uniform_owner(input_owners[0], axes=op.axis)
    return [reduced], [ok]


def _index_owner_positions(node) -> tuple[list[int], int]:
    """Input positions of the advanced (tensor) indices, and where their broadcast
    block lands in the output (numpy's rule: in place if adjacent, else in front)."""
    index_inputs = node.inputs[1:]
    tensor_positions = [
        i for i, idx in enumerate(index_inputs) if _is_tensor(idx) and idx.type.ndim > 0
    ]
    adjacent = tensor_positions == list(
        range(tensor_positions[0], tensor_positions[0] + len(tensor_positions))
    )
    if not adjacent:
        return tensor_positions, 0
    # Output axes before the block: one per slice before the first tensor index.
    return tensor_positions, tensor_positions[0]


@propagate_owner.register(AdvancedSubtensor1)
def _take_owner(op, node, input_owners):
    x, idx = node.inputs
    (out,) = node.outputs
    parts = []
    if input_owners[0] is not None:
        parts.append(op(input_owners[0], idx))
    if input_owners[1] is not None:
        index_owner = input_owners[1]
        parts.append(index_owner.reshape((index_owner.shape[0],) + (1,) * (out.type.ndim - 1)))
    combined, checks = _combine(parts, _shape_of(out))
    return [combined], checks


@propagate_owner.register(AdvancedSubtensor)
def _advanced_subtensor_owner(op, node, input_owners):
    x, *indices = node.inputs
    (out,) = node.outputs
    parts = []
    if input_owners[0] is not None:
        parts.append(op(input_owners[0], *indices))
    index_owners = input_owners[1:]
    if any(o is not None for o in index_owners):
        if any(
            o is not None and not (_is_tensor(idx) and idx.type.ndim > 0)
            for idx, o in zip(indices, index_owners)
        ):
            return propagate_owner.dispatch(object)(op, node, input_owners)
        tensor_positions, block_start = _index_owner_positions(node)
        block_ndim = max(indices[i].type.ndim for i in tensor_positions)
        # Constant index arrays own nothing; the final broadcast to the output shape
        # covers their axes.
        block_owners = [index_owners[i] for i in tensor_positions if index_owners[i] is not None]
        block_owners = [
            o.dimshuffle(["x"] * (block_ndim - o.type.ndim) + list(range(o.type.ndim)))
            for o in block_owners
        ]
        block, checks = _combine(block_owners, None)
        # Place the block's axes among the output's, broadcastable everywhere else.
        pattern = ["x"] * out.type.ndim
        for k in range(block_ndim):
            pattern[block_start + k] = k
        parts.append(block.dimshuffle(pattern))
        combined, more_checks = _combine(parts, _shape_of(out))
        return [combined], checks + more_checks
    combined, checks = _combine(parts, _shape_of(out))
    return [combined], checks


@propagate_owner.register(Subtensor)
def _subtensor_owner(op, node, input_owners):
    if any(o is not None for o in input_owners[1:]):
        return propagate_owner.dispatch(object)(op, node, input_owners)
    return [op(input_owners[0], *node.inputs[1:])], []


def _fresh_inc_op(op, set_instead_of_inc: bool):
    """``op``'s kind of (advanced) inc/set subtensor, on the same indices, not in place.

    Owner graphs reuse owner arrays elsewhere (checks), so they must not be destroyed.
    """
    props = {name: getattr(op, name) for name in op.__props__}
    props.update(inplace=False, set_instead_of_inc=set_instead_of_inc)
    return type(op)(**props)


@propagate_owner.register(IncSubtensor)
@propagate_owner.register(AdvancedIncSubtensor1)
@propagate_owner.register(AdvancedIncSubtensor)
def _inc_subtensor_owner(op, node, input_owners):
    # PyMC imputes missing observations this way: the observed values and the free
    # variable of the missing ones are written into one array by index (or mask),
    # ``set_subtensor(empty[missing], c_unobserved)``. Element j of the latent then
    # owns the output entry it was written to.
    x, y, *indices = node.inputs
    (out,) = node.outputs
    if any(o is not None for o in input_owners[2:]):
        # The latent picks where to write: the generic rule.
        return propagate_owner.dispatch(object)(op, node, input_owners)
    x_owner = input_owners[0] if input_owners[0] is not None else _filled_like(x)
    y_owner = input_owners[1] if input_owners[1] is not None else _filled_like(y)
    if op.set_instead_of_inc:
        # Written entries take the owner of what was written, the others keep x's
        # (repeated indices: the same entry wins as in the op itself).
        return [_fresh_inc_op(op, True)(x_owner, y_owner, *indices)], []
    # An increment adds every written value (repeated indices add several) to x's:
    # each entry must have one owner among all of them. Count the named owners,
    # their sum and sum of squares per entry: they all agree iff
    # count * sum_of_squares == sum**2.
    inc = _fresh_inc_op(op, False)
    x_named, y_named = pt.ge(x_owner, 0), pt.ge(y_owner, 0)
    x_value, y_value = pt.switch(x_named, x_owner, 0), pt.switch(y_named, y_owner, 0)
    count = inc(x_named.astype("int64"), y_named.astype("int64"), *indices)
    total = inc(x_value, y_value, *indices)
    squares = inc(x_value * x_value, y_value * y_value, *indices)
    ok = pt.all(pt.eq(count * squares, total * total))
    owner = pt.switch(pt.gt(count, 0), total // pt.maximum(count, 1), NO_OWNER)
    return [pt.broadcast_to(owner, out.shape)], [ok]


@propagate_owner.register(Blockwise)
def _blockwise_owner(op, node, input_owners):
    # Core dimensions are combined by the op (a solve mixes a whole row), so each
    # input must have a single owner over its core dimensions; batch dimensions
    # behave as in an Elemwise.
    batch_ndim = op.batch_ndim(node)
    checks, batch_owners = [], []
    for inp, owner, core in zip(node.inputs, input_owners, op.inputs_sig):
        if owner is None:
            continue
        core_axes = tuple(range(inp.type.ndim - len(core), inp.type.ndim))
        reduced, ok = _uniform_owner(owner, axes=core_axes) if core_axes else (owner, None)
        if ok is not None:
            checks.append(ok)
        # Left-pad to the node's batch rank, as Blockwise broadcasts.
        pad = batch_ndim - reduced.type.ndim
        batch_owners.append(reduced.dimshuffle(["x"] * pad + list(range(reduced.type.ndim))))
    outputs = []
    for out, core in zip(node.outputs, op.outputs_sig):
        batch_shape = _shape_of(out)[:batch_ndim]
        combined, agree = _combine(batch_owners, batch_shape)
        checks += agree
        expanded = _unbroadcast(combined).dimshuffle(list(range(batch_ndim)) + ["x"] * len(core))
        outputs.append(_broadcast(expanded, _shape_of(out)))
    return outputs, checks

"""Which latents can be enumerated through a broadcastable stand-in.

The enumeration evaluates each log-probability term once per joint configuration
``c`` of the latents (``C`` of them) by vectorizing the term's graph over a leading
batch axis. Within one configuration every element of a latent ``z`` (shape ``s``)
takes the same support value, so ``z`` can be replaced either by its *full* batch,
``broadcast_to(values[:, None, ...], (C, *s))``, or by a *stand-in* of shape
``(C, 1, ..., 1)``. The full batch repeats all the work downstream of ``z`` once per
element of ``z`` (for ``MvNormal(mu[z], chol=chol[z])``: a Cholesky factorization
and a triangular solve per observation and configuration); the stand-in does it
once per configuration, and broadcasting happens only where the data enter.

The stand-in is exact for a term when broadcasting its batched result to the full
shape gives the full substitution's result. This module decides that op by op, on
the model's (unbatched) graph. Every variable downstream of a stand-in carries a
*squeeze mask*: one flag per axis, True where its batched value has length 1
while the full substitution's has the variable's own length. Along such an axis
the full substitution's value is constant (a broadcast copy). The invariant kept
for every variable ``v`` is:

    ``batched_standin(v)`` has the shape of ``batched_full(v)``, except length 1
    on the masked axes, and broadcasting it gives ``batched_full(v)``.

An op that receives a squeezed input keeps the invariant only if it commutes with
broadcasting along the squeezed axes. The rules below accept exactly those ops and
input positions, each with the reason written next to it; any other op (Reshape,
Join, Shape, SpecifyShape, Subtensor slicing a squeezed axis, sums over a squeezed
axis, unknown ops, ...) is refused, and the latents whose stand-ins reach it fall
back to the full substitution. An op whose inputs are not squeezed receives the
same values under both substitutions, so it needs no rule.

Squeezed axes have static length one in the batched graph (see
:func:`vectorize_with_standins`), so PyTensor broadcasts them as usual; an axis stays
squeezed after broadcasting only when no unsqueezed input gives it a length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import singledispatch

import pytensor.scalar as ps
import pytensor.tensor as pt
from pytensor.graph.basic import Apply, Constant, Variable
from pytensor.graph.replace import vectorize_graph
from pytensor.graph.rewriting.utils import rewrite_graph
from pytensor.graph.traversal import ancestors, io_toposort
from pytensor.raise_op import CheckAndRaise
from pytensor.tensor.basic import Alloc, ExtractDiag
from pytensor.tensor.blockwise import Blockwise
from pytensor.tensor.elemwise import CAReduce, DimShuffle, Elemwise
from pytensor.tensor.subtensor import AdvancedSubtensor, AdvancedSubtensor1, Subtensor
from pytensor.tensor.type import TensorType
from pytensor.tensor.type_other import SliceType

__all__ = ["StandinPlan", "latent_mask", "plan_standins", "vectorize_with_standins"]

Mask = tuple[bool, ...]

#: Reductions that give the same result over n identical copies as over one.
_IDEMPOTENT_REDUCTIONS = (ps.Maximum, ps.Minimum, ps.AND, ps.OR)


def latent_mask(shape: tuple[int, ...]) -> Mask:
    """Squeeze mask of a latent's stand-in: every axis longer than one."""
    return tuple(length != 1 for length in shape)


@dataclass
class StandinPlan:
    """How to vectorize one term with stand-ins.

    Attributes
    ----------
    standins : set of Variable
        Latent value variables to replace by stand-ins (the others by full batches).
    masks : dict
        Squeeze mask of every variable of the term's graph that has a squeezed
        axis (variables absent are the same under both substitutions).
    """

    standins: set[Variable] = field(default_factory=set)
    masks: dict[Variable, Mask] = field(default_factory=dict)


def plan_standins(term: Variable, candidates: dict[Variable, Mask]) -> StandinPlan:
    """Which latents ``term`` can be enumerated with as stand-ins, and the squeeze
    masks that result.

    Parameters
    ----------
    term : Variable
        A log-probability graph (unbatched).
    candidates : dict
        Latent value variable -> squeeze mask of its stand-in (see
        :func:`latent_mask`). Latents of size one can be left out: their stand-in
        and full batch coincide.

    Returns
    -------
    StandinPlan
        The largest set found of candidates in ``term``'s graph whose stand-ins,
        substituted together, keep the invariant of the module docstring up to
        ``term``.
    """
    in_graph = set(ancestors([term]))
    accepted = {value for value, mask in candidates.items() if any(mask) and value in in_graph}
    while accepted:
        refused, masks = _propagate(term, {value: candidates[value] for value in accepted})
        if not refused:
            return StandinPlan(accepted, masks)
        accepted -= refused
    return StandinPlan()


def vectorize_with_standins(term: Variable, plan: StandinPlan, replace: dict) -> Variable:
    """``vectorize_graph(term, replace)``, keeping squeezed axes statically of length one.

    PyTensor broadcasts only axes whose static length is one (runtime broadcasting
    is an error, and rewrites such as ``local_useless_alloc`` assume it never
    happens). Some vectorized ops (a Blockwise fallback around advanced indexing)
    lose static shapes, so each squeezed output is pinned back to length one with
    ``specify_shape``; the invariant guarantees that the runtime check holds.

    Parameters
    ----------
    term : Variable
    plan : StandinPlan
    replace : dict
        Latent value variable -> its batched value (the stand-in for those in
        ``plan.standins``, the full batch for the others).
    """
    batched = dict(replace)
    for node in io_toposort(list(replace), [term]):
        inputs = [batched.get(inp, inp) for inp in node.inputs]
        if all(new is old for new, old in zip(inputs, node.inputs)):
            continue
        outputs = vectorize_graph(list(node.outputs), replace=dict(zip(node.inputs, inputs)))
        for out, new in zip(node.outputs, outputs):
            batched[out] = _pin(new, plan.masks.get(out))
    return batched.get(term, term)


def _pin(batched: Variable, mask: Mask | None) -> Variable:
    """``batched`` with its squeezed axes (``mask``, after the batch axes) declared
    of length one, if its type does not say so already."""
    if not mask:
        return batched
    n_batch = batched.type.ndim - len(mask)
    shape = (None,) * n_batch + tuple(1 if flag else None for flag in mask)
    static = batched.type.shape
    if all(want is None or have == 1 for want, have in zip(shape, static)):
        return batched
    return pt.specify_shape(batched, shape)


def _propagate(
    term: Variable, standins: dict[Variable, Mask]
) -> tuple[set[Variable], dict[Variable, Mask]]:
    """Propagate squeeze masks to ``term``.

    Returns the stand-ins that reach the first refusing op (empty when none
    refuses) and the masks found. All the stand-ins feeding a refused input are
    dropped at once: a smaller set could pass, but dropping more only costs speed,
    never exactness.
    """
    # Variable -> (mask, stand-ins it derives from); only for masked variables.
    state: dict[Variable, tuple[Mask, frozenset]] = {
        value: (mask, frozenset([value])) for value, mask in standins.items()
    }
    for node in io_toposort(list(standins), [term]):
        incoming = [state.get(inp) for inp in node.inputs]
        if not any(incoming):
            continue
        sources = frozenset().union(*(entry[1] for entry in incoming if entry))
        masks = [
            entry[0] if entry else _full_mask(inp) for inp, entry in zip(node.inputs, incoming)
        ]
        out_masks = squeeze_rule(node.op, node, masks)
        if out_masks is None:
            return set(sources), {}
        for out, mask in zip(node.outputs, out_masks):
            mask = _normalize(out, mask)
            if any(mask):
                state[out] = (mask, sources)
    return set(), {var: mask for var, (mask, _) in state.items()}


def _full_mask(var: Variable) -> Mask | None:
    """Mask of an input no stand-in reaches (None for non-tensors: slices, None)."""
    if not isinstance(var.type, TensorType):
        return None
    return (False,) * var.type.ndim


def _normalize(var: Variable, mask: Mask | None) -> Mask:
    """Clear the flags of axes of static length one: there both batches agree."""
    if mask is None or not isinstance(var.type, TensorType):
        return ()
    return tuple(flag and length != 1 for flag, length in zip(mask, var.type.shape))


def _broadcast(masks: list[Mask], shapes: list[tuple], runtime: bool = False) -> Mask | None:
    """Squeeze mask of the broadcast of right-aligned inputs (None: not exact).

    An axis is squeezed when every input is squeezed there or of static length
    one. Otherwise some unsqueezed input gives the axis its length, in both
    substitutions alike: PyTensor broadcasts only axes of static length one, so an
    input of unknown static length has the full length at runtime. Where runtime
    broadcasting does happen (``runtime``: index arrays of advanced indexing, which
    follow NumPy), an unsqueezed index of unknown length next to a squeezed one
    leaves the result undecided, and None is returned.
    """
    ndim = max((len(m) for m in masks), default=0)
    padded = [
        ((False,) * (ndim - len(m)) + m, (1,) * (ndim - len(s)) + tuple(s))
        for m, s in zip(masks, shapes)
    ]
    result = []
    for axis in range(ndim):
        squeezed = any(m[axis] for m, _ in padded)
        others = [s[axis] for m, s in padded if not m[axis]]
        if squeezed and runtime and None in others:
            return None
        result.append(squeezed and all(length == 1 for length in others))
    return tuple(result)


# -- rules -------------------------------------------------------------------------


@singledispatch
def squeeze_rule(op, node: Apply, masks: list[Mask | None]) -> list[Mask] | None:
    """Squeeze masks of ``node``'s outputs, or None when the op does not commute with
    broadcasting along its inputs' squeezed axes.

    Called only when some input is squeezed. Refusing is the default: an op earns
    a rule only when it provably commutes with broadcasting.
    """
    return None


@squeeze_rule.register(Elemwise)
def _elemwise(op, node, masks):
    # f(broadcast(a), b) == broadcast(f(a, b)) elementwise: broadcasting only copies
    # entries, and an elementwise op maps each output entry from the entries at the
    # same (broadcast) position. Includes Cast, Switch, Second and Composite.
    mask = _broadcast(masks, [inp.type.shape for inp in node.inputs])
    return [mask] * len(node.outputs)


@squeeze_rule.register(DimShuffle)
def _dimshuffle(op, node, masks):
    # Transposing and adding axes move the copies along; dropping an axis is only
    # allowed on axes of length one, where no copy was made.
    (mask,) = masks
    return [tuple(False if order == "x" else mask[order] for order in op.new_order)]


@squeeze_rule.register(CheckAndRaise)
def _check(op, node, masks):
    # The output is the first input; the conditions are scalars (never squeezed),
    # so they only decide whether to raise, identically in both substitutions.
    if any(any(m) for m in masks[1:] if m):
        return None
    return [masks[0]]


@squeeze_rule.register(Alloc)
def _alloc(op, node, masks):
    # Alloc broadcasts its value to the given shape: broadcasting a squeezed copy
    # gives the full copy. The result has the requested (full) shape.
    if any(any(m) for m in masks[1:] if m):
        return None
    return [(False,) * node.outputs[0].type.ndim]


@squeeze_rule.register(CAReduce)
def _reduce(op, node, masks):
    # Summing over a squeezed axis would drop a factor n, but max, min, all and
    # any of n identical copies equal that of one. Reductions over full axes act
    # on identical data in both substitutions and keep the other axes' copies.
    (mask,) = masks
    axes = range(len(mask)) if op.axis is None else op.axis
    if any(mask[a] for a in axes) and not isinstance(op.scalar_op, _IDEMPOTENT_REDUCTIONS):
        return None
    return [tuple(flag for a, flag in enumerate(mask) if a not in axes)]


@squeeze_rule.register(Blockwise)
def _blockwise(op, node, masks):
    # A Blockwise applies its core op independently to each batch entry and
    # broadcasts batch axes like an Elemwise; core axes are combined by the core op
    # (a solve mixes a whole row), so they must not be squeezed.
    batch_ndim = op.batch_ndim(node)
    batch_masks, batch_shapes = [], []
    for inp, mask, sig in zip(node.inputs, masks, op.inputs_sig):
        n_batch = inp.type.ndim - len(sig)
        if any(mask[n_batch:]):
            return None
        batch_masks.append(mask[:n_batch])
        batch_shapes.append(inp.type.shape[:n_batch])
    batch = _broadcast(batch_masks, batch_shapes)
    assert len(batch) <= batch_ndim
    batch = (False,) * (batch_ndim - len(batch)) + batch
    return [batch + (False,) * len(sig) for sig in op.outputs_sig]


@squeeze_rule.register(ExtractDiag)
def _extract_diag(op, node, masks):
    # The diagonal pairs entries of two axes; along the other axes it is applied
    # entry by entry, so copies there stay copies. It is appended as the last axis.
    (mask,) = masks
    if mask[op.axis1] or mask[op.axis2]:
        return None
    kept = tuple(flag for a, flag in enumerate(mask) if a not in (op.axis1, op.axis2))
    return [kept + (False,)]


@squeeze_rule.register(Subtensor)
def _subtensor(op, node, masks):
    # Basic indexing of a full axis picks the same entries in both substitutions; a
    # squeezed axis must be left whole (x[::-1] or x[1:] would index the copy).
    mask = masks[0]
    out = []
    for axis, flag in enumerate(mask):
        entry = op.idx_list[axis] if axis < len(op.idx_list) else slice(None)
        whole = isinstance(entry, slice) and entry == slice(None)
        if flag and not whole:
            return None
        if isinstance(entry, slice):
            out.append(flag)
    return [tuple(out)]


@squeeze_rule.register(AdvancedSubtensor1)
def _take(op, node, masks):
    # x[idx]: gathering with a broadcast index gives the broadcast gather. The
    # indexed array must be unsqueezed, since its indexed axis is looked up.
    x_mask, idx_mask = masks
    if any(x_mask):
        return None
    return [idx_mask[:1] + (False,) * (node.outputs[0].type.ndim - 1)]


@squeeze_rule.register(AdvancedSubtensor)
def _advanced_subtensor(op, node, masks):
    # x[i1, :, ...]: integer index arrays are broadcast together (like an Elemwise)
    # and gathered, so squeezed indices give a broadcast gather. The indexed array
    # must be unsqueezed; boolean masks (nonzero) and newaxis are refused.
    x, *indices = node.inputs
    if any(masks[0]):
        return None
    advanced = []
    for position, idx in enumerate(indices):
        if isinstance(idx.type, TensorType):
            if idx.type.dtype == "bool":
                return None
            advanced.append(position)
        elif not isinstance(idx.type, SliceType):
            return None
    if not advanced:
        return None
    shapes = [_static_shape(indices[p]) for p in advanced]
    block = _broadcast([masks[1 + p] for p in advanced], shapes, runtime=True)
    if block is None:
        return None
    # NumPy's rule: adjacent advanced indices keep their place (after the slices
    # before them), separated ones move to the front.
    adjacent = advanced == list(range(advanced[0], advanced[0] + len(advanced)))
    start = advanced[0] if adjacent else 0
    out = [False] * node.outputs[0].type.ndim
    out[start : start + len(block)] = block
    return [tuple(out)]


def _static_shape(var: Variable) -> tuple:
    """``var``'s static shape, with unknown lengths filled in where PyTensor's shape
    rewrites fold them to constants (``arange(p.shape[0])`` for a ``p`` of static
    shape ``(1, K)``, as in PyMC's Categorical log-probability)."""
    shape = list(var.type.shape)
    for axis, length in enumerate(shape):
        if length is None:
            folded = rewrite_graph(
                var.shape[axis], include=("ShapeOpt", "canonicalize"), clone=True
            )
            if isinstance(folded, Constant):
                shape[axis] = int(folded.data)
    return tuple(shape)

"""A marker on the sums over a term's entries that the closed-form M-step reads.

Every closed-form rule reduces its term's entries (observations) to a few numbers:
``sum R``, ``sum R x``, ``sum R (x - mu)^2``... Such a sum over all the data is the
sum of the same expression over chunks of it. The rules wrap each one in
:func:`additive`, an identity: compiled as it is, the marker is removed by a
canonicalization rewrite before anything else sees the graph, so the in-memory
routine is unchanged. :mod:`pm_em.chunks.plan` reads the markers to split the
routine into what a chunk computes (the marked sums) and what runs once on their
totals (the rest of the M-step).
"""

from __future__ import annotations

from pytensor.compile.ops import ViewOp
from pytensor.graph.basic import Variable
from pytensor.graph.rewriting.basic import node_rewriter
from pytensor.graph.traversal import ancestors
from pytensor.tensor.rewriting.basic import register_canonicalize, register_specialize

__all__ = ["AdditiveStatistic", "additive", "additive_statistics"]


class AdditiveStatistic(ViewOp):
    """Identity on a sum over a term's entries: the statistic that adds over chunks."""

    def __str__(self) -> str:
        return "AdditiveStatistic"


_ADDITIVE = AdditiveStatistic()


def additive(summed: Variable) -> Variable:
    """Mark ``summed``, a sum over observation entries (linear in them: a sum, a
    scatter-add, a product contracting the entry axis), as an additive statistic."""
    return _ADDITIVE(summed)


def additive_statistics(outputs: list[Variable]) -> list[Variable]:
    """The marked statistics among the ancestors of ``outputs`` (their marker
    outputs), each once."""
    found = []
    seen = set()
    for var in ancestors(outputs):
        if var.owner is not None and isinstance(var.owner.op, AdditiveStatistic):
            if var not in seen:
                seen.add(var)
                found.append(var)
    return found


@register_canonicalize
@register_specialize
@node_rewriter([AdditiveStatistic])
def local_remove_additive_statistic(fgraph, node):
    """The marker is for graph analysis only: compiled, it is the sum itself."""
    return [node.inputs[0]]

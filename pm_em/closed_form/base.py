"""What every closed-form rule needs: where a parameter is used, the responsibilities
of each term's entries, graphs evaluated at the current point of the M-step, and a
test that an expression merely *selects* elements of parameters.

The M-step is run as ECM: blocks of parameters are maximized one after another, each
given the latest values of the others. :class:`ClosedFormContext` tracks those latest
values (:attr:`ClosedFormContext.current`) as graphs, so that every update is a graph
of the value variables (where the E-step was computed) and the responsibilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytensor.tensor as pt
from pymc.logprob.utils import replace_rvs_by_values
from pytensor.graph.basic import Variable
from pytensor.graph.replace import graph_replace, vectorize_graph
from pytensor.graph.traversal import ancestors
from pytensor.tensor.random.op import RandomVariable

from pm_em.analysis import ModelStructure, ParamSpec, Term
from pm_em.chains import ChainSpec
from pm_em.chunks.statistic import additive
from pm_em.collapse import latent_mask, plan_collapse, vectorize_collapsed
from pm_em.compile import evaluate_once
from pm_em.latents import LatentSpec
from pm_em.mstep import ResponsibilityInputs
from pm_em.rewrites import split_advanced_indexing

__all__ = ["ChainUse", "ClosedFormContext", "ClosedFormUpdate", "Selection", "TermEntries"]

# Two independent random draws must both be reproduced exactly by a selection.
_SELECTION_TRIALS = 2


@dataclass(frozen=True)
class ClosedFormUpdate:
    """The exact maximizer of Q over a block of parameters, given the others.

    Attributes
    ----------
    params : list of ParamSpec
        The block.
    new_values : list of Variable
        Each parameter's new value on its value (unconstrained) space.
    family : str
        Which rule produced it (for reports and tests).
    """

    params: list[ParamSpec]
    new_values: list[Variable]
    family: str


@dataclass
class TermEntries:
    """A log-probability term seen entry by entry under each latent configuration.

    Attributes
    ----------
    term : Term
    rv : Variable
        The model variable whose log-probability the term is.
    weights : Variable
        Responsibilities ``(K, J)``: the posterior probability of configuration ``k``
        for entry ``j`` (``K = 1`` for a term free of latents).
    latent : LatentSpec or None
        The single latent the term depends on.
    batch_shape : tuple of int
        Shape of the term (its entries, ``J = prod(batch_shape)``).
    """

    term: Term
    rv: Variable
    weights: Variable
    latent: LatentSpec | None
    batch_shape: tuple[int, ...]

    @property
    def n_configs(self) -> int:
        return 1 if self.latent is None else self.latent.n_support

    @property
    def n_entries(self) -> int:
        return int(np.prod(self.batch_shape, dtype=int))


@dataclass(frozen=True)
class ChainUse:
    """A Markov chain's own term seen through the E-step's results.

    Attributes
    ----------
    chain : ChainSpec
    transition_counts : Variable
        Expected transition counts per sequence, ``(B, K, K)``.
    log_initial_weights : Variable
        Log posterior of each sequence's first state, ``(B, K)``.
    """

    chain: ChainSpec
    transition_counts: Variable
    log_initial_weights: Variable


@dataclass(frozen=True)
class Selection:
    """An expression that picks elements of some parameters (and constants).

    Attributes
    ----------
    ids : np.ndarray
        ``(K, J, *core)``: flat index into the concatenated parameters of the element
        each entry equals, or -1 where the entry is a constant.
    constants : np.ndarray
        Same shape: the constant's value where ``ids == -1``.
    params : list of ParamSpec
    """

    ids: np.ndarray
    constants: np.ndarray
    params: list[ParamSpec]

    def per_config(self) -> np.ndarray | None:
        """``ids`` without the entry axis when every entry picks the same elements
        under a configuration (``mu[z]``, a shared ``sigma``), else None."""
        if (self.ids == self.ids[:, :1]).all():
            return self.ids[:, 0]
        return None


class ClosedFormContext:
    """Shared state of the closed-form rules while the M-step graph is built.

    Parameters
    ----------
    structure : ModelStructure
    responsibilities : ResponsibilityInputs
        Per component, the E-step's results as input placeholders (or, with the same
        attributes, as graphs): ``log q(g)`` ``(Kg,)``, per element group ``log W``
        ``(Kg, Ke, n)``, and a chain's expected transition counts ``(B, K, K)``.
    """

    def __init__(self, structure: ModelStructure, responsibilities: ResponsibilityInputs):
        self.structure = structure
        self.model = structure.model
        self.params = {p.name: p for p in structure.params}
        #: Param name -> its latest value (value space) as a graph.
        self.current: dict[str, Variable] = {p.name: p.value for p in structure.params}
        self.claimed: set[str] = set()
        self._terms = {t.name: t for t in structure.terms}
        self._placement = {}
        for c, comp in enumerate(structure.components):
            for t in comp.global_terms:
                self._placement[t.name] = (c, None, None)
            for j, group in enumerate(comp.groups):
                for t, owner in group.terms:
                    self._placement[t.name] = (c, j, owner)
        self._log_q = responsibilities.log_q_global
        self._log_w = responsibilities.log_w_groups
        self._chains = {}
        for c, comp in enumerate(structure.components):
            if comp.chain is not None:
                self._chains[comp.chain_term.name] = ChainUse(
                    chain=comp.chain,
                    transition_counts=responsibilities.transition_counts[c],
                    log_initial_weights=_first_steps(self._log_w[c][0], comp.chain),
                )
        self._users = {
            p.name: [
                t for t in structure.terms if t.name != p.name and p.value in ancestors([t.logp])
            ]
            for p in structure.params
        }

    # -- where parameters are used -----------------------------------------------

    def users(self, param: ParamSpec) -> list[Term]:
        """Terms other than ``param``'s own prior whose log-probability involves it."""
        return self._users[param.name]

    def rv_of(self, term: Term) -> Variable:
        return self.model[term.name]

    def param_of(self, var: Variable) -> ParamSpec | None:
        """The parameter whose random variable ``var`` is, if any."""
        for p in self.structure.params:
            if p.rv is var:
                return p
        return None

    def entries(self, term: Term) -> TermEntries | None:
        """The term's entries with their responsibilities, or None when the term's
        latents are not enumerated on their own (joint latents, globals mixed with
        element latents). Entries free of the latent weigh 1 under the first
        configuration (they are the same under all)."""
        rv = self.rv_of(term)
        if term.name in self._chains:
            return None  # a chain's own term: see chain_use
        if not term.latents:
            shape = term.shape
            size = int(np.prod(shape, dtype=int))
            return TermEntries(term, rv, pt.ones((1, size)), None, shape)
        c, j, owner = self._placement[term.name]
        comp = self.structure.components[c]
        if len(comp.latents) != 1:
            return None
        (latent,) = comp.latents
        if j is None:
            shape = term.shape
            size = int(np.prod(shape, dtype=int))
            weights = pt.broadcast_to(pt.exp(self._log_q[c])[:, None], (latent.n_support, size))
            return TermEntries(term, rv, weights, latent, shape)
        weights = pt.exp(self._log_w[c][j][0])  # (K, n): no globals in this component
        flat_owner = owner.ravel()
        if not (flat_owner.size == latent.size and (flat_owner == np.arange(latent.size)).all()):
            weights = weights[:, pt.constant(np.maximum(flat_owner, 0))]
        if (flat_owner < 0).any():
            # Entries free of the latent (observed rows beside imputed ones) are the
            # same under every configuration: all their weight on the first one.
            free = pt.constant((flat_owner < 0)[None, :])
            first = pt.constant((np.arange(latent.n_support) == 0)[:, None].astype("float64"))
            weights = pt.switch(free, first, weights)
        return TermEntries(term, rv, weights, latent, owner.shape)

    def chain_use(self, term: Term) -> ChainUse | None:
        """For a Markov chain's own term: the chain and its expected counts."""
        return self._chains.get(term.name)

    # -- graphs at the current point ---------------------------------------------

    def evaluate(self, expr: Variable) -> Variable:
        """``expr`` (a graph of model variables) at the current point: parameters at
        their latest values, observed variables at their data, latents at their
        value variables."""
        (graph,) = split_advanced_indexing(self.model.replace_rvs_by_values([expr]))
        replace = {
            p.value: self.current[p.name]
            for p in self.structure.params
            if self.current[p.name] is not p.value
        }
        return graph_replace(graph, replace, strict=False) if replace else graph

    def constrained(self, param: ParamSpec) -> Variable:
        """A parameter's latest value on its constrained space."""
        return self.evaluate(param.rv)

    def table(self, expr: Variable, entries: TermEntries, core_shape=()) -> Variable:
        """``expr`` at the current point per configuration and entry:
        ``(K or 1, J, *core_shape)``."""
        graph = self.evaluate(expr)
        latent = entries.latent
        if latent is not None and latent.value in ancestors([graph]):
            graph = _per_configuration(graph, latent)
            leading = latent.n_support
        else:
            graph = graph[None]
            leading = 1
        full = (leading, *entries.batch_shape, *core_shape)
        graph = pt.broadcast_to(graph, full)
        if len(entries.batch_shape) != 1:
            graph = graph.reshape((leading, entries.n_entries, *core_shape))
        # Python float literals can be float32 constants: compute in float64.
        return graph.astype("float64") if graph.dtype == "float32" else graph

    def value_table(self, entries: TermEntries, core_shape=()) -> Variable:
        """The term's variable per configuration and entry: its data when observed,
        the support values when it is the latent, the latest value for a parameter."""
        return self.table(entries.rv, entries, core_shape)

    def set_value(self, param: ParamSpec, constrained_value: Variable) -> Variable:
        """Record a block's new value (given on the constrained space); returns it on
        the value space."""
        value = constrained_value.reshape(param.shape).astype(param.rv.type.dtype)
        if param.transform is not None:
            args = [self.evaluate(a) for a in param.rv.owner.inputs]
            value = param.transform.forward(value, *args)
        value = pt.as_tensor_variable(value).astype(param.value.type.dtype)
        self.current[param.name] = value
        return value

    # -- structural tests ---------------------------------------------------------

    def constant(self, expr: Variable) -> np.ndarray | None:
        """The value of ``expr`` when it depends on no free variable, else None."""
        (graph,) = self.model.replace_rvs_by_values([expr])
        free = {v for v in self.model.value_vars}
        if free & set(ancestors([graph])):
            return None
        (value,) = evaluate_once([], [graph], [])
        return np.asarray(value, dtype=float)

    def selection(
        self,
        expr: Variable,
        params: list[ParamSpec],
        entries: TermEntries,
        core_shape=(),
        positive: bool = False,
    ) -> Selection | None:
        """Whether ``expr`` only picks elements of ``params`` (and constants) for each
        configuration and entry; its index table if so.

        Tested by evaluating it with the parameters replaced by distinct codes and by
        random values: a selection reproduces them exactly (sums, scalings and other
        transformations do not). With ``positive=True`` the random values are
        positive, for expressions that are selections on a positive domain only
        (``(|tau| ** -0.5) ** -2`` is ``tau`` for ``tau > 0``).
        """
        holders = {p.rv: p.rv.type(f"{p.name}_probe") for p in params}
        # The probes take the parameters' place as their value variables do, in one
        # replacement: a graph_replace of the parameters first clones the latent's
        # own graph when an index shares a constant with it (the None of
        # mu[z, None] is also the size of the Dirichlet above z), and the clone
        # would escape the replacement of the latent by its value.
        rvs_to_values = {**self.model.rvs_to_values, **holders}
        rvs_to_transforms = {
            rv: t for rv, t in self.model.rvs_to_transforms.items() if rv not in holders
        }
        (graph,) = replace_rvs_by_values(
            [expr], rvs_to_values=rvs_to_values, rvs_to_transforms=rvs_to_transforms
        )
        (graph,) = split_advanced_indexing([graph])
        if _draws_randomly(graph):
            # A model variable left as it is: the probes would see random draws of
            # it, not its value. Not recognized; the numeric M-step applies.
            return None
        latent = entries.latent
        allowed = {latent.value} if latent is not None else set()
        if ({v for v in self.model.value_vars} - allowed) & set(ancestors([graph])):
            return None
        if latent is not None and latent.value in ancestors([graph]):
            graph = vectorize_graph(graph, replace={latent.value: _support_stack(latent)})
        else:
            graph = graph[None]
        # Always one row per configuration: the ids are paired with the weights.
        leading = entries.n_configs
        full = (leading, *entries.batch_shape, *core_shape)
        try:
            pt.broadcast_to(graph, full)
        except ValueError:  # static shapes that cannot broadcast: not this pattern
            return None
        # The probes are evaluated and checked on the graph as it is, broadcast to the
        # entries only at the end (as views): ``p=w`` is (1, K) per probe instead of
        # a K x n x K table, which at n = 1e6 cost gigabytes at build time.
        sizes = [int(np.prod(p.shape, dtype=int)) for p in params]
        total = sum(sizes)
        if total == 0:
            return None
        rng = np.random.default_rng(20081)
        # Two codings one apart tell parameter entries (which follow the code) from
        # constants (which do not); random draws then check nothing else happens.
        codes = np.arange(1.0, total + 1.0)
        draws = [
            rng.uniform(0.5, 2.0, size=total) if positive else rng.normal(size=total)
            for _ in range(_SELECTION_TRIALS)
        ]
        # Each probe as the parameters' own dtype holds it (float32 under
        # floatX="float32"), so that an exact selection reproduces it exactly.
        probes = [_representable(p, params, sizes) for p in (codes, codes + 1.0, *draws)]
        outputs = []
        for probe in probes:
            split = np.split(probe, np.cumsum(sizes)[:-1])
            outputs.append(
                graph_replace(
                    graph,
                    {
                        holders[p.rv]: pt.constant(v.reshape(p.shape).astype(p.rv.type.dtype))
                        for p, v in zip(params, split)
                    },
                    strict=False,
                )
            )
        try:
            values = [np.asarray(v, dtype=float) for v in evaluate_once([], outputs, [])]
        except Exception:  # noqa: BLE001 - any failure means "not a selection"
            return None
        if not values or any(v.shape != values[0].shape for v in values):
            return None
        code_tol, draw_tol = _exactness(graph.dtype, total)
        coded, shifted = values[0], values[1]
        step = shifted - coded
        is_param = np.isclose(step, 1.0, rtol=0, atol=code_tol)
        if not (is_param | np.isclose(step, 0.0, rtol=0, atol=code_tol)).all():
            return None
        ids = np.where(is_param, np.rint(coded).astype(np.int64) - 1, -1)
        constants = np.where(is_param, 0.0, coded)
        if not np.allclose(coded[is_param], ids[is_param] + 1, rtol=0, atol=code_tol):
            return None
        if (ids >= total).any() or (ids[is_param] < 0).any():
            return None
        for probe, value in zip(probes[2:], values[2:]):
            expected = np.where(ids >= 0, probe[np.maximum(ids, 0)], constants)
            if not np.allclose(value, expected, rtol=draw_tol, atol=draw_tol):
                return None
        try:
            ids, constants = (np.broadcast_to(a, full) for a in (ids, constants))
        except (ValueError, TypeError):  # shapes that do not broadcast: not this pattern
            return None
        shape = (leading, entries.n_entries, *core_shape)
        return Selection(
            ids=ids.reshape(shape), constants=constants.reshape(shape), params=list(params)
        )


def _draws_randomly(graph: Variable) -> bool:
    """Whether ``graph`` still contains a random variable (one that was not replaced
    by its value variable)."""
    return any(
        v.owner is not None and isinstance(v.owner.op, RandomVariable) for v in ancestors([graph])
    )


def _exactness(dtype: str, total: int) -> tuple[float, float]:
    """Tolerances of the selection test: on the coded probes (absolute, codes up to
    ``total``) and on the random ones (relative and absolute).

    float64's are fixed. A float32 graph (``floatX="float32"``) reproduces a
    selection only up to its own rounding (``(tau ** -0.5) ** -2`` is ``tau`` to a
    few ulps): some ulps of float32's epsilon then, still far too tight for any real
    transformation to pass.
    """
    eps = np.finfo(dtype).eps if np.issubdtype(dtype, np.floating) else 0.0
    if eps <= np.finfo(np.float64).eps:
        return 1e-9, 1e-12
    return 64 * eps * total, 64 * eps


def _representable(probe: np.ndarray, params: list[ParamSpec], sizes: list[int]) -> np.ndarray:
    """``probe`` (float64, the parameters' entries concatenated) rounded to each
    parameter's dtype; unchanged for float64 parameters."""
    pieces = np.split(probe, np.cumsum(sizes)[:-1])
    return np.concatenate(
        [piece.astype(p.rv.type.dtype).astype(float) for p, piece in zip(params, pieces)]
    )


def _first_steps(log_w: Variable, chain: ChainSpec) -> Variable:
    """A chain's ``log W`` ``(1, K, n)`` at the first step of each sequence, ``(B, K)``."""
    # A reshape, not a strided slice: PyTensor 2.38's local_subtensor_of_expand_dims
    # rewrite fails on ``w[0, :, ::T]`` of the fused graph.
    per_sequence = log_w[0].reshape((chain.n_states, chain.n_sequences, chain.n_steps))
    return per_sequence[:, :, 0].T


def _per_configuration(graph: Variable, latent: LatentSpec) -> Variable:
    """``graph`` once per support value of ``latent`` (leading axis), evaluated with a
    broadcastable stand-in where that is exact (``sigma[z]`` gives ``(K, 1)``, not a
    ``(K, n)`` gather; see :mod:`pm_em.collapse`), else with the latent's full copy
    per support value."""
    plan = plan_collapse(graph, {latent.value: latent_mask(latent.shape)})
    if latent.value in plan.standins:
        column = pt.constant(latent.support.astype(latent.value.type.dtype))
        standin = column.reshape((latent.n_support,) + (1,) * len(latent.shape))
        try:
            return vectorize_collapsed(graph, plan, {latent.value: standin})
        except (NotImplementedError, TypeError, ValueError):
            pass
    return vectorize_graph(graph, replace={latent.value: _support_stack(latent)})


def _support_stack(latent: LatentSpec) -> Variable:
    """The latent's value once per support value, ``(K, *latent.shape)``."""
    column = pt.constant(latent.support.astype(latent.value.type.dtype))
    column = column.reshape((latent.n_support,) + (1,) * len(latent.shape))
    return pt.broadcast_to(column, (latent.n_support, *latent.shape))


def scatter_sum(values: Variable, ids: np.ndarray, size: int) -> Variable:
    """Sum ``values`` ``(K, J, ...)`` into ``size`` bins by ``ids`` (same leading
    shape; -1 entries are dropped).

    When every entry of a configuration has the same id (the usual ``mu[z]``), the
    entries are summed first, so that the scatter is over ``K`` values only.
    """
    if (ids == ids[:, :1]).all():
        summed = additive(values.sum(axis=1))
        config_ids = ids[:, 0].ravel()
        keep = np.flatnonzero(config_ids >= 0)
        flat_summed = pt.broadcast_to(summed, ids[:, 0].shape).ravel()
        return pt.inc_subtensor(pt.zeros((size,))[pt.constant(config_ids[keep])], flat_summed[keep])
    flat_ids = ids.ravel()
    keep = np.flatnonzero(flat_ids >= 0)
    flat_values = pt.broadcast_to(values, ids.shape).ravel()[keep]
    return additive(pt.inc_subtensor(pt.zeros((size,))[pt.constant(flat_ids[keep])], flat_values))


def finite(x: Variable) -> Variable:
    """Elementwise: neither NaN nor infinite."""
    return ~pt.isnan(x) & ~pt.isinf(x)

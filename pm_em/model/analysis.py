"""Graph analysis: the model's latents, parameters, log-probability terms, and how
the latents' elements can be enumerated.

The result, a :class:`ModelStructure`, is what the enumeration and M-step builders
consume. Latents are grouped into *components* (connected through shared terms;
independent of each other given the parameters). Within a component, latents of
size one are *global* (enumerated jointly over the whole data), and the others form
*element groups*: latents whose elements line up one to one, enumerated jointly
element by element. Anything else is refused with :class:`UnsupportedModelError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pymc as pm
from pytensor.compile.sharedvalue import SharedVariable
from pytensor.graph.basic import Variable
from pytensor.graph.rewriting.utils import rewrite_graph
from pytensor.graph.traversal import ancestors
from pytensor.tensor.variable import TensorConstant

from pm_em.compile import evaluate_once
from pm_em.errors import UnsupportedModelError
from pm_em.estep.rewrites import split_advanced_indexing
from pm_em.model.chains import ChainSpec, chain_spec, is_markov_chain
from pm_em.model.connectivity import connected_labels
from pm_em.model.data import recording_reads
from pm_em.model.dependence import build_owner_graphs
from pm_em.model.initial_point import model_initial_point
from pm_em.model.latents import (
    InfiniteSupportError,
    LatentSpec,
    family_name,
    is_discrete,
    support_bounds,
)

__all__ = [
    "Component",
    "ElementGroup",
    "ModelStructure",
    "ParamSpec",
    "Term",
    "analyze_model",
]


@dataclass(frozen=True)
class ParamSpec:
    """A continuous free variable: what the M-step optimizes.

    Attributes
    ----------
    name : str
    rv : Variable
    value : Variable
        Its value variable (on the unconstrained space when it has a transform).
    transform : object or None
        PyMC's transform of the variable, if any.
    shape : tuple of int
        Constrained shape.
    value_shape : tuple of int
        Shape of the value variable (differs for e.g. simplex transforms).
    dims : tuple of str or None
    """

    name: str
    rv: Variable
    value: Variable
    transform: object
    shape: tuple[int, ...]
    value_shape: tuple[int, ...]
    dims: tuple[str, ...] | None

    @property
    def value_size(self) -> int:
        return int(np.prod(self.value_shape, dtype=int))


@dataclass
class Term:
    """One log-probability term of the model (a variable's or a potential's).

    Attributes
    ----------
    name : str
        Name of the variable (or potential) whose log-probability this is.
    logp : Variable
        Elementwise log-probability graph, in terms of value variables, no Jacobian.
    kind : str
        ``"latent"``, ``"observed"``, ``"free"`` or ``"potential"``.
    latents : set of str
        Names of the latents it depends on.
    owners : dict
        Latent name -> integer array shaped like ``logp``: flat index of the
        latent's element each entry depends on (-1: none). Only for latents of
        size > 1.
    shape : tuple of int
        Shape of ``logp`` (evaluated once: the symbolic shape may refer to the
        latents' values, which enumeration replaces).
    """

    name: str
    logp: Variable
    kind: str
    latents: set[str] = field(default_factory=set)
    owners: dict[str, np.ndarray] = field(default_factory=dict)
    shape: tuple[int, ...] = ()


@dataclass
class ElementGroup:
    """Latents of one size enumerated jointly, element by element.

    Attributes
    ----------
    latents : list of LatentSpec
    n_elements : int
    terms : list of (Term, np.ndarray)
        Each term with its owner map (flat element index, -1 where none) onto the
        group's elements.
    """

    latents: list[LatentSpec]
    n_elements: int
    terms: list[tuple[Term, np.ndarray]] = field(default_factory=list)

    @property
    def n_configs(self) -> int:
        return int(np.prod([lat.n_support for lat in self.latents], dtype=int))


@dataclass
class Component:
    """Latents that are dependent given the parameters, and their terms.

    Attributes
    ----------
    globals : list of LatentSpec
        Latents of size one, enumerated over jointly for the whole component.
    groups : list of ElementGroup
    global_terms : list of Term
        Terms that depend on the global latents only.
    chain : ChainSpec or None
        When the component is a Markov chain: the chain. Its one element group then
        holds the chain's dependents (emissions) only; the chain's own term is
        ``chain_term`` and enters through forward-backward.
    chain_term : Term or None
    """

    globals: list[LatentSpec] = field(default_factory=list)
    groups: list[ElementGroup] = field(default_factory=list)
    global_terms: list[Term] = field(default_factory=list)
    chain: ChainSpec | None = None
    chain_term: Term | None = None

    @property
    def n_global_configs(self) -> int:
        return int(np.prod([lat.n_support for lat in self.globals], dtype=int))

    @property
    def latents(self) -> list[LatentSpec]:
        return self.globals + [lat for g in self.groups for lat in g.latents]


@dataclass
class ModelStructure:
    """Everything the EM builders need to know about a model."""

    model: pm.Model
    latents: list[LatentSpec]
    params: list[ParamSpec]
    terms: list[Term]
    components: list[Component]
    n_observations: int

    @property
    def latent_free_terms(self) -> list[Term]:
        return [t for t in self.terms if not t.latents]

    @property
    def float_eps(self) -> float:
        """Machine epsilon of the parameters' values, the precision the model computes
        in: float64's, or float32's under ``floatX="float32"``. EM's rounding
        allowances scale with it (:func:`pm_em.fit.precision.loop_tolerances`).

        Not the terms' dtypes: a float64 model has float32 terms too where they
        depend on literals alone (``Uniform(0.0, 1.0)``'s density), with no rounding.
        """
        dtypes = [p.value.type.dtype for p in self.params]
        floats = [np.finfo(d).eps for d in dtypes if np.issubdtype(d, np.floating)]
        return float(max(floats, default=np.finfo(np.float64).eps))


# -- entry point -------------------------------------------------------------------


def analyze_model(model: pm.Model, latent_vars: list[str] | None = None) -> ModelStructure:
    """Find the latents, parameters and terms of ``model`` and how to enumerate them.

    Parameters
    ----------
    model : pm.Model
    latent_vars : list of str, optional
        Names of the latents. By default every discrete free variable.

    Returns
    -------
    ModelStructure

    Raises
    ------
    UnsupportedModelError
        For a latent with infinite or parameter-dependent support, a discrete free
        variable that is not a latent, imputed continuous data, or dependents that
        combine several elements of a latent.
    """
    _refuse_continuous_imputation(model)
    point = model_initial_point(model)
    latent_rvs = _select_latents(model, latent_vars)
    latents = _latent_specs(model, latent_rvs, point)
    chains = {lat.name: chain_spec(model, lat) for lat in latents if is_markov_chain(lat.rv)}
    params = _param_specs(model, latent_rvs, point)
    terms = _terms(model, latent_rvs)
    _attach_dependence(model, terms, latents, point, chains)
    components = _components(latents, terms, chains)
    n_obs = sum(int(np.size(point_value)) for point_value in observed_data(model).values())
    return ModelStructure(
        model=model,
        latents=latents,
        params=params,
        terms=terms,
        components=components,
        n_observations=max(n_obs, 1),
    )


# -- steps -------------------------------------------------------------------------


def _refuse_continuous_imputation(model: pm.Model) -> None:
    names = set(model.named_vars)
    for rv in model.free_RVs:
        base = rv.name.removesuffix("_unobserved")
        if base != rv.name and f"{base}_observed" in names and not is_discrete(rv):
            raise UnsupportedModelError(
                f"Observed variable '{base}' has missing values, which PyMC imputes as the "
                f"continuous free variable '{rv.name}'. pm_em's EM enumerates discrete "
                "latents only and does not impute continuous data. Drop the missing rows "
                "(or mask them out of the likelihood) before fitting."
            )


def _select_latents(model: pm.Model, latent_vars: list[str] | None) -> list[Variable]:
    discrete = [rv for rv in model.free_RVs if is_discrete(rv)]
    if latent_vars is None:
        return discrete
    if isinstance(latent_vars, str):
        latent_vars = [latent_vars]
    selected = []
    for name in latent_vars:
        if name not in model.named_vars:
            raise ValueError(f"latent_vars: '{name}' is not a variable of the model.")
        rv = model.named_vars[name]
        if rv not in model.free_RVs:
            raise ValueError(
                f"latent_vars: '{name}' is not a free random variable of the model "
                "(it is observed, deterministic or a potential)."
            )
        if not is_discrete(rv):
            raise ValueError(
                f"latent_vars: '{name}' is continuous; EM latents must be discrete with "
                "finite support. Continuous free variables are optimized by the M-step."
            )
        selected.append(rv)
    for rv in discrete:
        if rv not in selected:
            imputed = _imputed_from(model, rv)
            origin = (
                f" (PyMC created it to impute the missing values of '{imputed}')" if imputed else ""
            )
            raise UnsupportedModelError(
                f"'{rv.name}' is a discrete free variable{origin} but not in latent_vars. "
                "The M-step optimizes continuous variables only: add it to latent_vars."
            )
    return selected


def _imputed_from(model, rv) -> str | None:
    """The observed variable whose missing values PyMC imputes as ``rv`` (it names
    them ``<name>_unobserved``), or None."""
    if rv.name.endswith("_unobserved"):
        name = rv.name[: -len("_unobserved")]
        if name in model.named_vars and f"{name}_observed" in model.named_vars:
            return name
    return None


def _latent_specs(model, latent_rvs, point) -> list[LatentSpec]:
    free_rvs = set(model.free_RVs)
    bounds, names = [], []
    for rv in latent_rvs:
        try:
            lower, upper = support_bounds(rv.owner.op, rv.owner)
        except InfiniteSupportError:
            imputed = _imputed_from(model, rv)
            origin = (
                f" PyMC created it to impute the missing values of '{imputed}': give "
                f"'{imputed}' a finite support (pm.Truncated(..., upper=...) on its "
                "likelihood), or drop the rows where it is missing."
                if imputed
                else " Truncate it (pm.Truncated(..., upper=...)) or marginalize it by hand."
            )
            raise UnsupportedModelError(
                f"Latent '{rv.name}' ({family_name(rv)}) has infinite support, "
                f"so EM cannot enumerate it.{origin}"
            ) from None
        for bound in (lower, upper):
            # Shapes (Categorical's len(p)) are constant even when p is a free variable.
            bound = rewrite_graph(bound, include=("ShapeOpt", "canonicalize"))
            if any(a in free_rvs for a in ancestors([bound])):
                raise UnsupportedModelError(
                    f"The support of latent '{rv.name}' depends on other free variables; "
                    "EM needs a fixed, finite support. Give its bounds as constants."
                )
        bounds += [lower.min(), upper.max(), rv.shape]
        names.append(rv.name)
    values = evaluate_once([], bounds, [])
    specs = []
    for k, rv in enumerate(latent_rvs):
        lower, upper, shape = values[3 * k : 3 * k + 3]
        if not (np.isfinite(lower) and np.isfinite(upper)):
            raise UnsupportedModelError(
                f"Latent '{rv.name}' has an infinite bound, so EM cannot enumerate it. "
                "Give it finite lower and upper bounds (pm.Truncated)."
            )
        specs.append(
            LatentSpec(
                name=rv.name,
                rv=rv,
                value=model.rvs_to_values[rv],
                shape=tuple(int(s) for s in shape),
                support=np.arange(int(lower), int(upper) + 1, dtype="int64"),
                dims=model.named_vars_to_dims.get(rv.name),
            )
        )
    return specs


def _param_specs(model, latent_rvs, point) -> list[ParamSpec]:
    specs = []
    constrained = dict(zip([rv.name for rv in model.free_RVs], _constrained_shapes(model, point)))
    for rv in model.free_RVs:
        if rv in latent_rvs:
            continue
        value = model.rvs_to_values[rv]
        specs.append(
            ParamSpec(
                name=rv.name,
                rv=rv,
                value=value,
                transform=model.rvs_to_transforms.get(rv),
                shape=constrained[rv.name],
                value_shape=tuple(np.shape(point[value.name])),
                dims=model.named_vars_to_dims.get(rv.name),
            )
        )
    return specs


def _constrained_shapes(model, point) -> list[tuple[int, ...]]:
    shapes = [rv.shape for rv in model.free_RVs]
    values = evaluate_once(model.value_vars, shapes, [point[v.name] for v in model.value_vars])
    return [tuple(int(s) for s in shape) for shape in values]


def _terms(model, latent_rvs) -> list[Term]:
    terms = []
    latent_set = set(latent_rvs)
    variables = model.basic_RVs + model.potentials
    # One call for all terms: each call rewrites the whole log-probability graph.
    logps = model.logp(vars=variables, jacobian=False, sum=False)
    # beta[z, :] as beta[z]: PyTensor enumerates (vectorizes) the latter only.
    logps = split_advanced_indexing(logps)
    for var, logp in zip(variables, logps):
        if var in model.potentials:
            kind = "potential"
        elif var in model.observed_RVs:
            kind = "observed"
        elif var in latent_set:
            kind = "latent"
        else:
            kind = "free"
        # Every log-density is summed over the data downstream (the log-posterior,
        # the E-step's normalizers, Q): in float64, whatever floatX computes each
        # element in. A float32 sum over n elements rounds at ~n * 6e-8 relative,
        # which would swamp EM's convergence test; per element it is harmless. A
        # no-op (the same variable) for float64 terms.
        terms.append(Term(name=var.name, logp=logp.astype("float64"), kind=kind))
    return terms


def _attach_dependence(model, terms, latents, point, chains) -> None:
    """Fill each term's ``latents`` and ``owners`` (evaluated once), checking that no
    entry of a term combines several elements of one latent (a Markov chain's own
    term, which links consecutive states, is left to forward-backward)."""
    outputs, unpack = [], []
    for latent in latents:
        dependent = [t for t in terms if latent.value in ancestors([t.logp])]
        for t in dependent:
            t.latents.add(latent.name)
        if latent.name in chains:
            dependent = [t for t in dependent if t.name != latent.name]
        if (latent.size == 1 and latent.name not in chains) or not dependent:
            continue
        graphs = build_owner_graphs(latent.value, [t.logp for t in dependent])
        for t in dependent:
            if t.logp not in graphs.owners:
                # Depends on the latent through its shape only.
                t.latents.discard(latent.name)
                continue
            checks = graphs.checks[t.logp]
            outputs.append(graphs.owners[t.logp])
            outputs += [c.ok for c in checks]
            unpack.append((t, latent, checks))
    outputs += [t.logp.shape for t in terms]
    inputs = model.value_vars
    values = evaluate_once(inputs, outputs, [point[v.name] for v in inputs])
    for t, shape in zip(terms, values[len(values) - len(terms) :]):
        t.shape = tuple(int(s) for s in shape)
    values = values[: len(values) - len(terms)]
    position = 0
    for t, latent, checks in unpack:
        owner = np.asarray(values[position])
        oks = values[position + 1 : position + 1 + len(checks)]
        position += 1 + len(checks)
        for check, ok in zip(checks, oks):
            if not bool(ok):
                imputed = _imputed_from(model, latent.rv)
                way_out = (
                    f"'{latent.name}' holds the missing values of '{imputed}', which "
                    f"PyMC imputes: use '{imputed}' element by element, or drop the rows "
                    "where it is missing."
                    if imputed
                    else f"Marginalize '{latent.name}' by hand, or make it a scalar latent "
                    "if it acts as a whole."
                )
                raise UnsupportedModelError(
                    f"The log-probability of '{t.name}' combines several elements of the "
                    f"latent '{latent.name}' (through {check.op_name}), so its elements "
                    "cannot be enumerated independently. pm_em supports dependents whose "
                    f"every element depends on one element of '{latent.name}' (x[i] on "
                    f"z[i], mu[z], mu[z[group]]). {way_out}"
                )
        if (owner < 0).all():
            t.latents.discard(latent.name)
        else:
            t.owners[latent.name] = owner


def _components(latents: list[LatentSpec], terms: list[Term], chains) -> list[Component]:
    by_name = {lat.name: lat for lat in latents}
    index = {lat.name: i for i, lat in enumerate(latents)}
    labels = connected_labels(len(latents), ([index[n] for n in sorted(t.latents)] for t in terms))
    members: dict[int, list[LatentSpec]] = {}
    for lat, label in zip(latents, labels):
        members.setdefault(int(label), []).append(lat)

    components = []
    for group_latents in members.values():
        names = {lat.name for lat in group_latents}
        comp_terms = [t for t in terms if t.latents & names]
        chained = [lat.name for lat in group_latents if lat.name in chains]
        if chained:
            components.append(_chain_component(group_latents, comp_terms, chains[chained[0]]))
        else:
            component = _build_component(group_latents, comp_terms, by_name)
            _refuse_unenumerable_size(component)
            components.append(component)
    return components


#: Entries of the largest joint table EM will build (8 bytes each, and the E-step
#: holds a few such tables at once): beyond it, enumeration is refused up front
#: instead of failing with an allocation error deep inside PyTensor.
MAX_TABLE_ENTRIES = 10**8


def _refuse_unenumerable_size(component: Component) -> None:
    """Refuse a component whose joint enumeration would not fit in memory."""
    # math.prod on Python ints: np.prod would overflow for many binary latents.
    n_global = math.prod(int(lat.n_support) for lat in component.globals)
    for group in [None, *component.groups]:
        per_element = 1 if group is None else math.prod(int(lat.n_support) for lat in group.latents)
        if group is None:
            # A global term is tabulated per configuration and per entry.
            n_elements = max((math.prod(t.shape) for t in component.global_terms), default=1)
        else:
            n_elements = group.n_elements
        entries = n_global * per_element * n_elements
        if entries > MAX_TABLE_ENTRIES:
            names = [lat.name for lat in component.globals]
            if group is not None:
                names += [lat.name for lat in group.latents]
            raise UnsupportedModelError(
                f"The latents {names} depend on each other given the parameters, so EM "
                f"enumerates them jointly: {n_global * per_element:,} joint configurations"
                f"{'' if n_elements == 1 else f' for each of {n_elements:,} elements'}, "
                f"a table of {entries:,} entries (limit {MAX_TABLE_ENTRIES:,}). Write "
                "them as one vector latent with elementwise dependents (z[i] for x[i]) "
                "instead of separate scalar latents, reduce their supports, or "
                "marginalize some by hand."
            )


def _chain_component(latents, terms, chain: ChainSpec) -> Component:
    """A Markov chain with its dependents: one element group (the chain's states)
    whose terms are the emissions; the chain's own term is kept apart."""
    others = [lat.name for lat in latents if lat.name != chain.name]
    if others:
        raise UnsupportedModelError(
            f"The latent(s) {others} share log-probability terms with the Markov chain "
            f"'{chain.name}' (directly or through other latents). pm_em runs "
            "forward-backward on a chain whose dependents involve no other latent; "
            "marginalize the other latents by hand or make them part of the chain's "
            "state."
        )
    latent = chain.latent
    own = [t for t in terms if t.name == chain.name]
    group = ElementGroup(latents=[latent], n_elements=latent.size)
    for t in terms:
        if t.name == chain.name:
            continue
        group.terms.append((t, _group_owner(t, [latent])))
    return Component(groups=[group], chain=chain, chain_term=own[0])


def _build_component(latents, terms, by_name) -> Component:
    component = Component(globals=[lat for lat in latents if lat.size == 1])
    element = [lat for lat in latents if lat.size > 1]
    # Element latents linked through a term form one group.
    parent = {lat.name: lat.name for lat in element}

    def find(name):
        while parent[name] != name:
            name = parent[name]
        return name

    for t in terms:
        names = sorted(n for n in t.latents if n in parent)
        for other in names[1:]:
            parent[find(other)] = find(names[0])
    grouped: dict[str, list[LatentSpec]] = {}
    for lat in element:
        grouped.setdefault(find(lat.name), []).append(lat)

    for group_latents in grouped.values():
        sizes = {lat.size for lat in group_latents}
        if len(sizes) > 1:
            listed = ", ".join(f"'{lat.name}' ({lat.size})" for lat in group_latents)
            raise UnsupportedModelError(
                f"Latents {listed} feed the same terms but have different numbers of "
                "elements; pm_em enumerates linked latents element by element and needs "
                "them aligned one to one."
            )
        group = ElementGroup(latents=group_latents, n_elements=sizes.pop())
        names = {lat.name for lat in group_latents}
        for t in terms:
            if not (t.latents & names):
                continue
            group.terms.append((t, _group_owner(t, group_latents)))
        component.groups.append(group)

    element_names = {lat.name for lat in element}
    component.global_terms = [t for t in terms if not (t.latents & element_names)]
    return component


def _group_owner(term: Term, latents: list[LatentSpec]) -> np.ndarray:
    owners = [term.owners[lat.name] for lat in latents if lat.name in term.owners]
    combined = owners[0]
    for owner, lat in zip(owners[1:], latents[1:]):
        clash = (combined >= 0) & (owner >= 0) & (combined != owner)
        if clash.any():
            raise UnsupportedModelError(
                f"The log-probability of '{term.name}' links element {int(combined[clash][0])} "
                f"of one latent with element {int(owner[clash][0])} of '{lat.name}'; pm_em "
                "enumerates linked latents element by element and needs them aligned one "
                "to one (z2[i] depending on z1[i])."
            )
        combined = np.maximum(combined, owner)
    return combined


def observed_data(model: pm.Model) -> dict[str, np.ndarray]:
    """Each observed variable's current data, by name.

    The data are a constant, a ``pm.Data`` shared variable (read its current value),
    or a graph of one (PyMC casts float data of a discrete likelihood to its integer
    type), evaluated once.
    """
    data = {}
    for rv in model.observed_RVs:
        value = model.rvs_to_values[rv]
        if isinstance(value, TensorConstant):
            data[rv.name] = np.asarray(value.data)
        elif isinstance(value, SharedVariable):
            data[rv.name] = np.asarray(value.get_value())
        else:
            # Read for counting, not for deciding the routine's structure.
            with recording_reads(enabled=False):
                data[rv.name] = np.asarray(evaluate_once([], [value], [])[0])
    return data

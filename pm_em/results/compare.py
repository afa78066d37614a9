"""EM estimates beside MCMC posteriors, and EM fits beside each other.

* :func:`relabel` undoes label switching in MCMC draws: each draw's mixture components
  are permuted to best match the EM solution (an assignment problem per draw).
* :func:`compare` tabulates, per scalar parameter, the EM estimate against the
  relabelled MCMC posterior (mean, sd, HDI, the EM value's z-score, whether it lies in
  the HDI), labelled as ArviZ's ``az.summary`` labels its rows.
* :func:`compare_models` ranks EM fits of one data set by AIC, BIC or ICL
  (:mod:`pm_em.results.criteria`).

A mixture's likelihood does not change when its components are renamed, so an MCMC
sampler visits every labelling of the components, and per-component posterior
summaries (``mu[0]``) mix components. EM returns one labelling; relabelling each draw
to match it is what makes the two comparable.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import arviz as az
import numpy as np
import pandas as pd
import pymc as pm
import xarray as xr
from arviz.labels import BaseLabeller
from arviz.sel_utils import xarray_var_iter
from pytensor.graph.traversal import ancestors, apply_ancestors
from pytensor.tensor.elemwise import DimShuffle
from pytensor.tensor.random.basic import BernoulliRV, CategoricalRV
from pytensor.tensor.subtensor import AdvancedSubtensor, AdvancedSubtensor1
from scipy.optimize import linear_sum_assignment

from pm_em.model.chains import is_markov_chain
from pm_em.model.implicit import explicit_model
from pm_em.model.latents import is_discrete
from pm_em.results.criteria import CRITERIA
from pm_em.results.inference_data import em_point

__all__ = [
    "SupportAxes",
    "compare",
    "compare_models",
    "compared_names",
    "context_model",
    "reference_latents",
    "relabel",
    "support_axes",
]

SAMPLE_DIMS = ("chain", "draw")


@dataclass(frozen=True)
class SupportAxes:
    """Where a posterior variable holds one entry per value of a latent.

    Attributes
    ----------
    var_name : str
        The variable in the posterior.
    axes : tuple of int
        Its axes (counted after ``chain`` and ``draw``) that run over the latent's
        support: ``(0,)`` for ``mu`` in ``Normal(mu[z], ...)``, both axes of a Markov
        chain's transition matrix.
    bernoulli : bool
        The variable is the ``p`` of a Bernoulli latent: it stands for the vector
        ``(1 - p, p)`` over the support ``(0, 1)``, so swapping the labels maps it to
        ``1 - p``.
    """

    var_name: str
    axes: tuple[int, ...]
    bernoulli: bool = False


@dataclass(frozen=True)
class _Latent:
    """A latent of the EM result, as the MCMC posterior may hold it."""

    #: ``lp_<name>`` holds its responsibilities (the observed variable's name for
    #: an observed mixture's implicit labels).
    name: str
    support: np.ndarray
    #: Posterior variables holding its values (``z``; ``x_component``).
    label_names: tuple[str, ...]

    @property
    def responsibility_name(self) -> str:
        return f"lp_{self.name}"

    @property
    def variable_names(self) -> tuple[str, ...]:
        return (*self.label_names, self.responsibility_name)


# -- the latents and the variables they index ----------------------------------------


def reference_latents(reference: xr.Dataset) -> list[_Latent]:
    """Every latent of an EM result: a ``lp_<name>`` variable whose last dim is
    ``lp_<name>_dim`` (its support values as coordinates)."""
    latents = []
    for var_name, values in reference.data_vars.items():
        if not var_name.startswith("lp_") or values.dims[-1:] != (f"{var_name}_dim",):
            continue
        name = var_name[3:]
        labels = tuple(n for n in (name, f"{name}_component") if n in reference)
        latents.append(_Latent(name, np.asarray(reference[f"{var_name}_dim"].values), labels))
    return latents


def _core_shape(posterior: xr.Dataset, var_name: str) -> tuple[int, ...]:
    return tuple(posterior[var_name].shape[len(SAMPLE_DIMS) :])


def _upstream_free_rvs(variable, free_rvs: set) -> list:
    """The free random variables ``variable`` is computed from, not looking through
    them (``mu[z]`` -> ``mu``, ``z``; not ``mu``'s own hyper-parameters)."""
    return [v for v in ancestors([variable], blockers=free_rvs) if v in free_rvs]


def _graph_support_axes(model: pm.Model, latents: list[_Latent], shapes: dict) -> dict:
    """Latent name -> its :class:`SupportAxes`, read from the model graph.

    The rule: a continuous free variable is indexed by latent ``z`` along axis ``i``
    when it enters (directly or through other operations, e.g. a Cholesky factor
    assembled from it) an array indexed by ``z`` at position ``i`` (``mu[z]``,
    ``chol[z]``, ``beta[z1, z2]``) and its axis ``i`` has as many entries as ``z`` has
    values. The latent's own probabilities run over the support too: the last axis
    of a Categorical's ``p``, both last axes of a Markov chain's transition matrix
    and the last axis of its initial Categorical's ``p``, and a Bernoulli's ``p``
    when it is a free variable itself.
    """
    explicit = explicit_model(model)
    graph = explicit.model
    free_rvs = set(graph.free_RVs)
    continuous = {rv for rv in free_rvs if not is_discrete(rv) and rv.name in shapes}
    latent_rvs = {}
    for latent in latents:
        graph_name = explicit.labels.get(latent.name, latent.name)
        rv = graph.named_vars.get(graph_name)
        if rv is None or rv not in free_rvs or not is_discrete(rv):
            raise ValueError(
                f"The model has no latent '{graph_name}', which the EM result has "
                f"('{latent.responsibility_name}'). Pass the model given to find_MAP, "
                "with the latent written out (not a model where it is marginalized)."
            )
        latent_rvs[rv] = latent

    found: dict[str, dict[str, SupportAxes]] = {latent.name: {} for latent in latents}

    def add(latent, param, axes, bernoulli=False):
        shape = shapes[param.name]
        axes = tuple(a % len(shape) for a in axes) if shape else ()
        if bernoulli:
            if len(latent.support) != 2:
                return
        elif not axes or any(shape[a] != len(latent.support) for a in axes):
            return
        previous = found[latent.name].get(param.name)
        if previous is not None:
            axes = tuple(sorted(set(previous.axes) | set(axes)))
        found[latent.name][param.name] = SupportAxes(param.name, axes, bernoulli)

    outputs = [*graph.basic_RVs, *graph.deterministics, *graph.potentials]
    for node in apply_ancestors(outputs):
        if isinstance(node.op, AdvancedSubtensor | AdvancedSubtensor1):
            base, *indices = node.inputs
            params = [p for p in _upstream_free_rvs(base, free_rvs) if p in continuous]
            for position, index in enumerate(indices):
                for rv in _upstream_free_rvs(index, free_rvs):
                    if rv in latent_rvs:
                        for param in params:
                            if len(shapes[param.name]) > position:
                                add(latent_rvs[rv], param, (position,))
    for rv, latent in latent_rvs.items():
        node = rv.owner
        if isinstance(node.op, CategoricalRV):
            (p,) = node.op.dist_params(node)
            for param in _upstream_free_rvs(p, free_rvs):
                if param in continuous and shapes[param.name]:
                    add(latent, param, (-1,))
        elif isinstance(node.op, BernoulliRV):
            (p,) = node.op.dist_params(node)
            # Only p itself (broadcast to the latent's shape): 1 - p is its swap.
            while p.owner is not None and isinstance(p.owner.op, DimShuffle):
                p = p.owner.inputs[0]
            if p in continuous and shapes[p.name] == ():
                add(latent, p, (), bernoulli=True)
        elif is_markov_chain(rv):
            transition, _, initial_dist, *_ = node.inputs
            for param in _upstream_free_rvs(transition, free_rvs):
                if param in continuous and len(shapes[param.name]) >= 2:
                    add(latent, param, (-2, -1))
            if isinstance(getattr(initial_dist.owner, "op", None), CategoricalRV):
                (p,) = initial_dist.owner.op.dist_params(initial_dist.owner)
                for param in _upstream_free_rvs(p, free_rvs):
                    if param in continuous and shapes[param.name]:
                        add(latent, param, (-1,))
    return {name: list(axes.values()) for name, axes in found.items()}


def _dims_support_axes(
    posterior: xr.Dataset, latents: list[_Latent], component_dims: Mapping | None
) -> dict:
    """Latent name -> its :class:`SupportAxes`, read from the posterior's dims.

    The rule: with ``component_dims`` (latent name -> dim or dims), every variable
    with such a dim is permuted along it. Otherwise a variable is indexed by the
    latent when its first dim (after ``chain`` and ``draw``) has the latent's
    support values as coordinates (``component = [0, 1]``, or ArviZ's default
    ``mu_dim_0 = [0, 1]`` for a model without dims).
    """
    latent_vars = {n for latent in latents for n in latent.variable_names}
    params = [n for n in posterior.data_vars if n not in latent_vars]
    found = {}
    for latent in latents:
        own_dims = set()
        for n in latent.variable_names:
            if n in posterior:
                own_dims.update(posterior[n].dims)
        found[latent.name] = []
        if component_dims is not None and latent.name in component_dims:
            dims = component_dims[latent.name]
            dims = (dims,) if isinstance(dims, str) else tuple(dims)
            for n in params:
                core = posterior[n].dims[len(SAMPLE_DIMS) :]
                axes = tuple(i for i, dim in enumerate(core) if dim in dims)
                if axes:
                    found[latent.name].append(SupportAxes(n, axes))
            continue
        ambiguous = []
        for n in params:
            core = posterior[n].dims[len(SAMPLE_DIMS) :]
            if not core or core[0] in own_dims or posterior.sizes[core[0]] != len(latent.support):
                continue
            coords = np.asarray(posterior[core[0]].values)
            if coords.dtype.kind in "iu" and np.array_equal(coords, latent.support):
                found[latent.name].append(SupportAxes(n, (0,)))
            else:
                ambiguous.append(n)
        if ambiguous and not found[latent.name]:
            raise ValueError(
                f"Cannot tell which variables are indexed by latent '{latent.name}': "
                f"{ambiguous} have a first dim of {len(latent.support)} entries whose "
                f"coordinates are not its values {latent.support.tolist()}. Pass "
                f"model= (the model given to find_MAP) or component_dims="
                f"{{'{latent.name}': <dim>}}."
            )
    return found


def context_model(model):
    return model if model is not None else pm.Model.get_context(error_if_none=False)


def support_axes(
    reference: az.InferenceData,
    posterior: xr.Dataset,
    model: pm.Model | None = None,
    component_dims: Mapping[str, str | Sequence[str]] | None = None,
) -> dict[str, list[SupportAxes]]:
    """The posterior variables indexed by each latent's support (what :func:`relabel`
    permutes).

    Parameters
    ----------
    reference : az.InferenceData
        An EM result (its ``lp_<name>`` variables name the latents).
    posterior : xr.Dataset
        The posterior whose variables are looked up.
    model, component_dims
        As in :func:`relabel`.

    Returns
    -------
    dict
        Latent name (as in ``lp_<name>``) -> list of :class:`SupportAxes`.
    """
    latents = reference_latents(em_point(reference))
    model = context_model(model)
    if component_dims is None and model is not None:
        shapes = {n: _core_shape(posterior, n) for n in posterior.data_vars}
        return _graph_support_axes(model, latents, shapes)
    return _dims_support_axes(posterior, latents, component_dims)


# -- relabelling ---------------------------------------------------------------------


def _support_first(values: np.ndarray, axes: tuple[int, ...], bernoulli: bool) -> np.ndarray:
    """Per draw, the variable as ``(n_draws, K, n_features)``: the support axis first.

    Several support axes (a transition matrix) enter by their diagonal, which keeps
    the cost of an assignment additive over components.
    """
    n_draws = values.shape[0]
    if bernoulli:
        values = np.stack([1.0 - values, values], axis=-1).reshape(n_draws, 2, -1)
        return values
    shifted = [a + 1 for a in axes]
    if len(shifted) > 1:
        values = np.diagonal(values, axis1=shifted[0], axis2=shifted[1])
        values = np.moveaxis(values, -1, 1)
    else:
        values = np.moveaxis(values, shifted[0], 1)
    return values.reshape(n_draws, values.shape[1], -1)


def _draw_permutations(
    draws: xr.Dataset, reference: xr.Dataset, variables: list[SupportAxes], n_support: int
) -> np.ndarray:
    """Per draw, the permutation ``perm`` such that the draw's component ``perm[k]``
    best matches the EM solution's component ``k``; ``(n_draws, K)``.

    The cost of matching draw component ``j`` to EM component ``k`` is the squared
    distance between their parameters, each standardized by its spread over all
    draws and components (a scale the labelling does not change).
    """
    n_draws = draws.sizes["chain"] * draws.sizes["draw"]
    cost = np.zeros((n_draws, n_support, n_support))
    for variable in variables:
        if variable.var_name not in reference:
            continue
        values = draws[variable.var_name].values.reshape(
            n_draws, *_core_shape(draws, variable.var_name)
        )
        target = reference[variable.var_name].values.reshape(
            1, *_core_shape(reference, variable.var_name)
        )
        values = _support_first(values.astype(float), variable.axes, variable.bernoulli)
        target = _support_first(target.astype(float), variable.axes, variable.bernoulli)[0]
        scale = values.std(axis=(0, 1))
        scale = np.where(scale > 0, scale, 1.0)
        # cost[s, k, j]: EM component k against the draw's component j.
        difference = (values[:, None, :, :] - target[None, :, None, :]) / scale
        cost += np.nansum(difference**2, axis=-1)
    permutations = np.empty((n_draws, n_support), dtype=int)
    for s in range(n_draws):
        _, permutations[s] = linear_sum_assignment(cost[s])
    return permutations


def _permute_axes(values: np.ndarray, permutations: np.ndarray, axes) -> np.ndarray:
    """``values`` (chain, draw, *core) with each draw's ``axes`` (counted in ``core``)
    reordered by its permutation: new entry ``k`` is the old entry ``perm[k]``."""
    n_chains, n_draws = values.shape[:2]
    n_support = permutations.shape[-1]
    for axis in axes:
        axis = axis + len(SAMPLE_DIMS)
        # (chain, draw, 1, ..., K, ..., 1): take_along_axis broadcasts the ones.
        index_shape = [n_chains, n_draws] + [1] * (values.ndim - len(SAMPLE_DIMS))
        index_shape[axis] = n_support
        index = np.moveaxis(
            permutations.reshape(n_chains, n_draws, n_support, *([1] * (values.ndim - 3))),
            2,
            axis,
        ).reshape(index_shape)
        values = np.take_along_axis(values, index, axis=axis)
    return values


def _relabel_values(
    draws: xr.Dataset,
    latent: _Latent,
    variables: list[SupportAxes],
    permutations: np.ndarray,
) -> dict[str, np.ndarray]:
    """The relabelled arrays of one latent's variables, by name."""
    n_chains, n_draws = draws.sizes["chain"], draws.sizes["draw"]
    per_draw = permutations.reshape(n_chains, n_draws, -1)
    new = {}
    for variable in variables:
        values = draws[variable.var_name].values
        if variable.bernoulli:
            # (1 - p, p) reordered: the new p is the old entry perm[1].
            swapped = per_draw[..., 1] == 0
            new[variable.var_name] = np.where(
                swapped.reshape(swapped.shape + (1,) * (values.ndim - 2)), 1.0 - values, values
            )
        else:
            new[variable.var_name] = _permute_axes(values, permutations, variable.axes)
    if latent.responsibility_name in draws:
        values = draws[latent.responsibility_name].values
        new[latent.responsibility_name] = _permute_axes(values, permutations, (values.ndim - 3,))
    # A draw's label j is the new label k with perm[k] = j.
    inverse = np.argsort(per_draw, axis=-1)
    for name in latent.label_names:
        if name not in draws:
            continue
        values = draws[name].values
        positions = np.searchsorted(latent.support, values)
        flat = positions.reshape(n_chains, n_draws, -1)
        relabelled = np.take_along_axis(inverse, flat, axis=-1).reshape(values.shape)
        new[name] = latent.support[relabelled].astype(values.dtype)
    return new


def _recompute_deterministics(model: pm.Model, posterior: xr.Dataset, changed: set) -> dict:
    """The model's Deterministics in ``posterior`` that depend on a relabelled
    variable, recomputed from the relabelled draws; those that cannot be (they depend
    on a variable the posterior does not hold, e.g. a marginalized latent) are dropped
    with a warning, as their old values would contradict the new labels."""
    free_rvs = set(model.free_RVs)
    recompute, inputs, dropped = [], [], []
    for det in model.deterministics:
        if det.name not in posterior:
            continue
        upstream = _upstream_free_rvs(det, free_rvs)
        if det.name in changed or not any(rv.name in changed for rv in upstream):
            continue
        if any(rv.name not in posterior for rv in upstream):
            dropped.append(det.name)
            continue
        recompute.append(det)
        inputs.extend(rv for rv in upstream if rv not in inputs)
    if dropped:
        warnings.warn(
            f"Deterministics {dropped} depend on relabelled variables and on variables "
            "the posterior does not hold; they are dropped from the relabelled draws.",
            UserWarning,
            stacklevel=3,
        )
    new = {name: None for name in dropped}
    if not recompute:
        return new
    function = model.compile_fn(recompute, inputs=inputs, point_fn=False, on_unused_input="ignore")
    n_chains, n_draws = posterior.sizes["chain"], posterior.sizes["draw"]
    flat_inputs = [
        posterior[rv.name].values.reshape(n_chains * n_draws, *_core_shape(posterior, rv.name))
        for rv in inputs
    ]
    outputs = [function(*(x[s] for x in flat_inputs)) for s in range(n_chains * n_draws)]
    for position, det in enumerate(recompute):
        stacked = np.stack([np.asarray(out[position]) for out in outputs])
        new[det.name] = stacked.reshape(n_chains, n_draws, *stacked.shape[1:])
    return new


def relabel(
    mcmc_idata: az.InferenceData,
    reference: az.InferenceData,
    model: pm.Model | None = None,
    *,
    component_dims: Mapping[str, str | Sequence[str]] | None = None,
) -> az.InferenceData:
    """Undo label switching in MCMC draws by matching each draw to the EM solution.

    For each latent of the EM result and each draw, the draw's components are
    permuted to minimize the squared distance, standardized per parameter element,
    between its latent-indexed parameters and the EM ones (a linear assignment
    problem, :func:`scipy.optimize.linear_sum_assignment`). The same permutation is
    applied to every latent-indexed variable of the draw, to the latent's values
    (``z``) and to its responsibilities (``lp_z``, as pymc-extras'
    ``recover_marginals`` writes them) when the posterior holds them.

    Which variables are latent-indexed:

    * **from the model graph** (``model``, or the model of the ``with`` context): a
      continuous free variable that enters an array indexed by the latent
      (``mu[z]``, ``chol[z]`` with ``chol`` assembled from ``chol_diag`` and
      ``chol_offdiag``), along the indexed axis when that axis has as many entries
      as the latent has values; and the latent's own probabilities (the last axis
      of ``w`` in ``Categorical(p=w)``, a Markov chain's transition matrix along both
      axes, a free Bernoulli ``p``, which becomes ``1 - p`` when the two labels
      swap). Deterministics that depend on relabelled variables are recomputed from
      the relabelled draws.
    * **from dims** (no model, or ``component_dims``): with ``component_dims``
      (latent name -> dim, e.g. ``{"z": "component"}``), every variable with that
      dim; otherwise every variable whose first dim has the latent's support values
      as coordinates (``component = [0, 1]``; ``mu_dim_0`` for a model without
      dims). Deterministics that do not have that dim are left as they are.

    Parameters
    ----------
    mcmc_idata : az.InferenceData
        Draws in the ``posterior`` group, e.g. from ``pm.sample`` on the model with
        the latent marginalized (``pymc_extras.marginalize``) or sampled.
    reference : az.InferenceData
        The EM result (:func:`pm_em.find_MAP`, or its Laplace fit, whose ``map``
        group is used): its parameters are the target, its ``lp_<name>`` variables
        name the latents and their support values.
    model : pm.Model, optional
        The model given to ``find_MAP``, with the latent written out. By default the
        model of the ``with`` context, if any; with neither, the dims rule applies.
    component_dims : dict, optional
        Latent name -> the dim (or dims) along which its values run; uses the dims
        rule instead of the graph.

    Returns
    -------
    az.InferenceData
        A copy of ``mcmc_idata`` with the posterior relabelled; the other groups are
        unchanged. ``mcmc_idata`` itself is not modified.

    Raises
    ------
    ValueError
        When the model has no latent the EM result names, or (dims rule) when
        variables have a first dim of the right length whose coordinates do not say
        which values they hold.

    Examples
    --------
    >>> em_idata = pm_em.find_MAP(model)  # doctest: +SKIP
    >>> trace = pm.sample(model=pymc_extras.marginalize(model, ["z"]))  # doctest: +SKIP
    >>> trace = pm_em.relabel(trace, reference=em_idata, model=model)  # doctest: +SKIP
    """
    posterior = mcmc_idata.posterior
    reference_posterior = em_point(reference)
    latents = reference_latents(reference_posterior)
    model = context_model(model)
    indexed = support_axes(reference, posterior, model, component_dims)
    updates: dict[str, np.ndarray] = {}
    current = posterior
    for latent in latents:
        variables = indexed.get(latent.name, [])
        if not variables:
            continue
        for variable in variables:
            if variable.var_name in reference_posterior and _core_shape(
                reference_posterior, variable.var_name
            ) != _core_shape(current, variable.var_name):
                raise ValueError(
                    f"'{variable.var_name}' has shape "
                    f"{_core_shape(current, variable.var_name)} in the MCMC posterior and "
                    f"{_core_shape(reference_posterior, variable.var_name)} in the EM result."
                )
        permutations = _draw_permutations(
            current, reference_posterior, variables, len(latent.support)
        )
        new = _relabel_values(current, latent, variables, permutations)
        updates.update(new)
        current = current.assign({name: (current[name].dims, v) for name, v in new.items()})
    if model is not None and updates:
        for name, values in _recompute_deterministics(model, current, set(updates)).items():
            if values is None:
                current = current.drop_vars(name)
            else:
                current = current.assign({name: (current[name].dims, values)})
    relabelled = mcmc_idata.copy()
    if updates:
        relabelled.posterior = current
    return relabelled


# -- comparison ----------------------------------------------------------------------


def compared_names(em_posterior, posterior, var_names, model, latents) -> list[str]:
    if var_names is not None:
        names = [var_names] if isinstance(var_names, str) else list(var_names)
        missing = [n for n in names if n not in em_posterior or n not in posterior]
        if missing:
            raise ValueError(
                f"var_names {missing} are not in both posteriors; the EM result has "
                f"{list(em_posterior.data_vars)}, the MCMC posterior {list(posterior.data_vars)}."
            )
        return names
    if model is not None:
        candidates = [rv.name for rv in model.free_RVs if not is_discrete(rv)]
    else:
        latent_vars = {n for latent in latents for n in latent.variable_names}
        candidates = [
            n
            for n in em_posterior.data_vars
            if n not in latent_vars
            and not n.endswith("_se")
            and np.issubdtype(em_posterior[n].dtype, np.floating)
        ]
    return [n for n in candidates if n in em_posterior and n in posterior]


def _standard_errors(em_idata: az.InferenceData, name: str) -> np.ndarray | None:
    """The EM estimate's standard errors, when the result carries them: a
    ``<name>_se`` variable in the ``fit`` group (as :func:`pm_em.results.laplace.fit_laplace`
    writes them), in the ``map`` group or in the ``posterior``."""
    for group in ("fit", "map", "posterior"):
        if group in em_idata.groups() and f"{name}_se" in em_idata[group]:
            values = em_idata[group][f"{name}_se"]
            values = values.squeeze([d for d in SAMPLE_DIMS if d in values.dims], drop=True)
            return np.asarray(values.values, dtype=float)
    return None


def _covariance_standard_errors(em_idata: az.InferenceData) -> dict[str, float]:
    """Flat label -> standard error, from a ``fit`` group's ``covariance_matrix`` with
    labelled ``rows`` (pymc-extras' Laplace layout). Only rows named like the table's
    labels (variables without a transform) are used."""
    if "fit" not in em_idata.groups() or "covariance_matrix" not in em_idata.fit:
        return {}
    covariance = em_idata.fit["covariance_matrix"]
    labels = [str(label) for label in covariance["rows"].values]
    return dict(zip(labels, np.sqrt(np.diag(covariance.values))))


def compare(
    em_idata: az.InferenceData,
    mcmc_idata: az.InferenceData,
    var_names: str | Sequence[str] | None = None,
    *,
    model: pm.Model | None = None,
    component_dims: Mapping[str, str | Sequence[str]] | None = None,
    hdi_prob: float = 0.94,
    undo_label_switching: bool = True,
) -> pd.DataFrame:
    """The EM estimate of each scalar parameter beside its MCMC posterior.

    Parameters
    ----------
    em_idata : az.InferenceData
        The EM result (:func:`pm_em.find_MAP`), or its Laplace fit
        (:func:`pm_em.results.laplace.fit_laplace`), whose ``map`` group holds the estimate
        and whose ``fit`` group the standard errors.
    mcmc_idata : az.InferenceData
        MCMC draws of the same model (``pm.sample``).
    var_names : str or list of str, optional
        Variables to compare. By default every continuous free variable of the model
        (with a model), else every floating-point variable of both posteriors other
        than the latents' responsibilities.
    model : pm.Model, optional
        The model given to ``find_MAP``; by default the ``with`` context's, if any.
        Used to find the latent-indexed variables (see :func:`relabel`) and the
        free variables.
    component_dims : dict, optional
        Passed to :func:`relabel`.
    hdi_prob : float, default 0.94
        Probability of the highest-density interval (ArviZ's default).
    undo_label_switching : bool, default True
        Relabel the draws to match the EM solution first (:func:`relabel`).

    Returns
    -------
    pandas.DataFrame
        One row per scalar, indexed as ``az.summary`` indexes (``mu[0]``, ``mu[a]``,
        ``chol_diag[1, x0]``), with columns ``em`` (the estimate), ``em_se`` (its
        standard error where the result carries one: a ``<name>_se`` variable in its
        ``fit``, ``map`` or ``posterior`` group, else NaN), ``mean``, ``sd``, the HDI
        bounds named as ArviZ names them (``hdi_3%``, ``hdi_97%``), ``r_hat`` (of
        the relabelled draws; NaN for one chain), ``z_score`` (``(em - mean) / sd``)
        and ``in_hdi``.

    Examples
    --------
    >>> table = pm_em.compare(em_idata, trace, model=model)  # doctest: +SKIP
    >>> table.loc["mu[0]", ["em", "mean", "z_score"]]  # doctest: +SKIP
    """
    if not 0 < hdi_prob <= 1:
        raise ValueError(f"hdi_prob must be in (0, 1], got {hdi_prob!r}.")
    model = context_model(model)
    if undo_label_switching:
        mcmc_idata = relabel(mcmc_idata, em_idata, model, component_dims=component_dims)
    posterior = mcmc_idata.posterior
    em_posterior = em_point(em_idata)
    latents = reference_latents(em_posterior)
    names = compared_names(em_posterior, posterior, var_names, model, latents)
    if not names:
        raise ValueError("The EM result and the MCMC posterior have no parameter in common.")

    alpha = 1.0 - hdi_prob
    lower_name = f"hdi_{100 * alpha / 2:g}%"
    upper_name = f"hdi_{100 * (1 - alpha / 2):g}%"
    draws = posterior[names]
    hdi = az.hdi(draws, hdi_prob=hdi_prob)
    if draws.sizes["chain"] > 1:
        r_hat = az.rhat(draws)
    else:
        r_hat = xr.full_like(draws.isel(chain=0, draw=0, drop=True), np.nan)
    metrics = {}
    for name in names:
        template = draws[name].isel(chain=0, draw=0, drop=True)
        em_values = em_posterior[name].values.reshape(-1, *template.shape)
        if em_values.shape[0] != 1:
            raise ValueError(
                f"'{name}' has shape {em_posterior[name].shape} in the EM result; "
                f"expected (1, 1, {', '.join(map(str, template.shape))})."
            )
        standard_errors = _standard_errors(em_idata, name)
        if standard_errors is None:
            standard_errors = np.full(template.shape, np.nan)
        stacked = np.stack(
            [
                em_values[0],
                np.broadcast_to(standard_errors, template.shape),
                draws[name].mean(SAMPLE_DIMS).values,
                draws[name].std(SAMPLE_DIMS, ddof=1).values,
                hdi[name].sel(hdi="lower").values,
                hdi[name].sel(hdi="higher").values,
                r_hat[name].values,
            ]
        )
        metrics[name] = (("metric", *template.dims), stacked.astype(float))
    columns = ["em", "em_se", "mean", "sd", lower_name, upper_name, "r_hat"]
    coords = {k: v for k, v in draws.coords.items() if k not in SAMPLE_DIMS}
    joined = xr.Dataset(metrics, coords={**coords, "metric": columns})
    labeller = BaseLabeller()
    rows, index = [], []
    for var_name, sel, isel, values in xarray_var_iter(joined, skip_dims={"metric"}):
        rows.append(values)
        index.append(labeller.make_label_flat(var_name, sel, isel))
    table = pd.DataFrame(np.asarray(rows), index=index, columns=columns)
    from_covariance = _covariance_standard_errors(em_idata)
    if from_covariance:
        known = table.index.map(lambda label: from_covariance.get(label, np.nan))
        table["em_se"] = table["em_se"].fillna(pd.Series(known, index=table.index))
    table["z_score"] = (table["em"] - table["mean"]) / table["sd"]
    table["in_hdi"] = (table["em"] >= table[lower_name]) & (table["em"] <= table[upper_name])
    return table


# -- model selection -----------------------------------------------------------------

_SELECTION_COLUMNS = (
    "log_likelihood",
    "n_params",
    "n_observations",
    "aic",
    "bic",
    "icl",
    "entropy",
)


def compare_models(fits: Mapping[str, az.InferenceData], criterion: str = "bic") -> pd.DataFrame:
    """Rank EM fits of the same data by an information criterion (lower is better).

    Parameters
    ----------
    fits : dict
        Name -> EM result (:func:`pm_em.find_MAP`), e.g. ``{"K=2": idata2, "K=3":
        idata3}``; each carries its criteria in ``posterior.attrs`` (``map.attrs``
        for a Laplace fit).
    criterion : {"aic", "bic", "icl"}, default "bic"
        What to rank by; see :mod:`pm_em.results.criteria` for the definitions (those of
        scikit-learn's ``GaussianMixture``).

    Returns
    -------
    pandas.DataFrame
        One row per fit, best first: ``rank`` (0 for the best), ``log_likelihood``,
        ``n_params``, ``n_observations``, ``aic``, ``bic``, ``icl``, ``entropy`` (NaN
        for a fit without latents) and ``d_<criterion>``, the difference to the best.

    Raises
    ------
    ValueError
        For an unknown criterion, a fit without the criteria (not from
        :func:`pm_em.find_MAP`), or fits of different numbers of observations.

    Examples
    --------
    >>> pm_em.compare_models({"K=2": idata2, "K=3": idata3}, criterion="bic")  # doctest: +SKIP
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}.")
    if not fits:
        raise ValueError("fits is empty: give at least one EM result.")
    rows = {}
    for name, idata in fits.items():
        attrs = em_point(idata).attrs
        missing = [key for key in ("log_likelihood", "n_params", criterion) if key not in attrs]
        if missing:
            raise ValueError(
                f"Fit '{name}' has no {missing} in posterior.attrs; model-selection "
                "criteria are recorded by pm_em.find_MAP."
            )
        rows[name] = {key: attrs.get(key, np.nan) for key in _SELECTION_COLUMNS}
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(_SELECTION_COLUMNS))
    n_observations = table["n_observations"].unique()
    if len(n_observations) > 1:
        raise ValueError(
            "The fits have different numbers of observations "
            f"({dict(table['n_observations'])}); criteria only rank fits of the same data."
        )
    table = table.sort_values(criterion, kind="stable")
    table.insert(0, "rank", np.arange(len(table)))
    table[f"d_{criterion}"] = table[criterion] - table[criterion].iloc[0]
    return table

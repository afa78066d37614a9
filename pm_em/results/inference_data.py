"""Assembling an EM result into arviz.InferenceData, laid out as pymc-extras'
``find_MAP`` and ``recover_marginals`` lay theirs out, so it sits beside MCMC output."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import arviz as az
import numpy as np
import pymc as pm
import xarray as xr
from pymc.backends.arviz import find_constants, find_observations

from pm_em.results.criteria import model_selection_attrs

__all__ = [
    "LaplaceFit",
    "build_chunked_inference_data",
    "build_inference_data",
    "coords_of",
    "dims_of",
    "em_point",
    "with_laplace_groups",
]


def coords_of(model: pm.Model) -> dict:
    """The model's coords that have values, as arrays."""
    return {name: np.asarray(values) for name, values in model.coords.items() if values is not None}


def dims_of(model: pm.Model, name: str, ndim: int) -> list[str]:
    """The dims of ``name``: the model's, else ``<name>_dim_<i>`` as PyMC names them."""
    dims = model.named_vars_to_dims.get(name)
    if dims is not None:
        return list(dims)
    return [f"{name}_dim_{i}" for i in range(ndim)]


def _posterior(em, point, deterministics, labels, log_resp) -> xr.Dataset:
    model = em.model
    data, dims = {}, {}
    for name, value in {**point, **deterministics}.items():
        data[name] = np.asarray(value)[None, None]
        dims[name] = dims_of(model, name, np.ndim(value))
    coords = coords_of(model)
    for lat in em.latents:
        lat_dims = dims_of(model, lat.name, len(lat.shape))
        # An observed mixture's implicit labels: lp_x for the responsibilities of x's
        # labels, x_component for the most probable component.
        observed = em.implicit_labels.get(lat.name)
        label_name = lat.name if observed is None else f"{observed}_component"
        responsibility_name = f"lp_{lat.name if observed is None else observed}"
        if observed is not None and lat.dims is None:
            lat_dims = [f"{observed}_dim_{i}" for i in range(len(lat.shape))]
        data[label_name] = labels[lat.name][None, None]
        dims[label_name] = lat_dims
        support_dim = f"{responsibility_name}_dim"
        data[responsibility_name] = log_resp[lat.name][None, None]
        dims[responsibility_name] = [*lat_dims, support_dim]
        coords[support_dim] = lat.support
    return az.dict_to_dataset(data, library=pm, coords=coords, dims=dims)


def _log_likelihood(em, pointwise) -> xr.Dataset:
    model = em.model
    data = {name: np.asarray(v)[None, None] for name, v in pointwise.items()}
    # A multivariate likelihood has one value per row: keep the batch dims only.
    dims = {name: dims_of(model, name, np.ndim(v))[: np.ndim(v)] for name, v in pointwise.items()}
    return az.dict_to_dataset(data, library=pm, coords=coords_of(model), dims=dims)


def _em_stats(histories, best, tol, max_iter, options) -> xr.Dataset:
    """The winning start's run (``logp`` per iteration, ``n_iter``, ``n_e_steps``,
    ``converged``), and every start's along ``restart`` (``restart_*``, ``logp``
    NaN-padded to the longest run)."""
    winner = histories[best]
    length = max(len(h.logp) for h in histories)
    restart_logp = np.full((len(histories), length), np.nan)
    for r, history in enumerate(histories):
        restart_logp[r, : len(history.logp)] = history.logp
    return xr.Dataset(
        {
            "logp": ("iteration", np.asarray(winner.logp)),
            "n_iter": winner.n_iter,
            "n_e_steps": winner.n_e_steps,
            "converged": winner.converged,
            "restart_logp": (("restart", "restart_iteration"), restart_logp),
            "restart_n_iter": ("restart", [h.n_iter for h in histories]),
            "restart_n_e_steps": ("restart", [h.n_e_steps for h in histories]),
            "restart_converged": ("restart", [h.converged for h in histories]),
            "restart_degenerate": ("restart", [h.collapse is not None for h in histories]),
            "restart_squarem_from": (
                "restart",
                [-1 if h.squarem_from is None else h.squarem_from for h in histories],
            ),
        },
        coords={
            "iteration": np.arange(len(winner.logp)),
            "restart": np.arange(len(histories)),
            "restart_iteration": np.arange(length),
        },
        attrs={"tol": tol, "max_iter": max_iter, "best_restart": best, **options},
    )


def _data_group(model, values: dict) -> xr.Dataset | None:
    if not values:
        return None
    dims = {name: dims_of(model, name, np.ndim(v)) for name, v in values.items()}
    return az.dict_to_dataset(
        values, library=pm, coords=coords_of(model), dims=dims, default_dims=[]
    )


def build_inference_data(em, result, *, tol, max_iter, options=None) -> az.InferenceData:
    """The InferenceData of a fit.

    Parameters
    ----------
    em : EM
    result : FitResult
        The converged point, responsibilities, pointwise log-likelihood, history.
    tol, max_iter : float, int
        Recorded in ``em_stats.attrs``.
    options : dict, optional
        Other options to record there (``init``, ``accelerate``).

    Returns
    -------
    az.InferenceData
        Groups ``posterior``, ``log_likelihood``, ``em_stats``, ``observed_data``,
        ``constant_data``. ``posterior.attrs`` holds the model-selection criteria
        (:func:`pm_em.results.criteria.model_selection_attrs`): ``log_likelihood``,
        ``n_params``, ``n_observations``, ``aic``, ``bic``, ``entropy`` and ``icl``.
    """
    model = em.model
    posterior = _posterior(em, result.point, result.deterministics, result.labels, result.log_resp)
    # AIC, BIC and ICL with scikit-learn's conventions (pm_em.results.criteria).
    posterior.attrs.update(
        model_selection_attrs(
            result.pointwise, (p.value_size for p in em.params), dict(result.log_resp)
        )
    )
    groups = {
        "posterior": posterior,
        "log_likelihood": _log_likelihood(em, result.pointwise),
        "em_stats": _em_stats(
            result.restarts or [result.history], result.best_restart, tol, max_iter, options or {}
        ),
    }
    observed = _data_group(model, find_observations(model))
    if observed is not None:
        groups["observed_data"] = observed
    constant = _data_group(model, find_constants(model))
    if constant is not None:
        groups["constant_data"] = constant
    with warnings.catch_warnings():
        # em_stats is not one of ArviZ's named groups; that is intended.
        warnings.simplefilter("ignore", UserWarning)
        return az.InferenceData(**groups)


def build_chunked_inference_data(
    em, point: dict, histories: list, best: int, *, tol, max_iter, options
) -> az.InferenceData:
    """The result of a chunked fit: the MAP point (dims and coords of the model's
    parameters) and ``em_stats`` as :func:`build_inference_data` lays them out.
    Per-row groups (responsibilities, labels, pointwise log-likelihood) are not built:
    the model holds one chunk, not the data."""
    model = em.model
    data = {name: np.asarray(value)[None, None] for name, value in point.items()}
    dims = {name: dims_of(model, name, np.ndim(value)) for name, value in point.items()}
    used = {dim for names in dims.values() for dim in names}
    coords = {dim: values for dim, values in coords_of(model).items() if dim in used}
    posterior = az.dict_to_dataset(data, library=pm, coords=coords, dims=dims)
    stats = _em_stats(histories, best, tol, max_iter, options)
    with warnings.catch_warnings():
        # em_stats is not one of ArviZ's named groups; that is intended.
        warnings.simplefilter("ignore", UserWarning)
        return az.InferenceData(posterior=posterior, em_stats=stats)


def em_point(idata: az.InferenceData) -> xr.Dataset:
    """The EM estimate in an EM result: its ``posterior`` (chain = draw = 1), or the
    ``map`` group of a Laplace fit (:func:`pm_em.results.laplace.fit_laplace`), whose
    ``posterior`` holds draws from the approximation instead."""
    groups = idata.groups()
    if "map" in groups:
        return idata.map
    if "posterior" not in groups:
        raise ValueError("idata has neither a 'posterior' nor a 'map' group: not an EM result.")
    return idata.posterior


@dataclass
class LaplaceFit:
    """What the ``fit`` group of a Laplace fit holds (pymc-extras' layout): the
    Gaussian's mean and covariance over the labelled unconstrained coordinates, each
    parameter's standard errors, and how they were computed (``attrs``)."""

    labels: list[str]
    mean: np.ndarray
    covariance: np.ndarray
    standard_errors: dict[str, np.ndarray]
    attrs: dict = field(default_factory=dict)


#: The groups a Laplace fit writes anew; the others are kept from the EM result.
_LAPLACE_GROUPS = ("posterior", "map", "fit")


def _draws_group(model, samples: dict[str, np.ndarray]) -> xr.Dataset:
    data = {name: v[None] for name, v in samples.items()}
    dims = {name: dims_of(model, name, v.ndim - 1) for name, v in samples.items()}
    return az.dict_to_dataset(data, library=pm, coords=coords_of(model), dims=dims)


def _fit_group(model, fit: LaplaceFit) -> xr.Dataset:
    labels = fit.labels
    data = {
        "mean_vector": xr.DataArray(fit.mean, dims=["rows"], coords={"rows": labels}),
        "covariance_matrix": xr.DataArray(
            fit.covariance,
            dims=["rows", "columns"],
            coords={"rows": labels, "columns": labels},
        ),
    }
    coords = coords_of(model)
    for name, se in fit.standard_errors.items():
        dims = dims_of(model, name, se.ndim)
        data[f"{name}_se"] = xr.DataArray(
            se, dims=dims, coords={d: coords[d] for d in dims if d in coords}
        )
    return xr.Dataset(data, attrs=fit.attrs)


def with_laplace_groups(
    idata: az.InferenceData, model, samples: dict[str, np.ndarray], fit: LaplaceFit
) -> az.InferenceData:
    """A copy of the EM result ``idata`` with a Laplace fit's groups: ``posterior``
    (the draws, one chain), ``map`` (the EM point, :func:`em_point`) and ``fit``.

    Parameters
    ----------
    idata : az.InferenceData
        An EM result, or a previous Laplace fit of one.
    model : pm.Model
        The model EM ran on (its coords and dims).
    samples : dict
        Variable name -> draws, leading axis the draw.
    fit : LaplaceFit
    """
    source = em_point(idata)
    groups = {name: idata[name].copy() for name in idata.groups() if name not in _LAPLACE_GROUPS}
    groups["posterior"] = _draws_group(model, samples)
    groups["map"] = source.copy(deep=True)
    groups["fit"] = _fit_group(model, fit)
    with warnings.catch_warnings():
        # map, fit and em_stats are not among ArviZ's named groups; that is intended.
        warnings.simplefilter("ignore", UserWarning)
        return az.InferenceData(**groups)

"""Assembling an EM result into arviz.InferenceData, laid out as pymc-extras'
``find_MAP`` and ``recover_marginals`` lay theirs out, so it sits beside MCMC output."""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import pymc as pm
import xarray as xr
from pymc.backends.arviz import find_constants, find_observations

__all__ = ["build_inference_data"]


def _coords(model: pm.Model) -> dict:
    return {name: np.asarray(values) for name, values in model.coords.items() if values is not None}


def _dims(model: pm.Model, name: str, ndim: int) -> list[str]:
    dims = model.named_vars_to_dims.get(name)
    if dims is not None:
        return list(dims)
    return [f"{name}_dim_{i}" for i in range(ndim)]


def _posterior(em, point, deterministics, labels, log_resp) -> xr.Dataset:
    model = em.model
    data, dims = {}, {}
    for name, value in {**point, **deterministics}.items():
        data[name] = np.asarray(value)[None, None]
        dims[name] = _dims(model, name, np.ndim(value))
    coords = _coords(model)
    for lat in em.latents:
        lat_dims = _dims(model, lat.name, len(lat.shape))
        data[lat.name] = labels[lat.name][None, None]
        dims[lat.name] = lat_dims
        support_dim = f"lp_{lat.name}_dim"
        data[f"lp_{lat.name}"] = log_resp[lat.name][None, None]
        dims[f"lp_{lat.name}"] = [*lat_dims, support_dim]
        coords[support_dim] = lat.support
    return az.dict_to_dataset(data, library=pm, coords=coords, dims=dims)


def _log_likelihood(em, pointwise) -> xr.Dataset:
    model = em.model
    data = {name: np.asarray(v)[None, None] for name, v in pointwise.items()}
    # A multivariate likelihood has one value per row: keep the batch dims only.
    dims = {name: _dims(model, name, np.ndim(v))[: np.ndim(v)] for name, v in pointwise.items()}
    return az.dict_to_dataset(data, library=pm, coords=_coords(model), dims=dims)


def _em_stats(history, tol, max_iter) -> xr.Dataset:
    return xr.Dataset(
        {
            "logp": ("iteration", np.asarray(history.logp)),
            "n_iter": history.n_iter,
            "converged": history.converged,
        },
        coords={"iteration": np.arange(len(history.logp))},
        attrs={"tol": tol, "max_iter": max_iter},
    )


def _data_group(model, values: dict) -> xr.Dataset | None:
    if not values:
        return None
    dims = {name: _dims(model, name, np.ndim(v)) for name, v in values.items()}
    return az.dict_to_dataset(values, library=pm, coords=_coords(model), dims=dims, default_dims=[])


def build_inference_data(em, result, *, tol, max_iter) -> az.InferenceData:
    """The InferenceData of a fit.

    Parameters
    ----------
    em : EM
    result : FitResult
        The converged point, responsibilities, pointwise log-likelihood, history.
    tol, max_iter : float, int
        Recorded in ``em_stats.attrs``.

    Returns
    -------
    az.InferenceData
        Groups ``posterior``, ``log_likelihood``, ``em_stats``, ``observed_data``,
        ``constant_data``.
    """
    model = em.model
    groups = {
        "posterior": _posterior(
            em, result.point, result.deterministics, result.labels, result.log_resp
        ),
        "log_likelihood": _log_likelihood(em, result.pointwise),
        "em_stats": _em_stats(result.history, tol, max_iter),
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

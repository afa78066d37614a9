"""Saying why a point is unusable, in the user's terms.

EM cannot start where the observed-data log-posterior is not finite. PyTensor would
only report a NaN or a failed parameter check deep inside a compiled graph; these
functions find the variable and the element responsible (a start value outside its
prior's support, data with NaN, an observation impossible under every latent value)
and say what to do. They run only when something is already wrong, so they favour
clarity over speed: small graphs evaluated once, without C compilation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pymc as pm
from pymc.logprob.utils import ParameterValueError
from pytensor.compile.sharedvalue import SharedVariable
from pytensor.graph.traversal import graph_inputs
from pytensor.tensor.variable import TensorConstant

from pm_em.compile import evaluate_once
from pm_em.model.analysis import observed_data

__all__ = [
    "check_observed_data",
    "check_start_values",
    "explain_nonfinite_logp",
    "first_bad_index",
    "model_or_context",
]


def model_or_context(model):
    """``model``, or the one of the ``with`` context, as PyMC resolves it; with none,
    a TypeError that says how to pass one."""
    try:
        return pm.modelcontext(model)
    except TypeError as error:
        raise TypeError(
            f"{error} pm_em needs a PyMC model: call it inside `with model:` or pass model=..."
        ) from None


def first_bad_index(array: np.ndarray, bad=None) -> tuple[tuple[int, ...], int] | None:
    """The first (C-order) index where ``bad(array)`` holds (default: not finite),
    and how many such elements there are; None when there are none."""
    array = np.asarray(array)
    mask = ~np.isfinite(array) if bad is None else bad(array)
    count = int(np.count_nonzero(mask))
    if count == 0:
        return None
    flat = int(np.flatnonzero(mask.ravel())[0])
    index = tuple(int(i) for i in np.unravel_index(flat, array.shape)) if array.ndim else ()
    return index, count


def _where(name: str, found: tuple[tuple[int, ...], int], count: bool = True) -> str:
    index, n_bad = found
    at = f"'{name}'" if not index else f"'{name}' at index {index}"
    more = f" (and {n_bad - 1} more element(s))" if count and n_bad > 1 else ""
    return at + more


def _prior_logps(em, values: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Each continuous parameter's elementwise prior log-density at ``values``."""
    free = [t for t in em.structure.terms if t.kind == "free"]
    inputs = [p.value for p in em.params]
    try:
        tables = evaluate_once(inputs, [t.logp for t in free], values)
    except ParameterValueError as error:
        # A prior whose own parameters fail PyMC's checks at this point.
        return {"<prior parameters>": error}
    return {t.name: np.asarray(v) for t, v in zip(free, tables)}


def check_start_values(em, point: Mapping[str, np.ndarray], names: Iterable[str], label: str):
    """Raise a ValueError naming the variable when a user-given start value is not a
    point EM can start from: NaN/inf, or outside the support of its prior.

    Parameters
    ----------
    em : EM
    point : dict
        The whole start (constrained space).
    names : iterable of str
        The entries the user set (only those are blamed).
    label : str
        How the user passed them (``"initvals"`` or ``"init"``), for the message.
    """
    names = list(names)
    for name in names:
        found = first_bad_index(point[name])
        if found is not None:
            raise ValueError(
                f"{label}['{name}'] contains NaN or inf ({_where(name, found)}): "
                "give finite start values."
            )
    values = em.to_values(point)
    by_name = {p.name: (p, v) for p, v in zip(em.params, values)}
    for name in names:
        param, value = by_name[name]
        if not np.all(np.isfinite(value)):
            raise ValueError(
                f"{label}['{name}'] = {np.asarray(point[name]).tolist()} is outside the "
                f"support of '{name}' ({param.rv.owner.op}): its transform "
                f"({type(param.transform).__name__}) maps it to NaN or inf. Give a value "
                "inside the support (e.g. positive for a scale, on the simplex for weights)."
            )
    priors = _prior_logps(em, values)
    for name in names:
        table = priors.get(name)
        if table is None:
            continue
        found = first_bad_index(table, bad=lambda a: ~(a > -np.inf))
        if found is not None:
            raise ValueError(
                f"{label}['{name}'] is outside the support of its prior: log-density "
                f"-inf or NaN at {_where(name, found)}. Give a value the prior allows."
            )


def _raw_data(model) -> dict[str, np.ndarray]:
    """Each observed variable's data as the user gave them: before PyMC's cast to the
    likelihood's dtype (a NaN in integer data fails in that cast)."""
    data = {}
    for rv in model.observed_RVs:
        value = model.rvs_to_values[rv]
        sources = [
            v for v in graph_inputs([value]) if isinstance(v, SharedVariable | TensorConstant)
        ]
        if len(sources) == 1:
            source = sources[0]
            raw = source.get_value() if isinstance(source, SharedVariable) else source.data
            data[rv.name] = np.asarray(raw)
    return data


def _data_problem(model) -> str | None:
    """What is wrong with the observed data (NaN or inf), or None."""
    for name, data in _raw_data(model).items():
        if not np.issubdtype(data.dtype, np.floating):
            continue
        found = first_bad_index(data, bad=np.isnan)
        if found is not None:
            return (
                f"the observed data of {_where(name, found)} are NaN. Remove those "
                "observations, or pass missing values as NaN in a NumPy array to "
                "`observed` (not through pm.Data) so PyMC imputes them; pm_em enumerates "
                "imputed values only for finite discrete likelihoods."
            )
        found = first_bad_index(data, bad=np.isinf)
        if found is not None:
            return (
                f"the observed data of {_where(name, found)} are infinite, which no "
                "likelihood allows. Remove or correct those observations."
            )
    return None


def check_observed_data(model) -> None:
    """Raise a ValueError naming the variable and element when observed data hold NaN
    or inf (possible through ``pm.set_data``), before any work is done."""
    problem = _data_problem(model)
    if problem is not None:
        raise ValueError(f"Cannot fit: {problem}")


def explain_nonfinite_logp(em, values: list[np.ndarray], logp: float) -> str:
    """Why the observed-data log-posterior ``logp`` is not finite at ``values``.

    Checked in order: the data (NaN or inf in an observed variable), the priors (a
    parameter outside its prior's support), and each observed variable's pointwise
    log-likelihood with the latents summed out (an observation impossible under every
    latent value). The first finding is described, with its variable and element.
    """
    head = f"The observed-data log-posterior is {logp} at the start"
    problem = _data_problem(em.model)
    if problem is not None:
        return f"{head}: {problem}"
    priors = _prior_logps(em, values)
    for name, table in priors.items():
        if isinstance(table, Exception):
            return f"{head}: a prior's parameters fail PyMC's checks ({table})."
        found = first_bad_index(table, bad=lambda a: ~(a > -np.inf))
        if found is not None:
            return (
                f"{head}: the start value of {_where(name, found)} is outside the "
                "support of its prior. Give start values the prior allows (initvals)."
            )
    pointwise = _pointwise(em, values)
    if isinstance(pointwise, str):
        return f"{head}: {pointwise}"
    for name, table in pointwise.items():
        found = first_bad_index(table, bad=lambda a: ~(a > -np.inf))
        if found is not None:
            latents = sorted(
                {lat for t in em.structure.terms if t.name == name for lat in t.latents}
            )
            under = (
                f"under every value of the latent(s) {latents}"
                if latents
                else "(it depends on no latent)"
            )
            data = observed_data(em.model).get(name)
            value = ""
            if data is not None and data.shape == table.shape:
                value = f" (observed value {data[found[0]].item()!r})"
            # Pieces after an impossible one are NaN (chain rule): only the first
            # index is reliable, so no count is given.
            return (
                f"{head}: the observation of {_where(name, found, count=False)}{value} has "
                f"probability 0 {under}: it lies outside the support of its likelihood. "
                "Check the data (a negative or non-integer count, a value beyond a bound, "
                "a label outside the categories); if the support depends on parameters, "
                "give start values (initvals) under which every observation is possible."
            )
    return (
        f"{head}, although every observation and prior is finite there: a Potential or "
        "the latents' own prior may be -inf (e.g. every value of a latent has "
        "probability 0). Check the model's Potentials and the latents' probabilities."
    )


def _pointwise(em, values) -> dict[str, np.ndarray] | str:
    """Pointwise log-likelihood per observed variable (latents summed out), or why it
    could not be computed."""
    try:
        paths, predictive = em.chain_outputs(values)
        labels = {}
        for lat in em.latents:
            if lat.name in paths:
                labels[lat.name] = np.asarray(paths[lat.name]).astype(lat.value.type.dtype)
            else:
                # Any valid label does: only the Deterministics depend on it.
                labels[lat.name] = np.full(lat.shape, lat.support[0], dtype=lat.value.type.dtype)
        # -inf tables give NaN pieces past the impossible observation; expected here.
        with np.errstate(invalid="ignore", divide="ignore"):
            _, pointwise = em.result_outputs(values, labels, predictive)
    except ParameterValueError as error:
        return f"a likelihood's parameters fail PyMC's checks ({error})."
    return pointwise

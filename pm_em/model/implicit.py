"""Mixture distributions as implicit latents: ``pm.NormalMixture``, ``pm.Mixture``,
``pm.ZeroInflated*``, ``pm.Hurdle*``.

These are latent-variable models with the label already summed out. EM needs the
label back: each observed mixture variable ``x`` becomes an explicit latent
``x__component ~ Categorical(w)`` and an observed variable given that label, in a
rewritten copy of the model (the user's model is not touched, and still serves
``pm.sample``). The copy has the same log-probability with the label summed out,
so EM on it is EM on the user's model.

How the observation given its label is written decides which M-step updates are in
closed form:

* one batched component (``NormalMixture``, ``Mixture(w, Normal.dist(mu, sigma))``
  with a trailing mixture axis) or a list of components of one family: the same
  family with its parameters indexed by the label, ``Normal(mu[z], sigma[z])``,
  exactly as the user would have written it (closed forms apply);
* components of different families (zero-inflation and hurdles: a ``DiracDelta`` and
  a count distribution): the mixture itself with one-hot weights, ``Mixture(w=onehot(z),
  comps)``, whose log-probability is the chosen component's (numeric M-step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pymc as pm
import pytensor.tensor as pt
from pymc.distributions.mixture import _BaseMixtureRV
from pymc.model.fgraph import (
    ModelObservedRV,
    fgraph_from_model,
    model_free_rv,
    model_from_fgraph,
    model_observed_rv,
)
from pytensor.tensor.random.op import RandomVariable

from pm_em.estep.rewrites import strip_leading_broadcast

__all__ = ["ExplicitModel", "explicit_model", "label_name"]


def label_name(observed: str) -> str:
    """Name of the explicit latent standing for ``observed``'s mixture labels."""
    return f"{observed}__component"


@dataclass
class ExplicitModel:
    """A model with every observed mixture's label written out.

    Attributes
    ----------
    model : pm.Model
        The rewritten copy (the user's model itself when it has no mixture).
    labels : dict
        Observed mixture name -> name of its label latent in ``model``.
    """

    model: pm.Model
    labels: dict[str, str] = field(default_factory=dict)


def explicit_model(model: pm.Model) -> ExplicitModel:
    """The model with observed mixture distributions' labels as explicit latents."""
    if not any(isinstance(rv.owner.op, _BaseMixtureRV) for rv in model.observed_RVs):
        return ExplicitModel(model)
    fgraph, _ = fgraph_from_model(model, inlined_views=True)
    labels = {}
    for node in list(fgraph.toposort()):
        if not isinstance(node.op, ModelObservedRV):
            continue
        rv, data, *dims = node.inputs
        if rv.owner is None or not isinstance(rv.owner.op, _BaseMixtureRV):
            continue
        name = node.outputs[0].name
        given_label = _explicit_observation(rv, data, dims, label_name(name))
        new = model_observed_rv(given_label, data, *dims)
        new.name = name
        fgraph.replace(node.outputs[0], new, import_missing=True)
        labels[name] = label_name(name)
    return ExplicitModel(model_from_fgraph(fgraph, mutate_fgraph=True), labels)


def _explicit_observation(mixture, data, dims, latent_name: str):
    """The observation given its label, and (as its ancestor) the label latent."""
    node = mixture.owner
    _, weights, *components = node.inputs
    ndim_supp = components[0].owner.op.ndim_supp
    batch_ndim = mixture.ndim - ndim_supp
    # From the data, not from the mixture: the mixture's shape is a graph of its
    # parameters, which the label's shape must not depend on.
    batch_shape = tuple(data.shape)[:batch_ndim]

    label = pm.Categorical.dist(p=weights, shape=batch_shape)
    value = label.type(name=latent_name)
    label_dims = dims[:batch_ndim] if len(dims) >= batch_ndim else []
    label = model_free_rv(label, value, None, *label_dims)
    label.name = latent_name

    same_family = all(
        isinstance(c.owner.op, RandomVariable) and type(c.owner.op) is type(components[0].owner.op)
        for c in components
    )
    if same_family:
        params = _selected_params(components, label, batch_ndim)
        if params is not None:
            return components[0].owner.op(*params)
    n_components = weights.type.shape[-1]
    if n_components is None:
        n_components = weights.shape[-1]
    one_hot = pt.eq(label[..., None], pt.arange(n_components)).astype("float64")
    return pm.Mixture.dist(w=one_hot, comp_dists=list(components))


def _selected_params(components, label, batch_ndim: int):
    """Each distribution parameter of the components, indexed by the label along the
    mixture axis: ``mu[z]`` when the parameter varies along that axis only."""
    op = components[0].owner.op
    per_component = [op.dist_params(c.owner) for c in components]
    selected = []
    for position, core_ndim in enumerate(op.ndims_params):
        if len(components) == 1:
            # PyMC broadcasts a single component's parameters to the mixture's batch
            # shape; undone, ``mu`` of shape (K,) is indexed as ``mu[z]``.
            param = strip_leading_broadcast(pt.as_tensor(per_component[0][position]))
            mixture_axis = param.ndim - core_ndim - 1
            if mixture_axis < 0:  # does not vary by component
                selected.append(param)
                continue
        else:
            try:  # stacked where each component's batch axes end
                param = pt.stack(
                    [pt.as_tensor(params[position]) for params in per_component],
                    axis=-core_ndim - 1,
                )
            except (ValueError, TypeError):  # components of unequal shapes
                return None
            mixture_axis = param.ndim - core_ndim - 1
        if mixture_axis == 0:
            selected.append(param[label])  # mu[z]: the explicit model's own pattern
            continue
        # Batched parameters: align the mixture axis after the label's batch axes.
        leading = mixture_axis
        if leading > batch_ndim:
            return None
        full_batch = tuple(label.shape) + (param.shape[mixture_axis],)
        core = tuple(param.shape)[mixture_axis + 1 :]
        padded = pt.shape_padleft(param, batch_ndim - leading)
        broadcast = pt.broadcast_to(padded, full_batch + core)
        index = label.reshape((*tuple(label.shape), 1) + (1,) * core_ndim)
        index = pt.broadcast_to(index, (*tuple(label.shape), 1, *core))
        picked = pt.take_along_axis(broadcast, index, axis=batch_ndim)
        selected.append(pt.squeeze(picked, axis=batch_ndim))
    return selected

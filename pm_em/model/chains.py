"""Markov-chain latents: a ``pymc_extras.DiscreteMarkovChain`` read off the model.

A chain's elements are not independent a priori (its log-probability links each
state to the previous one), so the element-by-element enumeration of mixtures does
not apply to its own term. Its dependents (the emissions, ``y ~ Normal(mu[s], ...)``)
still depend on one element each, and are tabulated per state exactly as a mixture's
are; the E-step then runs forward-backward over those tables
(:mod:`pm_em.estep.forward_backward`) with the chain's transition matrix and initial
distribution, which this module turns into log-space graphs of the parameters.

pymc-extras is optional: without it no model can hold such a chain, and nothing here
is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytensor.tensor as pt
from pymc.logprob.basic import logp as rv_logp
from pytensor.graph.basic import Variable
from pytensor.graph.replace import vectorize_graph

from pm_em.errors import UnsupportedModelError
from pm_em.model.latents import LatentSpec, support_bounds

__all__ = ["ChainSpec", "chain_spec", "is_markov_chain"]

try:  # pragma: no branch - which branch depends on the installation
    from pymc_extras.distributions.timeseries import DiscreteMarkovChainRV
except ImportError:  # pymc-extras not installed: no model can hold a chain
    DiscreteMarkovChainRV = None


def is_markov_chain(rv: Variable) -> bool:
    """Whether ``rv`` is a ``pymc_extras.DiscreteMarkovChain``."""
    return (
        DiscreteMarkovChainRV is not None
        and rv.owner is not None
        and isinstance(rv.owner.op, DiscreteMarkovChainRV)
    )


if DiscreteMarkovChainRV is not None:

    @support_bounds.register(DiscreteMarkovChainRV)
    def _markov_chain_bounds(op, node):
        transition = node.inputs[0]
        return pt.constant(0), transition.shape[-1] - 1


@dataclass
class ChainSpec:
    """A Markov-chain latent and the graphs forward-backward needs.

    Attributes
    ----------
    latent : LatentSpec
        The chain as a latent; its last axis is time, the others index independent
        sequences.
    n_sequences, n_steps, n_states : int
        ``B`` (the product of the batch axes, 1 for one sequence), ``T``, ``K``.
    transition : Variable
        The chain's transition matrix ``P`` as given to it, ``(*batch, K, K)`` or
        broadcastable (a graph of model variables).
    initial_dist : Variable
        The chain's initial distribution (a random variable of shape ``(*batch, 1)``).
    log_transition : Variable
        ``log P`` as a graph of the value variables, broadcast to ``(B, K, K)``.
    log_initial : Variable
        ``log p(s_0 = k)``, a graph of the value variables, ``(B, K)``.
    valid : Variable
        True when every row of ``P`` sums to one (PyMC's own check of the chain).
    """

    latent: LatentSpec
    n_sequences: int
    n_steps: int
    n_states: int
    transition: Variable
    initial_dist: Variable
    log_transition: Variable
    log_initial: Variable
    valid: Variable

    @property
    def name(self) -> str:
        return self.latent.name

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.latent.shape[:-1]


def chain_spec(model, latent: LatentSpec) -> ChainSpec:
    """Read the transition matrix and initial distribution of a chain latent.

    Parameters
    ----------
    model : pm.Model
    latent : LatentSpec
        A latent for which :func:`is_markov_chain` holds.

    Returns
    -------
    ChainSpec

    Raises
    ------
    UnsupportedModelError
        For chains of higher order (``n_lags > 1``).
    """
    node = latent.rv.owner
    if node.op.n_lags != 1:
        raise UnsupportedModelError(
            f"Markov chain '{latent.name}' has n_lags={node.op.n_lags}; pm_em's "
            "forward-backward handles first-order chains (n_lags=1). Write the chain "
            "on the product state space (K**n_lags states) to fit it by EM."
        )
    transition, _, initial_dist, _ = node.inputs
    n_states = int(latent.n_support)
    *batch, n_steps = latent.shape
    n_sequences = int(np.prod(batch, dtype=int))

    transition_rows = pt.as_tensor_variable(transition).astype("float64")
    log_transition = pt.log(pt.broadcast_to(transition_rows, (*batch, n_states, n_states)))
    valid = pt.all(pt.isclose(transition_rows.sum(axis=-1), 1.0))

    # log p(s_0 = k) for every state k: the initial distribution's own log-probability
    # (any family PyMC can evaluate), vectorized over a leading axis of states.
    placeholder = initial_dist.type()
    initial_logp = rv_logp(initial_dist, placeholder)
    states = pt.arange(n_states, dtype=placeholder.dtype)
    states = states.reshape((n_states,) + (1,) * placeholder.ndim)
    per_state = vectorize_graph(
        initial_logp,
        replace={placeholder: pt.broadcast_to(states, (n_states, *batch, 1))},
    )
    log_initial = per_state.reshape((n_states, n_sequences)).T.astype("float64")

    log_transition, log_initial, valid = model.replace_rvs_by_values(
        [log_transition.reshape((n_sequences, n_states, n_states)), log_initial, valid]
    )
    return ChainSpec(
        latent=latent,
        n_sequences=n_sequences,
        n_steps=int(n_steps),
        n_states=n_states,
        transition=transition,
        initial_dist=initial_dist,
        log_transition=log_transition,
        log_initial=log_initial,
        valid=valid,
    )

"""Count and rate likelihoods whose MAP update is a ratio of expected sums.

With ``R[k, j]`` the responsibilities, ``x`` the values and ``n`` the trials of the
entries that select parameter element ``m``:

* Poisson rate: ``(sum R x + a - 1) / (sum R + b)`` under ``Gamma(a, b)``
  (``Exponential(b)``: ``a = 1``; flat: ``a = 1, b = 0``);
* Exponential rate: ``(sum R + a - 1) / (sum R x + b)``, same priors;
* Binomial / Bernoulli probability: ``(sum R x + a - 1) / (sum R n + a + b - 2)``
  under ``Beta(a, b)`` (``Uniform(0, 1)``: ``a = b = 1``). A Bernoulli *latent*
  with its probability as a parameter (a zero-inflation or mixing weight) is the
  same case, its "values" being its support values.

Priors with a shape below 1 can put the mode on the boundary, where no finite value
is the maximizer: those fall to the numeric M-step.
"""

from __future__ import annotations

import numpy as np
import pytensor.tensor as pt
from pytensor.graph.traversal import ancestors
from pytensor.tensor.random.basic import BernoulliRV, BinomialRV, ExponentialRV, PoissonRV

from pm_em.mstep.closed_form.base import ClosedFormUpdate, finite, scatter_sum
from pm_em.mstep.closed_form.priors import prior_constants, prior_family, rate_prior

__all__ = ["binomial_probability", "exponential_rate", "poisson_rate"]


def _uses(ctx, param, op_type, position, transform=None):
    """Each term of family ``op_type`` using ``param`` only as a selection in argument
    ``position`` (after ``transform``, e.g. a reciprocal for a scale); None if any use
    of ``param`` is different."""
    uses = []
    for term in ctx.users(param):
        rv = ctx.rv_of(term)
        if rv.owner is None or not isinstance(rv.owner.op, op_type):
            return None
        args = rv.owner.inputs[2:]
        others = [a for i, a in enumerate(args) if i != position]
        if param.rv in ancestors(others):
            return None
        entries = ctx.entries(term)
        if entries is None:
            return None
        arg = args[position] if transform is None else transform(args[position])
        selection = ctx.selection(arg, [param], entries)
        if selection is None:
            return None
        uses.append((entries, args, selection))
    return uses or None


def _keep_valid(ctx, param, new, upper=None):
    current = ctx.constrained(param).ravel()
    valid = finite(new) & (new > 0)
    if upper is not None:
        valid = valid & (new < upper)
    return pt.switch(valid, new, current)


def _value_sums(ctx, uses, size):
    """Expected sum of the values and expected count per parameter element."""
    total, count = pt.zeros((size,)), pt.zeros((size,))
    for entries, _, selection in uses:
        total += scatter_sum(entries.weights * ctx.value_table(entries), selection.ids, size)
        count += scatter_sum(entries.weights, selection.ids, size)
    return total, count


def _gamma_rate(ctx, param, rv_type, posterior_mode, label, transform=None):
    """The rate's posterior mode under its Gamma (or flat) prior, from the expected
    sums of the values and counts of the ``rv_type`` terms using it."""
    prior = rate_prior(ctx, param)
    if prior is None or (prior[0] < 1).any():
        return None
    uses = _uses(ctx, param, rv_type, 0, transform=transform)
    if uses is None:
        return None
    total, count = _value_sums(ctx, uses, int(param.value_size))
    alpha, beta = (pt.constant(v) for v in prior)
    new = _keep_valid(ctx, param, posterior_mode(total, count, alpha, beta))
    return ClosedFormUpdate([param], [ctx.set_value(param, new)], label)


def _poisson_mode(total, count, alpha, beta):
    """The Gamma posterior mode of a Poisson rate: total events over exposure."""
    return (total + alpha - 1) / (count + beta)


def _exponential_mode(total, count, alpha, beta):
    """The Gamma posterior mode of an Exponential rate: events over total time."""
    return (count + alpha - 1) / (total + beta)


def poisson_rate(ctx, param) -> ClosedFormUpdate | None:
    """Closed-form update of a Poisson rate (flat, Gamma or Exponential prior)."""
    return _gamma_rate(ctx, param, PoissonRV, _poisson_mode, "poisson rate")


def exponential_rate(ctx, param) -> ClosedFormUpdate | None:
    """Closed-form update of an Exponential rate, ``Exponential(lam=rate[z])``."""
    # PyMC stores the scale, 1 / lam: the rate is its reciprocal.
    return _gamma_rate(
        ctx, param, ExponentialRV, _exponential_mode, "exponential rate", pt.reciprocal
    )


def _probability_prior(ctx, param):
    family = prior_family(param)
    if family == "beta":
        return prior_constants(ctx, param, 2)
    if family == "uniform":
        bounds = prior_constants(ctx, param, 2)
        if bounds is None or (bounds[0] != 0).any() or (bounds[1] != 1).any():
            return None
        return [np.ones(param.value_size), np.ones(param.value_size)]
    return None


def binomial_probability(ctx, param) -> ClosedFormUpdate | None:
    """Closed-form update of a Bernoulli / Binomial probability (Beta or
    Uniform(0, 1) prior), observed or latent."""
    prior = _probability_prior(ctx, param)
    if prior is None or (prior[0] < 1).any() or (prior[1] < 1).any():
        return None
    uses = []
    for term in ctx.users(param):
        rv = ctx.rv_of(term)
        if rv.owner is not None and isinstance(rv.owner.op, BernoulliRV):
            found = _uses_single(ctx, param, term, 0)
        elif rv.owner is not None and isinstance(rv.owner.op, BinomialRV):
            found = _uses_single(ctx, param, term, 1)
        else:
            return None
        if found is None:
            return None
        uses.append(found)
    if not uses:
        return None
    size = int(param.value_size)
    successes, trials = pt.zeros((size,)), pt.zeros((size,))
    for entries, args, selection, position in uses:
        n_trials = 1.0 if position == 0 else ctx.table(args[0], entries)
        successes += scatter_sum(entries.weights * ctx.value_table(entries), selection.ids, size)
        trials += scatter_sum(entries.weights * n_trials, selection.ids, size)
    alpha, beta = (pt.constant(v) for v in prior)
    new = (successes + alpha - 1) / (trials + alpha + beta - 2)
    new = _keep_valid(ctx, param, new, upper=1.0)
    return ClosedFormUpdate([param], [ctx.set_value(param, new)], "binomial probability")


def _uses_single(ctx, param, term, position):
    rv = ctx.rv_of(term)
    args = rv.owner.inputs[2:]
    if param.rv in ancestors([a for i, a in enumerate(args) if i != position]):
        return None
    entries = ctx.entries(term)
    if entries is None:
        return None
    selection = ctx.selection(args[position], [param], entries)
    if selection is None:
        return None
    return entries, args, selection, position

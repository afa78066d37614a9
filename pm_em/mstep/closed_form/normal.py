"""Normal likelihoods: location and scale parameters selected by the latent
(``Normal(mu[z], sigma[z])``, a shared ``sigma``, known scales, ...).

Given the responsibilities ``R[k, j]`` of entry ``j`` under configuration ``k``:

* location ``mu_m``: the precision-weighted mean of the entries that select it,
  ``sum R x / s^2 / sum R / s^2``, with a ``Normal(m0, s0)`` prior adding
  ``m0 / s0^2`` and ``1 / s0^2``;
* scale ``sigma_m``, from ``N = sum R`` and ``S = sum R (x - mu)^2``: ``sqrt(S / N)``
  under a flat prior; under ``HalfNormal(s)`` the root of
  ``sigma^4 / s^2 + N sigma^2 - S = 0``; under ``InverseGamma(a, b)`` the root of
  ``(N + a + 1) sigma^2 - b sigma - S = 0``; under ``HalfCauchy(b)`` the positive
  root of ``(N + 2) v^2 - (S - N b^2) v - S b^2 = 0`` in ``v = sigma^2``; under
  ``Exponential(lam)`` the positive root of ``lam sigma^3 + N sigma^2 - S = 0``
  (Newton's method from an upper bound: the cubic is convex there, so the iterates
  decrease monotonically to the root);
* precision ``tau_m`` (``Normal(mu, tau=tau[z])``): ``(N / 2 + a - 1) / (S / 2 + b)``
  under ``Gamma(a, b)`` (flat: ``a = 1, b = 0``).
"""

from __future__ import annotations

import pytensor.tensor as pt
from pytensor.graph.traversal import ancestors
from pytensor.tensor.random.basic import NormalRV

from pm_em.mstep.closed_form.base import ClosedFormUpdate, finite, scatter_sum
from pm_em.mstep.closed_form.priors import prior_constants, prior_family, rate_prior

__all__ = ["normal_location", "normal_precision", "normal_scale"]


def _normal_uses(ctx, param, position: int, precision: bool = False):
    """Each Normal term using ``param`` in argument ``position`` (0: location,
    1: scale; with ``precision``, the scale's inverse square) as a selection, and
    nowhere else; None if any use is different."""
    uses = []
    for term in ctx.users(param):
        rv = ctx.rv_of(term)
        if rv.owner is None or not isinstance(rv.owner.op, NormalRV):
            return None
        args = rv.owner.inputs[2:4]
        if param.rv in ancestors([args[1 - position]]):
            return None
        entries = ctx.entries(term)
        if entries is None:
            return None
        if precision:
            selection = ctx.selection(args[1] ** -2, [param], entries, positive=True)
        else:
            selection = ctx.selection(args[position], [param], entries)
        if selection is None:
            return None
        uses.append((entries, args, selection))
    return uses or None


def normal_location(ctx, param) -> ClosedFormUpdate | None:
    """Closed-form update of a Normal location parameter (flat or Normal prior)."""
    family = prior_family(param)
    if family not in ("normal", "flat"):
        return None
    uses = _normal_uses(ctx, param, 0)
    if uses is None:
        return None
    size = int(param.value_size)
    numerator = pt.zeros((size,))
    denominator = pt.zeros((size,))
    for entries, (_, scale), selection in uses:
        precision = ctx.table(scale, entries) ** -2
        weighted = entries.weights * precision
        numerator += scatter_sum(weighted * ctx.value_table(entries), selection.ids, size)
        denominator += scatter_sum(weighted, selection.ids, size)
    if family == "normal":
        (prior_mu, prior_sigma) = [
            pt.broadcast_to(ctx.evaluate(a), param.shape).ravel().astype("float64")
            for a in param.rv.owner.inputs[2:4]
        ]
        numerator += prior_mu / prior_sigma**2
        denominator += 1.0 / prior_sigma**2
    current = ctx.constrained(param).ravel()
    new = pt.switch(denominator > 0, numerator / denominator, current)
    return ClosedFormUpdate([param], [ctx.set_value(param, new)], "normal location")


def normal_scale(ctx, param) -> ClosedFormUpdate | None:
    """Closed-form update of a Normal scale parameter (flat, HalfNormal or
    InverseGamma prior)."""
    family = prior_family(param)
    if family == "halfflat":
        prior = None
    elif family == "halfnormal":
        prior = prior_constants(ctx, param, 2)
        if prior is None or (prior[0] != 0).any():
            return None
    elif family == "invgamma":
        prior = prior_constants(ctx, param, 2)
        if prior is None:
            return None
    elif family == "halfcauchy":
        prior = prior_constants(ctx, param, 1)
        if prior is None:
            return None
    elif family == "exponential":
        prior = prior_constants(ctx, param, 1)
        if prior is None:
            return None
    else:
        return None
    uses = _normal_uses(ctx, param, 1)
    if uses is None:
        return None
    count, squares = _residual_sums(ctx, uses, int(param.value_size))
    if family == "halfflat":
        new = pt.sqrt(squares / count)
    elif family == "halfnormal":
        prior_scale = pt.constant(prior[1])
        # Root of v^2 / s^2 + N v - S = 0 in v = sigma^2, in the cancellation-free form.
        variance = 2 * squares / (count + pt.sqrt(count**2 + 4 * squares / prior_scale**2))
        new = pt.sqrt(variance)
    elif family == "invgamma":
        alpha, beta = pt.constant(prior[0]), pt.constant(prior[1])
        lead = count + alpha + 1
        new = (beta + pt.sqrt(beta**2 + 4 * lead * squares)) / (2 * lead)
    elif family == "halfcauchy":
        beta2 = pt.constant(prior[0]) ** 2
        middle = squares - count * beta2
        lead = count + 2
        # The product of the roots is negative: exactly one is positive.
        variance = (middle + pt.sqrt(middle**2 + 4 * lead * squares * beta2)) / (2 * lead)
        new = pt.sqrt(variance)
    else:
        new = _exponential_prior_scale(pt.constant(1.0 / prior[0]), count, squares)
    current = ctx.constrained(param).ravel()
    # A scale of exactly 0 (a component on one point, no prior to stop it) is the
    # maximizer: kept, so that the collapse is seen (pm_em.fit.degenerate), not hidden.
    # An empty component (no count) leaves its scale undetermined: kept as it was.
    new = pt.switch((count > 0) & finite(new) & (new >= 0), new, current)
    return ClosedFormUpdate([param], [ctx.set_value(param, new)], "normal scale")


def _residual_sums(ctx, uses, size):
    """Expected count and sum of squared residuals per parameter element."""
    count = pt.zeros((size,))
    squares = pt.zeros((size,))
    for entries, (location, _), selection in uses:
        residual = ctx.value_table(entries) - ctx.table(location, entries)
        count += scatter_sum(entries.weights, selection.ids, size)
        squares += scatter_sum(entries.weights * residual**2, selection.ids, size)
    return count, squares


def normal_precision(ctx, param) -> ClosedFormUpdate | None:
    """Closed-form update of a Normal precision (flat, Gamma or Exponential prior)."""
    prior = rate_prior(ctx, param)
    if prior is None or (prior[0] < 1).any():
        return None
    uses = _normal_uses(ctx, param, 1, precision=True)
    if uses is None:
        return None
    count, squares = _residual_sums(ctx, uses, int(param.value_size))
    alpha, beta = (pt.constant(v) for v in prior)
    new = (count / 2 + alpha - 1) / (squares / 2 + beta)
    current = ctx.constrained(param).ravel()
    # An infinite precision (a component on one point) is the maximizer: kept, so
    # that the collapse is seen; no count leaves it undetermined.
    new = pt.switch((count > 0) & ~pt.isnan(new) & (new > 0), new, current)
    return ClosedFormUpdate([param], [ctx.set_value(param, new)], "normal precision")


_NEWTON_STEPS = 60


def _exponential_prior_scale(rate, count, squares):
    """Positive root of ``rate s^3 + count s^2 - squares = 0``.

    Both ``sqrt(squares / count)`` and ``cbrt(squares / rate)`` bound the root from
    above; from there Newton's iterates on this convex, increasing cubic decrease
    monotonically and converge (at worst by a constant factor per step far away,
    quadratically near the root).
    """
    bound = pt.minimum(
        pt.sqrt(squares / pt.maximum(count, 1e-300)), (squares / rate) ** (1.0 / 3.0)
    )
    scale = bound
    for _ in range(_NEWTON_STEPS):
        value = rate * scale**3 + count * scale**2 - squares
        slope = 3 * rate * scale**2 + 2 * count * scale
        scale = pt.switch(slope > 0, scale - value / slope, scale)
    return scale

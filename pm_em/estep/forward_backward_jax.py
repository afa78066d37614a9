"""JAX implementations of the hidden Markov chain Ops (:mod:`pm_em.estep.forward_backward`),
registered with PyTensor's JAX linker.

Importing this module registers them (:mod:`pm_em.compile` does so before compiling
with the JAX backend); it imports JAX, so nothing else imports it.

Two forms of the forward and backward recursions, same conventions as the C code
(impossible data, invalid input, ties):

* **sequential** (:func:`forward_backward_sequential`): ``jax.lax.scan`` over the steps,
  forward messages normalized at every step, backward messages shifted to a largest
  entry of 0, everything in log space. ``O(T K^2)`` work, ``T`` sequential steps: the
  right form on a CPU.
* **parallel in time** (:func:`forward_backward_parallel`): the forward messages are
  prefix products of the per-step matrices ``A_t[j, k] = log P[j, k] + log e_t(k)`` in
  the (log-sum-exp, +) semiring, which is associative, so
  ``jax.lax.associative_scan`` computes them in ``O(log T)`` depth (``O(T K^3)`` work);
  the backward messages are the suffix products. The messages are not normalized
  (each step's emissions are only shifted to a largest entry of 0): log space keeps
  them finite, at an absolute rounding error of about ``1e-16 T`` times the mean
  log-likelihood per step left after that shift. For long sequences on
  an accelerator, where the depth is what costs.

:data:`PARALLEL_MIN_STEPS` decides which one the Op uses: the parallel form when the
default JAX device is not a CPU and the chain has at least that many steps.

Viterbi is sequential (it runs once per fit, at the end).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from pytensor.link.jax.dispatch import jax_funcify

from pm_em.estep.forward_backward import (
    ForwardBackward,
    ForwardFilter,
    Viterbi,
    check_chain_shapes,
)

__all__ = [
    "PARALLEL_MIN_STEPS",
    "forward_backward_parallel",
    "forward_backward_sequential",
    "forward_filter_sequential",
    "viterbi_sequential",
]

#: Chains at least this long use the parallel-in-time form on an accelerator (GPU/TPU).
#: ``None``: never. The CPU always runs the sequential form (fewer operations).
PARALLEL_MIN_STEPS: int | None = 4096

#: Probability-space sums at least this large are exact to rounding (the C Op's
#: ``PMEM_HMM_FAST_MIN``): the terms lost to underflow are each below ``~1e-308``.
_FAST_MIN = 1e-200


def _logsumexp(x, axis):
    """Max-shifted log-sum-exp along ``axis``; ``-inf`` (never NaN) when every entry is
    ``-inf``."""
    top = jnp.max(x, axis=axis, keepdims=True)
    shift = jnp.where(jnp.isfinite(top), top, 0.0)
    total = jnp.log(jnp.sum(jnp.exp(x - shift), axis=axis, keepdims=True)) + shift
    return jnp.squeeze(total, axis=axis)


def _finite_or_zero(x):
    return jnp.where(jnp.isfinite(x), x, 0.0)


def _normalize(x):
    """Log weights normalized along the last axis, and their log normalizer; an all
    ``-inf`` row stays ``-inf``."""
    log_norm = _logsumexp(x, axis=-1)
    return x - _finite_or_zero(log_norm)[..., None], log_norm


def _checked(log_emission, log_transition, log_initial):
    """The C code's shape checks (static under JAX), the invalid-sequence mask ``(B,)``
    and the inputs with those sequences zeroed."""
    check_chain_shapes(log_emission, log_transition, log_initial)
    invalid = (
        ~jnp.all(log_emission < jnp.inf, axis=(1, 2))
        | ~jnp.all(log_transition < jnp.inf, axis=(1, 2))
        | ~jnp.all(log_initial < jnp.inf, axis=1)
    )
    log_emission = jnp.where(invalid[:, None, None], 0.0, log_emission)
    log_transition = jnp.where(invalid[:, None, None], 0.0, log_transition)
    log_initial = jnp.where(invalid[:, None], 0.0, log_initial)
    return invalid, log_emission, log_transition, log_initial


def _forward(log_emission, log_transition, log_initial):
    """Normalized forward pass: ``log_pred`` and ``log_filter`` ``(T, B, K)`` (time
    first) and ``log_norm`` ``(T, B)``."""
    emission = jnp.moveaxis(log_emission, 1, 0)
    first_filter, first_norm = _normalize(log_initial + emission[0])

    def step(prev_filter, emit):
        pred = _logsumexp(prev_filter[:, :, None] + log_transition, axis=1)
        log_filter, log_norm = _normalize(pred + emit)
        return log_filter, (pred, log_filter, log_norm)

    _, (pred, log_filter, log_norm) = jax.lax.scan(step, first_filter, emission[1:])
    return (
        jnp.concatenate([log_initial[None], pred]),
        jnp.concatenate([first_filter[None], log_filter]),
        jnp.concatenate([first_norm[None], log_norm]),
    )


def forward_backward_sequential(log_emission, log_transition, log_initial):
    """``(log_gamma, transition_counts, log_likelihood)`` by ``lax.scan`` (see
    :func:`pm_em.estep.forward_backward.forward_backward`): in probability space when that is
    exact to rounding (:func:`_forward_backward_scaled`), else in log space."""
    invalid, log_emission, log_transition, log_initial = _checked(
        log_emission, log_transition, log_initial
    )
    *scaled, exact = _forward_backward_scaled(log_emission, log_transition, log_initial)
    outputs = jax.lax.cond(
        exact,
        lambda: tuple(scaled),
        lambda: _forward_backward_log(log_emission, log_transition, log_initial),
    )
    return _conventions(invalid, *outputs)


def forward_backward_log_space(log_emission, log_transition, log_initial):
    """:func:`forward_backward_sequential` in log space throughout (the reference of
    the probability-space form, and its fallback)."""
    invalid, log_emission, log_transition, log_initial = _checked(
        log_emission, log_transition, log_initial
    )
    return _conventions(invalid, *_forward_backward_log(log_emission, log_transition, log_initial))


def _forward_backward_scaled(log_emission, log_transition, log_initial):
    """Forward-backward in probability space, with a flag saying whether that was exact.

    Why. A log-space step costs ``K**2`` exponentials and a few reductions, and
    ``lax.scan`` pays for each operation at every step: at ``T = 100_000`` that made
    the E-step several times slower than the C Op. Here each step is a ``K x K``
    matrix-vector product, a sum and a division; the exponentials and logarithms are
    taken once over whole arrays, outside the scans.

    How (Rabiner's scaling). Each step's emissions are divided by their largest
    (``e_t = exp(log e_t - max)``) and the transitions by their largest entry, and the
    forward messages are normalized at every step, ``p_t = a_t / c_t`` with
    ``a_t = (p_{t-1} P) * e_t`` and ``c_t = sum(a_t)``: nothing grows with ``T``, and
    ``log p(y)`` is the sum of the ``log c_t`` and of the shifts. The backward messages
    are divided by their largest entry at every step. Logarithms are few (one per
    step and state, for ``log_gamma``): XLA's float64 ``log`` and ``exp`` are what
    costs most once the steps are cheap.

    When it is exact. Every unnormalized entry (``a_t[k]``, the backward message
    before its division, and the product of the two messages) at least
    ``_FAST_MIN = 1e-200``: the terms that underflowed into it (each below ``~1e-308``)
    are then lost to rounding, as in the C Op's own probability-space dot products,
    and every ``log_gamma`` is as accurate as in log space. Otherwise (a state
    ``1e-200`` times less probable than another at some step, a zero probability,
    impossible data) the flag is False and the log-space recursion computes the
    result instead (:func:`jax.lax.cond` runs one of the two): exact, only slower.
    """
    fast_min = _FAST_MIN
    shift = _finite_or_zero(jnp.max(log_emission, axis=2))  # (B, T)
    emission = jnp.exp(jnp.moveaxis(log_emission - shift[:, :, None], 1, 0))  # (T, B, K)
    transition_shift = _finite_or_zero(jnp.max(log_transition, axis=(1, 2)))  # (B,)
    transition = jnp.exp(log_transition - transition_shift[:, None, None])
    initial_shift = _finite_or_zero(jnp.max(log_initial, axis=1))
    first = jnp.exp(log_initial - initial_shift[:, None]) * emission[0]
    first_norm = first.sum(axis=1)

    def forward(prev, emit):
        unnormalized = jnp.einsum("bj,bjk->bk", prev, transition) * emit
        norm = unnormalized.sum(axis=1)
        filtered = unnormalized / norm[:, None]
        return filtered, (filtered, norm)

    first_filter = first / first_norm[:, None]
    _, (filtered, norm) = jax.lax.scan(forward, first_filter, emission[1:])
    filtered = jnp.concatenate([first_filter[None], filtered])  # (T, B, K)
    norm = jnp.concatenate([first_norm[None], norm])  # (T, B)

    def backward(following, emit):
        unnormalized = jnp.einsum("bjk,bk->bj", transition, emit * following)
        top = unnormalized.max(axis=1)
        message = unnormalized / top[:, None]
        return message, (message, top)

    last = jnp.ones_like(first)
    _, (beta, top) = jax.lax.scan(backward, last, emission[1:], reverse=True)
    beta = jnp.concatenate([beta, last[None]])  # (T, B, K)

    posterior = filtered * beta  # (T, B, K), unnormalized
    exact = (
        jnp.all(filtered * norm[:, :, None] >= fast_min)
        & jnp.all(beta[:-1] * top[:, :, None] >= fast_min)
        & jnp.all(posterior >= fast_min)
    )
    n_steps = log_emission.shape[1]
    log_likelihood = (
        jnp.log(norm).sum(axis=0)
        + shift.sum(axis=1)
        + initial_shift
        + (n_steps - 1) * transition_shift
    )
    log_gamma = jnp.log(posterior / posterior.sum(axis=2, keepdims=True))
    # xi_t(j, k) = p_{t-1}(j) P[j, k] e_t(k) b_t(k) / Z_t, with
    # Z_t = sum_k a_t(k) b_t(k): one product over all steps, as in Baum-Welch.
    ahead = emission[1:] * beta[1:]
    ahead = ahead / posterior[1:].sum(axis=2, keepdims=True) / norm[1:, :, None]
    counts = jnp.einsum("tbj,tbk->bjk", filtered[:-1], ahead) * transition
    return jnp.moveaxis(log_gamma, 0, 1), counts, log_likelihood, exact


def _forward_backward_log(log_emission, log_transition, log_initial):
    """Log-space forward-backward of checked inputs, before :func:`_conventions`."""
    log_pred, log_filter, log_norm = _forward(log_emission, log_transition, log_initial)
    log_likelihood = log_norm.sum(axis=0)
    emission = jnp.moveaxis(log_emission, 1, 0)
    B, K = log_initial.shape

    def step(carry, xs):
        log_beta, counts = carry
        filt, prev_filt, pred, emit = xs
        log_gamma, _ = _normalize(filt + log_beta)
        # xi_t(j, k) = exp(filter_{t-1}(j) + log P[j, k] - pred_t(k) + log gamma_t(k))
        log_ratio = jnp.where(pred > -jnp.inf, log_gamma - _finite_or_zero(pred), -jnp.inf)
        counts = counts + jnp.exp(prev_filt[:, :, None] + log_transition + log_ratio[:, None, :])
        raw = _logsumexp(log_transition + (emit + log_beta)[:, None, :], axis=2)
        log_beta = raw - _finite_or_zero(jnp.max(raw, axis=1))[:, None]
        return (log_beta, counts), log_gamma

    (log_beta, counts), log_gamma = jax.lax.scan(
        step,
        (jnp.zeros((B, K)), jnp.zeros((B, K, K))),
        (log_filter[1:], log_filter[:-1], log_pred[1:], emission[1:]),
        reverse=True,
    )
    first_gamma, _ = _normalize(log_filter[0] + log_beta)
    log_gamma = jnp.moveaxis(jnp.concatenate([first_gamma[None], log_gamma]), 0, 1)
    return log_gamma, counts, log_likelihood


def _conventions(invalid, log_gamma, counts, log_likelihood):
    """Impossible sequences: ``log_gamma = -inf``, counts 0; invalid ones: NaN."""
    impossible = log_likelihood == -jnp.inf
    log_gamma = jnp.where(impossible[:, None, None], -jnp.inf, log_gamma)
    counts = jnp.where(impossible[:, None, None], 0.0, counts)
    log_gamma = jnp.where(invalid[:, None, None], jnp.nan, log_gamma)
    counts = jnp.where(invalid[:, None, None], jnp.nan, counts)
    log_likelihood = jnp.where(invalid, jnp.nan, log_likelihood)
    return log_gamma, counts, log_likelihood


def _log_matmul(a, b):
    """``c[..., i, k] = logsumexp_j (a[..., i, j] + b[..., j, k])``."""
    return _logsumexp(a[..., :, :, None] + b[..., None, :, :], axis=-2)


def forward_backward_parallel(log_emission, log_transition, log_initial):
    """``(log_gamma, transition_counts, log_likelihood)`` by ``lax.associative_scan``
    over the steps (``O(log T)`` depth); same outputs as
    :func:`forward_backward_sequential` to rounding."""
    if log_emission.shape[1] == 1:  # no step to scan over
        return forward_backward_sequential(log_emission, log_transition, log_initial)
    invalid, log_emission, log_transition, log_initial = _checked(
        log_emission, log_transition, log_initial
    )
    B, T, K = log_emission.shape
    # Each step's emissions shifted to a largest entry of 0 (the shifts add back to
    # log p(y)), so that the messages' magnitude grows with the data's information,
    # not with the emissions' own scale.
    shift = _finite_or_zero(jnp.max(log_emission, axis=2))  # (B, T)
    emission = jnp.moveaxis(log_emission - shift[:, :, None], 1, 0)  # (T, B, K)
    # Step matrices (T - 1, B, K, K): A_t[j, k] = log P[j, k] + log e_t(k), t >= 1.
    steps = log_transition[None] + emission[1:, :, None, :]
    # alpha_t = alpha_0 A_1 ... A_t: prefix products; beta_t = A_{t+1} ... A_{T-1} 1.
    prefix = jax.lax.associative_scan(_log_matmul, steps, axis=0)
    suffix = jax.lax.associative_scan(lambda a, b: _log_matmul(b, a), steps, axis=0, reverse=True)
    alpha0 = log_initial + emission[0]  # (B, K)
    alpha = jnp.concatenate(
        [alpha0[None], _logsumexp(alpha0[None, :, :, None] + prefix, axis=-2)]
    )  # (T, B, K)
    beta = jnp.concatenate(
        [_logsumexp(suffix, axis=-1), jnp.zeros((1, B, K))]
    )  # (T, B, K): beta_t(j) = logsumexp_k suffix_{t+1}[j, k]
    log_likelihood = _logsumexp(alpha[-1], axis=-1) + shift.sum(axis=1)
    norm = _finite_or_zero(_logsumexp(alpha[-1], axis=-1))
    log_gamma, _ = _normalize(alpha + beta)
    log_xi = alpha[:-1, :, :, None] + steps + beta[1:, :, None, :] - norm[None, :, None, None]
    counts = jnp.exp(log_xi).sum(axis=0)
    return _conventions(invalid, jnp.moveaxis(log_gamma, 0, 1), counts, log_likelihood)


def forward_filter_sequential(log_emission, log_transition, log_initial):
    """One-step predictive state distributions ``(B, T, K)`` (see
    :func:`pm_em.estep.forward_backward.forward_filter`)."""
    invalid, log_emission, log_transition, log_initial = _checked(
        log_emission, log_transition, log_initial
    )
    log_pred, _, _ = _forward(log_emission, log_transition, log_initial)
    return jnp.where(invalid[:, None, None], jnp.nan, jnp.moveaxis(log_pred, 0, 1))


def viterbi_sequential(log_emission, log_transition, log_initial):
    """``(path, log_joint)`` with the C code's tie-breaking (see
    :func:`pm_em.estep.forward_backward.viterbi`)."""
    invalid, log_emission, log_transition, log_initial = _checked(
        log_emission, log_transition, log_initial
    )
    B, T, K = log_emission.shape
    emission = jnp.moveaxis(log_emission, 1, 0)

    def shifted(delta):
        top = jnp.max(delta, axis=1)
        return delta - _finite_or_zero(top)[:, None], top > -jnp.inf

    delta0, possible0 = shifted(log_initial + emission[0])

    def step(carry, emit):
        delta, possible = carry
        candidates = delta[:, :, None] + log_transition  # (B, previous, next)
        best_prev = jnp.argmax(candidates, axis=1)  # first maximum: lowest index
        best = jnp.max(candidates, axis=1)
        delta, now_possible = shifted(best + emit)
        return (delta, possible & now_possible), best_prev

    (delta, possible), best_prev = jax.lax.scan(step, (delta0, possible0), emission[1:])
    last = jnp.argmax(delta, axis=1)

    def back(state, prev):  # prev: best predecessors of step t, (B, K)
        earlier = jnp.take_along_axis(prev, state[:, None], axis=1)[:, 0]
        return earlier, earlier

    _, earlier = jax.lax.scan(back, last, best_prev, reverse=True)
    path = jnp.concatenate([earlier, last[None]]).T  # (B, T)
    path = jnp.where((~possible | invalid)[:, None], 0, path).astype(jnp.int64)

    batch = jnp.arange(B)
    log_joint = (
        log_initial[batch, path[:, 0]]
        + jnp.take_along_axis(log_emission, path[:, :, None], axis=2)[:, :, 0].sum(axis=1)
        + log_transition[batch[:, None], path[:, :-1], path[:, 1:]].sum(axis=1)
    )
    log_joint = jnp.where(possible, log_joint, -jnp.inf)
    log_joint = jnp.where(invalid, jnp.nan, log_joint)
    return path, log_joint


def _use_parallel(n_steps: int) -> bool:
    return (
        PARALLEL_MIN_STEPS is not None
        and n_steps >= PARALLEL_MIN_STEPS
        and jax.default_backend() != "cpu"
    )


@jax_funcify.register(ForwardBackward)
def _jax_funcify_forward_backward(op, node=None, **kwargs):
    def forward_backward(log_emission, log_transition, log_initial):
        if _use_parallel(log_emission.shape[1]):
            return forward_backward_parallel(log_emission, log_transition, log_initial)
        return forward_backward_sequential(log_emission, log_transition, log_initial)

    return forward_backward


@jax_funcify.register(ForwardFilter)
def _jax_funcify_forward_filter(op, node=None, **kwargs):
    return forward_filter_sequential


@jax_funcify.register(Viterbi)
def _jax_funcify_viterbi(op, node=None, **kwargs):
    return viterbi_sequential

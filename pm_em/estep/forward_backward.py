"""Forward–backward and Viterbi for batches of hidden Markov chains, as compiled PyTensor Ops.

For ``B`` independent chains of ``T`` steps over ``K`` states, with time-homogeneous
transitions, the inputs are (all natural logs)

* ``log_emission[b, t, k] = log p(y_t | s_t = k)``, shape ``(B, T, K)``;
* ``log_transition[b, j, k] = log p(s_t = k | s_{t-1} = j)``, shape ``(B, K, K)``;
* ``log_initial[b, k] = log p(s_0 = k)``, shape ``(B, K)``,

and the graph builders return

* :func:`forward_backward`: the state marginals ``log p(s_t = k | y)``, the expected
  transition counts ``sum_{t>=1} p(s_{t-1} = j, s_t = k | y)`` and ``log p(y)`` (the
  E-step of Baum–Welch); ``log p(y)`` is differentiable;
* :func:`forward_filter`: the one-step predicted state distributions
  ``log p(s_t = k | y_0, ..., y_{t-1})`` (for one-step predictive pointwise
  log-likelihoods);
* :func:`viterbi`: the jointly most probable state sequence and its ``log p(path, y)``.

Why C. These run once per EM iteration on chains of ``T = 100_000`` steps; a ``Scan``
(or any per-step Python work) costs microseconds per step and would dominate the fit.
The recursions are therefore ``ExternalCOp`` subclasses whose C loops (in
``forward_backward.c``, beside this module) run over sequences, steps and states, with
a NumPy ``perform`` (vectorized over sequences and states, looping over
steps in Python) used only when PyTensor has no C compiler.

Numerics. Everything is in log space. The forward messages are normalized at every step
(their log-normalizers sum to ``log p(y)``) and the backward messages are shifted so their
largest entry is 0, so nothing grows with ``T``, and emissions of any finite magnitude
(say around ``-1e6``) lose no precision beyond their own rounding. Entries may be ``-inf``
(zero probabilities) and are handled exactly: a log-sum-exp over only ``-inf`` is ``-inf``,
never NaN.

In C, the log-sum-exps against the transition matrix are evaluated as probability-space
dot products: with the filtered probabilities ``p_j`` (which sum to 1) and each transition
column divided by its largest entry ``c_k``, ``log p(s_t = k | y_<t) = log c_k +
log(sum_j p_j * P_jk / c_k)``. When that dot product is at least ``1e-200``, the terms
lost to underflow (each below ``~1e-308``) cannot matter and the result is exact to
rounding; otherwise the entry is recomputed as a max-shifted log-sum-exp. The backward
pass does the same by rows. This takes ``K`` exponentials per step instead of ``K**2``
(measured about twice as fast as log-sum-exps throughout at ``T = 100_000``, ``K = 3``).

Conventions, per sequence ``b``:

* impossible data (``log p(y) = -inf``): ``log_gamma`` is ``-inf`` everywhere, the
  transition counts are 0, the gradient of ``log p(y)`` is 0; ``log_predictive`` is
  ``-inf`` at every step after the first impossible one (the one-step predictive of a
  probability-zero history); the Viterbi path is all 0 with ``log_joint = -inf``;
* invalid input (any NaN or ``+inf`` in the sequence's emissions, transitions or initial
  probabilities): every float output of that sequence is NaN, the Viterbi path is 0;
* ``T >= 1`` and ``K >= 1`` are required.
"""

from __future__ import annotations

import numpy as np
import pytensor.tensor as pt
from pytensor.gradient import DisconnectedType, grad_not_implemented, grad_undefined
from pytensor.graph.basic import Apply, Variable
from pytensor.link.c.op import ExternalCOp

__all__ = ["check_chain_shapes", "forward_backward", "forward_filter", "viterbi"]

# The C implementation of the three Ops (its path is relative to this module).
_C_SOURCE = "forward_backward.c"


# ---------------------------------------------------------------------------------------
# NumPy fallback (perform)
# ---------------------------------------------------------------------------------------


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    """Max-shifted ``log(sum(exp(x)))`` along ``axis``; ``-inf`` if every entry is ``-inf``."""
    x_max = np.max(x, axis=axis, keepdims=True)
    shift = np.where(np.isfinite(x_max), x_max, 0.0)
    with np.errstate(divide="ignore"):
        total = np.log(np.sum(np.exp(x - shift), axis=axis, keepdims=True)) + shift
    return np.squeeze(total, axis=axis)


def _finite_or_zero(x: np.ndarray) -> np.ndarray:
    """``x`` with ``-inf`` normalizers replaced by 0, so subtracting them yields ``-inf``
    rows (impossible sequences) instead of NaN."""
    return np.where(np.isfinite(x), x, 0.0)


def _invalid_sequences(log_emission, log_transition, log_initial):
    """``(B,)`` mask of sequences with a NaN or ``+inf`` input, and the inputs with those
    sequences zeroed (so the vectorized recursions raise no floating-point warnings)."""
    invalid = (
        ~(log_emission < np.inf).all(axis=(1, 2))
        | ~(log_transition < np.inf).all(axis=(1, 2))
        | ~(log_initial < np.inf).all(axis=1)
    )
    if invalid.any():
        log_emission = np.where(invalid[:, None, None], 0.0, log_emission)
        log_transition = np.where(invalid[:, None, None], 0.0, log_transition)
        log_initial = np.where(invalid[:, None], 0.0, log_initial)
    return invalid, log_emission, log_transition, log_initial


def check_chain_shapes(log_emission, log_transition, log_initial) -> None:
    """The C code's shape checks, for the NumPy fallback and the JAX implementations
    (where shapes are static)."""
    B, T, K = log_emission.shape
    if log_transition.shape != (B, K, K) or log_initial.shape != (B, K):
        raise ValueError(
            "hidden Markov chain shapes do not match: log_emission "
            f"{log_emission.shape}, log_transition {log_transition.shape}, log_initial "
            f"{log_initial.shape}; expected (B, T, K), (B, K, K), (B, K)"
        )
    if T < 1 or K < 1:
        raise ValueError(
            f"hidden Markov chains need at least one step and one state, got T = {T}, K = {K}"
        )


def _forward_numpy(log_emission, log_transition, log_initial):
    """Normalized forward pass: ``(log_pred, log_filter, log_norm)``, shapes ``(B, T, K)``,
    ``(B, T, K)``, ``(B, T)``; ``log_norm[:, t] = log p(y_t | y_<t)``. After an impossible
    step, a sequence's filter and predictive are ``-inf``."""
    B, T, K = log_emission.shape
    log_pred = np.empty((B, T, K))
    log_filter = np.empty((B, T, K))
    log_norm = np.empty((B, T))
    pred = log_initial
    for t in range(T):
        if t > 0:
            pred = _logsumexp(log_filter[:, t - 1, :, None] + log_transition, axis=1)
        log_pred[:, t] = pred
        alpha = pred + log_emission[:, t]
        log_norm[:, t] = _logsumexp(alpha, axis=1)
        log_filter[:, t] = alpha - _finite_or_zero(log_norm[:, t])[:, None]
    return log_pred, log_filter, log_norm


def _forward_backward_numpy(log_emission, log_transition, log_initial):
    """NumPy forward–backward: ``(log_gamma, transition_counts, log_likelihood)``."""
    invalid, log_emission, log_transition, log_initial = _invalid_sequences(
        log_emission, log_transition, log_initial
    )
    B, T, K = log_emission.shape
    log_pred, log_filter, log_norm = _forward_numpy(log_emission, log_transition, log_initial)
    log_likelihood = log_norm.sum(axis=1)
    possible = log_likelihood > -np.inf

    log_gamma = np.empty((B, T, K))
    counts = np.zeros((B, K, K))
    log_beta = np.zeros((B, K))
    for t in range(T - 1, -1, -1):
        g = log_filter[:, t] + log_beta
        log_gamma[:, t] = g - _finite_or_zero(_logsumexp(g, axis=1))[:, None]
        if t == 0:
            break
        # xi_t(j, k) = exp(filter_{t-1}(j) + log P[j, k] - pred_t(k) + log gamma_t(k))
        pred = log_pred[:, t]
        log_ratio = np.where(pred > -np.inf, log_gamma[:, t] - _finite_or_zero(pred), -np.inf)
        counts += np.exp(log_filter[:, t - 1, :, None] + log_transition + log_ratio[:, None, :])
        future = log_emission[:, t] + log_beta
        raw = _logsumexp(log_transition + future[:, None, :], axis=2)
        log_beta = raw - _finite_or_zero(raw.max(axis=1))[:, None]

    log_gamma[~possible] = -np.inf
    counts[~possible] = 0.0
    log_gamma[invalid] = np.nan
    counts[invalid] = np.nan
    log_likelihood[invalid] = np.nan
    return log_gamma, counts, log_likelihood


def _forward_filter_numpy(log_emission, log_transition, log_initial):
    """NumPy one-step predictive state distributions ``(B, T, K)``."""
    invalid, log_emission, log_transition, log_initial = _invalid_sequences(
        log_emission, log_transition, log_initial
    )
    log_pred, _, _ = _forward_numpy(log_emission, log_transition, log_initial)
    log_pred[invalid] = np.nan
    return log_pred


def _viterbi_numpy(log_emission, log_transition, log_initial):
    """NumPy Viterbi: ``(path, log_joint)`` with the C code's tie-breaking."""
    invalid, log_emission, log_transition, log_initial = _invalid_sequences(
        log_emission, log_transition, log_initial
    )
    B, T, K = log_emission.shape
    best_prev = np.zeros((T, B, K), dtype=np.int64)
    delta = log_initial + log_emission[:, 0]
    possible = delta.max(axis=1) > -np.inf
    delta = delta - _finite_or_zero(delta.max(axis=1))[:, None]
    for t in range(1, T):
        candidates = delta[:, :, None] + log_transition  # (B, previous, next)
        best_prev[t] = np.argmax(candidates, axis=1)  # first maximum: lowest index
        best = np.take_along_axis(candidates, best_prev[t][:, None, :], axis=1)[:, 0]
        delta = best + log_emission[:, t]
        delta_max = delta.max(axis=1)
        possible &= delta_max > -np.inf
        delta = delta - _finite_or_zero(delta_max)[:, None]

    path = np.empty((B, T), dtype=np.int64)
    path[:, T - 1] = np.argmax(delta, axis=1)
    batch = np.arange(B)
    for t in range(T - 1, 0, -1):
        path[:, t - 1] = best_prev[t, batch, path[:, t]]
    path[~possible | invalid] = 0

    steps = np.arange(T)
    log_joint = (
        log_initial[batch, path[:, 0]]
        + log_emission[batch[:, None], steps, path].sum(axis=1)
        + log_transition[batch[:, None], path[:, :-1], path[:, 1:]].sum(axis=1)
    )
    log_joint[~possible] = -np.inf
    log_joint[invalid] = np.nan
    return path, log_joint


# ---------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------


class _HiddenMarkovOp(ExternalCOp):
    """Shared input handling and C plumbing of the hidden Markov chain Ops: the C code
    is ``forward_backward.c`` beside this module, each Op calling its entry point
    ``c_function`` there."""

    __props__ = ()
    #: The Op's entry point in ``forward_backward.c``.
    c_function: str
    #: Its NumPy implementation, the fallback without a C compiler: the inputs ->
    #: a tuple of the outputs.
    numpy_function: staticmethod

    def __init__(self):
        super().__init__(_C_SOURCE, self.c_function)

    def perform(self, node, inputs, output_storage):
        check_chain_shapes(*inputs)
        for storage, value in zip(output_storage, self.numpy_function(*inputs)):
            storage[0] = value

    def _input_variables(self, log_emission, log_transition, log_initial):
        """The inputs as float64 tensors, their ranks and static shapes checked; and the
        static ``(B, T, K)`` (``None`` where unknown)."""
        inputs = []
        for name, x, ndim in (
            ("log_emission", log_emission, 3),
            ("log_transition", log_transition, 3),
            ("log_initial", log_initial, 2),
        ):
            x = pt.as_tensor_variable(x)
            if x.type.ndim != ndim:
                raise ValueError(f"{name} must have {ndim} dimensions, got {x.type.ndim}")
            if x.type.dtype != "float64":
                x = pt.cast(x, "float64")
            inputs.append(x)
        emission_shape, transition_shape, initial_shape = (x.type.shape for x in inputs)

        def agree(*sizes):
            known = {s for s in sizes if s is not None}
            if len(known) > 1:
                raise ValueError(
                    "hidden Markov chain shapes do not match: log_emission "
                    f"{emission_shape}, log_transition {transition_shape}, log_initial "
                    f"{initial_shape}; expected (B, T, K), (B, K, K), (B, K)"
                )
            return known.pop() if known else None

        n_sequences = agree(emission_shape[0], transition_shape[0], initial_shape[0])
        n_states = agree(emission_shape[2], *transition_shape[1:], initial_shape[1])
        return inputs, (n_sequences, emission_shape[1], n_states)

    def c_headers(self, **kwargs):
        return ["<math.h>", "<stdlib.h>"]

    def c_no_compile_args(self, **kwargs):
        # -inf and NaN are data here; fast-math would assume them away.
        return ["-ffast-math"]


class ForwardBackward(_HiddenMarkovOp):
    """Forward–backward over a batch of chains: ``(log_gamma, transition_counts,
    log_likelihood)``; see :func:`forward_backward`."""

    c_function = "pmem_hmm_forward_backward_op"
    numpy_function = staticmethod(_forward_backward_numpy)

    def make_node(self, log_emission, log_transition, log_initial):
        inputs, (B, T, K) = self._input_variables(log_emission, log_transition, log_initial)
        outputs = [
            pt.tensor(dtype="float64", shape=(B, T, K)),
            pt.tensor(dtype="float64", shape=(B, K, K)),
            pt.tensor(dtype="float64", shape=(B,)),
        ]
        return Apply(self, inputs, outputs)

    def infer_shape(self, fgraph, node, input_shapes):
        emission_shape, transition_shape, _ = input_shapes
        return [emission_shape, transition_shape, (emission_shape[0],)]

    def L_op(self, inputs, outputs, output_grads):
        log_gamma, transition_counts, _ = outputs
        gamma_grad, counts_grad, log_likelihood_grad = output_grads
        if not (
            isinstance(gamma_grad.type, DisconnectedType)
            and isinstance(counts_grad.type, DisconnectedType)
        ):
            return [
                grad_not_implemented(
                    self,
                    position,
                    x,
                    "Only the log_likelihood output of forward_backward is differentiable; "
                    "gradients through log_gamma or transition_counts are not implemented.",
                )
                for position, x in enumerate(inputs)
            ]
        if isinstance(log_likelihood_grad.type, DisconnectedType):
            return [DisconnectedType()() for _ in inputs]
        # d log p(y) / d log p(y_t | s_t = k) = p(s_t = k | y), d / d log P[j, k] = the
        # expected count of j -> k, d / d log p(s_0 = k) = p(s_0 = k | y); exp(-inf) = 0.
        weight = log_likelihood_grad[:, None, None]
        state_marginals = pt.exp(log_gamma)
        return [
            state_marginals * weight,
            transition_counts * weight,
            state_marginals[:, 0, :] * log_likelihood_grad[:, None],
        ]


class ForwardFilter(_HiddenMarkovOp):
    """One-step predictive state distributions of a batch of chains; see
    :func:`forward_filter`."""

    c_function = "pmem_hmm_forward_filter_op"
    numpy_function = staticmethod(lambda *inputs: (_forward_filter_numpy(*inputs),))

    def make_node(self, log_emission, log_transition, log_initial):
        inputs, (B, T, K) = self._input_variables(log_emission, log_transition, log_initial)
        return Apply(self, inputs, [pt.tensor(dtype="float64", shape=(B, T, K))])

    def infer_shape(self, fgraph, node, input_shapes):
        return [input_shapes[0]]

    def L_op(self, inputs, outputs, output_grads):
        return [
            grad_not_implemented(
                self, position, x, "forward_filter's log_predictive is not differentiable."
            )
            for position, x in enumerate(inputs)
        ]


class Viterbi(_HiddenMarkovOp):
    """Most probable state sequences of a batch of chains; see :func:`viterbi`."""

    c_function = "pmem_hmm_viterbi_op"
    numpy_function = staticmethod(_viterbi_numpy)

    def make_node(self, log_emission, log_transition, log_initial):
        inputs, (B, T, _) = self._input_variables(log_emission, log_transition, log_initial)
        outputs = [pt.tensor(dtype="int64", shape=(B, T)), pt.tensor(dtype="float64", shape=(B,))]
        return Apply(self, inputs, outputs)

    def infer_shape(self, fgraph, node, input_shapes):
        emission_shape = input_shapes[0]
        return [emission_shape[:2], (emission_shape[0],)]

    def L_op(self, inputs, outputs, output_grads):
        path_grad, _ = output_grads
        if not isinstance(path_grad.type, DisconnectedType):
            return [
                grad_undefined(self, position, x, "The Viterbi path is discrete.")
                for position, x in enumerate(inputs)
            ]
        return [
            grad_not_implemented(self, position, x, "viterbi's log_joint is not differentiable.")
            for position, x in enumerate(inputs)
        ]


_forward_backward_op = ForwardBackward()
_forward_filter_op = ForwardFilter()
_viterbi_op = Viterbi()


# ---------------------------------------------------------------------------------------
# Graph builders
# ---------------------------------------------------------------------------------------


def _batched_inputs(log_emission, log_transition, log_initial) -> list[Variable]:
    """float64 inputs, with an unbatched ``(K, K)`` transition matrix or ``(K,)`` initial
    distribution broadcast to the emissions' ``B`` sequences."""
    log_emission = pt.as_tensor_variable(log_emission).astype("float64")
    log_transition = pt.as_tensor_variable(log_transition).astype("float64")
    log_initial = pt.as_tensor_variable(log_initial).astype("float64")
    if log_emission.type.ndim != 3:
        raise ValueError(f"log_emission must be (B, T, K), got {log_emission.type.ndim} dimensions")
    n_sequences = log_emission.shape[0]
    if log_transition.type.ndim == 2:
        log_transition = pt.broadcast_to(log_transition, (n_sequences, *log_transition.shape))
    if log_initial.type.ndim == 1:
        log_initial = pt.broadcast_to(log_initial, (n_sequences, *log_initial.shape))
    return [log_emission, log_transition, log_initial]


def forward_backward(
    log_emission, log_transition, log_initial
) -> tuple[Variable, Variable, Variable]:
    """State marginals, expected transition counts and log-likelihood of hidden Markov
    chains (the E-step of Baum–Welch).

    Parameters
    ----------
    log_emission : tensor_like, shape (B, T, K)
        ``log p(y_t | s_t = k)`` for ``B`` independent sequences of ``T`` steps over ``K``
        states. Any float dtype (computed in float64). Entries may be ``-inf``.
    log_transition : tensor_like, shape (B, K, K) or (K, K)
        ``log p(s_t = k | s_{t-1} = j)`` at ``[b, j, k]``, the same at every step; a
        ``(K, K)`` matrix is shared by all sequences.
    log_initial : tensor_like, shape (B, K) or (K,)
        ``log p(s_0 = k)``; a ``(K,)`` vector is shared by all sequences.

    Returns
    -------
    log_gamma : TensorVariable, shape (B, T, K)
        ``log p(s_t = k | y)``; ``-inf`` everywhere for a sequence with ``log p(y) = -inf``.
    transition_counts : TensorVariable, shape (B, K, K)
        Expected transition counts ``sum_{t=1}^{T-1} p(s_{t-1} = j, s_t = k | y)`` (not
        logs); 0 when ``T = 1`` or ``log p(y) = -inf``.
    log_likelihood : TensorVariable, shape (B,)
        ``log p(y)`` per sequence; NaN when a sequence's inputs hold a NaN or ``+inf``
        (its other outputs are then NaN too). Differentiable: its gradient is
        ``exp(log_gamma)`` for ``log_emission``, ``transition_counts`` for
        ``log_transition`` and ``exp(log_gamma[:, 0])`` for ``log_initial``.

    Notes
    -----
    Gradients through ``log_gamma`` or ``transition_counts`` are not implemented.
    """
    return tuple(_forward_backward_op(*_batched_inputs(log_emission, log_transition, log_initial)))


def forward_filter(log_emission, log_transition, log_initial) -> Variable:
    """One-step predicted state distributions ``log p(s_t = k | y_0, ..., y_{t-1})``.

    Parameters
    ----------
    log_emission, log_transition, log_initial : tensor_like
        As in :func:`forward_backward`.

    Returns
    -------
    log_predictive : TensorVariable, shape (B, T, K)
        ``log_initial`` at ``t = 0``, then ``logsumexp_j (log p(s_{t-1} = j | y_<t) +
        log_transition[j, k])``, so ``logsumexp_k (log_predictive + log_emission)`` at
        step ``t`` is ``log p(y_t | y_<t)``. After the first step at which a sequence
        becomes impossible its rows are ``-inf``; NaN for a sequence with a NaN or
        ``+inf`` input. Not differentiable.
    """
    return _forward_filter_op(*_batched_inputs(log_emission, log_transition, log_initial))


def viterbi(log_emission, log_transition, log_initial) -> tuple[Variable, Variable]:
    """Most probable state sequences of hidden Markov chains.

    Parameters
    ----------
    log_emission, log_transition, log_initial : tensor_like
        The chains' emission, transition and initial log-probabilities, shaped as
        :func:`forward_backward` takes them.

    Returns
    -------
    path : TensorVariable, int64, shape (B, T)
        A jointly most probable state sequence. Ties go to the lowest state index (as
        ``np.argmax``): for the last state, then for each state's best predecessor
        going backwards. All 0 for an impossible sequence or one with a NaN or
        ``+inf`` input.
    log_joint : TensorVariable, shape (B,)
        ``log p(path, y)``; ``-inf`` for an impossible sequence, NaN for one with a NaN
        or ``+inf`` input. Not differentiable.
    """
    return tuple(_viterbi_op(*_batched_inputs(log_emission, log_transition, log_initial)))

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
The recursions are therefore ``COp`` subclasses whose C loops run over sequences, steps and
states, with a NumPy ``perform`` (vectorized over sequences and states, looping over
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

import hashlib

import numpy as np
import pytensor.tensor as pt
from pytensor.gradient import DisconnectedType, grad_not_implemented, grad_undefined
from pytensor.graph.basic import Apply, Variable
from pytensor.link.c.op import COp

__all__ = ["check_chain_shapes", "forward_backward", "forward_filter", "viterbi"]


# ---------------------------------------------------------------------------------------
# C implementation
# ---------------------------------------------------------------------------------------

# Shared by the three Ops (PyTensor deduplicates identical support code when several of
# them end up in one compiled module). Nothing below the batch drivers touches the
# Python API, so the drivers run with the GIL released.
_C_SUPPORT_CODE = r"""
#ifndef PMEM_HMM_SUPPORT
#define PMEM_HMM_SUPPORT

/* A probability-space sum whose largest term would be 1 without underflow is accurate
   to rounding when it is at least this large, even if some terms underflowed (each lost
   term is below ~1e-308); smaller sums are recomputed exactly in log space. */
#define PMEM_HMM_FAST_MIN 1e-200
#define PMEM_HMM_LOG_FAST_MIN (-460.51701859880913680)  /* log(1e-200) */

/* 1 if x holds a NaN or +inf, which are not log-probabilities. */
static int pmem_hmm_has_invalid(const double* x, npy_intp n)
{
    for (npy_intp i = 0; i < n; ++i) {
        if (!(x[i] < INFINITY)) return 1;
    }
    return 0;
}

static void pmem_hmm_fill(double* x, npy_intp n, double value)
{
    for (npy_intp i = 0; i < n; ++i) x[i] = value;
}

/* log sum_i exp(x[i * x_stride] + y[i * y_stride]), max-shifted; -inf if every term is
   -inf. Inputs never hold NaN or +inf (checked per sequence). */
static double pmem_hmm_logsumexp_pair(const double* x, npy_intp x_stride, const double* y,
                                      npy_intp y_stride, npy_intp n)
{
    double max_term = -INFINITY;
    for (npy_intp i = 0; i < n; ++i) {
        double term = x[i * x_stride] + y[i * y_stride];
        if (term > max_term) max_term = term;
    }
    if (max_term == -INFINITY) return -INFINITY;
    double total = 0.0;
    for (npy_intp i = 0; i < n; ++i) total += exp(x[i * x_stride] + y[i * y_stride] - max_term);
    return max_term + log(total);
}

/* Normalizes the log weights v[0..K) in place (so that they log-sum-exp to 0) and
   writes their probabilities to prob. Returns the log normalizer, or -inf (v and prob
   untouched) when every weight is -inf. */
static double pmem_hmm_normalize(npy_intp K, double* v, double* prob)
{
    double max_v = -INFINITY;
    for (npy_intp k = 0; k < K; ++k)
        if (v[k] > max_v) max_v = v[k];
    if (max_v == -INFINITY) return -INFINITY;
    double total = 0.0;
    for (npy_intp k = 0; k < K; ++k) {
        prob[k] = exp(v[k] - max_v);
        total += prob[k];
    }
    double log_norm = max_v + log(total);
    double inv_total = 1.0 / total;
    for (npy_intp k = 0; k < K; ++k) {
        v[k] -= log_norm;
        prob[k] *= inv_total;
    }
    return log_norm;
}

/* Per transition column k: col_max[k] = max_j log P[j, k] and
   col_scaled[j, k] = exp(log P[j, k] - col_max[k]); per row j likewise row_max and
   row_scaled. An all -inf column (row) gets max -inf and scaled entries 0. */
static void pmem_hmm_scale_transition(npy_intp K, const double* log_trans, double* col_max,
                                      double* col_scaled, double* row_max, double* row_scaled)
{
    for (npy_intp k = 0; k < K; ++k) {
        double m = -INFINITY;
        for (npy_intp j = 0; j < K; ++j) {
            if (log_trans[j * K + k] > m) m = log_trans[j * K + k];
        }
        col_max[k] = m;
        for (npy_intp j = 0; j < K; ++j) {
            col_scaled[j * K + k] = (m == -INFINITY) ? 0.0 : exp(log_trans[j * K + k] - m);
        }
    }
    for (npy_intp j = 0; j < K; ++j) {
        double m = -INFINITY;
        for (npy_intp k = 0; k < K; ++k) {
            if (log_trans[j * K + k] > m) m = log_trans[j * K + k];
        }
        row_max[j] = m;
        for (npy_intp k = 0; k < K; ++k) {
            row_scaled[j * K + k] = (m == -INFINITY) ? 0.0 : exp(log_trans[j * K + k] - m);
        }
    }
}

/* Normalized forward recursion of one sequence. Writes, per step t,
   log_pred[t, k] = log p(s_t = k | y_<t) (log_initial at t = 0), and the filtered
   distribution p(s_t = k | y_<=t) in log space (log_filter) and probability space
   (filter_prob), rows filter_stride apart: K keeps every step, 0 keeps only the current
   one (each step reads the previous row completely before overwriting it).
   Returns log p(y); on impossible data returns -inf and sets *impossible_step to the
   first step t with p(y_t | y_<t) = 0 (rows after it are not written). */
static double pmem_hmm_forward(npy_intp T, npy_intp K, const double* log_emit,
                               const double* log_trans, const double* log_init,
                               const double* col_max, const double* col_scaled,
                               double* log_pred, double* log_filter, double* filter_prob,
                               npy_intp filter_stride, npy_intp* impossible_step)
{
    double log_lik = 0.0;
    for (npy_intp t = 0; t < T; ++t) {
        double* pred = log_pred + t * K;
        double* filt = log_filter + t * filter_stride;
        double* filt_prob = filter_prob + t * filter_stride;
        const double* emit = log_emit + t * K;
        if (t == 0) {
            for (npy_intp k = 0; k < K; ++k) pred[k] = log_init[k];
        } else {
            const double* prev = log_filter + (t - 1) * filter_stride;
            const double* prev_prob = filter_prob + (t - 1) * filter_stride;
            for (npy_intp k = 0; k < K; ++k) {
                if (col_max[k] == -INFINITY) {
                    pred[k] = -INFINITY;
                    continue;
                }
                double total = 0.0;
                for (npy_intp j = 0; j < K; ++j) total += prev_prob[j] * col_scaled[j * K + k];
                pred[k] = (total >= PMEM_HMM_FAST_MIN)
                              ? col_max[k] + log(total)
                              : pmem_hmm_logsumexp_pair(prev, 1, log_trans + k, K, K);
            }
        }
        /* alpha_t = pred + emission, normalized; the normalizer is log p(y_t | y_<t). */
        for (npy_intp k = 0; k < K; ++k) filt[k] = pred[k] + emit[k];
        double log_norm = pmem_hmm_normalize(K, filt, filt_prob);
        if (log_norm == -INFINITY) {
            *impossible_step = t;
            return -INFINITY;
        }
        log_lik += log_norm;
    }
    *impossible_step = T;
    return log_lik;
}

/* Backward pass of one sequence after pmem_hmm_forward with filter_stride = K and
   log_filter = log_gamma: turns log_gamma into the log state marginals in place (from
   the last step down, so row t-1 still holds the filter when step t needs it) and
   accumulates the expected transition counts into counts (zeroed by the caller).
   work holds 4 * K doubles. Returns 0, or 1 if a message vanished (impossible data,
   which the forward pass should already have reported). */
static int pmem_hmm_backward(npy_intp T, npy_intp K, const double* log_emit,
                             const double* log_trans, const double* col_max,
                             const double* col_scaled, const double* row_max,
                             const double* row_scaled, const double* log_pred,
                             const double* filter_prob, double* log_gamma, double* counts,
                             double* work)
{
    /* beta: log p(y_>t | s_t) up to a per-step constant, largest entry 0. */
    double* beta = work;
    double* gamma_prob = work + K;
    double* future = work + 2 * K;     /* log emission + beta at step t */
    double* future_prob = work + 3 * K;
    for (npy_intp k = 0; k < K; ++k) beta[k] = 0.0;

    for (npy_intp t = T - 1; t >= 0; --t) {
        double* lg = log_gamma + t * K;
        /* gamma_t ∝ filter_t * beta_t */
        for (npy_intp k = 0; k < K; ++k) lg[k] += beta[k];
        if (pmem_hmm_normalize(K, lg, gamma_prob) == -INFINITY) return 1;
        if (t == 0) break;

        /* xi_t(j, k) = p(s_{t-1} = j | s_t = k, y_<t) * gamma_t(k)
                      = exp(filter_{t-1}(j) + log P[j, k] - pred_t(k)) * gamma_t(k). */
        const double* pred = log_pred + t * K;
        const double* prev_prob = filter_prob + (t - 1) * K;
        const double* prev_log = log_gamma + (t - 1) * K;  /* still the filter */
        for (npy_intp k = 0; k < K; ++k) {
            if (gamma_prob[k] == 0.0) continue;  /* every xi_t(., k) <= gamma_t(k) */
            if (pred[k] - col_max[k] >= PMEM_HMM_LOG_FAST_MIN) {
                /* The forward dot product for this entry was >= 1e-200, so the
                   rescaling below is at most 1e200 and underflowed terms stay
                   negligible. */
                double scale = gamma_prob[k] * exp(col_max[k] - pred[k]);
                for (npy_intp j = 0; j < K; ++j) {
                    counts[j * K + k] += prev_prob[j] * col_scaled[j * K + k] * scale;
                }
            } else {
                double log_scale = lg[k] - pred[k];
                for (npy_intp j = 0; j < K; ++j) {
                    counts[j * K + k] += exp(prev_log[j] + log_trans[j * K + k] + log_scale);
                }
            }
        }

        /* beta_{t-1}(j) = logsumexp_k (log P[j, k] + emission_t(k) + beta_t(k)), shifted. */
        const double* emit = log_emit + t * K;
        double max_future = -INFINITY;
        for (npy_intp k = 0; k < K; ++k) {
            future[k] = emit[k] + beta[k];
            if (future[k] > max_future) max_future = future[k];
        }
        if (max_future == -INFINITY) return 1;
        for (npy_intp k = 0; k < K; ++k) future_prob[k] = exp(future[k] - max_future);
        double max_beta = -INFINITY;
        for (npy_intp j = 0; j < K; ++j) {
            double value;
            if (row_max[j] == -INFINITY) {
                value = -INFINITY;
            } else {
                double dot = 0.0;
                for (npy_intp k = 0; k < K; ++k) dot += row_scaled[j * K + k] * future_prob[k];
                value = (dot >= PMEM_HMM_FAST_MIN)
                            ? row_max[j] + max_future + log(dot)
                            : pmem_hmm_logsumexp_pair(log_trans + j * K, 1, future, 1, K);
            }
            beta[j] = value;  /* beta_t is no longer needed: future holds it */
            if (value > max_beta) max_beta = value;
        }
        if (max_beta == -INFINITY) return 1;
        for (npy_intp j = 0; j < K; ++j) beta[j] -= max_beta;
    }
    return 0;
}

/* Forward-backward over B sequences (C-contiguous inputs and outputs). Returns 0, or -1
   if out of memory. */
static int pmem_hmm_forward_backward_batch(npy_intp B, npy_intp T, npy_intp K,
                                           const double* log_emit, const double* log_trans,
                                           const double* log_init, double* log_gamma,
                                           double* counts, double* log_lik)
{
    npy_intp TK = T * K, KK = K * K;
    double* work = (double*)malloc(sizeof(double) * (2 * TK + 2 * KK + 6 * K));
    if (work == NULL) return -1;
    double* log_pred = work;
    double* filter_prob = log_pred + TK;
    double* col_scaled = filter_prob + TK;
    double* row_scaled = col_scaled + KK;
    double* col_max = row_scaled + KK;
    double* row_max = col_max + K;
    double* backward_work = row_max + K;  /* 4 * K */

    for (npy_intp b = 0; b < B; ++b) {
        const double* emit_b = log_emit + b * TK;
        const double* trans_b = log_trans + b * KK;
        const double* init_b = log_init + b * K;
        double* gamma_b = log_gamma + b * TK;
        double* counts_b = counts + b * KK;
        pmem_hmm_fill(counts_b, KK, 0.0);
        if (pmem_hmm_has_invalid(emit_b, TK) || pmem_hmm_has_invalid(trans_b, KK)
            || pmem_hmm_has_invalid(init_b, K)) {
            pmem_hmm_fill(gamma_b, TK, NAN);
            pmem_hmm_fill(counts_b, KK, NAN);
            log_lik[b] = NAN;
            continue;
        }
        pmem_hmm_scale_transition(K, trans_b, col_max, col_scaled, row_max, row_scaled);
        npy_intp impossible_step;
        double ll = pmem_hmm_forward(T, K, emit_b, trans_b, init_b, col_max, col_scaled,
                                     log_pred, gamma_b, filter_prob, K, &impossible_step);
        if (ll == -INFINITY
            || pmem_hmm_backward(T, K, emit_b, trans_b, col_max, col_scaled, row_max,
                                 row_scaled, log_pred, filter_prob, gamma_b, counts_b,
                                 backward_work) != 0) {
            pmem_hmm_fill(gamma_b, TK, -INFINITY);
            pmem_hmm_fill(counts_b, KK, 0.0);
            log_lik[b] = -INFINITY;
            continue;
        }
        log_lik[b] = ll;
    }
    free(work);
    return 0;
}

/* One-step predictive state distributions over B sequences. Returns 0, or -1 if out of
   memory. */
static int pmem_hmm_forward_filter_batch(npy_intp B, npy_intp T, npy_intp K,
                                         const double* log_emit, const double* log_trans,
                                         const double* log_init, double* log_pred)
{
    npy_intp TK = T * K, KK = K * K;
    double* work = (double*)malloc(sizeof(double) * (2 * KK + 4 * K));
    if (work == NULL) return -1;
    double* col_scaled = work;
    double* row_scaled = col_scaled + KK;
    double* col_max = row_scaled + KK;
    double* row_max = col_max + K;
    double* filter_log = row_max + K;  /* only the current step is kept */
    double* filter_prob = filter_log + K;

    for (npy_intp b = 0; b < B; ++b) {
        const double* emit_b = log_emit + b * TK;
        const double* trans_b = log_trans + b * KK;
        const double* init_b = log_init + b * K;
        double* pred_b = log_pred + b * TK;
        if (pmem_hmm_has_invalid(emit_b, TK) || pmem_hmm_has_invalid(trans_b, KK)
            || pmem_hmm_has_invalid(init_b, K)) {
            pmem_hmm_fill(pred_b, TK, NAN);
            continue;
        }
        pmem_hmm_scale_transition(K, trans_b, col_max, col_scaled, row_max, row_scaled);
        npy_intp impossible_step;
        pmem_hmm_forward(T, K, emit_b, trans_b, init_b, col_max, col_scaled, pred_b,
                         filter_log, filter_prob, 0, &impossible_step);
        if (impossible_step + 1 < T) {
            pmem_hmm_fill(pred_b + (impossible_step + 1) * K, (T - impossible_step - 1) * K,
                          -INFINITY);
        }
    }
    free(work);
    return 0;
}

/* Viterbi over B sequences. Ties go to the lowest state index, both for the last state
   and for each state's best predecessor. Returns 0, or -1 if out of memory. */
static int pmem_hmm_viterbi_batch(npy_intp B, npy_intp T, npy_intp K, const double* log_emit,
                                  const double* log_trans, const double* log_init,
                                  npy_int64* path, double* log_joint)
{
    npy_intp TK = T * K, KK = K * K;
    double* delta = (double*)malloc(sizeof(double) * 2 * K);
    npy_int32* best_prev = (npy_int32*)malloc(sizeof(npy_int32) * (TK > 0 ? TK : 1));
    if (delta == NULL || best_prev == NULL) {
        free(delta);
        free(best_prev);
        return -1;
    }
    double* next_delta = delta + K;

    for (npy_intp b = 0; b < B; ++b) {
        const double* emit_b = log_emit + b * TK;
        const double* trans_b = log_trans + b * KK;
        const double* init_b = log_init + b * K;
        npy_int64* path_b = path + b * T;
        for (npy_intp t = 0; t < T; ++t) path_b[t] = 0;
        if (pmem_hmm_has_invalid(emit_b, TK) || pmem_hmm_has_invalid(trans_b, KK)
            || pmem_hmm_has_invalid(init_b, K)) {
            log_joint[b] = NAN;
            continue;
        }
        /* delta_t(k): best log p(s_<=t, y_<=t) ending in k, shifted so its max is 0
           (the shift keeps comparisons precise however large |log p| grows). */
        int possible = 1;
        for (npy_intp t = 0; t < T && possible; ++t) {
            const double* emit = log_emit + b * TK + t * K;
            double max_delta = -INFINITY;
            for (npy_intp k = 0; k < K; ++k) {
                double best;
                if (t == 0) {
                    best = init_b[k];
                } else {
                    npy_int32 arg = 0;
                    best = delta[0] + trans_b[k];
                    for (npy_intp j = 1; j < K; ++j) {
                        double candidate = delta[j] + trans_b[j * K + k];
                        if (candidate > best) {
                            best = candidate;
                            arg = (npy_int32)j;
                        }
                    }
                    best_prev[t * K + k] = arg;
                }
                next_delta[k] = best + emit[k];
                if (next_delta[k] > max_delta) max_delta = next_delta[k];
            }
            if (max_delta == -INFINITY) {
                possible = 0;
                break;
            }
            for (npy_intp k = 0; k < K; ++k) delta[k] = next_delta[k] - max_delta;
        }
        if (!possible) {
            log_joint[b] = -INFINITY;
            continue;
        }
        npy_intp state = 0;
        for (npy_intp k = 1; k < K; ++k) {
            if (delta[k] > delta[state]) state = k;
        }
        path_b[T - 1] = state;
        for (npy_intp t = T - 1; t > 0; --t) {
            state = best_prev[t * K + state];
            path_b[t - 1] = state;
        }
        /* The path's own log joint, summed directly: exact to rounding. */
        double total = init_b[path_b[0]] + emit_b[path_b[0]];
        for (npy_intp t = 1; t < T; ++t) {
            total += trans_b[path_b[t - 1] * K + path_b[t]] + emit_b[t * K + path_b[t]];
        }
        log_joint[b] = total;
    }
    free(delta);
    free(best_prev);
    return 0;
}

/* C-contiguous, aligned float64 views (new references) of the three inputs, with their
   shapes checked against each other. Returns 0, or -1 with a Python exception set. */
static int pmem_hmm_prepare_inputs(PyArrayObject* log_emit, PyArrayObject* log_trans,
                                   PyArrayObject* log_init, PyArrayObject** emit_c,
                                   PyArrayObject** trans_c, PyArrayObject** init_c,
                                   npy_intp* B, npy_intp* T, npy_intp* K)
{
    /* The caller releases whichever of these were acquired. */
    *emit_c = (PyArrayObject*)PyArray_FROM_OTF((PyObject*)log_emit, NPY_FLOAT64,
                                               NPY_ARRAY_IN_ARRAY);
    if (*emit_c == NULL) return -1;
    *trans_c = (PyArrayObject*)PyArray_FROM_OTF((PyObject*)log_trans, NPY_FLOAT64,
                                                NPY_ARRAY_IN_ARRAY);
    if (*trans_c == NULL) return -1;
    *init_c = (PyArrayObject*)PyArray_FROM_OTF((PyObject*)log_init, NPY_FLOAT64,
                                               NPY_ARRAY_IN_ARRAY);
    if (*init_c == NULL) return -1;
    if (PyArray_NDIM(*emit_c) != 3 || PyArray_NDIM(*trans_c) != 3
        || PyArray_NDIM(*init_c) != 2) {
        PyErr_SetString(PyExc_ValueError,
                        "hidden Markov chain inputs must be log_emission (B, T, K), "
                        "log_transition (B, K, K) and log_initial (B, K)");
        return -1;
    }
    const npy_intp* e = PyArray_DIMS(*emit_c);
    const npy_intp* p = PyArray_DIMS(*trans_c);
    const npy_intp* i = PyArray_DIMS(*init_c);
    if (p[0] != e[0] || i[0] != e[0] || p[1] != e[2] || p[2] != e[2] || i[1] != e[2]) {
        PyErr_Format(PyExc_ValueError,
                     "hidden Markov chain shapes do not match: log_emission (%ld, %ld, %ld), "
                     "log_transition (%ld, %ld, %ld), log_initial (%ld, %ld); expected "
                     "(B, T, K), (B, K, K), (B, K)",
                     (long)e[0], (long)e[1], (long)e[2], (long)p[0], (long)p[1], (long)p[2],
                     (long)i[0], (long)i[1]);
        return -1;
    }
    if (e[1] < 1 || e[2] < 1) {
        PyErr_Format(PyExc_ValueError,
                     "hidden Markov chains need at least one step and one state, got "
                     "T = %ld, K = %ld", (long)e[1], (long)e[2]);
        return -1;
    }
    *B = e[0];
    *T = e[1];
    *K = e[2];
    return 0;
}

/* Reuses *out if it is a C-contiguous, aligned, writeable array of the right shape and
   type, else replaces it. Returns 0, or -1 with a Python exception set. */
static int pmem_hmm_prepare_output(PyArrayObject** out, int ndim, npy_intp* dims, int typenum)
{
    if (*out != NULL && PyArray_NDIM(*out) == ndim && PyArray_TYPE(*out) == typenum
        && PyArray_ISCARRAY(*out) && PyArray_CompareLists(PyArray_DIMS(*out), dims, ndim)) {
        return 0;
    }
    Py_XDECREF(*out);
    *out = (PyArrayObject*)PyArray_EMPTY(ndim, dims, typenum, 0);
    return (*out == NULL) ? -1 : 0;
}

#endif
"""

# Shared opening and closing of the three Ops' c_code: contiguous inputs, output
# allocation, the batch driver without the GIL, releases, then failure if any.
_C_CODE_TEMPLATE = r"""
{
    PyArrayObject* emit_c = NULL;
    PyArrayObject* trans_c = NULL;
    PyArrayObject* init_c = NULL;
    npy_intp B = 0, T = 0, K = 0;
    int failed = pmem_hmm_prepare_inputs(%(log_emission)s, %(log_transition)s,
                                         %(log_initial)s, &emit_c, &trans_c, &init_c,
                                         &B, &T, &K);
    if (!failed) {
        %(allocate)s
    }
    if (!failed) {
        const double* emit_data = (const double*)PyArray_DATA(emit_c);
        const double* trans_data = (const double*)PyArray_DATA(trans_c);
        const double* init_data = (const double*)PyArray_DATA(init_c);
        int status;
        Py_BEGIN_ALLOW_THREADS
        status = %(call)s;
        Py_END_ALLOW_THREADS
        if (status != 0) {
            PyErr_NoMemory();
            failed = 1;
        }
    }
    Py_XDECREF(emit_c);
    Py_XDECREF(trans_c);
    Py_XDECREF(init_c);
    if (failed) {
        %(fail)s
    }
}
"""

# The compiled-module cache is keyed on this version; deriving it from the shared C source
# means an edit there can never reuse a stale binary. Bump the integer when editing the C
# snippets built in the Ops' c_code methods or in _c_allocate.
_C_CODE_VERSION = (
    1,
    hashlib.sha256((_C_SUPPORT_CODE + _C_CODE_TEMPLATE).encode()).hexdigest()[:16],
)


def _c_allocate(outputs: list[tuple[str, int, str, str]]) -> str:
    """C statements allocating each ``(name, ndim, dims, typenum)`` output."""
    lines = []
    for index, (name, ndim, dims, typenum) in enumerate(outputs):
        lines.append(f"npy_intp dims_{index}[{ndim}] = {{{dims}}};")
        lines.append(
            f"failed = failed || pmem_hmm_prepare_output(&{name}, {ndim}, dims_{index}, {typenum});"
        )
    return "\n        ".join(lines)


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


class _HiddenMarkovOp(COp):
    """Shared input handling and C plumbing of the hidden Markov chain Ops."""

    __props__ = ()

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

    def c_support_code(self, **kwargs):
        return _C_SUPPORT_CODE

    def c_no_compile_args(self, **kwargs):
        # -inf and NaN are data here; fast-math would assume them away.
        return ["-ffast-math"]

    def c_code_cache_version(self):
        return _C_CODE_VERSION

    def _c_code(self, inames, fail, allocate, call):
        log_emission, log_transition, log_initial = inames
        return _C_CODE_TEMPLATE % {
            "log_emission": log_emission,
            "log_transition": log_transition,
            "log_initial": log_initial,
            "allocate": allocate,
            "call": call,
            "fail": fail,
        }


class ForwardBackward(_HiddenMarkovOp):
    """Forward–backward over a batch of chains: ``(log_gamma, transition_counts,
    log_likelihood)``; see :func:`forward_backward`."""

    def make_node(self, log_emission, log_transition, log_initial):
        inputs, (B, T, K) = self._input_variables(log_emission, log_transition, log_initial)
        outputs = [
            pt.tensor(dtype="float64", shape=(B, T, K)),
            pt.tensor(dtype="float64", shape=(B, K, K)),
            pt.tensor(dtype="float64", shape=(B,)),
        ]
        return Apply(self, inputs, outputs)

    def perform(self, node, inputs, output_storage):
        check_chain_shapes(*inputs)
        for storage, value in zip(output_storage, _forward_backward_numpy(*inputs)):
            storage[0] = value

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

    def c_code(self, node, name, inames, onames, sub):
        log_gamma, counts, log_likelihood = onames
        allocate = _c_allocate(
            [
                (log_gamma, 3, "B, T, K", "NPY_FLOAT64"),
                (counts, 3, "B, K, K", "NPY_FLOAT64"),
                (log_likelihood, 1, "B", "NPY_FLOAT64"),
            ]
        )
        call = (
            "pmem_hmm_forward_backward_batch(B, T, K, emit_data, trans_data, init_data, "
            f"(double*)PyArray_DATA({log_gamma}), (double*)PyArray_DATA({counts}), "
            f"(double*)PyArray_DATA({log_likelihood}))"
        )
        return self._c_code(inames, sub["fail"], allocate, call)


class ForwardFilter(_HiddenMarkovOp):
    """One-step predictive state distributions of a batch of chains; see
    :func:`forward_filter`."""

    def make_node(self, log_emission, log_transition, log_initial):
        inputs, (B, T, K) = self._input_variables(log_emission, log_transition, log_initial)
        return Apply(self, inputs, [pt.tensor(dtype="float64", shape=(B, T, K))])

    def perform(self, node, inputs, output_storage):
        check_chain_shapes(*inputs)
        output_storage[0][0] = _forward_filter_numpy(*inputs)

    def infer_shape(self, fgraph, node, input_shapes):
        return [input_shapes[0]]

    def L_op(self, inputs, outputs, output_grads):
        return [
            grad_not_implemented(
                self, position, x, "forward_filter's log_predictive is not differentiable."
            )
            for position, x in enumerate(inputs)
        ]

    def c_code(self, node, name, inames, onames, sub):
        (log_predictive,) = onames
        allocate = _c_allocate([(log_predictive, 3, "B, T, K", "NPY_FLOAT64")])
        call = (
            "pmem_hmm_forward_filter_batch(B, T, K, emit_data, trans_data, init_data, "
            f"(double*)PyArray_DATA({log_predictive}))"
        )
        return self._c_code(inames, sub["fail"], allocate, call)


class Viterbi(_HiddenMarkovOp):
    """Most probable state sequences of a batch of chains; see :func:`viterbi`."""

    def make_node(self, log_emission, log_transition, log_initial):
        inputs, (B, T, _) = self._input_variables(log_emission, log_transition, log_initial)
        outputs = [pt.tensor(dtype="int64", shape=(B, T)), pt.tensor(dtype="float64", shape=(B,))]
        return Apply(self, inputs, outputs)

    def perform(self, node, inputs, output_storage):
        check_chain_shapes(*inputs)
        for storage, value in zip(output_storage, _viterbi_numpy(*inputs)):
            storage[0] = value

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

    def c_code(self, node, name, inames, onames, sub):
        path, log_joint = onames
        allocate = _c_allocate([(path, 2, "B, T", "NPY_INT64"), (log_joint, 1, "B", "NPY_FLOAT64")])
        call = (
            "pmem_hmm_viterbi_batch(B, T, K, emit_data, trans_data, init_data, "
            f"(npy_int64*)PyArray_DATA({path}), (double*)PyArray_DATA({log_joint}))"
        )
        return self._c_code(inames, sub["fail"], allocate, call)


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
        As in :func:`forward_backward`.

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

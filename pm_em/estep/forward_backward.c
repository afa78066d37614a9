#section support_code

/* Forward-backward, the forward filter and Viterbi over a batch of hidden Markov
   chains, in log space: the C implementation of the Ops of forward_backward.py
   (loaded there with PyTensor's ExternalCOp). Shared by the three Ops: PyTensor
   deduplicates identical support code when several of them end up in one compiled
   module, and the guard keeps one copy when the code differs by nothing but
   whitespace. Nothing below the batch drivers touches the Python API, so the
   drivers run with the GIL released. */

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
static void pmem_hmm_scale_lines(npy_intp K, const double* log_trans, npy_intp line_stride,
                                 npy_intp entry_stride, double* line_max, double* scaled)
{
    for (npy_intp l = 0; l < K; ++l) {
        double m = -INFINITY;
        for (npy_intp e = 0; e < K; ++e) {
            const double v = log_trans[l * line_stride + e * entry_stride];
            if (v > m) m = v;
        }
        line_max[l] = m;
        for (npy_intp e = 0; e < K; ++e) {
            const npy_intp i = l * line_stride + e * entry_stride;
            scaled[i] = (m == -INFINITY) ? 0.0 : exp(log_trans[i] - m);
        }
    }
}

static void pmem_hmm_scale_transition(npy_intp K, const double* log_trans, double* col_max,
                                      double* col_scaled, double* row_max, double* row_scaled)
{
    /* Column k holds entries j * K + k; row j holds j * K + k. */
    pmem_hmm_scale_lines(K, log_trans, 1, K, col_max, col_scaled);
    pmem_hmm_scale_lines(K, log_trans, K, 1, row_max, row_scaled);
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


/* ---------------------------------------------------------------------------------
   The three Ops' entry points, called by ExternalCOp's generated code as
   f(log_emission, log_transition, log_initial, &output_0, ...): contiguous inputs,
   output allocation, the batch driver without the GIL, releases. Nonzero on failure,
   with a Python exception set.
   --------------------------------------------------------------------------------- */

/* What the three entry points share around their batch driver. */
typedef struct {
    PyArrayObject* emit;
    PyArrayObject* trans;
    PyArrayObject* init;
    npy_intp B, T, K;
} pmem_hmm_inputs;

static int pmem_hmm_open(PyArrayObject* log_emit, PyArrayObject* log_trans,
                         PyArrayObject* log_init, pmem_hmm_inputs* in)
{
    in->emit = NULL;
    in->trans = NULL;
    in->init = NULL;
    in->B = in->T = in->K = 0;
    return pmem_hmm_prepare_inputs(log_emit, log_trans, log_init, &in->emit, &in->trans,
                                   &in->init, &in->B, &in->T, &in->K);
}

static int pmem_hmm_close(pmem_hmm_inputs* in, int failed)
{
    Py_XDECREF(in->emit);
    Py_XDECREF(in->trans);
    Py_XDECREF(in->init);
    return failed;
}

#define PMEM_HMM_DATA(a) ((const double*)PyArray_DATA(a))

/* Run a batch driver call without the GIL unless `failed`; a nonzero status is an
   allocation failure. */
#define PMEM_HMM_RUN(failed, call)                  \
    if (!(failed)) {                                \
        int pmem_status;                            \
        Py_BEGIN_ALLOW_THREADS                      \
        pmem_status = (call);                       \
        Py_END_ALLOW_THREADS                        \
        if (pmem_status != 0) {                     \
            PyErr_NoMemory();                       \
            (failed) = 1;                           \
        }                                           \
    }

static int pmem_hmm_forward_backward_op(PyArrayObject* log_emit, PyArrayObject* log_trans,
                                        PyArrayObject* log_init, PyArrayObject** log_gamma,
                                        PyArrayObject** counts,
                                        PyArrayObject** log_likelihood)
{
    pmem_hmm_inputs in;
    int failed = pmem_hmm_open(log_emit, log_trans, log_init, &in);
    if (!failed) {
        npy_intp gamma_dims[3] = {in.B, in.T, in.K};
        npy_intp count_dims[3] = {in.B, in.K, in.K};
        npy_intp ll_dims[1] = {in.B};
        failed = pmem_hmm_prepare_output(log_gamma, 3, gamma_dims, NPY_FLOAT64)
                 || pmem_hmm_prepare_output(counts, 3, count_dims, NPY_FLOAT64)
                 || pmem_hmm_prepare_output(log_likelihood, 1, ll_dims, NPY_FLOAT64);
    }
    PMEM_HMM_RUN(failed, pmem_hmm_forward_backward_batch(
            in.B, in.T, in.K, PMEM_HMM_DATA(in.emit), PMEM_HMM_DATA(in.trans),
            PMEM_HMM_DATA(in.init), (double*)PyArray_DATA(*log_gamma),
            (double*)PyArray_DATA(*counts), (double*)PyArray_DATA(*log_likelihood)));
    return pmem_hmm_close(&in, failed);
}

static int pmem_hmm_forward_filter_op(PyArrayObject* log_emit, PyArrayObject* log_trans,
                                      PyArrayObject* log_init, PyArrayObject** log_predictive)
{
    pmem_hmm_inputs in;
    int failed = pmem_hmm_open(log_emit, log_trans, log_init, &in);
    if (!failed) {
        npy_intp dims[3] = {in.B, in.T, in.K};
        failed = pmem_hmm_prepare_output(log_predictive, 3, dims, NPY_FLOAT64);
    }
    PMEM_HMM_RUN(failed, pmem_hmm_forward_filter_batch(
            in.B, in.T, in.K, PMEM_HMM_DATA(in.emit), PMEM_HMM_DATA(in.trans),
            PMEM_HMM_DATA(in.init), (double*)PyArray_DATA(*log_predictive)));
    return pmem_hmm_close(&in, failed);
}

static int pmem_hmm_viterbi_op(PyArrayObject* log_emit, PyArrayObject* log_trans,
                               PyArrayObject* log_init, PyArrayObject** path,
                               PyArrayObject** log_joint)
{
    pmem_hmm_inputs in;
    int failed = pmem_hmm_open(log_emit, log_trans, log_init, &in);
    if (!failed) {
        npy_intp path_dims[2] = {in.B, in.T};
        npy_intp joint_dims[1] = {in.B};
        failed = pmem_hmm_prepare_output(path, 2, path_dims, NPY_INT64)
                 || pmem_hmm_prepare_output(log_joint, 1, joint_dims, NPY_FLOAT64);
    }
    PMEM_HMM_RUN(failed, pmem_hmm_viterbi_batch(
            in.B, in.T, in.K, PMEM_HMM_DATA(in.emit), PMEM_HMM_DATA(in.trans),
            PMEM_HMM_DATA(in.init), (npy_int64*)PyArray_DATA(*path),
            (double*)PyArray_DATA(*log_joint)));
    return pmem_hmm_close(&in, failed);
}

#endif

"""Memory of a fit: the EM loop and the result (``EM.finish`` and the InferenceData)
each allocate a few n x K tables, whatever the number of terms and iterations.

The unit is one n x K float64 table, ``n * K * 8`` bytes; the figure is
``tracemalloc``'s peak above the level at the start of the phase (NumPy reports its
buffers to it, those PyTensor's compiled code allocates included). At n = 1,000,000
``benchmarks/memory.py`` measures 4.0-4.6 tables for the loop and 2.4-3.1 for the
result; before, 10 and 22 (one table per term and per intermediate of the pointwise
log-likelihood, two copies of the responsibilities per E-step, a (K, n, K) product
for the weights' counts). At the n here, a few hundred kB of Python objects add a
fraction of a table, which the bounds allow for.
"""

import gc
import tracemalloc
import warnings

import numpy as np
import pymc as pm
import pytest

import pm_em
from pm_em.fit.loop import run_em
from pm_em.results.inference_data import build_inference_data

N = 20_000
K = 2
TABLE = N * K * 8
START = {"w": np.array([0.5, 0.5]), "mu": np.array([1.0, 6.0]), "sigma": np.array([1.5, 1.5])}


@pytest.fixture(scope="module")
def fitted():
    """The benchmark's 1-D mixture (flat priors), its routine and a converged run."""
    rng = np.random.default_rng(20240601)
    z = (rng.random(N) < 0.6).astype(int)
    x = rng.normal(np.array([2.0, 5.0])[z], np.array([0.5, 1.0])[z])
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(K))
        mu = pm.Flat("mu", shape=K)
        sigma = pm.HalfFlat("sigma", shape=K)
        z = pm.Categorical("z", p=w, shape=N)
        pm.Normal("x", mu[z], sigma[z], observed=x)
    em = pm_em.EM(model)
    values = em.to_values(START)
    state, history = run_em(em.routine, values, tol=1e-8, max_iter=1000, warn=False)
    assert history.converged
    return em, values, state, history


def traced_peak(fn) -> int:
    """Bytes ``fn()`` allocates at its peak, above what was allocated before."""
    gc.collect()
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return peak - baseline


def test_fit_loop_holds_a_few_tables(fitted):
    em, values, _, _ = fitted
    peak = traced_peak(lambda: run_em(em.routine, values, tol=1e-8, max_iter=1000, warn=False))
    # 4.6 tables at n = 1e6: the current responsibilities, the E-step's own table
    # and its responsibility-weighted data, the previous state's responsibilities.
    assert peak < 6.5 * TABLE, f"fit loop peaked at {peak / TABLE:.1f} tables"


def test_result_holds_a_few_tables(fitted):
    em, _, state, history = fitted

    def finish():
        result = em.finish(state, history)
        result.restarts = [history]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build_inference_data(em, result, tol=1e-8, max_iter=1000)

    idata = finish()  # the first call compiles the result function
    peak = traced_peak(finish)
    # 3.1 tables at n = 1e6, 2.5 of them what the InferenceData keeps (lp_z is the
    # fit's own table; the labels, the pointwise log-likelihood, coordinates).
    assert peak < 5.0 * TABLE, f"finish peaked at {peak / TABLE:.1f} tables"
    assert idata.posterior["lp_z"].shape == (1, 1, N, K)
    np.testing.assert_allclose(
        float(idata.log_likelihood["x"].sum()), idata.posterior.attrs["log_likelihood"]
    )

"""A chunked fit runs the in-memory EM loop (pm_em.fit.loop): SQUAREM, callback,
Ctrl-C and the degenerate-solution diagnosis behave as in memory, against the
in-memory fit of the same data from the same start."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pymc as pm
import pytest

import pm_em
from pm_em import EM
from pm_em.chunks.fit import ChunkedEM
from tests.models import SPIKE_DATA, SPIKE_START, spike_model
from tests.test_chunked import CASES, assert_same_fit, fit_in_chunks


def fit_in_memory(case, **kwargs):
    build, data, _, start = CASES[case]
    return pm_em.find_MAP(build(data), initvals=start, init="jitter", progressbar=False, **kwargs)


@pytest.mark.parametrize(
    ("case", "options"),
    [
        ("gmm", {"accelerate": "squarem"}),
        ("zip", {"accelerate": "squarem"}),
        ("gamma_scales", {"accelerate": "squarem"}),
        # 30 plain EM steps, then SQUAREM cycles over the numeric M-step.
        ("poisson_lognormal", {"accelerate": "auto", "tol": 1e-12}),
    ],
    ids=["gmm-squarem", "zip-squarem", "numeric-squarem", "numeric-auto"],
)
def test_squarem_in_chunks_takes_the_in_memory_iterates(case, options):
    """The same SQUAREM cycles: the extrapolation reads the EM map's iterates, which
    agree to ~1e-15, so the step lengths, the E-step counts and every iterate
    agree too."""
    reference = fit_in_memory(case, **options)
    chunked = fit_in_chunks(case, **options)
    assert_same_fit(chunked, reference)
    stats, expected = chunked.em_stats, reference.em_stats
    assert int(stats.n_e_steps) == int(expected.n_e_steps)
    assert stats.attrs["squarem_from"] == expected.attrs["squarem_from"] >= 0
    assert stats.attrs["accelerate"] == options["accelerate"]


def _record(stop_at=None):
    seen = []

    def callback(info):
        seen.append(info)
        return stop_at is not None and (info.restart, info.iteration) == stop_at

    return seen, callback


def _assert_same_calls(chunked, reference):
    assert [(i.restart, i.iteration) for i in chunked] == [
        (i.restart, i.iteration) for i in reference
    ]
    for got, expected in zip(chunked, reference):
        np.testing.assert_allclose(got.logp, expected.logp, rtol=1e-12)
        assert set(got.point) == set(expected.point)
        for name, value in expected.point.items():
            np.testing.assert_allclose(got.point[name], value, atol=1e-10)


def test_callback_sees_what_it_sees_in_memory_and_stops_the_fit():
    seen_memory, callback = _record(stop_at=(0, 3))
    reference = fit_in_memory("gmm", callback=callback)
    seen_chunks, callback = _record(stop_at=(0, 3))
    chunked = fit_in_chunks("gmm", callback=callback)
    _assert_same_calls(seen_chunks, seen_memory)
    assert len(seen_chunks) == 3
    stats = chunked.em_stats
    assert (int(stats.n_iter), bool(stats.converged), stats.attrs["stopped"]) == (
        3,
        False,
        "callback",
    )
    # The result is the point the callback saw last.
    for name, value in seen_chunks[-1].point.items():
        np.testing.assert_array_equal(chunked.posterior[name].values[0, 0], value)
    np.testing.assert_allclose(stats.logp.values, reference.em_stats.logp.values, rtol=1e-12)


def test_callback_stopping_a_start_ends_the_remaining_ones():
    """n_init = 3 in this process (one start after another): a stop in start 1 leaves
    start 2 unrun, as in memory."""
    options = {"n_init": 3, "random_seed": 7, "accelerate": None, "progressbar": False}
    build, data, length, _ = CASES["zip"]
    seen_memory, callback = _record(stop_at=(1, 2))
    reference = pm_em.find_MAP(build(data), init="jitter", callback=callback, **options)
    seen_chunks, callback = _record(stop_at=(1, 2))
    chunked = pm_em.find_MAP(build(data[:length]), data={"x": data}, callback=callback, **options)
    _assert_same_calls(seen_chunks, seen_memory)
    assert chunked.em_stats.sizes["restart"] == 2
    assert chunked.em_stats.attrs["stopped"] == "callback"
    assert chunked.em_stats.attrs["best_restart"] == reference.em_stats.attrs["best_restart"]


def test_ctrl_c_in_chunks_returns_the_last_completed_iteration(caplog, python_ctrl_c):
    """A real SIGINT, sent from another thread while the chunks are passed over: at
    most the iteration under way completes, and its point comes back."""
    seen, sent = [], threading.Event()

    def interrupt():
        os.kill(os.getpid(), signal.SIGINT)
        sent.set()

    def callback(info):
        seen.append(info)
        if info.iteration == 3:
            threading.Thread(target=interrupt).start()
        if info.iteration >= 4:
            sent.wait(timeout=60)
        time.sleep(0.005)

    chunked = fit_in_chunks("gmm", callback=callback, tol=1e-300, max_iter=500)
    stats = chunked.em_stats
    assert (bool(stats.converged), stats.attrs["stopped"]) == (False, "interrupt")
    n_iter = int(stats.n_iter)
    assert 3 <= n_iter <= 4 and seen[-1].iteration <= 4
    # The point returned is that of the last iteration recorded.
    last = seen[n_iter - 1]
    assert last.iteration == n_iter and float(stats.logp[-1]) == last.logp
    for name, value in last.point.items():
        np.testing.assert_array_equal(chunked.posterior[name].values[0, 0], value)
    assert np.all(np.diff(stats.logp.values) >= 0)


def test_collapsing_component_in_chunks_is_diagnosed_as_in_memory():
    with pytest.warns(pm_em.DegenerateSolutionWarning, match=r"sigma\[1\].*InverseGamma"):
        reference = pm_em.find_MAP(spike_model(SPIKE_DATA), initvals=SPIKE_START, progressbar=False)
    # The outlier is in the last chunk, not in the one the model is declared on.
    with pytest.warns(pm_em.DegenerateSolutionWarning, match=r"sigma\[1\].*InverseGamma"):
        chunked = pm_em.find_MAP(
            spike_model(SPIKE_DATA[:20]),
            data={"x": SPIKE_DATA},
            initvals=SPIKE_START,
            progressbar=False,
        )
    for idata in (reference, chunked):
        assert bool(idata.em_stats.restart_degenerate[0]) and not bool(idata.em_stats.converged)
    assert int(chunked.em_stats.n_iter) == int(reference.em_stats.n_iter)
    # The last sound point is returned: the start.
    for name, value in SPIKE_START.items():
        np.testing.assert_allclose(chunked.posterior[name].values[0, 0], value)


RNG = np.random.default_rng(4)
EMPTY_DATA = np.concatenate([RNG.normal(-2.0, 1.0, 30), RNG.normal(2.0, 1.0, 20)])
RNG.shuffle(EMPTY_DATA)


def fixed_weights(data):
    """A third component of prior probability 0: its expected count is exactly 0."""
    with pm.Model() as model:
        mu = pm.Normal("mu", 0.5, 10.0, shape=3)
        z = pm.Categorical("z", np.array([0.6, 0.4, 0.0]), shape=len(data))
        pm.Normal("x", mu[z], 1.0, observed=data)
    return model


def test_empty_component_in_chunks_is_reported_as_in_memory():
    start = {"mu": np.array([-1.0, 1.0, 0.0])}
    options = {"initvals": start, "tol": 1e-14, "progressbar": False}
    empty = r"Empty component\(s\): z = 2 \(expected count 0\)"
    with pytest.warns(pm_em.DegenerateSolutionWarning, match=empty):
        reference = pm_em.find_MAP(fixed_weights(EMPTY_DATA), **options)
    with pytest.warns(pm_em.DegenerateSolutionWarning, match=empty):
        chunked = pm_em.find_MAP(fixed_weights(EMPTY_DATA[:15]), data={"x": EMPTY_DATA}, **options)
    assert int(chunked.em_stats.n_iter) == int(reference.em_stats.n_iter)
    np.testing.assert_allclose(
        chunked.posterior["mu"].values, reference.posterior["mu"].values, atol=1e-10
    )


def test_expected_counts_over_chunks_are_the_in_memory_counts():
    """The protocol's expected counts (what the empty-component check reads): the
    chunked E-step's equal the in-memory routine's on the full data, and add up to
    the number of rows."""
    build, data, length, start = CASES["gmm"]
    full = EM(build(data))
    chunked = ChunkedEM(EM(build(data[:length])), {"x": data})
    values = full.to_values(start)
    (expected,) = full.routine.expected_counts(full.routine.e_step(values)[1])
    (got,) = chunked.expected_counts(chunked.e_step(values)[1])
    assert got.latent == expected.latent == "z"
    np.testing.assert_array_equal(got.support, expected.support)
    np.testing.assert_allclose(got.counts, expected.counts, rtol=1e-12)
    np.testing.assert_allclose(got.counts.sum(), len(data), rtol=1e-12)


def ridge(data):
    """A K = 4 mixture on log-normal data (tests/test_restarts.py): jittered starts
    end at different modes, after SQUAREM took over (accelerate="auto")."""
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(4))
        mu = pm.Normal("mu", 0.0, 10.0, shape=4)
        sigma = pm.InverseGamma("sigma", 2.0, 0.1, shape=4)
        z = pm.Categorical("z", p=w, shape=len(data))
        pm.Normal("x", mu[z], sigma[z], observed=data)
    return model


def test_starts_at_different_modes_warn_as_in_memory():
    x = np.random.default_rng(5).lognormal(0.0, 0.6, 300)
    options = {"n_init": 4, "random_seed": 0, "progressbar": False}
    different = r"1 of 4 converged starts.*raise n_init"
    # Each start leaves components empty, in chunks as in memory.
    empty = r"Empty component\(s\): z = "
    with pytest.warns(pm_em.MultimodalWarning, match=different):
        with pytest.warns(pm_em.DegenerateSolutionWarning, match=empty):
            reference = pm_em.find_MAP(ridge(x), init="jitter", **options)
    with pytest.warns(pm_em.MultimodalWarning, match=different):
        with pytest.warns(pm_em.DegenerateSolutionWarning, match=empty):
            chunked = pm_em.find_MAP(ridge(x[:100]), data={"x": x}, **options)
    stats, expected = chunked.em_stats, reference.em_stats
    for name in ("best_restart", "restarts_at_best"):
        assert stats.attrs[name] == expected.attrs[name]
    assert stats.attrs["restart_spread"] == pytest.approx(expected.attrs["restart_spread"])
    assert stats.attrs["restart_spread"] > 1.0
    np.testing.assert_array_equal(stats.restart_n_iter, expected.restart_n_iter)
    np.testing.assert_array_equal(stats.restart_squarem_from, expected.restart_squarem_from)
    np.testing.assert_array_equal(stats.restart_degenerate, expected.restart_degenerate)

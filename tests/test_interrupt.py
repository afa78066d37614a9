"""Stopping a fit early: a ``callback`` that asks to stop, and Ctrl-C. Either way
the best point so far comes back as InferenceData, marked not converged."""

import logging
import os
import signal
import threading
import time

import numpy as np
import pytest

import pm_em
from tests.models import normal_mixture


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(-1.0, 1.0, 60), rng.normal(1.5, 1.0, 60)])
    model = normal_mixture(x)
    pm_em.EM(model)  # compiled once for the module
    return model


def fit(model, **kwargs):
    options = {"progressbar": False, "random_seed": 1, "tol": 1e-300, "max_iter": 500}
    return pm_em.find_MAP(model, **{**options, **kwargs})


def _stats(idata):
    stats = idata.em_stats
    return int(stats["n_iter"]), bool(stats["converged"]), stats.attrs["stopped"]


@pytest.mark.parametrize("how", ["return_true", "stop_iteration"])
def test_callback_stops_early_with_the_point_it_saw(model, how):
    seen = []

    def callback(info):
        seen.append(info)
        if info.iteration == 3:
            if how == "stop_iteration":
                raise StopIteration
            return True
        return None

    idata = fit(model, callback=callback)
    assert [info.iteration for info in seen] == [1, 2, 3]
    assert all(info.restart == 0 for info in seen)
    assert _stats(idata) == (3, False, "callback")
    # The result is the point of the last iteration, with its log-posterior.
    np.testing.assert_array_equal(idata.posterior["mu"].values[0, 0], seen[-1].point["mu"])
    assert float(idata.em_stats["logp"][-1]) == seen[-1].logp
    em = pm_em.routine.em.cached_routine(model)
    np.testing.assert_allclose(em.logp(seen[-1].point), seen[-1].logp, rtol=1e-12)
    # Monotone up to there.
    assert np.all(np.diff([info.logp for info in seen]) >= 0)


def test_callback_stops_the_remaining_starts(model):
    def callback(info):
        return info.restart == 1 and info.iteration == 2

    idata = fit(model, n_init=4, callback=callback)
    stats = idata.em_stats
    assert stats.sizes["restart"] == 2  # starts 2 and 3 never ran
    assert stats.attrs["stopped"] == "callback"
    finals = [float(v[~np.isnan(v)][-1]) for v in stats["restart_logp"].values]
    assert stats.attrs["best_restart"] == int(np.argmax(finals))


def test_ctrl_c_stops_within_an_iteration_with_the_best_point(model, caplog, python_ctrl_c):
    """A real SIGINT, delivered from another thread while EM runs. Measured in
    iterations, not seconds (a loaded machine stretches any wall-clock bound): once
    the signal is sent, at most the iteration under way completes."""
    seen, at_kill, sent = [], [], threading.Event()

    def interrupt():
        at_kill.append(seen[-1])  # iterations completed when the signal goes out
        os.kill(os.getpid(), signal.SIGINT)
        sent.set()

    def callback(info):
        seen.append(info.iteration)
        if info.iteration == 3:
            threading.Thread(target=interrupt).start()
        if info.iteration >= 4:
            # However late the thread runs, the signal arrives during the first start:
            # a fast start converges within ten iterations, before a late signal.
            sent.wait(timeout=60)
        time.sleep(0.005)  # iterations long enough to be interrupted inside one

    with caplog.at_level(logging.WARNING, logger="pm_em"):
        idata = fit(model, callback=callback, n_init=3)
    assert at_kill, "the interrupt was never sent"
    n_iter, converged, stopped = _stats(idata)
    assert (converged, stopped) == (False, "interrupt")
    # No later callback, and the result is the last iteration completed before the
    # signal, or the one under way when it came.
    assert seen[-1] <= at_kill[0] + 1
    assert at_kill[0] <= n_iter <= at_kill[0] + 1
    assert "Interrupted after 1 of 3 start(s)" in caplog.text
    assert np.all(np.isfinite(idata.posterior["mu"].values))
    logp = idata.em_stats["logp"].values
    assert np.all(np.diff(logp) >= 0)


def test_step_api_callback(model):
    em = pm_em.routine.em.cached_routine(model)
    calls = []

    def callback(info):
        calls.append((info.iteration, info.logp))
        return info.iteration == 2

    point, history = em.run(em.initial_point(random_seed=2), callback=callback)
    assert [c[0] for c in calls] == [1, 2]
    assert (history.n_iter, history.converged, history.stopped) == (2, False, "callback")
    np.testing.assert_allclose(em.logp(point), calls[-1][1], rtol=1e-12)


def test_callback_must_be_callable(model):
    with pytest.raises(TypeError, match="callback must be callable"):
        fit(model, callback=1)

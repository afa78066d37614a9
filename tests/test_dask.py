"""Chunks on the workers of a Dask LocalCluster (2 workers, 1 thread each): the same
fit as in memory, and a worker killed mid-fit loses nothing."""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest

from pm_em import EM
from pm_em.chunks.fit import ChunkedEM, fit_chunked
from pm_em.errors import DegenerateSolutionWarning, EMConvergenceWarning
from pm_em.fit.loop import run_em
from tests.test_chunked import CASES, assert_same_fit, fit_in_memory

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, dashboard_address=":0", processes=True
    )
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


@pytest.fixture(scope="module")
def reference():
    return fit_in_memory("gmm")


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    path = tmp_path_factory.mktemp("chunked") / "x.npy"
    np.save(path, CASES["gmm"][1])
    return np.load(path, mmap_mode="r")


def test_cluster_fit_matches_in_memory_fit(client, reference, mapped):
    build, data, length, start = CASES["gmm"]
    fit = fit_chunked(
        build(data[:length]), data={"x": mapped}, initvals=start, client=client, progressbar=False
    )
    assert_same_fit(fit, reference)


def test_cluster_fit_with_a_numeric_m_step_matches_in_memory_fit(client):
    """The numeric block's Q and gradient summed over the workers' chunks (each
    evaluation a call to every worker) gives the in-memory fit."""
    build, data, length, start = CASES["gamma_scales"]
    fit = fit_chunked(
        build(data[:length]), data={"x": data}, initvals=start, client=client, progressbar=False
    )
    assert_same_fit(fit, fit_in_memory("gamma_scales"))


class KillOneWorker:
    """A chunk hook (``on_chunks``) that kills a worker's process (every worker's, with
    ``every=True``) after the first chunks of the second iteration."""

    def __init__(self, client, every=False):
        self.client = client
        self.every = every
        self.calls = 0
        self.killed = None

    def __call__(self, n_done):
        self.calls += 1
        if self.calls == 5 and self.killed is None:
            workers = sorted(self.client.scheduler_info()["workers"])
            self.killed = workers[0]
            pids = self.client.run(os.getpid, workers=workers if self.every else workers[:1])
            for pid in pids.values():
                os.kill(pid, signal.SIGKILL)


def test_killed_worker_is_replaced_and_the_fit_is_unchanged(client, reference, mapped):
    build, data, length, start = CASES["gmm"]
    em = EM(build(data[:length]))
    hook = KillOneWorker(client)
    routine = ChunkedEM(em, {"x": mapped}, client=client, on_chunks=hook)
    state, history = run_em(routine, em.to_values(start), tol=1e-8, max_iter=1000)
    values = state.values
    assert hook.killed is not None
    # Every chunk is now held by the surviving worker.
    assert hook.killed not in routine.executor.owned
    assert sorted(i for idx in routine.executor.owned.values() for i in idx) == list(
        range(routine.n_chunks)
    )
    assert history.converged and history.n_iter == int(reference.em_stats.n_iter)
    point = em.to_point(values)
    for name, value in point.items():
        np.testing.assert_allclose(value, reference.posterior[name].values[0, 0], atol=1e-10)


@pytest.mark.slow
def test_every_worker_lost_stops_with_the_last_iteration(client, reference, mapped):
    """No worker left that holds chunks (the nannies restart empty ones): the fit
    stops, warns, and returns the last completed iteration's point."""
    build, data, length, start = CASES["gmm"]
    em = EM(build(data[:length]))
    routine = ChunkedEM(em, {"x": mapped}, client=client, on_chunks=KillOneWorker(client, True))
    with pytest.warns(EMConvergenceWarning, match="Every Dask worker holding chunks was lost"):
        state, history = run_em(routine, em.to_values(start), tol=1e-8, max_iter=1000)
    values, logp = state.values, state.logp
    assert history.stopped == "workers lost" and not history.converged
    # The point returned is the one whose log-posterior was recorded last.
    assert logp == history.logp[-1] and history.n_iter >= 1
    assert np.isfinite(em.logp(em.to_point(values)))


def _calls():
    seen = []

    def callback(info):
        seen.append((info.restart, info.iteration, info.logp, threading.current_thread().name))

    return seen, callback


@pytest.mark.parametrize("accelerate", [None, "squarem"], ids=["em", "squarem"])
def test_starts_side_by_side_equal_starts_one_after_another(client, accelerate):
    """n_init = 3 starts on the same workers, one driver thread each: every start's
    trace, the winner and its point are bit for bit those of the starts run one
    after another (each pass sums the workers' parts in the same order)."""
    build, data, length, _ = CASES["zip"]
    options = {"client": client, "n_init": 3, "random_seed": 7, "progressbar": False}
    fits, calls = {}, {}
    for concurrent in (True, False):
        calls[concurrent], callback = _calls()
        fits[concurrent] = fit_chunked(
            build(data[:length]),
            data={"x": data},
            accelerate=accelerate,
            callback=callback,
            concurrent_starts=concurrent,
            **options,
        )
    side, sequential = fits[True].em_stats, fits[False].em_stats
    np.testing.assert_array_equal(side.restart_logp.values, sequential.restart_logp.values)
    np.testing.assert_array_equal(side.restart_n_e_steps, sequential.restart_n_e_steps)
    assert side.attrs["best_restart"] == sequential.attrs["best_restart"]
    for name in fits[False].posterior.data_vars:
        np.testing.assert_array_equal(fits[True].posterior[name], fits[False].posterior[name])
    # The same callback calls; side by side, each start's come from one of the
    # starts' threads (whether the starts also interleave depends on the machine's
    # load, so it is not asserted).
    assert sorted(c[:3] for c in calls[True]) == sorted(c[:3] for c in calls[False])
    for restart in range(3):
        (thread,) = {c[3] for c in calls[True] if c[0] == restart}
        assert thread.startswith("pm_em-start")
    assert {c[3] for c in calls[False]} == {threading.main_thread().name}


def _three_unending_starts(client, callback):
    """Three starts of the ZIP case side by side on the cluster, which cannot
    converge (tol=1e-300): what stops them is the user's."""
    build, data, length, _ = CASES["zip"]
    return fit_chunked(
        build(data[:length]),
        data={"x": data},
        client=client,
        n_init=3,
        random_seed=7,
        tol=1e-300,
        max_iter=500,
        callback=callback,
        progressbar=False,
    )


def test_a_stop_ends_every_start_side_by_side(client):
    """The callback stops start 1 at its second iteration: the others (which cannot
    converge at tol=1e-300) stop at the end of their iteration under way."""

    def callback(info):
        return (info.restart, info.iteration) == (1, 2)

    idata = _three_unending_starts(client, callback)
    stats = idata.em_stats
    assert stats.attrs["stopped"] == "callback"
    assert stats.sizes["restart"] == 3 and not stats.restart_converged.values.any()
    assert int(stats.restart_n_iter[1]) == 2 and (stats.restart_n_iter.values < 500).all()


def test_ctrl_c_stops_every_start_side_by_side(client, python_ctrl_c):
    """A real SIGINT reaches the main thread, which waits for the starts' threads:
    each start ends at its iteration under way, and the best point so far is
    returned."""
    started, sent = threading.Event(), threading.Event()

    def interrupt():
        os.kill(os.getpid(), signal.SIGINT)
        sent.set()

    # The calls are serialized: the first start to reach iteration 3 sends the signal,
    # before any call can wait for it (waiting for one given start would hold the
    # lock that start's own call needs, until the timeout).
    def callback(info):
        if info.iteration >= 3 and not started.is_set():
            started.set()
            threading.Thread(target=interrupt).start()
        if info.iteration > 3:
            sent.wait(timeout=60)

    idata = _three_unending_starts(client, callback)
    stats = idata.em_stats
    assert stats.attrs["stopped"] == "interrupt"
    assert not stats.restart_converged.values.any() and (stats.restart_n_iter.values < 50).all()
    best = stats.attrs["best_restart"]
    finals = [v[~np.isnan(v)][-1] for v in stats.restart_logp.values]
    assert best == int(np.argmax(finals))
    build, data, _, _ = CASES["zip"]
    em = EM(build(data))
    point = {name: idata.posterior[name].values[0, 0] for name in ("psi", "rate")}
    np.testing.assert_allclose(em.logp(point), finals[best], rtol=1e-12)


def test_collapse_on_the_cluster_is_diagnosed(client):
    """The model refuses a scale of 0 on a worker (ParameterValueError): that is the
    computation's own failure, not a lost worker, and the loop's collapse diagnosis
    follows as in memory."""
    from tests.models import SPIKE_DATA, SPIKE_START, spike_model

    with pytest.warns(DegenerateSolutionWarning, match=r"sigma\[1\].*InverseGamma"):
        idata = fit_chunked(
            spike_model(SPIKE_DATA[:20]),
            data={"x": SPIKE_DATA},
            initvals=SPIKE_START,
            client=client,
            progressbar=False,
        )
    assert bool(idata.em_stats.restart_degenerate[0])

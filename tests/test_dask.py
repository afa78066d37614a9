"""Chunks on the workers of a Dask LocalCluster (2 workers, 1 thread each): the same
fit as in memory, and a worker killed mid-fit loses nothing."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from pm_em import EM
from pm_em.chunks.fit import ChunkedEM, fit_chunked
from pm_em.errors import EMConvergenceWarning
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

"""Fixtures shared by the test files.

PyTensor compilation is what makes the suite slow, so fixtures that compile (a model's
EM routine, a fit) are module-scoped: every test of a file shares them, and pm_em's own
routine cache shares a model's routine between ``pm_em.EM`` and ``find_MAP``.
"""

import os
import signal

import numpy as np
import pytest

from tests.helpers import ENGINE_TOL, MAX_ITER


@pytest.fixture
def rng():
    """A generator with a fixed seed, fresh for each test: random test data, but every
    run sees the same. Tests whose expected numbers depend on the draws seed their own."""
    return np.random.default_rng(20260501)


@pytest.fixture(scope="module")
def pm_em():
    """``pm_em``, imported by the tests that use it only: the references' own tests
    (tests/test_examples.py, tests/test_hmm.py) run without it."""
    import pm_em

    return pm_em


@pytest.fixture(scope="module")
def idata(case, pm_em):
    """``find_MAP`` on the file's ``case`` (its ``model``) from ``case.start``, converged
    as tightly as the references are (one compilation and fit per case)."""
    return pm_em.find_MAP(
        case.model,
        initvals=case.start,
        tol=ENGINE_TOL,
        max_iter=MAX_ITER,
        random_seed=0,
        progressbar=False,
    )


@pytest.fixture
def python_ctrl_c():
    """Ctrl-C raising ``KeyboardInterrupt`` in the main thread, as in a terminal.

    A process started in the background by a non-interactive shell (a CI job, a
    pytest-xdist worker) inherits SIGINT ignored, and Python then installs no handler:
    the signal would go nowhere. The test restores Python's own handler and unblocks
    the signal for its duration."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    yield
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    signal.signal(signal.SIGINT, previous)


# The number of pytest-xdist workers for ``-n auto``: one per core, at most
# MAX_WORKERS. Each worker imports PyMC, PyTensor and JAX (~0.5 GB) and compiles the
# models of its test files; past a few workers the duplicated compilation costs more
# than the extra cores give.
MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config):
    return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))

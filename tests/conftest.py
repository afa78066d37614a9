"""Fixtures shared by the test files.

PyTensor compilation is what makes the suite slow, so fixtures that compile (a model's
EM routine, a fit) are module-scoped: every test of a file shares them, and pm_em's own
routine cache shares a model's routine between ``pm_em.EM`` and ``find_MAP``.
"""

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

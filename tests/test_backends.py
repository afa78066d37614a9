"""The backends: the option, and one fit per family on the backend the suite does not
run by default (the suite runs on ``pm_em.compile.default_backend()``: JAX when it is
installed, else C, or what ``PM_EM_BACKEND`` sets; this file then runs the other one).
Each fit is checked against an independent reference: scikit-learn, NumPy
Baum–Welch, the conjugate formula, the float64 mode.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pymc as pm
import pytensor
import pytensor.tensor as pt
import pytest

import pm_em
from pm_em.compile import default_backend, resolve_backend
from pm_em.routine.em import cached_routine
from tests.models import unit_scale_mixture
from tests.references import hmm as reference_hmm

REPO = Path(__file__).resolve().parent.parent
DEFAULT = default_backend()
#: The backend this suite does not run by default: every family gets a fit on it.
OTHER = "c" if DEFAULT == "jax" else "jax"


@pytest.fixture(scope="module", autouse=True)
def other_backend_available():
    if OTHER == "jax":
        pytest.importorskip("jax")
    if OTHER == "c" and not pytensor.config.cxx:
        pytest.skip("no C compiler configured")


@pytest.fixture(scope="module", autouse=True)
def unoptimized_c():
    """The C modules of this file are compiled without optimization (``-O0`` after
    PyTensor's ``-O3``): on an empty compiledir that takes about a third less time
    (185 s -> 120 s for five of the fits, measured 2026-12-06), and the numbers are
    the same, as no fast-math is in the flags. The flags are part of PyTensor's cache
    key, so these modules never stand in for a user's optimized ones. pm_em's own C
    code (the forward-backward Op) is also compiled at ``-O3`` by
    tests/test_forward_backward.py."""
    flags = f"{pytensor.config.gcc__cxxflags} -O0".strip()
    with pytensor.config.change_flags(gcc__cxxflags=flags):
        yield


def _function_modes(em):
    """The linker of every function the routine compiled so far."""
    routine = em.routine
    fns = [routine._e_step_fn, routine._constrained_fn, routine._unconstrained_fn]
    fns += [routine._objective_fn, routine._closed_form_fn, routine._stats_fn]
    fns += [routine._chain_fn, routine._result_fn]
    return {type(fn.maker.linker).__name__ for fn in fns if fn is not None}


def _fit_other(model, start, random_seed):
    """``find_MAP`` on the other backend from ``start``, converged tightly."""
    return pm_em.find_MAP(
        model,
        initvals=start,
        tol=1e-12,
        backend=OTHER,
        progressbar=False,
        random_seed=random_seed,
    )


def test_mixture_matches_sklearn():
    from examples import gaussian_mixture as example

    x = example.simulate_data(n=300)
    start = example.initial_values(x)
    model = example.build_model(x)
    idata = _fit_other(model, start, random_seed=1)
    assert idata.em_stats.attrs["backend"] == OTHER
    em = cached_routine(model, backend=OTHER)
    assert _function_modes(em) == ({"JAXLinker"} if OTHER == "jax" else {"VMLinker"})
    gm = example.fit_sklearn(x, start)
    post = idata.posterior.squeeze(("chain", "draw"))
    np.testing.assert_allclose(post["w"], gm.weights_, atol=1e-6)
    np.testing.assert_allclose(post["mu"], gm.means_[:, 0], atol=1e-6)
    np.testing.assert_allclose(post["sigma"], np.sqrt(gm.covariances_[:, 0, 0]), atol=1e-6)
    assert float(idata.log_likelihood["x"].sum()) == pytest.approx(gm.score(x[:, None]) * 300)


def test_mvnormal_mixture_matches_sklearn():
    """The observation count is a shape here: JAX needs it static (freeze_shapes)."""
    from examples import multivariate_mixture as example

    X = example.simulate_data(n=240)
    start, cov = example.kmeans_start(X)
    idata = _fit_other(example.build_model(X), start, random_seed=6)
    gm = example.fit_sklearn(X, start, cov)
    post = idata.posterior.squeeze(("chain", "draw"))
    np.testing.assert_allclose(post["w"], gm.weights_, atol=1e-5)
    np.testing.assert_allclose(post["mu"], gm.means_, atol=1e-5)
    np.testing.assert_allclose(post["cov"], gm.covariances_, atol=1e-5)


def test_hmm_matches_baum_welch():
    pytest.importorskip("pymc_extras")
    from examples import hmm as example

    y, _ = example.simulate_data(n_steps=200)
    start = example.initial_values(y)
    idata = _fit_other(example.build_model(y), start, random_seed=1)
    # Flat priors: Dirichlet(1) on P and pi, flat mu and sigma: Baum-Welch's MLE.
    expected = reference_hmm.baum_welch(y, start, emission="gaussian", tol=1e-12)
    post = idata.posterior.squeeze(("chain", "draw"))
    # The mode has transitions at 0, where both approach it slowly: the likelihood
    # agrees tightly, the parameters to the distance both still have to go.
    loglik = float(idata.log_likelihood["y"].sum())
    assert loglik == pytest.approx(expected.loglik_trace[-1], rel=1e-9)
    for name in ("P", "pi", "mu", "sigma"):
        np.testing.assert_allclose(post[name], expected.estimates[name], atol=1e-4, err_msg=name)
    path = reference_hmm.viterbi_paths(y, expected.estimates, "gaussian")[0]
    np.testing.assert_array_equal(post["s"], path)


def test_implicit_mixture_matches_sklearn():
    from examples import gaussian_mixture as example

    x = example.simulate_data(n=300, seed=5)
    start = example.initial_values(x)
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Flat("mu", shape=2)
        sigma = pm.HalfFlat("sigma", shape=2)
        pm.NormalMixture("x", w=w, mu=mu, sigma=sigma, observed=x)
    idata = _fit_other(model, start, random_seed=1)
    gm = example.fit_sklearn(x, start)
    post = idata.posterior.squeeze(("chain", "draw"))
    np.testing.assert_allclose(post["w"], gm.weights_, atol=1e-6)
    np.testing.assert_allclose(post["mu"], gm.means_[:, 0], atol=1e-6)
    np.testing.assert_allclose(post["sigma"], np.sqrt(gm.covariances_[:, 0, 0]), atol=1e-6)


def test_laplace_conjugate_mean_is_exact(rng):
    """mu ~ Normal(m0, s0), x ~ Normal(mu, 1): the posterior of mu is Gaussian, so the
    Laplace approximation is exact."""
    m0, s0 = 1.0, 2.0
    x = rng.normal(0.5, 1.0, 20)
    y = rng.normal(3.0 * (rng.random(25) < 0.3), 1.0)
    with pm.Model() as model:
        mu = pm.Normal("mu", m0, s0)
        pm.Normal("x", mu, 1.0, observed=x)
        p = pm.Beta("p", 2.0, 2.0)
        z = pm.Bernoulli("z", p=p, shape=len(y))
        pm.Normal("y", 3.0 * z, 1.0, observed=y)
    idata = pm_em.find_MAP(model, laplace=True, backend=OTHER, progressbar=False, random_seed=1)
    precision = 1 / s0**2 + len(x)
    mean = (m0 / s0**2 + x.sum()) / precision
    np.testing.assert_allclose(idata.fit["mean_vector"].sel(rows="mu"), mean, rtol=1e-8)
    np.testing.assert_allclose(idata.fit["mu_se"], np.sqrt(1 / precision), rtol=1e-8)
    # fit_laplace on the result reuses the fit's routine (its backend is recorded).
    assert cached_routine(model, backend=OTHER) is pm_em.results.laplace._routine_for(
        model, idata.map, OTHER
    )


def test_float32_matches_the_float64_mode(rng):
    x = np.concatenate([rng.normal(-2.0, 1.0, 100), rng.normal(3.0, 1.0, 100)])
    start = {"w": np.array([0.5, 0.5]), "mu": np.array([-1.0, 1.0]), "sigma": np.ones(2)}

    def fit(floatx, **kwargs):
        with pytensor.config.change_flags(floatX=floatx):
            with pm.Model() as model:
                w = pm.Dirichlet("w", np.ones(2))
                mu = pm.Normal("mu", 0.0, 10.0, shape=2)
                sigma = pm.HalfNormal("sigma", 5.0, shape=2)
                z = pm.Categorical("z", w, shape=len(x))
                pm.Normal("x", mu[z], sigma[z], observed=x)
            return pm_em.find_MAP(model, initvals=start, progressbar=False, **kwargs)

    fit32 = fit("float32", backend=OTHER)
    reference = fit("float64", tol=1e-12)  # default backend
    assert bool(fit32.em_stats.converged)
    for name in ("w", "mu", "sigma"):
        assert fit32.posterior[name].dtype == np.float32
        np.testing.assert_allclose(
            fit32.posterior[name], reference.posterior[name], rtol=1e-4, atol=1e-5
        )


# -- the option ---------------------------------------------------------------------------


def test_backend_option_is_checked():
    with pytest.raises(ValueError, match=r"backend must be one of \['c', 'jax'\], got 'cuda'"):
        resolve_backend("cuda")
    with pytest.raises(ValueError, match="contradicts compile_kwargs"):
        resolve_backend("c", {"mode": "JAX"})
    assert resolve_backend(None, {"mode": "JAX"}) == "jax"
    assert resolve_backend(None, {"mode": "FAST_RUN"}) == "c"


def test_jax_keeps_float64_where_a_float32_literal_meets_zeros():
    """PyTensor's JAX dispatch makes ``pt.zeros`` weakly typed, so a float32 literal
    (``0.0``) pulled it down to float32 (pm_em.jax_dispatch): the GLS system of the
    closed-form MvNormal mean was ~1e-7 off. Exact, and float64 as declared."""
    pytest.importorskip("jax")
    from pm_em.compile import compile_function

    x = pt.vector("x", shape=(2,))
    h = pt.inc_subtensor(pt.zeros(4)[[0, 3]], x)
    y = pt.switch(h > 0, h, 0.0)
    assert y.owner.inputs[2].dtype == "float32" and y.dtype == "float64"
    (out,) = compile_function([x], [y], backend="jax")(np.array([1.0, 2.0]) / 3.0)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, np.array([1.0, 0.0, 0.0, 2.0]) / 3.0)


def test_jax_leaves_elementwise_fusion_to_xla():
    """Under JAX, PyTensor's fusion pass (``Composite`` ops, for C loops) is left out
    of the rewrites: XLA fuses by itself, and the pass costs compile time. A stable
    chain of elementwise ops stays unfused and computes what NumPy does."""
    pytest.importorskip("jax")
    from pytensor.scalar.basic import Composite

    from pm_em.compile import compile_function

    x = pt.vector("x", shape=(5,))
    y = pt.log1p(pt.exp(-pt.abs(x))) + pt.maximum(x, 0.0) - 2.0 * x**2
    fn = compile_function([x], [y], backend="jax")
    values = np.linspace(-800.0, 3.0, 5)
    (out,) = fn(values)
    scalar_ops = [getattr(node.op, "scalar_op", None) for node in fn.maker.fgraph.apply_nodes]
    assert scalar_ops and not any(isinstance(op, Composite) for op in scalar_ops)
    np.testing.assert_allclose(out, np.logaddexp(0.0, values) - 2.0 * values**2, rtol=1e-15)


def test_jax_writes_through_a_constant_mask_inside_a_vectorized_graph():
    """PyMC imputes missing data by writing through a constant boolean mask, and
    enumerating a latent vectorizes that write: JAX then saw the mask traced and
    refused it (NonConcreteBooleanIndexError). Exact, as NumPy computes it."""
    pytest.importorskip("jax")
    from pytensor.graph.replace import vectorize_graph

    from pm_em.compile import compile_function

    mask = np.array([True, False, True, True, False])
    base = pt.vector("base", shape=(5,))
    imputed = pt.vector("imputed", shape=(3,))
    core = pt.set_subtensor(base[mask], imputed)[mask] * 2.0
    batch = pt.matrix("batch", shape=(4, 3))
    (out,) = compile_function(
        [base, batch], [vectorize_graph(core, {imputed: batch})], backend="jax"
    )(np.arange(5.0), np.arange(12.0).reshape(4, 3))
    np.testing.assert_array_equal(out, 2.0 * np.arange(12.0).reshape(4, 3))


def test_jax_computes_float64_in_a_float32_session():
    """PyTensor sets JAX's float64 from floatX when its JAX dispatch is imported: in a
    process started with floatX=float32, float64 graphs were computed in float32."""
    pytest.importorskip("jax")
    script = (
        "import numpy as np, pytensor.tensor as pt\n"
        "from pm_em.compile import compile_function\n"
        "x = pt.dvector('x')\n"
        "(out,) = compile_function([x], [x + 1e-10], backend='jax')(np.array([1.0]))\n"
        "print(out.dtype, repr(float(out[0] - 1.0)))\n"
    )
    env = {**os.environ, "PYTENSOR_FLAGS": "floatX=float32"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    dtype, difference = done.stdout.split()
    assert dtype == "float64"
    assert float(difference) == pytest.approx(1e-10, rel=1e-5)


def test_a_cold_jax_fit_starts_no_compiler(tmp_path):
    """A JAX fit in a fresh process, on an empty compiledir, runs no subprocess.
    PyTensor's sparse rewrite ``local_usmm`` reads ``config.blas__ldflags`` while
    rewriting a normal log-density, and the first read compiled and ran test
    programs with g++: 0.3 to 0.5 s of every cold JAX fit (``_jax_mode``)."""
    pytest.importorskip("jax")
    script = (
        "import numpy as np, pytensor.utils\n"
        "started = []\n"
        "popen = pytensor.utils.subprocess_Popen\n"
        "def recorded(command, **kwargs):\n"
        "    started.append(command)\n"
        "    return popen(command, **kwargs)\n"
        "pytensor.utils.subprocess_Popen = recorded\n"
        "import pm_em\n"
        "from tests.models import normal_mixture\n"
        "x = np.concatenate([np.linspace(-3, -1, 20), np.linspace(1, 3, 20)])\n"
        "idata = pm_em.find_MAP(normal_mixture(x), backend='jax', progressbar=False)\n"
        "assert idata.em_stats.attrs['backend'] == 'jax'\n"
        "print(len(started))\n"
    )
    env = {**os.environ}
    env["PYTENSOR_FLAGS"] = ",".join(
        filter(None, [env.get("PYTENSOR_FLAGS", ""), f"base_compiledir={tmp_path}"])
    )
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.split()[-1] == "0"


def test_environment_sets_the_default(monkeypatch):
    pytest.importorskip("jax")
    monkeypatch.delenv("PM_EM_BACKEND", raising=False)
    assert default_backend() == "jax"
    assert resolve_backend(None) == "jax"
    assert resolve_backend("c") == "c"  # an explicit backend wins
    monkeypatch.setenv("PM_EM_BACKEND", "c")
    assert default_backend() == "c"
    assert resolve_backend("jax") == "jax"
    monkeypatch.delenv("PM_EM_BACKEND")
    monkeypatch.setattr("pm_em.compile._jax_installed", lambda: False)
    assert default_backend() == "c"  # the fallback without JAX
    monkeypatch.setenv("PM_EM_BACKEND", "numpy")
    with pytest.raises(ValueError, match="backend must be one of"):
        default_backend()


def test_same_shape_data_reuses_the_compiled_routine_on_both_backends(rng):
    """pm.set_data of the same shape: the routine (and its compiled functions, JAX's
    with the data shapes frozen) is reused, and fits the new values exactly as a
    model built on them; a new dim length rebuilds it."""
    x = np.concatenate([rng.normal(-2.0, 1.0, 20), rng.normal(2.0, 1.0, 20)])
    other = x[::-1] + 0.5

    options = {
        "initvals": {"mu": np.array([-1.0, 1.0])},
        "progressbar": False,
        "tol": 1e-12,
        "random_seed": 3,
    }
    for backend in (DEFAULT, OTHER):
        model = unit_scale_mixture(x)
        pm_em.find_MAP(model, backend=backend, **options)
        routine = cached_routine(model, backend=backend)
        with model:
            pm.set_data({"data": other})
        idata = pm_em.find_MAP(model, backend=backend, **options)
        assert cached_routine(model, backend=backend) is routine
        expected = pm_em.find_MAP(unit_scale_mixture(other), backend=backend, **options)
        for name in ("w", "mu"):
            np.testing.assert_allclose(
                idata.posterior[name], expected.posterior[name], rtol=1e-10, err_msg=backend
            )
        with model:
            pm.set_data({"data": other[:30]}, coords={"obs": np.arange(30)})
        idata = pm_em.find_MAP(model, backend=backend, **options)
        assert cached_routine(model, backend=backend) is not routine
        assert idata.posterior["lp_z"].shape == (1, 1, 30, 2)

"""Shared machinery for the pm_em benchmarks.

Each benchmark script measures pm_em and its peers in one process, from one start and
with one stopping rule, and reports ratios: absolute times drift between runs on small
shared machines, ratios measured in the same run much less so.

PyTensor, PyMC and pm_em are imported lazily (inside functions) so that
``--fresh-compiledir`` can point PyTensor at an empty compilation directory before
PyTensor reads its flags.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Params = dict[str, np.ndarray]

#: Name of the method every other method's parameters are compared with.
REFERENCE = "numpy"


@dataclass(frozen=True)
class Settings:
    """What one benchmark run is asked to do (from the command line).

    Parameters
    ----------
    n : int
        Number of observations.
    seed : int
        Seed of the simulated data; also pm_em's ``random_seed``.
    tol : float
        pm_em's ``tol``.
    peer_tol : float
        The same stopping rule expressed as the peers' tol (see `peer_tolerance`).
    max_iter : int
        Iteration cap for every method.
    repeats : int
        Timed fits per method; the median is reported.
    memory : bool
        Whether to measure each method's traced memory peak in one extra fit.
    skip_pm_em : bool
        Measure the peers only.
    compiledir : str or None
        The fresh PyTensor compiledir in use, if one was asked for.
    json_path : pathlib.Path or None
        Where to write the JSON record.
    """

    n: int
    seed: int
    tol: float
    peer_tol: float
    max_iter: int
    repeats: int
    memory: bool
    skip_pm_em: bool
    compiledir: str | None
    json_path: Path | None


@dataclass(frozen=True)
class Problem:
    """A mixture problem as the NumPy reference sees it.

    Parameters
    ----------
    x : numpy.ndarray
        Observations, first axis over observations.
    start : dict of str to numpy.ndarray
        The common starting parameters.
    log_joint : callable
        ``log_joint(x, params)`` returns the ``(n, K)`` table ``log p(x_i, z_i = k)``.
    m_step : callable
        ``m_step(x, resp)`` returns the parameters maximizing the expected
        complete-data log-likelihood.
    canonical : callable
        Puts the components of a parameter dict into a canonical order, so that
        methods can be compared despite label switching.
    """

    x: np.ndarray
    start: Params
    log_joint: Callable[[np.ndarray, Params], np.ndarray]
    m_step: Callable[[np.ndarray, np.ndarray], Params]
    canonical: Callable[[Params], Params]

    def loglik(self, params: Params) -> float:
        """Observed-data log-likelihood of ``params`` (one function for all methods)."""
        log_norm, _ = log_normalize(self.log_joint(self.x, params))
        return float(log_norm.sum())


@dataclass
class MethodResult:
    """What one method produced and how long it took.

    Parameters
    ----------
    name : str
        Short name of the method, used in the table.
    fit_times : list of float
        Wall-clock seconds of each timed fit from the common start.
    n_iter : int
        EM iterations the method reports.
    converged : bool
        Whether the method reports convergence before ``max_iter``.
    params : dict of str to numpy.ndarray
        Final parameters, components in canonical order.
    loglik : float
        Observed-data log-likelihood of ``params`` by `Problem.loglik`.
    reported_loglik : float
        The method's own final log-likelihood or log-posterior, as it reports it.
    extra : dict
        Method-specific figures (compile times, cache state, ...).
    """

    name: str
    fit_times: list[float]
    n_iter: int
    converged: bool
    params: Params
    loglik: float
    reported_loglik: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fit_s(self) -> float:
        """Median of the timed fits, in seconds."""
        return statistics.median(self.fit_times)

    @property
    def s_per_iter(self) -> float:
        """Median fit time divided by the number of iterations."""
        return self.fit_s / max(self.n_iter, 1)


def parse_settings(description: str, default_n: int, n_dims: int) -> Settings:
    """Read the command line shared by the benchmark scripts.

    With ``--fresh-compiledir`` this also points PyTensor at an empty temporary
    compilation directory, so it must run before PyTensor is imported.

    Parameters
    ----------
    description : str
        Shown by ``--help``.
    default_n : int
        Default number of observations.
    n_dims : int
        Dimension of one observation (for `peer_tolerance`).

    Returns
    -------
    Settings
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--n", type=int, default=default_n, help="observations")
    parser.add_argument("--repeats", type=int, default=3, help="timed fits per method")
    parser.add_argument("--seed", type=int, default=20240601, help="data seed")
    parser.add_argument(
        "--tol",
        type=float,
        default=1e-8,
        help="pm_em's tol; the peers get the equivalent stopping rule",
    )
    parser.add_argument("--max-iter", type=int, default=1000, help="iteration cap")
    parser.add_argument("--json", type=Path, default=None, help="also write JSON here")
    parser.add_argument(
        "--fresh-compiledir",
        action="store_true",
        help="compile into an empty temporary PyTensor compiledir (truly cold)",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="run each method once more under tracemalloc and report its peak",
    )
    parser.add_argument("--skip-pm-em", action="store_true", help="peers only")
    args = parser.parse_args()
    return Settings(
        n=args.n,
        seed=args.seed,
        tol=args.tol,
        peer_tol=peer_tolerance(args.tol, n_dims),
        max_iter=args.max_iter,
        repeats=args.repeats,
        memory=args.memory,
        skip_pm_em=args.skip_pm_em,
        compiledir=use_fresh_compiledir() if args.fresh_compiledir else None,
        json_path=args.json,
    )


def peer_tolerance(tol: float, n_dims: int) -> float:
    """Translate pm_em's ``tol`` into the peers' rule on the mean log-likelihood.

    pm_em stops when the observed-data log-posterior changes by less than ``tol``
    times the number of observed *elements* (``n * n_dims`` for ``n`` observations of
    dimension ``n_dims``) between iterations. The peers (the NumPy EM here,
    scikit-learn) compare the change of the log-likelihood divided by the number of
    *rows* ``n`` with their tol, so the equivalent is ``tol * n_dims``.

    Parameters
    ----------
    tol : float
        pm_em's tolerance.
    n_dims : int
        Dimension of one observation.

    Returns
    -------
    float
    """
    return tol * n_dims


def use_fresh_compiledir() -> str:
    """Point PyTensor at a new, empty compilation directory, removed at exit.

    Returns
    -------
    str
        The temporary directory used.

    Raises
    ------
    RuntimeError
        If PyTensor was already imported: it reads ``PYTENSOR_FLAGS`` once, at import.
    """
    if "pytensor" in sys.modules:
        raise RuntimeError("expected PyTensor not imported yet, got it in sys.modules")
    compiledir = tempfile.mkdtemp(prefix="pm_em_bench_compiledir_")
    atexit.register(shutil.rmtree, compiledir, ignore_errors=True)
    flags = [os.environ.get("PYTENSOR_FLAGS", ""), f"compiledir={compiledir}"]
    os.environ["PYTENSOR_FLAGS"] = ",".join(filter(None, flags))
    return compiledir


def progress(message: str) -> None:
    """Say on stderr what is being timed, so that a long run shows where it is."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def count_compiled_modules() -> tuple[str, int]:
    """Count the compiled C modules in PyTensor's on-disk cache.

    Returns
    -------
    compiledir : str
        PyTensor's compilation directory.
    n_modules : int
        Number of shared libraries under it: a rise across a call means that call
        compiled C code rather than loading it from the cache.
    """
    import pytensor

    compiledir = Path(pytensor.config.compiledir)
    return str(compiledir), sum(1 for _ in compiledir.rglob("*.so"))


def warm_up_pytensor() -> float:
    """Compile a trivial PyTensor function so one-time setup is not charged to a model.

    With an empty compiledir PyTensor first builds its own helper modules (the lazy
    linker and friends): a user pays that once per installation, not per model.

    Returns
    -------
    float
        Seconds the warm-up took.
    """
    import pytensor
    import pytensor.tensor as pt

    start = time.perf_counter()
    v = pt.dvector("v")
    pytensor.function([v], pt.exp(v).sum())(np.ones(3))
    return time.perf_counter() - start


def log_normalize(log_joint: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalize a table of log-joint densities over its last axis.

    Parameters
    ----------
    log_joint : numpy.ndarray of shape (n, K)
        ``log p(x_i, z_i = k)``.

    Returns
    -------
    log_norm : numpy.ndarray of shape (n,)
        ``log p(x_i)``, by a max-shifted log-sum-exp.
    resp : numpy.ndarray of shape (n, K)
        Responsibilities ``p(z_i = k | x_i)``.
    """
    shift = log_joint.max(axis=1, keepdims=True)
    resp = np.exp(log_joint - shift)
    total = resp.sum(axis=1, keepdims=True)
    resp /= total
    return (shift + np.log(total))[:, 0], resp


def numpy_em(problem: Problem, tol: float, max_iter: int) -> tuple[Params, int, bool, list[float]]:
    """Run textbook EM in log space from ``problem.start``.

    Each iteration is one E-step at the current parameters (which also gives their
    log-likelihood) and one M-step. The loop stops when the mean log-likelihood per
    observation changes by less than ``tol`` between consecutive E-steps: the rule
    scikit-learn's ``GaussianMixture`` applies, with the same iteration count.

    Parameters
    ----------
    problem : Problem
        Data, start, E-step table and M-step.
    tol : float
        Stopping threshold on the change of the mean log-likelihood.
    max_iter : int
        Maximum number of M-steps.

    Returns
    -------
    params : dict of str to numpy.ndarray
        Parameters after the last M-step.
    n_iter : int
        Number of M-steps done.
    converged : bool
        Whether the stopping rule was met before ``max_iter``.
    history : list of float
        Mean log-likelihood at each E-step.
    """
    x, params = problem.x, problem.start
    history: list[float] = []
    previous = -np.inf
    for n_iter in range(1, max_iter + 1):
        log_norm, resp = log_normalize(problem.log_joint(x, params))
        params = problem.m_step(x, resp)
        current = float(log_norm.sum()) / x.shape[0]
        history.append(current)
        if abs(current - previous) < tol:
            return params, n_iter, True, history
        previous = current
    return params, max_iter, False, history


def time_repeated(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Call ``fn`` ``repeats`` times and time each call with ``time.perf_counter``.

    Parameters
    ----------
    fn : callable
        Called with no arguments.
    repeats : int
        Number of timed calls (at least one is made).

    Returns
    -------
    times : list of float
        Seconds per call.
    result
        What the last call returned.
    """
    times = []
    result = None
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def traced_peak_mb(fn: Callable[[], Any]) -> float:
    """Peak memory traced by ``tracemalloc`` during one call, in MB.

    NumPy reports its array buffers to ``tracemalloc``, so this covers the arrays a
    method allocates (PyTensor's outputs included), not memory that C code takes
    with its own allocator.

    Parameters
    ----------
    fn : callable
        Called once with no arguments.

    Returns
    -------
    float
        Peak traced allocation above the level at the start of the call.
    """
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return (peak - baseline) / 1e6


def run_numpy(problem: Problem, settings: Settings) -> MethodResult:
    """Measure the textbook NumPy EM (`numpy_em`) on ``problem``.

    Parameters
    ----------
    problem : Problem
        The mixture problem.
    settings : Settings
        Stopping rule (``peer_tol``), repeats, memory flag.

    Returns
    -------
    MethodResult
    """

    def fit():
        return numpy_em(problem, settings.peer_tol, settings.max_iter)

    progress("numpy: timing fits")
    times, (params, n_iter, converged, history) = time_repeated(fit, settings.repeats)
    params = problem.canonical(params)
    n = problem.x.shape[0]
    extra: dict[str, Any] = {"loglik_history": [h * n for h in history]}
    if settings.memory:
        extra["peak_traced_mb"] = traced_peak_mb(fit)
    return MethodResult(
        name="numpy",
        fit_times=times,
        n_iter=n_iter,
        converged=converged,
        params=params,
        loglik=problem.loglik(params),
        reported_loglik=history[-1] * n,
        extra=extra,
    )


def run_sklearn(
    problem: Problem,
    settings: Settings,
    options: dict[str, Any],
    to_params: Callable[[Any], Params],
) -> MethodResult:
    """Measure scikit-learn's ``GaussianMixture`` from the common start.

    Parameters
    ----------
    problem : Problem
        The mixture problem; ``x`` is reshaped to ``(n, d)``.
    settings : Settings
        Stopping rule (``peer_tol``), iteration cap, repeats, memory flag.
    options : dict
        Further keyword arguments of ``GaussianMixture``: ``n_components``,
        ``covariance_type`` and ``weights_init``, ``means_init``, ``precisions_init``
        set to the common start (scikit-learn then discards the initial
        responsibilities it draws, so only their cheap ``"random_from_data"`` kind is
        asked for).
    to_params : callable
        Fitted estimator to a parameter dict named as in ``problem.start``.

    Returns
    -------
    MethodResult
    """
    from sklearn.mixture import GaussianMixture

    X = problem.x.reshape(problem.x.shape[0], -1)
    options = {
        "tol": settings.peer_tol,
        "reg_covar": 0.0,
        "max_iter": settings.max_iter,
        "init_params": "random_from_data",
        "random_state": 0,
        **options,
    }

    def fit():
        return GaussianMixture(**options).fit(X)

    progress("sklearn: timing fits")
    times, fitted = time_repeated(fit, settings.repeats)
    params = problem.canonical(to_params(fitted))
    extra: dict[str, Any] = {}
    if settings.memory:
        extra["peak_traced_mb"] = traced_peak_mb(fit)
    return MethodResult(
        name="sklearn",
        fit_times=times,
        n_iter=int(fitted.n_iter_),
        converged=bool(fitted.converged_),
        params=params,
        loglik=problem.loglik(params),
        reported_loglik=float(fitted.lower_bound_) * X.shape[0],
        extra=extra,
    )


def run_pm_em(
    problem: Problem,
    settings: Settings,
    build_model: Callable[[], Any],
    initvals: Params,
    extract: Callable[[Any], Params],
) -> MethodResult:
    """Measure pm_em: cold build of the EM routine, first fit, then warm fits.

    The routine is built once with ``pm_em.EM(model)`` (the compile time). Then
    ``pm_em.find_MAP`` runs on the same model object once (first fit) and
    ``settings.repeats`` more times (warm fits, which reuse the routine cached on
    the model).

    Parameters
    ----------
    problem : Problem
        The mixture problem (for the common log-likelihood).
    settings : Settings
        ``tol``, iteration cap, repeats, seed, memory flag.
    build_model : callable
        Returns a new ``pymc.Model``.
    initvals : dict of str to numpy.ndarray
        The common start, by the model's free-variable names.
    extract : callable
        ``extract(idata)`` returns a parameter dict named as in ``problem.start``.

    Returns
    -------
    MethodResult
    """
    import pm_em

    setup_s = warm_up_pytensor()
    model = build_model()
    compiledir, modules_before = count_compiled_modules()
    progress("pm_em: building the EM routine")
    start = time.perf_counter()
    pm_em.EM(model)
    compile_s = time.perf_counter() - start
    _, modules_after_build = count_compiled_modules()

    def fit():
        return pm_em.find_MAP(
            model,
            initvals=initvals,
            tol=settings.tol,
            max_iter=settings.max_iter,
            random_seed=settings.seed,
            progressbar=False,
        )

    progress(f"pm_em: EM() took {compile_s:.1f} s; first find_MAP")
    (first_fit_s,), _ = time_repeated(fit, 1)
    _, modules_after_fit = count_compiled_modules()
    progress(f"pm_em: first find_MAP took {first_fit_s:.1f} s; warm fits")
    warm_times, idata = time_repeated(fit, settings.repeats)

    stats = idata.em_stats
    logp = np.asarray(stats["logp"], dtype=float).ravel()
    logp = logp[np.isfinite(logp)]
    params = problem.canonical(extract(idata))
    if modules_before == 0:
        state = "empty (cold)"
    elif modules_after_build > modules_before:
        state = "warm for PyTensor's own modules, cold for this model's graph"
    else:
        state = "warm (nothing compiled during EM())"
    extra: dict[str, Any] = {
        "compile_s": compile_s,
        "first_fit_s": first_fit_s,
        "pytensor_setup_s": setup_s,
        "compiledir": compiledir,
        "compiledir_state": (
            f"{state}; {modules_before} modules before EM(), "
            f"{modules_after_build - modules_before} compiled during EM(), "
            f"{modules_after_fit - modules_after_build} during the first find_MAP"
        ),
        "logp_history": logp.tolist(),
    }
    if settings.memory:
        extra["peak_traced_mb"] = traced_peak_mb(fit)
    return MethodResult(
        name="pm_em",
        fit_times=warm_times,
        n_iter=int(np.asarray(stats["n_iter"]).ravel()[0]),
        converged=bool(np.asarray(stats["converged"]).ravel()[0]),
        params=params,
        loglik=problem.loglik(params),
        reported_loglik=float(logp[-1]) if logp.size else float("nan"),
        extra=extra,
    )


def point_estimate(idata: Any, name: str) -> np.ndarray:
    """Return the estimate of ``name``, dropping its chain and draw axes (both 1)."""
    values = np.asarray(idata.posterior[name])
    return values.reshape(values.shape[2:])


def max_abs_param_diff(a: Params, b: Params) -> float:
    """Largest absolute difference over every parameter the two dicts share.

    Parameters
    ----------
    a, b : dict of str to numpy.ndarray
        Parameters with components in the same canonical order.

    Returns
    -------
    float
    """
    return max(float(np.max(np.abs(a[key] - b[key]))) for key in a.keys() & b.keys())


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux units)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def environment() -> dict[str, Any]:
    """Versions and machine facts worth keeping next to the figures."""
    import pymc
    import pytensor
    import sklearn

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pymc": pymc.__version__,
        "pytensor": pytensor.__version__,
        "scikit-learn": sklearn.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "pytensor_linker": pytensor.config.linker,
        "pytensor_cxx": bool(pytensor.config.cxx),
        # Empty when PyTensor found no BLAS to link: its dot products then fall back
        # to slower code, which matters for pm_em's figures.
        "pytensor_blas_ldflags": pytensor.config.blas__ldflags,
    }


def report(title: str, results: list[MethodResult], settings: Settings) -> None:
    """Print the comparison table and optionally write everything as JSON.

    Parameters
    ----------
    title : str
        First line of the printed report.
    results : list of MethodResult
        One per method; the one named ``REFERENCE`` is the reference for parameter
        differences.
    settings : Settings
        The run's settings, printed and stored.
    """
    env = environment()
    by_name = {r.name: r for r in results}
    reference = by_name.get(REFERENCE, results[0])
    pm_em = by_name.get("pm_em")
    diffs = {r.name: max_abs_param_diff(r.params, reference.params) for r in results}

    print(f"\n{title}")
    print(
        f"  n={settings.n} seed={settings.seed} pm_em tol={settings.tol:g} "
        f"peer tol={settings.peer_tol:g} (mean loglik) repeats={settings.repeats} "
        f"fresh compiledir={settings.compiledir or 'no'}"
    )
    print(
        f"  pymc {env['pymc']}, pytensor {env['pytensor']}, scikit-learn "
        f"{env['scikit-learn']}, numpy {env['numpy']}, {env['cpus']} CPUs, PyTensor BLAS: "
        f"{env['pytensor_blas_ldflags'] or 'none linked'}"
    )
    header = (
        f"{'method':<8} {'fit s':>9} {'s/iter':>9} {'iters':>6} {'conv':>5} "
        f"{'loglik':>17} {'max|dθ| vs ' + reference.name:>17}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.name:<8} {r.fit_s:>9.4f} {r.s_per_iter:>9.5f} {r.n_iter:>6d} "
            f"{'yes' if r.converged else 'NO':>5} {r.loglik:>17.6f} "
            f"{diffs[r.name]:>17.2e}"
        )

    ratios: dict[str, dict[str, float]] = {}
    if pm_em is not None:
        extra = pm_em.extra
        print(
            f"\n  pm_em EM() build (compile): {extra['compile_s']:.3f} s; "
            f"first find_MAP: {extra['first_fit_s']:.3f} s; "
            f"warm find_MAP (median of {len(pm_em.fit_times)}): {pm_em.fit_s:.3f} s"
        )
        print(f"  PyTensor compiledir {extra['compiledir']}:")
        print(f"    {extra['compiledir_state']}")
        for r in results:
            if r is pm_em:
                continue
            ratios[r.name] = {
                "fit": pm_em.fit_s / r.fit_s,
                "per_iter": pm_em.s_per_iter / r.s_per_iter,
            }
            print(
                f"  pm_em / {r.name:<8} warm fit time {ratios[r.name]['fit']:7.2f}x"
                f"   per iteration {ratios[r.name]['per_iter']:7.2f}x"
            )
        # The log-posterior pm_em reports exceeds the log-likelihood by the prior's
        # log-density: log((K - 1)!) for the Dirichlet(1, ..., 1) weights, 0 otherwise.
        print(
            f"  pm_em's reported final logp {pm_em.reported_loglik:.6f} = loglik of its "
            f"parameters {pm_em.loglik:.6f} + {pm_em.reported_loglik - pm_em.loglik:.6f} "
            "(flat priors' log-density, expected log((K-1)!))"
        )
    memory = {r.name: r.extra["peak_traced_mb"] for r in results if "peak_traced_mb" in r.extra}
    if memory:
        print("  peak traced MB: " + ", ".join(f"{k} {v:.1f}" for k, v in memory.items()))
    print(f"  process peak RSS: {peak_rss_mb():.0f} MB")

    if settings.json_path is not None:
        record = {
            "title": title,
            "settings": {k: v for k, v in asdict(settings).items() if k != "json_path"},
            "environment": env,
            "results": [
                {
                    "name": r.name,
                    "fit_s": r.fit_s,
                    "fit_times": r.fit_times,
                    "s_per_iter": r.s_per_iter,
                    "n_iter": r.n_iter,
                    "converged": r.converged,
                    "loglik": r.loglik,
                    "reported_loglik": r.reported_loglik,
                    "max_abs_param_diff_vs_reference": diffs[r.name],
                    "params": {k: v.tolist() for k, v in r.params.items()},
                    "extra": r.extra,
                }
                for r in results
            ],
            "ratios_pm_em_over": ratios,
            "peak_rss_mb": peak_rss_mb(),
        }
        settings.json_path.write_text(json.dumps(record, indent=2))
        print(f"  wrote {settings.json_path}")

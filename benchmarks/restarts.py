"""Finding the best mode (issue 5): SQUAREM against plain EM, and restarts.

From the repository root, after ``pip install -e ".[bench]"``::

    python benchmarks/restarts.py                 # about 4 minutes on 2 cores
    python benchmarks/restarts.py --json out.json

Two measurements, in one run, printed as markdown (progress on stderr):

1. **Plain EM against SQUAREM** (``accelerate="squarem"``) from the same start with
   the same tight tolerance: E-steps and warm wall time to converge, whether both
   reach the same optimum, and whether SQUAREM's log-posterior trace ever decreases.
   On the seed examples of ``cases.py`` (the 1-D two-component normal mixture and the
   zero-inflated Poisson), and on the K = 4 mixture of part 2, where EM is slow. Each
   problem is fitted from its fixed start and from several jittered starts.
2. **Restarts on a multimodal mixture**: a K = 4 normal mixture, with proper priors
   (Dirichlet(1) weights, Normal means, InverseGamma scales) that keep every mode
   finite, fitted to log-normal data. Single starts (``n_init=1``) of every ``init``
   strategy locate the modes; the best of all is "the best mode". Then ``n_init=10``
   fits across 20 seeds: how many reach it, and how long they take.

See ``benchmarks/README.md``, "Restarts and SQUAREM", for a measured table.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import scaffold
from cases import CASES, Params, by_first_mean
from scaffold import progress

# --- the K = 4 mixture on skewed data -----------------------------------------------
# Log-normal data have a long right tail: a Gaussian mixture fitted to them can split
# the bulk and the tail in many nearly equally good ways, so its posterior has several
# local modes. The priors keep each of them finite (an InverseGamma scale has zero
# density at 0, so no component can collapse onto one observation); they are weak
# next to n = 1,000 observations. Weak enough that the best mode spends a component
# on the single largest observation, its scale held at ~0.025 by the prior: a
# bounded spike, the MAP of this model (README, "Restarts and SQUAREM").

MIX_K = 4
LOGNORMAL_MU = 0.0
LOGNORMAL_SIGMA = 0.6
PRIOR_MU_SD = 10.0
PRIOR_SIGMA_ALPHA = 2.0
PRIOR_SIGMA_BETA = 0.1


def lognormal_simulate(n: int, seed: int) -> np.ndarray:
    """Draw ``n`` points of LogNormal(0, 0.6): mode 0.70, median 1, mean 1.20."""
    return np.random.default_rng(seed).lognormal(LOGNORMAL_MU, LOGNORMAL_SIGMA, n)


def mixture4_model(x: np.ndarray):
    """K = 4 normal mixture with proper priors, ``Normal(mu[z], sigma[z])``."""
    import pymc as pm

    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(MIX_K))
        mu = pm.Normal("mu", 0.0, PRIOR_MU_SD, shape=MIX_K)
        sigma = pm.InverseGamma("sigma", PRIOR_SIGMA_ALPHA, PRIOR_SIGMA_BETA, shape=MIX_K)
        z = pm.Categorical("z", p=w, shape=x.shape[0])
        pm.Normal("x", mu[z], sigma[z], observed=x)
    return model


def mixture4_start(x: np.ndarray) -> Params:
    """A fixed, data-based start: equal weights, means at the octiles 1, 3, 5, 7,
    every scale half the data's standard deviation."""
    return {
        "w": np.full(MIX_K, 1.0 / MIX_K),
        "mu": np.quantile(x, (np.arange(MIX_K) + 0.5) / MIX_K),
        "sigma": np.full(MIX_K, x.std() / 2.0),
    }


# --- part 1: plain EM against SQUAREM -----------------------------------------------


@dataclass(frozen=True)
class SpeedProblem:
    """A model fitted by plain EM and by SQUAREM.

    Parameters
    ----------
    key : str
        Short name.
    title : str
        Human-readable description.
    simulate : callable
        ``simulate(n, seed)`` returns the data.
    build_model : callable
        ``build_model(x)`` returns the PyMC model.
    start : callable
        ``start(x)`` returns the fixed start, in the model's variable names.
    params : callable
        ``params(point)`` returns the point's parameters in a canonical component
        order (mixtures can switch labels), for comparing two fits.
    """

    key: str
    title: str
    simulate: Callable[[int, int], np.ndarray]
    build_model: Callable[[np.ndarray], Any]
    start: Callable[[np.ndarray], Params]
    params: Callable[[Params], Params]


def _from_case(key: str) -> SpeedProblem:
    """A `SpeedProblem` from a ``cases.py`` case: its data, model and common start."""
    case = CASES[key]
    return SpeedProblem(
        key=key,
        title=case.title,
        simulate=case.simulate,
        build_model=case.build_model,
        start=lambda x: case.initvals(case.start),
        params=lambda point: case.canonical(case.from_posterior(point.__getitem__)),
    )


SPEED_PROBLEMS = {
    "gmm1d": _from_case("gmm1d"),
    "zip": _from_case("zip"),
    "lognormal4": SpeedProblem(
        key="lognormal4",
        title="K = 4 normal mixture, log-normal data, proper priors",
        simulate=lognormal_simulate,
        build_model=mixture4_model,
        start=mixture4_start,
        params=lambda point: by_first_mean({k: point[k] for k in ("w", "mu", "sigma")}),
    ),
}
SPEED_PLAN = (("gmm1d", 1_000), ("gmm1d", 100_000), ("zip", 100_000), ("lognormal4", 1_000))


#: Warm runs of one method from one start are repeated until they add up to this.
MIN_TIMED_S = 0.5


@dataclass
class Run:
    """One ``EM.run`` to convergence: median warm time and what it returned."""

    seconds: float
    n_iter: int
    n_e_steps: int
    converged: bool
    degenerate: bool
    logp: list[float]
    params: Params
    warnings: list[str]

    @property
    def largest_decrease(self) -> float:
        """The largest drop of the log-posterior from one iteration to the next
        (0 when it never went down)."""
        return float(max(0.0, -np.min(np.diff(self.logp)))) if len(self.logp) > 1 else 0.0

    @property
    def decreases(self) -> int:
        """Iterations at which the log-posterior went down, by any amount."""
        return int(np.sum(np.diff(self.logp) < 0))


def relative_gap(params: Params, reference: Params) -> float:
    """Largest relative difference of a parameter from the reference; values below
    1e-6 in size (an empty component's weight) are compared absolutely."""
    return max(
        float(np.max(np.abs(params[k] - v) / np.maximum(np.abs(v), 1e-6)))
        for k, v in reference.items()
    )


@dataclass
class SpeedRow:
    """Plain EM and SQUAREM from one start, and the optimum they converge to.

    ``reference`` is plain EM continued from the better of the two end points with a
    tolerance 1000 times tighter: the optimum both approximate, so that each
    method's own stopping error can be read off (plain EM stops short of the
    optimum by about ``tol * r / (1 - r)`` per observation, ``r`` its rate).
    """

    problem: str
    n: int
    start: str
    em: Run
    squarem: Run
    reference_logp: float
    reference: Params

    @property
    def e_step_ratio(self) -> float:
        """Plain EM's E-steps over SQUAREM's."""
        return self.em.n_e_steps / self.squarem.n_e_steps

    @property
    def time_ratio(self) -> float:
        """Plain EM's warm time over SQUAREM's."""
        return self.em.seconds / self.squarem.seconds

    def logp_gap(self, run: Run) -> float:
        """How far below the reference optimum ``run`` stopped, per observation."""
        return (self.reference_logp - run.logp[-1]) / self.n

    def param_gap(self, run: Run) -> float:
        """Largest relative distance of ``run``'s parameters from the reference."""
        return relative_gap(run.params, self.reference)

    def same_optimum(self, ll_tol: float) -> bool:
        """Both fits at the same optimum (not two modes): their log-posteriors agree
        to ``ll_tol`` per observation."""
        return abs(self.squarem.logp[-1] - self.em.logp[-1]) / self.n <= ll_tol

    @property
    def squarem_extra_e_steps(self) -> int:
        """E-steps beyond three per cycle (and the start's): each is a rejected
        extrapolation, re-evaluated with a halved step."""
        return self.squarem.n_e_steps - 1 - 3 * self.squarem.n_iter

    @property
    def em_rate(self) -> float:
        """Factor by which plain EM's log-posterior increments shrink per step near
        the end: close to 1 means slow linear convergence, where SQUAREM helps most."""
        steps = np.diff(self.em.logp)
        # Increments at rounding level say nothing about the rate.
        steps = steps[steps > 1e-13 * abs(self.em.logp[-1])]
        ratios = steps[1:] / steps[:-1]
        return float(np.median(ratios[-5:])) if ratios.size else float("nan")


def _run_once(em, start: Params, accelerate, args):
    """One ``EM.run`` to convergence: seconds, end point, history, warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        began = time.perf_counter()
        point, history = em.run(start, tol=args.tol, max_iter=args.max_iter, accelerate=accelerate)
        seconds = time.perf_counter() - began
    return seconds, point, history, sorted({str(w.message).splitlines()[0][:160] for w in caught})


def em_runs(em, start: Params, problem: SpeedProblem, args) -> dict[str | None, tuple]:
    """Plain EM and SQUAREM from ``start`` to convergence, each timed by the median
    of at least ``args.repeats`` warm runs (the routine is compiled and has run once
    already), more for runs of milliseconds, until they add up to `MIN_TIMED_S`.

    The two methods take turns, so that a change of the machine's load during the
    measurement slows both alike and leaves their ratio alone.

    Returns
    -------
    dict
        For ``None`` (plain EM) and ``"squarem"``: ``(run, point)``, the `Run` and
        its end point in the model's variable names.
    """
    times: dict[str | None, list[float]] = {None: [], "squarem": []}
    last = {}
    while len(times[None]) < args.repeats or (
        min(sum(t) for t in times.values()) < MIN_TIMED_S and len(times[None]) < 100
    ):
        for accelerate in times:
            seconds, *last[accelerate] = _run_once(em, start, accelerate, args)
            times[accelerate].append(seconds)
    out = {}
    for accelerate, (point, history, caught) in last.items():
        run = Run(
            seconds=statistics.median(times[accelerate]),
            n_iter=history.n_iter,
            n_e_steps=history.n_e_steps,
            converged=history.converged,
            degenerate=history.collapse is not None,
            logp=[float(v) for v in history.logp],
            params=problem.params(point),
            warnings=caught,
        )
        out[accelerate] = (run, point)
    return out


def measure_speed(problem: SpeedProblem, n: int, args) -> tuple[list[SpeedRow], float]:
    """Plain EM and SQUAREM on one problem, from its fixed start and from
    ``args.starts`` jittered ones (``EM.initial_point(random_seed=s)``, the
    ``init="jitter"`` start of ``find_MAP``).

    Returns
    -------
    rows : list of SpeedRow
    build_s : float
        Seconds to build and compile the EM routine.
    """
    import pm_em

    x = problem.simulate(n, args.seed)
    model = problem.build_model(x)
    progress(f"{problem.key} n={n:,}: building the EM routine")
    began = time.perf_counter()
    em = pm_em.EM(model)
    build_s = time.perf_counter() - began
    fixed = problem.start(x)
    # Warm-up: every compiled function is called once before anything is timed.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for accelerate in (None, "squarem"):
            em.run(fixed, tol=args.tol, max_iter=3, accelerate=accelerate)
    starts = [("fixed", fixed)]
    starts += [(f"jitter {s}", em.initial_point(random_seed=s)) for s in range(args.starts)]
    rows = []
    for label, start in starts:
        progress(f"{problem.key} n={n:,}: {label} start, plain EM and SQUAREM")
        runs = em_runs(em, start, problem, args)
        (plain, plain_end), (fast, fast_end) = runs[None], runs["squarem"]
        better = fast_end if fast.logp[-1] >= plain.logp[-1] else plain_end
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference, history = em.run(
                better, tol=args.tol * 1e-3, max_iter=args.max_iter, accelerate=None
            )
        rows.append(
            SpeedRow(
                problem=problem.key,
                n=n,
                start=label,
                em=plain,
                squarem=fast,
                reference_logp=float(history.logp[-1]),
                reference=problem.params(reference),
            )
        )
    return rows, build_s


# --- part 2: restarts on the multimodal mixture -------------------------------------

INITS = ("kmeans", "jitter", "prior")
#: ``(init, accelerate)`` of the ``n_init`` fits. "auto" is the default; it resolves
#: to "kmeans" on this model (its ``mu`` indexes the data).
RESTART_PLANS = (("auto", None), ("jitter", None), ("prior", None), ("auto", "squarem"))


@dataclass
class MapFit:
    """One ``find_MAP`` call and every start in it."""

    init: str
    accelerate: str | None
    n_init: int
    seed: int
    seconds: float
    finals: list[float]
    degenerate: list[bool]
    converged: list[bool]
    n_e_steps: list[int]
    best_restart: int
    params: dict[str, list[float]]
    warnings: list[str] = field(default_factory=list)

    @property
    def final(self) -> float:
        """The winning start's final log-posterior."""
        return self.finals[self.best_restart]


def fit_map(model, init: str, n_init: int, seed: int, accelerate, args) -> MapFit:
    """``pm_em.find_MAP`` with the given start strategy and seed, timed.

    Parameters
    ----------
    model : pm.Model
    init : str
        ``find_MAP``'s ``init``.
    n_init : int
        Starts in this call.
    seed : int
        ``random_seed``.
    accelerate : {None, "squarem"}
    args : argparse.Namespace
        ``tol`` and ``max_iter``.

    Returns
    -------
    MapFit
        Every start's final log-posterior and flags, the winner's parameters.
    """
    import pm_em

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        began = time.perf_counter()
        idata = pm_em.find_MAP(
            model,
            init=init,
            n_init=n_init,
            accelerate=accelerate,
            tol=args.tol,
            max_iter=args.max_iter,
            random_seed=seed,
            progressbar=False,
        )
        seconds = time.perf_counter() - began
    stats = idata.em_stats
    # Each start's trace is NaN-padded to the longest; its last finite entry is where
    # it stopped (before the collapse, for a degenerate start).
    finals = [float(row[np.isfinite(row)][-1]) for row in stats["restart_logp"].values]
    winner = {k: np.asarray(idata.posterior[k]).reshape(-1) for k in ("w", "mu", "sigma")}
    return MapFit(
        init=init,
        accelerate=accelerate,
        n_init=n_init,
        seed=seed,
        seconds=seconds,
        finals=finals,
        degenerate=[bool(v) for v in stats["restart_degenerate"].values],
        converged=[bool(v) for v in stats["restart_converged"].values],
        n_e_steps=[int(v) for v in stats["restart_n_e_steps"].values],
        best_restart=int(stats.attrs["best_restart"]),
        params={k: v.tolist() for k, v in by_first_mean(winner).items()},
        warnings=sorted({str(w.message).splitlines()[0][:160] for w in caught}),
    )


def measure_restarts(args) -> dict[str, Any]:
    """Single starts of every strategy, then ``n_init`` fits across seeds.

    Returns
    -------
    dict
        ``x`` (the data), ``build_s``, ``singles`` (init to its `MapFit` list),
        ``restarts`` (``(init, accelerate)`` to its `MapFit` list), ``best`` (the
        highest final log-posterior of any non-degenerate start), ``n_starts_total``
        and ``auto_is_kmeans``.
    """
    import pm_em

    n = args.mixture_n
    x = lognormal_simulate(n, args.seed)
    model = mixture4_model(x)
    progress(f"lognormal4 n={n:,}: building the EM routine")
    began = time.perf_counter()
    pm_em.EM(model)  # find_MAP reuses this routine
    build_s = time.perf_counter() - began
    singles: dict[str, list[MapFit]] = {}
    for init in INITS:
        progress(f"lognormal4: {args.single_starts} single starts, init={init!r}")
        singles[init] = [
            fit_map(model, init, 1, seed, None, args) for seed in range(args.single_starts)
        ]
    # "auto" must be "kmeans" here, start for start, or the tables would mislead.
    auto = fit_map(model, "auto", 1, 0, None, args)
    auto_is_kmeans = auto.finals == singles["kmeans"][0].finals
    restarts: dict[tuple[str, str | None], list[MapFit]] = {}
    for init, accelerate in RESTART_PLANS:
        progress(
            f"lognormal4: n_init={args.n_init}, init={init!r}, accelerate={accelerate!r}, "
            f"seeds 0..{args.restart_seeds - 1}"
        )
        restarts[(init, accelerate)] = [
            fit_map(model, init, args.n_init, seed, accelerate, args)
            for seed in range(args.restart_seeds)
        ]
    every_fit = [f for fits in (*singles.values(), *restarts.values()) for f in fits]
    sound = [
        final
        for f in every_fit
        for final, degenerate in zip(f.finals, f.degenerate)
        if not degenerate
    ]
    return {
        "x": x,
        "build_s": build_s,
        "singles": singles,
        "restarts": restarts,
        "best": max(sound),
        "n_starts_total": sum(len(f.finals) for f in every_fit),
        "auto_is_kmeans": auto_is_kmeans,
    }


def modes_found(fits: list[MapFit], threshold: float) -> list[dict[str, Any]]:
    """Distinct end points among single starts, best first.

    Finals within ``threshold`` of the previous one (in descending order) are the
    same end point. Not every end point is a mode in the strict sense: a start that
    empties a component may stop on a slow slide toward the boundary.

    Returns
    -------
    list of dict
        ``logp`` (the best final of the group), ``params`` (its fit's parameters) and
        ``count`` (starts per init strategy).
    """
    order = sorted(fits, key=lambda f: -f.final)
    modes: list[dict[str, Any]] = []
    for f in order:
        if f.degenerate[0]:
            continue
        if modes and modes[-1]["last"] - f.final <= threshold:
            modes[-1]["last"] = f.final
            modes[-1]["count"][f.init] = modes[-1]["count"].get(f.init, 0) + 1
        else:
            modes.append({"logp": f.final, "last": f.final, "params": f.params, "count": {}})
            modes[-1]["count"][f.init] = 1
    return modes


# --- report -------------------------------------------------------------------------


def _ratio(value: float) -> str:
    return f"{value:.2f}x"


def speed_tables(rows: list[SpeedRow], args) -> str:
    """Markdown: one row per problem (fixed start, then median and min over all its
    starts), then one row per start."""
    out = [
        "| problem | n | E-steps EM / SQUAREM (fixed start) | E-step ratio: fixed / median / "
        "min | warm s EM / SQUAREM (fixed start) | time ratio: fixed / median / min | "
        f"same optimum | parameters within {args.param_rtol:g} of the optimum: EM / SQUAREM "
        "| logp decreases: SQUAREM cycles (largest, per obs) / EM iterations | target ≥ 3x "
        "fewer E-steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = list(dict.fromkeys((r.problem, r.n) for r in rows))
    for key, n in keys:
        group = [r for r in rows if (r.problem, r.n) == (key, n) and not _degenerate(r)]
        fixed = next(r for r in rows if (r.problem, r.n, r.start) == (key, n, "fixed"))
        e_ratios = [r.e_step_ratio for r in group]
        t_ratios = [r.time_ratio for r in group]
        same = sum(r.same_optimum(args.ll_tol) for r in group)
        close_em = sum(r.param_gap(r.em) <= args.param_rtol for r in group)
        close_sq = sum(r.param_gap(r.squarem) <= args.param_rtol for r in group)
        decreases = sum(r.squarem.decreases for r in group)
        largest = max(r.squarem.largest_decrease for r in group) / n
        em_decreases = sum(r.em.decreases for r in group)
        met = "met" if fixed.e_step_ratio >= 3 else "**missed**"
        out.append(
            f"| {SPEED_PROBLEMS[key].title} | {n:,} | {fixed.em.n_e_steps} / "
            f"{fixed.squarem.n_e_steps} | {_ratio(fixed.e_step_ratio)} / "
            f"{_ratio(statistics.median(e_ratios))} / {_ratio(min(e_ratios))} | "
            f"{fixed.em.seconds:.3f} / {fixed.squarem.seconds:.3f} | "
            f"{_ratio(fixed.time_ratio)} / {_ratio(statistics.median(t_ratios))} / "
            f"{_ratio(min(t_ratios))} | {same} of {len(group)} starts | {close_em} / "
            f"{close_sq} of {len(group)} | {decreases} ({largest:.1e}) / {em_decreases} | "
            f"{met} |"
        )
    out += [
        "",
        "| problem | n | start | EM iters / E-steps | SQUAREM cycles / E-steps "
        "(rejected steps) | E-step ratio | EM s | SQUAREM s | time ratio | below the "
        "optimum, per obs: EM / SQUAREM | max rel. parameter distance: EM / SQUAREM | "
        "SQUAREM largest decrease, per obs | EM rate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if _degenerate(r):
            out.append(
                f"| {r.problem} | {r.n:,} | {r.start} | degenerate: EM "
                f"{r.em.degenerate}, SQUAREM {r.squarem.degenerate} | | | | | | | | | |"
            )
            continue
        flags = "" if r.em.converged and r.squarem.converged else " (not converged)"
        out.append(
            f"| {r.problem} | {r.n:,} | {r.start}{flags} | {r.em.n_iter} / {r.em.n_e_steps} | "
            f"{r.squarem.n_iter} / {r.squarem.n_e_steps} ({r.squarem_extra_e_steps}) | "
            f"{_ratio(r.e_step_ratio)} | {r.em.seconds:.3f} | {r.squarem.seconds:.3f} | "
            f"{_ratio(r.time_ratio)} | {r.logp_gap(r.em):.1e} / {r.logp_gap(r.squarem):.1e} | "
            f"{r.param_gap(r.em):.1e} / {r.param_gap(r.squarem):.1e} | "
            f"{r.squarem.largest_decrease / r.n:.1e} | {r.em_rate:.3f} |"
        )
    return "\n".join(out)


def _degenerate(row: SpeedRow) -> bool:
    return row.em.degenerate or row.squarem.degenerate


def _hits(finals: list[float], best: float, threshold: float) -> int:
    return sum(best - f <= threshold for f in finals)


def restart_tables(result: dict[str, Any], args) -> str:
    """Markdown: the modes found, single-start shares, ``n_init`` fits."""
    n = args.mixture_n
    best, threshold = result["best"], args.mode_tol * n
    singles = result["singles"]
    all_singles = [f for fits in singles.values() for f in fits]
    modes = modes_found(all_singles, threshold)
    header = " / ".join(INITS)
    out = [
        f"Best mode: log-posterior {best:.6f}, the maximum over all "
        f"{result['n_starts_total']:,} starts of this run. A start reaches it when its "
        f"final log-posterior is within {args.mode_tol:g} × n = {threshold:.3g} of it. "
        f"Distinct end points among the single starts (final log-posteriors more than "
        f"{threshold:.3g} apart): {len(modes)}; the best {args.show_modes}:",
        "",
        f"| end point | log-posterior | below best, per obs | mu (sorted) | w | sigma | "
        f"single starts: {header} |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, mode in enumerate(modes[: args.show_modes], start=1):
        p = mode["params"]
        counts = " / ".join(str(mode["count"].get(init, 0)) for init in INITS)
        out.append(
            f"| {i} | {mode['logp']:.3f} | {(best - mode['logp']) / n:.1e} | "
            f"{_fmt_vector(p['mu'])} | {_fmt_vector(p['w'])} | {_fmt_vector(p['sigma'])} | "
            f"{counts} |"
        )
    if len(modes) > args.show_modes:
        rest = modes[args.show_modes :]
        counts = " / ".join(str(sum(m["count"].get(init, 0) for m in rest)) for init in INITS)
        out.append(f"| {len(rest)} others | ≤ {rest[0]['logp']:.3f} | | | | | {counts} |")
    out += [
        "",
        "| init (n_init = 1) | starts | reach the best mode | share | closest miss, per obs "
        "| degenerate | end with an empty component | not converged | median E-steps | "
        "median s per fit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    shares = {}
    for init in INITS:
        fits = singles[init]
        finals = [f.final for f in fits]
        hits = _hits(finals, best, threshold)
        shares[init] = hits / len(fits)
        misses = [(best - f) / n for f in finals if best - f > threshold]
        label = f"{init} (= auto)" if init == "kmeans" else init
        out.append(
            f"| {label} | {len(fits)} | {hits} | {shares[init]:.0%} | "
            f"{f'{min(misses):.1e}' if misses else '–'} | "
            f"{sum(f.degenerate[0] for f in fits)} | {sum(_empty(f) for f in fits)} | "
            f"{sum(not f.converged[0] for f in fits)} | "
            f"{statistics.median(f.n_e_steps[0] for f in fits):.0f} | "
            f"{statistics.median(f.seconds for f in fits):.3f} |"
        )
    k = args.n_init
    out += [
        "",
        f"| init (n_init = {k}) | accelerate | seeds reaching the best mode | expected from "
        f"the single-start share: mean, P(all {args.restart_seeds}) | starts inside reaching "
        "it | degenerate starts | E-steps per fit: median | wall s per fit: median "
        f"(min–max) | wall s, all seeds | target: all {args.restart_seeds} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (init, accelerate), fits in result["restarts"].items():
        reached = _hits([f.final for f in fits], best, threshold)
        inside = [final for f in fits for final in f.finals]
        share = shares["kmeans" if init == "auto" else init]
        per_seed = 1.0 - (1.0 - share) ** k
        seconds = [f.seconds for f in fits]
        met = "met" if reached == len(fits) else "**missed**"
        out.append(
            f"| {init} | {accelerate or 'none'} | {reached} of {len(fits)} | "
            f"{per_seed * len(fits):.1f}, {per_seed ** len(fits):.2f} | "
            f"{_hits(inside, best, threshold)} of {len(inside)} | "
            f"{sum(d for f in fits for d in f.degenerate)} | "
            f"{statistics.median(sum(f.n_e_steps) for f in fits):.0f} | "
            f"{statistics.median(seconds):.2f} ({min(seconds):.2f}–{max(seconds):.2f}) | "
            f"{sum(seconds):.1f} | {met} |"
        )
    return "\n".join(out)


def _empty(fit: MapFit) -> bool:
    """The fit ended with a component whose expected count is ~0 (pm_em warns)."""
    return any(w.startswith("Empty component") for w in fit.warnings)


def _fmt_vector(values) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


def report(results, args, env, seconds) -> str:
    """Everything printed at the end of a run, as markdown."""
    rows, speed_builds, result = results
    x = result["x"]
    notes = [
        *scaffold.script_notes(env, args, seconds),
        f"tol = {args.tol:g} per observation, max_iter = {args.max_iter} everywhere; data "
        f"seed {args.seed}. EM routines built (compiled) first: "
        + ", ".join(f"{k} n={n:,} {s:.1f} s" for (k, n), s in speed_builds.items())
        + f", lognormal4 (part 2) {result['build_s']:.1f} s.",
    ]
    part1 = [
        "## 1. Plain EM against SQUAREM",
        "",
        f"Same start, same `tol`, `EM.run` to convergence; warm time is the median of "
        f"at least {args.repeats} runs after a warm-up (more, up to 100, until they add "
        f"up to {MIN_TIMED_S:g} s), plain EM and SQUAREM taking turns. Starts: the "
        "problem's fixed start (the common start of `run.py`; for lognormal4 the octile "
        f"start), then {args.starts} jittered ones (`EM.initial_point(random_seed=s)`, "
        "s = 0, 1, ...); median and min are over all of them. The optimum: plain EM "
        "continued from the better end point with a tol 1000 times tighter. Same "
        f"optimum: the two end points' logp within {args.ll_tol:g} per obs (one mode, "
        "not two). Rejected steps: E-steps beyond three per SQUAREM cycle (a failed "
        "extrapolation, retried with a halved step). EM rate: the factor by which plain "
        "EM's log-posterior increments shrink per step near the end (close to 1: slow). "
        "A decrease of SQUAREM's logp is counted however small.",
        "",
        speed_tables(rows, args),
    ]
    part2 = [
        "## 2. Restarts on a multimodal mixture",
        "",
        f"K = {MIX_K} normal mixture, `w ~ Dirichlet(1)`, `mu ~ Normal(0, {PRIOR_MU_SD:g})`, "
        f"`sigma ~ InverseGamma({PRIOR_SIGMA_ALPHA:g}, {PRIOR_SIGMA_BETA:g})`, on "
        f"n = {args.mixture_n:,} draws of LogNormal({LOGNORMAL_MU:g}, {LOGNORMAL_SIGMA:g}) "
        f"(range {x.min():.2f}–{x.max():.2f}, median {np.median(x):.2f}). `find_MAP` with "
        f"`random_seed` = 0..{args.single_starts - 1} for single starts, "
        f'0..{args.restart_seeds - 1} for `n_init={args.n_init}`. `init="auto"` resolves '
        'to `"kmeans"` on this model'
        + (
            " (checked: the same start for seed 0)."
            if result["auto_is_kmeans"]
            else " (**but seed 0 gave a different start: check**)."
        ),
        "",
        restart_tables(result, args),
    ]
    return "\n".join(["## Results", "", *[f"- {line}" for line in notes], "", *part1, ""] + part2)


# --- command line -------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    # --repeats: warm runs timed in part 1; --starts: jittered starts in part 1.
    parser = scaffold.benchmark_parser(__doc__, tol=1e-10, max_iter=10_000, repeats=3, starts=5)
    parser.add_argument("--mixture-n", type=int, default=1_000, help="part 2's data size")
    parser.add_argument("--single-starts", type=int, default=100, help="per init, part 2")
    parser.add_argument("--n-init", type=int, default=10, help="starts per restart fit")
    parser.add_argument("--restart-seeds", type=int, default=20, help="restart fits per plan")
    parser.add_argument(
        "--mode-tol",
        type=float,
        default=1e-6,
        help="a start reaches the best mode within this log-posterior per observation",
    )
    parser.add_argument(
        "--ll-tol", type=float, default=1e-6, help="part 1's same-optimum rule, per obs"
    )
    parser.add_argument(
        "--param-rtol", type=float, default=1e-4, help="part 1's same-parameters rule"
    )
    parser.add_argument("--show-modes", type=int, default=6, help="end points listed in part 2")
    return scaffold.parse_command_line(parser, argv)


def measure(args):
    """Both parts: the speed rows and build times, then the restarts."""
    rows, builds = [], {}
    for key, n in SPEED_PLAN:
        problem_rows, builds[(key, n)] = measure_speed(SPEED_PROBLEMS[key], n, args)
        rows += problem_rows
    return rows, builds, measure_restarts(args)


def record(results) -> dict:
    rows, _, result = results
    return {
        "speed": [asdict(r) for r in rows],
        "restarts": {
            "best": result["best"],
            "singles": {k: [asdict(f) for f in v] for k, v in result["singles"].items()},
            "restarts": {
                f"{init}/{acc}": [asdict(f) for f in fits]
                for (init, acc), fits in result["restarts"].items()
            },
        },
    }


def main() -> None:
    """Run both parts and print the markdown report."""
    scaffold.run_benchmark(parse_args(), measure, report, record)


if __name__ == "__main__":
    main()

"""Acceleration by default (issue 14): ``accelerate="auto"`` against plain EM,
SQUAREM and scikit-learn, on a K = 5 mixture where plain EM is slow.

From the repository root, after ``pip install -e ".[bench]"``::

    python benchmarks/accelerate.py                # about 5 minutes on 2 cores
    python benchmarks/accelerate.py --n 20000 --json out.json

Two measurements, in one process, printed as markdown (progress on stderr):

1. **The K = 5 mixture** (``gmm5`` of ``cases.py``) at ``--n`` observations. Every
   method starts from one k-means start: pm_em's own ``init="kmeans"`` start (k-means++
   and Lloyd iterations for the means, the jittered default point for the weights and
   scales), given to pm_em as ``initvals`` and to scikit-learn as ``weights_init``,
   ``means_init`` and ``precisions_init`` (``reg_covar=0``, the same MLE). Stopping
   rule: the change of the log-likelihood per observation below ``--tol`` for all
   (scikit-learn's ``tol`` is per row, the same here, d = 1). pm_em runs with
   ``accelerate="auto"`` (the default), None (plain EM) and ``"squarem"``, and
   ``"auto"`` with other switch points (``--switch``: plain EM steps before SQUAREM).
   scikit-learn also runs with its own settings (its k-means initialization,
   ``reg_covar=1e-6``, full covariance) at the same ``tol`` and ``max_iter``, and
   with its defaults entirely (``tol=1e-3``, ``max_iter=100``).
2. **The switch point on fast fits**: the 1-D two-component mixture (``gmm1d``) from
   its fixed start and from jittered ones, where plain EM takes 20-50 iterations:
   E-steps of plain EM, ``"auto"`` at each switch point, and SQUAREM.

Warm times: every compiled function has run once before; each figure is the median
of ``--repeats`` fits, the methods taking turns.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import scaffold
from cases import CASES
from scaffold import progress


@dataclass
class Row:
    """One method's fit."""

    method: str
    seconds: float
    n_iter: int
    n_e_steps: int | None
    converged: bool
    loglik: float
    squarem_from: int | None = None
    warnings: tuple[str, ...] = ()


def _pm_em_fit(model, start, accelerate, args, switch=None):
    """``find_MAP`` from ``start`` (every parameter given, so ``init`` plays no part);
    ``switch`` sets ``accelerate="auto"``'s switch point for this call."""
    import pm_em
    import pm_em.fit.loop

    default = pm_em.fit.loop.AUTO_SQUAREM_AFTER
    if switch is not None:
        pm_em.fit.loop.AUTO_SQUAREM_AFTER = switch
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            began = time.perf_counter()
            idata = pm_em.find_MAP(
                model,
                init="jitter",
                initvals=start,
                accelerate=accelerate,
                tol=args.tol,
                max_iter=args.max_iter,
                random_seed=0,
                progressbar=False,
            )
            seconds = time.perf_counter() - began
    finally:
        pm_em.fit.loop.AUTO_SQUAREM_AFTER = default
    stats = idata.em_stats
    params = {name: idata.posterior[name].values[0, 0] for name in ("w", "mu", "sigma")}
    return seconds, stats, params, tuple(sorted({str(w.message)[:120] for w in caught}))


def _sklearn_fit(x, options):
    from sklearn.mixture import GaussianMixture

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        began = time.perf_counter()
        gm = GaussianMixture(**options).fit(x[:, None])
        seconds = time.perf_counter() - began
    params = {
        "w": gm.weights_,
        "mu": gm.means_[:, 0],
        "sigma": np.sqrt(gm.covariances_.reshape(len(gm.weights_), -1)[:, 0]),
    }
    return seconds, gm, params, tuple(sorted({str(w.message)[:120] for w in caught}))


def measure_k5(args) -> tuple[list[Row], dict]:
    """Part 1: every method on the K = 5 mixture from one k-means start."""
    import pm_em
    import pm_em.fit.loop
    from pm_em.fit.starts import start_points

    case = CASES["gmm5"]
    x = case.simulate(args.n, args.seed)
    model = case.build_model(x)
    progress(f"gmm5 n={args.n:,}: building the EM routine")
    began = time.perf_counter()
    em = pm_em.EM(model)
    build_s = time.perf_counter() - began
    (start,) = start_points(em, "kmeans", 1, random_seed=args.start_seed)
    start = {k: np.asarray(v, dtype=float) for k, v in start.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for accelerate in (None, "squarem"):
            pm_em.find_MAP(
                model,
                initvals=start,
                init="jitter",
                max_iter=3,
                accelerate=accelerate,
                progressbar=False,
            )
    same_start = {
        "n_components": 5,
        "covariance_type": "diag",
        "weights_init": start["w"],
        "means_init": start["mu"][:, None],
        "precisions_init": 1.0 / start["sigma"][:, None] ** 2,
        "reg_covar": 0.0,
        "tol": args.tol,
        "max_iter": args.max_iter,
        "n_init": 1,
        "init_params": "random_from_data",
        "random_state": 0,
    }
    own = {"n_components": 5, "tol": args.tol, "max_iter": args.max_iter, "random_state": 0}
    plans = [("pm_em default (auto)", "auto", None)]
    plans += [("pm_em plain EM (None)", None, None), ("pm_em SQUAREM", "squarem", None)]
    default = pm_em.fit.loop.AUTO_SQUAREM_AFTER
    plans += [(f"pm_em auto, switch after {s}", "auto", s) for s in args.switch if s != default]
    plans += [
        ("sklearn, same start", "sklearn", same_start),
        ("sklearn, own k-means init", "sklearn", own),
        ("sklearn, all defaults (tol 1e-3, max_iter 100)", "sklearn", {"n_components": 5}),
    ]
    times: dict[str, list[float]] = {label: [] for label, *_ in plans}
    last = {}
    for repeat in range(args.repeats):
        for label, method, extra in plans:
            progress(f"gmm5 n={args.n:,}: {label} ({repeat + 1}/{args.repeats})")
            if method == "sklearn":
                seconds, gm, params, caught = _sklearn_fit(x, extra)
                last[label] = (gm, params, caught)
            else:
                seconds, stats, params, caught = _pm_em_fit(model, start, method, args, extra)
                last[label] = (stats, params, caught)
            times[label].append(seconds)
    rows = []
    for label, method, _ in plans:
        fitted, params, caught = last[label]
        loglik = case.loglik(x, params) / args.n
        if method == "sklearn":
            # Each iteration is an E-step and an M-step; fit() adds a final E-step.
            row = Row(
                label,
                0.0,
                int(fitted.n_iter_),
                int(fitted.n_iter_) + 1,
                bool(fitted.converged_),
                loglik,
                None,
                caught,
            )
        else:
            squarem_from = int(fitted.attrs["squarem_from"])
            row = Row(
                label,
                0.0,
                int(fitted["n_iter"]),
                int(fitted["n_e_steps"]),
                bool(fitted["converged"]),
                loglik,
                None if squarem_from < 0 else squarem_from,
                caught,
            )
        row.seconds = statistics.median(times[label])
        rows.append(row)
    facts = {"build_s": build_s, "start": {k: v.tolist() for k, v in start.items()}}
    return rows, facts


def measure_switch(args) -> list[dict]:
    """Part 2: E-steps on the fast 1-D two-component mixture for each switch point."""
    import pm_em
    import pm_em.fit.loop

    case = CASES["gmm1d"]
    x = case.simulate(args.fast_n, args.seed)
    model = case.build_model(x)
    em = pm_em.EM(model)
    starts = [("fixed", case.initvals(case.start))]
    starts += [(f"jitter {s}", em.initial_point(random_seed=s)) for s in range(args.starts)]
    out = []
    for label, start in starts:
        progress(f"gmm1d n={args.fast_n:,}: {label}")
        row = {"start": label}
        settings = [("plain", None, None), ("squarem", "squarem", None)]
        settings += [(f"auto {s}", "auto", s) for s in args.switch]
        for name, accelerate, switch in settings:
            default = pm_em.fit.loop.AUTO_SQUAREM_AFTER
            pm_em.fit.loop.AUTO_SQUAREM_AFTER = switch if switch is not None else default
            try:
                _, history = em.run(
                    start, tol=args.tol, max_iter=args.max_iter, accelerate=accelerate
                )
            finally:
                pm_em.fit.loop.AUTO_SQUAREM_AFTER = default
            row[name] = (history.n_iter, history.n_e_steps, history.logp[-1])
        out.append(row)
    return out


def report(results, args, env, seconds) -> str:
    """The markdown report."""
    rows, facts, switch_rows = results
    best = max(r.loglik for r in rows)
    sk = next(r for r in rows if r.method == "sklearn, same start")
    lines = [
        "## Results",
        "",
        *[f"- {line}" for line in scaffold.script_notes(env, args, seconds)],
        f"- K = 5 mixture, n = {args.n:,}, data seed {args.seed}; tol = {args.tol:g} per "
        f"observation, max_iter = {args.max_iter}; EM routine built in "
        f"{facts['build_s']:.1f} s. Start (pm_em's k-means start, seed {args.start_seed}): "
        + ", ".join(f"{k} = {np.round(v, 3).tolist()}" for k, v in facts["start"].items()),
        "",
        "| method | iterations | E-steps | SQUAREM from iteration | converged | warm s "
        "(median) | time / sklearn same start | log-lik per obs | below the best, per obs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.n_iter} | {r.n_e_steps} | "
            f"{'–' if r.squarem_from is None else r.squarem_from} | {r.converged} | "
            f"{r.seconds:.2f} | {r.seconds / sk.seconds:.2f}x | {r.loglik:.10f} | "
            f"{best - r.loglik:.1e} |"
        )
    names = ["plain", *[f"auto {s}" for s in args.switch], "squarem"]
    lines += [
        "",
        f"Switch point on the 1-D two-component mixture (n = {args.fast_n:,}, tol "
        f"{args.tol:g}): iterations / E-steps per start.",
        "",
        "| start | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for row in switch_rows:
        lines.append(
            f"| {row['start']} | " + " | ".join(f"{row[n][0]} / {row[n][1]}" for n in names) + " |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    # --starts: the jittered starts of part 2.
    parser = scaffold.benchmark_parser(__doc__, tol=1e-8, max_iter=2000, repeats=1, starts=5)
    parser.add_argument("--n", type=int, default=200_000, help="K = 5 mixture's data size")
    parser.add_argument("--fast-n", type=int, default=100_000, help="part 2's data size")
    parser.add_argument("--start-seed", type=int, default=1, help="seed of the k-means start")
    parser.add_argument(
        "--switch",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[10, 20, 30, 50],
        help="switch points of accelerate='auto' to compare (the default is 30)",
    )
    return scaffold.parse_command_line(parser, argv)


def measure(args):
    """Both parts: the K = 5 rows and facts, then the switch-point rows."""
    rows, facts = measure_k5(args)
    return rows, facts, measure_switch(args)


def record(results) -> dict:
    rows, facts, switch_rows = results
    return {"k5": [asdict(r) for r in rows], "facts": facts, "switch": switch_rows}


def main() -> None:
    scaffold.run_benchmark(parse_args(), measure, report, record)


if __name__ == "__main__":
    main()

"""Peak memory of each phase of a pm_em fit at large n, in units of one n x K table.

From the repository root::

    python benchmarks/memory.py                   # n = 1,000,000, three cases, ~5 minutes
    python benchmarks/memory.py --n 100000 --cases gmm1d

Each case runs in its own subprocess, which measures, one after the other:

* **build**: ``pm_em.EM(model)``, deriving and compiling the routine (after a
  routine of a 200-point copy of the model was built, so that PyTensor's one-time
  loading of its compile cache, about 100 MB whatever n, is not counted);
* **fit loop**: ``run_em`` from the common start to convergence (after one
  untimed run), what ``find_MAP`` does per start;
* **finish**: ``EM.finish`` and the InferenceData (after one untimed call, which
  compiles the result function);
* **find_MAP**: one whole call, as a user makes it, after a first one (which sets
  up what a process does once, such as BLAS's thread buffers, outside NumPy).

Every figure is the rise above the level at the start of the phase: the data and
anything alive before (the fitted state, for ``finish``) are not counted. "Held"
is what the phase leaves allocated (the final state; the InferenceData, whose
``lp_z`` is one table). Two methods, side by side:

* ``tracemalloc``'s peak. NumPy reports its array buffers to it, including the
  arrays PyTensor's C thunks allocate (they are NumPy arrays), so it sees every
  table; it also counts Python objects.
* the rise of the resident set's high-water mark (``VmHWM``, reset through
  ``/proc/self/clear_refs``), which also sees memory C code takes with its own
  allocator. The subprocess runs with ``MALLOC_MMAP_THRESHOLD_`` fixed, so that
  every large array is its own mapping, returned to the system when freed: without
  it glibc raises the threshold after the first large free and keeps later
  tables in its heap, and the high-water mark misses memory it reuses.

The two agree to within a fraction of a table when every large allocation goes
through NumPy.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cases import GMM1D, ZIP, gmm1d_model
from rss import reset_rss_peak, status_bytes
from scaffold import benchmark_parser

RESULT_PREFIX = "MEMORY-RESULT "
PHASES = ("build", "loop", "finish", "find_map")
PHASE_LABELS = {
    "build": "build (derive + compile)",
    "loop": "fit loop",
    "finish": "finish + InferenceData",
    "find_map": "find_MAP, whole call",
}

# A three-component version of the 1-D mixture: well separated, unequal weights.
GMM3_W = np.array([0.3, 0.3, 0.4])
GMM3_MU = np.array([-1.0, 2.0, 5.0])
GMM3_SIGMA = np.array([0.5, 0.7, 1.0])


def gmm3_simulate(n: int, seed: int) -> np.ndarray:
    """Draw ``n`` points of the three-component mixture."""
    rng = np.random.default_rng(seed)
    z = rng.choice(3, size=n, p=GMM3_W)
    return rng.normal(GMM3_MU[z], GMM3_SIGMA[z])


@dataclass(frozen=True)
class Spec:
    """One measured problem: data, model, start and the number of latent values."""

    title: str
    n_support: int
    simulate: Callable[[int, int], np.ndarray]
    build_model: Callable[[np.ndarray], Any]
    start: dict[str, np.ndarray]


SPECS = {
    "gmm1d": Spec(
        "1-D normal mixture", 2, GMM1D.simulate, GMM1D.build_model, GMM1D.initvals(GMM1D.start)
    ),
    "gmm1d3": Spec(
        "1-D normal mixture",
        3,
        gmm3_simulate,
        lambda x: gmm1d_model(x, n_components=3),
        {
            "w": np.full(3, 1.0 / 3.0),
            "mu": np.array([-2.0, 1.5, 6.0]),
            "sigma": np.full(3, 1.5),
        },
    ),
    "zip": Spec("zero-inflated Poisson", 2, ZIP.simulate, ZIP.build_model, ZIP.initvals(ZIP.start)),
}


# --- measuring, in the worker -------------------------------------------------------


def measure(fn: Callable[[], Any]) -> tuple[Any, dict[str, float | None]]:
    """Call ``fn`` once; its result and its peaks above the level at the start.

    Returns
    -------
    result
        What ``fn`` returned (kept alive, so that "held" counts it).
    figures : dict
        ``traced_peak``, ``traced_held``, ``rss_peak``, ``rss_held`` (bytes; the RSS
        figures None where Linux's counters are unavailable) and ``seconds``.
    """
    gc.collect()
    rss_before = status_bytes("VmRSS")
    can_reset = reset_rss_peak()
    tracemalloc.start()
    baseline, _ = tracemalloc.get_traced_memory()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_peak, rss_now = status_bytes("VmHWM"), status_bytes("VmRSS")
    known = can_reset and rss_before is not None and rss_peak is not None
    return result, {
        "traced_peak": peak - baseline,
        "traced_held": held - baseline,
        "rss_peak": rss_peak - rss_before if known else None,
        "rss_held": rss_now - rss_before if known and rss_now is not None else None,
        "seconds": seconds,
    }


def worker(key: str, n: int, seed: int, tol: float, max_iter: int) -> dict[str, Any]:
    """Measure the four phases of one case in this (fresh) process."""
    import pm_em
    from pm_em.fit.loop import run_em
    from pm_em.results.inference_data import build_inference_data

    warnings.simplefilter("ignore")
    spec = SPECS[key]
    x = spec.simulate(n, seed)
    # PyTensor loads its compile cache's index once per process (~100 MB, whatever
    # n): a small routine first, so that the build figure is the model's own.
    pm_em.EM(spec.build_model(spec.simulate(200, seed)))
    model = spec.build_model(x)
    record: dict[str, Any] = {"key": key, "n": n, "n_support": spec.n_support}

    em, record["build"] = measure(lambda: pm_em.EM(model))

    values = em.to_values(spec.start)

    def fit():
        return run_em(em.routine, values, tol=tol, max_iter=max_iter, warn=False)

    fit()  # warm: anything done once per routine is not the loop's
    (state, history), record["loop"] = measure(fit)
    record["n_iter"] = history.n_iter

    def finish(state, history):
        result = em.finish(state, history)
        result.restarts, result.best_restart = [history], 0
        return build_inference_data(em, result, tol=tol, max_iter=max_iter)

    finish(state, history)  # compiles the result function
    idata, record["finish"] = measure(lambda: finish(state, history))
    record["log_likelihood"] = float(idata.posterior.attrs["log_likelihood"])
    idata = state = history = None  # freed before the whole call is measured

    def whole():
        return pm_em.find_MAP(
            model, initvals=spec.start, tol=tol, max_iter=max_iter, progressbar=False
        )

    whole()  # what a first call does once per process (BLAS thread set-up, ...)
    idata, record["find_map"] = measure(whole)
    del idata
    return record


# --- the driver ---------------------------------------------------------------------


def run_worker(key: str, args: argparse.Namespace) -> dict[str, Any]:
    """One case in a fresh subprocess with a fixed mmap threshold (see the module
    docstring)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        key,
        f"--n={args.n}",
        f"--seed={args.seed}",
        f"--tol={args.tol}",
        f"--max-iter={args.max_iter}",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"key": key, "error": f"worker exited {done.returncode}: {tail[:300]}"}


def _mb(value: float | None) -> str:
    return "–" if value is None else f"{value / 1e6:.0f}"


def _times(value: float | None, table: float) -> str:
    return "–" if value is None else f"{value / table:.1f}"


def report(records: list[dict[str, Any]]) -> str:
    """The markdown table: one row per case and phase."""
    header = (
        "| case | n | K | one table MB | phase | s | traced peak MB | × table | "
        "RSS peak MB | × table | held × table (traced / RSS) |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for record in records:
        spec = SPECS[record["key"]]
        if "error" in record:
            lines.append(f"| {spec.title} | | {spec.n_support} | | {record['error']} |||||||")
            continue
        n, k = record["n"], record["n_support"]
        table = n * k * 8.0
        for phase in PHASES:
            f = record[phase]
            lines.append(
                f"| {spec.title} | {n:,} | {k} | {table / 1e6:.0f} | {PHASE_LABELS[phase]} | "
                f"{f['seconds']:.1f} | {_mb(f['traced_peak'])} | "
                f"{_times(f['traced_peak'], table)} | {_mb(f['rss_peak'])} | "
                f"{_times(f['rss_peak'], table)} | {_times(f['traced_held'], table)} / "
                f"{_times(f['rss_held'], table)} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = benchmark_parser(__doc__, tol=1e-8, max_iter=1000)
    parser.add_argument("--n", type=int, default=1_000_000, help="observations (1,000,000)")
    parser.add_argument(
        "--cases", default=",".join(SPECS), help="comma-separated subset of " + ", ".join(SPECS)
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(args.cases) - set(SPECS)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {list(SPECS)}")
    return args


def main() -> None:
    """Measure every chosen case and print the markdown table."""
    args = parse_args()
    if args.worker:
        record = worker(args.worker, args.n, args.seed, args.tol, args.max_iter)
        print(RESULT_PREFIX + json.dumps(record), flush=True)
        return
    records = []
    for key in args.cases:
        print(f"{key} n={args.n:,}", file=sys.stderr, flush=True)
        records.append(run_worker(key, args))
    print(report(records))
    if args.json is not None:
        args.json.write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()

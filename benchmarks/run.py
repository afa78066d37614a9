"""pm_em benchmark suite: pm_em against its peers, in one run, printed as markdown.

From the repository root, after ``pip install -e ".[bench]"``::

    python benchmarks/run.py            # full suite
    python benchmarks/run.py --quick    # a few minutes

Every method fits the same data from the same start with the same stopping rule (as
far as its API allows), in this process; cold starts are measured in fresh
subprocesses with an empty PyTensor compile directory. The script checks that every
method reaches the same log-likelihood and flags those that do not. See
``benchmarks/README.md`` for what is measured and how the stopping rules are aligned.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from cases import CASES, Case
from peers import COMPILING, PEERS, Fit, make_fit
from rss import reset_rss_peak, status_bytes
from scaffold import (
    benchmark_parser,
    environment,
    environment_notes,
    progress,
    settings,
    write_record,
)


@dataclass(frozen=True)
class Planned:
    """One case of a run: the problem, its size, whether to measure cold starts, and
    peers left out (with the reason shown in the table)."""

    case: str
    n: int
    cold: bool = True
    left_out: tuple[str, ...] = ()
    why_left_out: str = ""


FULL_PLAN = [
    Planned("gmm1d", 1_000),
    Planned("gmm1d", 100_000),
    Planned("gmm1d", 1_000_000),
    Planned("mvgmm2d", 100_000),
    Planned("zip", 100_000),
    Planned("hmm", 100_000),
]
QUICK_PLAN = [
    Planned("gmm1d", 1_000),
    Planned("gmm1d", 100_000, cold=False),
    Planned(
        "mvgmm2d",
        2_000,
        cold=False,
        left_out=("pymc-extras",),
        why_left_out="left out of --quick: its MvNormal(mu[z], chol=chol[z]) fit takes "
        "minutes even at n = 2,000 (the full run measures it)",
    ),
    Planned("zip", 10_000, cold=False),
    Planned("hmm", 10_000, cold=False),
]

PEER_LABELS = {
    "numpy": "NumPy EM",
    "sklearn": "scikit-learn",
    "hmmlearn": "hmmlearn",
    "pm_em": "pm_em (C backend)",
    "pm_em-jax": "pm_em (JAX backend, the default)",
    "pymc-extras": "pymc-extras",
}
RESULT_PREFIX = "BENCH-RESULT "
#: A first call slower than this gets one warm fit, not ``--repeats``, and no memory run.
SLOW_FIRST_CALL_S = 60.0


class BudgetExceeded(BaseException):
    """A call ran past its time budget.

    A `BaseException`, like `KeyboardInterrupt`, so that libraries catching
    ``Exception`` around their work (better_optimize does, under pymc-extras'
    find_MAP) do not turn it into an ordinary early stop.
    """


@dataclass
class Measurement:
    """Everything measured for one method on one case.

    Times are seconds; memory is MB (10^6 bytes). ``status`` is ``"ok"``,
    ``"timeout"``, ``"error"`` or ``"skipped"``, with ``note`` saying why.
    """

    case: str
    n: int
    peer: str
    status: str = "ok"
    note: str = ""
    cold_s: float | None = None
    cold_status: str | None = None
    warm_cache_s: float | None = None
    warm_cache_status: str | None = None
    first_s: float | None = None
    warm_times: list[float] = field(default_factory=list)
    n_iter: int | None = None
    converged: bool | None = None
    traced_mb: float | None = None
    rss_mb: float | None = None
    loglik: float | None = None
    cold_logliks: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def warm_s(self) -> float | None:
        """Median of the warm fits."""
        return statistics.median(self.warm_times) if self.warm_times else None


# --- timing and memory --------------------------------------------------------------


def timed(fn: Callable[[], Any], budget: float | None) -> tuple[float, Any]:
    """Call ``fn`` once under a wall-clock budget.

    The budget is a ``SIGALRM``: it interrupts Python code, so a single long call
    into compiled code ends first.

    Raises
    ------
    BudgetExceeded
        When ``budget`` seconds pass.
    """

    def on_alarm(signum, frame):
        raise BudgetExceeded

    previous = signal.signal(signal.SIGALRM, on_alarm)
    if budget:
        signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        start = time.perf_counter()
        result = fn()
        return time.perf_counter() - start, result
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _mb(n_bytes: int | None) -> float | None:
    return None if n_bytes is None else n_bytes / 1e6


def measure_memory(fn: Callable[[], Any], budget: float | None) -> tuple[float, float | None]:
    """Peak memory of one call: traced by ``tracemalloc`` and RSS high-water.

    Both are above the level at the start of the call, so the data (already in
    memory) is not counted. NumPy reports its array buffers to ``tracemalloc``, so the
    traced peak covers the arrays a method allocates, PyTensor's included, plus Python
    objects; the RSS figure also covers memory C code takes with its own allocator.

    Returns
    -------
    traced_mb : float
    rss_mb : float or None
        ``None`` where the RSS high-water mark cannot be reset.
    """
    rss_before = _mb(status_bytes("VmRSS"))
    can_reset = reset_rss_peak()
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        timed(fn, budget)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_peak = _mb(status_bytes("VmHWM"))
    rss = rss_peak - rss_before if can_reset and rss_peak and rss_before else None
    return (peak - baseline) / 1e6, rss


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return text[:200]


# --- cold starts in subprocesses ----------------------------------------------------


#: The worker's "peer" that only compiles a trivial PyTensor function.
SETUP = "pytensor-setup"


def _compile_trivial_function() -> None:
    """What PyTensor builds once per compiledir, whatever the model: its own helper
    modules (the lazy linker and friends) and one small elementwise op."""
    import pytensor
    import pytensor.tensor as pt

    v = pt.dvector("v")
    pytensor.function([v], pt.exp(v).sum())(np.ones(3))


def worker(args: argparse.Namespace) -> None:
    """One first call in this fresh process, after the imports.

    Prints one line ``BENCH-RESULT {json}``: the seconds of the first call (model
    building, compiling and fitting; for `SETUP`, compiling a trivial function), the
    import time, and the fit's log-likelihood.
    """
    start = time.perf_counter()
    import pymc  # noqa: F401  (imported here so that the first call excludes it)

    if args.peer.startswith("pm_em"):
        import pm_em  # noqa: F401
    elif args.peer == "pymc-extras":
        import pymc_extras  # noqa: F401
    record: dict[str, Any] = {"import_s": time.perf_counter() - start}
    if args.peer == SETUP:
        case, x, job = None, None, _compile_trivial_function
    else:
        case = CASES[args.case]
        x = case.simulate(args.n, args.seed)

        def job() -> Fit:
            return make_fit(args.peer, case, x, args.tol, args.max_iter, args.seed)()

    rss_before = _mb(status_bytes("VmRSS"))
    try:
        seconds, fit = timed(job, args.max_seconds)
        record.update(status="ok", seconds=seconds)
        if case is not None:
            record.update(loglik=case.loglik(x, fit.params), n_iter=fit.n_iter)
    except BudgetExceeded:
        record.update(status="timeout")
    except Exception as error:  # noqa: BLE001  (reported, not hidden)
        record.update(status="error", note=_describe(error))
    rss_peak = _mb(status_bytes("VmHWM"))
    if rss_peak and rss_before:
        record["rss_peak_mb"] = rss_peak - rss_before
    import pytensor

    compiledir = Path(pytensor.config.compiledir)
    record["compiled_modules"] = sum(1 for _ in compiledir.rglob("*.so"))
    print(RESULT_PREFIX + json.dumps(record), flush=True)


def run_worker(
    peer: str, args: argparse.Namespace, compiledir: str, case: str = "", n: int = 0
) -> dict[str, Any]:
    """Run `worker` in a subprocess whose PyTensor compiles into ``compiledir``."""
    env = dict(os.environ)
    env["PYTENSOR_FLAGS"] = ",".join(
        filter(None, [env.get("PYTENSOR_FLAGS", ""), f"compiledir={compiledir}"])
    )
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        f"--case={case}",
        f"--n={n}",
        f"--peer={peer}",
        f"--tol={args.tol}",
        f"--max-iter={args.max_iter}",
        f"--seed={args.seed}",
        f"--max-seconds={args.max_seconds}",
    ]
    # The worker stops its own fit at the budget; the margin covers imports and the
    # gap between the alarm and the end of a long compiled call.
    hard_limit = args.max_seconds + 300 if args.max_seconds else None
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=hard_limit, check=False
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "note": f"killed after {hard_limit} s"}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": "error", "note": f"worker exited {done.returncode}: {tail[:200]}"}


def measure_setup(args: argparse.Namespace) -> dict[str, Any]:
    """PyTensor's one-time cost in an empty compiledir, common to pm_em and
    pymc-extras: a trivial function's first compile."""
    compiledir = tempfile.mkdtemp(prefix="pm_em_bench_compiledir_")
    try:
        progress("PyTensor's own setup in an empty compiledir")
        return run_worker(SETUP, args, compiledir)
    finally:
        shutil.rmtree(compiledir, ignore_errors=True)


def measure_cold(case: Case, n: int, peer: str, args: argparse.Namespace, m: Measurement) -> None:
    """Cold first call (empty compiledir), then the first call of a second fresh
    process with the compiledir the first one filled (warm on-disk cache)."""
    compiledir = tempfile.mkdtemp(prefix="pm_em_bench_compiledir_")
    try:
        progress(f"{case.key} n={n} {peer}: cold start (empty compiledir)")
        cold = run_worker(peer, args, compiledir, case.key, n)
        m.cold_status = cold["status"]
        m.extra["cold"] = cold
        if cold["status"] != "ok":
            return
        m.cold_s = cold["seconds"]
        m.cold_logliks.append(cold["loglik"])
        progress(f"{case.key} n={n} {peer}: first call, warm on-disk cache")
        warm_cache = run_worker(peer, args, compiledir, case.key, n)
        m.warm_cache_status = warm_cache["status"]
        m.extra["warm_cache"] = warm_cache
        if warm_cache["status"] == "ok":
            m.warm_cache_s = warm_cache["seconds"]
            m.cold_logliks.append(warm_cache["loglik"])
    finally:
        shutil.rmtree(compiledir, ignore_errors=True)


# --- the main process ---------------------------------------------------------------


def measure_here(
    case: Case, x: np.ndarray, peer: str, args: argparse.Namespace, m: Measurement
) -> None:
    """First call, warm fits and memory of ``peer`` in this process."""
    budget = args.max_seconds
    try:
        fit_fn = make_fit(peer, case, x, args.tol, args.max_iter, args.seed)
        progress(f"{case.key} n={m.n} {peer}: first call in this process")
        m.first_s, fit = timed(fit_fn, budget)
    except BudgetExceeded:
        m.status, m.note = "timeout", f"the first call ran past --max-seconds={budget:g}"
        return
    except Exception as error:  # noqa: BLE001  (reported in the table, not hidden)
        m.status, m.note = "error", _describe(error)
        return
    # A fit that takes minutes is timed once, so that the run stays within reach.
    repeats = args.repeats if m.first_s < SLOW_FIRST_CALL_S else 1
    for i in range(repeats):
        progress(f"{case.key} n={m.n} {peer}: warm fit {i + 1}/{repeats}")
        try:
            seconds, fit = timed(fit_fn, budget)
        except BudgetExceeded:
            if not m.warm_times:
                m.status = "timeout"
            m.note = f"warm fit {i + 1} ran past --max-seconds={budget:g}"
            break
        except Exception as error:  # noqa: BLE001  (reported in the table, not hidden)
            m.status, m.note = "error", _describe(error)
            return
        m.warm_times.append(seconds)
    record_fit(case, x, fit, m)
    if m.status != "ok":
        return
    if args.memory and m.first_s >= SLOW_FIRST_CALL_S:
        m.extra["memory"] = f"not measured: first call over {SLOW_FIRST_CALL_S:g} s"
    elif args.memory:
        progress(f"{case.key} n={m.n} {peer}: memory")
        try:
            m.traced_mb, m.rss_mb = measure_memory(fit_fn, budget)
        except BudgetExceeded:
            m.extra["memory"] = "timeout"
        except Exception as error:  # noqa: BLE001  (a failed memory run loses only memory)
            m.extra["memory"] = _describe(error)


def record_fit(case: Case, x: np.ndarray, fit: Fit, m: Measurement) -> None:
    """Store a fit's iterations, flag, parameters and common log-likelihood."""
    m.n_iter, m.converged = fit.n_iter, fit.converged
    m.loglik = case.loglik(x, fit.params)
    m.extra.update(fit.extra)
    m.extra["params"] = {k: np.asarray(v).tolist() for k, v in fit.params.items()}


def run_case(step: Planned, args: argparse.Namespace) -> list[Measurement]:
    """Measure every selected peer on one case."""
    key, n = step.case, step.n
    case = CASES[key]
    x = case.simulate(n, args.seed)
    peers = [p for p in case.peers if p in args.peers]
    rows = {p: Measurement(case=key, n=n, peer=p) for p in peers}
    for peer in set(peers) & set(step.left_out):
        rows[peer].status, rows[peer].note = "skipped", step.why_left_out
    peers = [p for p in peers if p not in step.left_out]
    if step.cold:
        for peer in (p for p in peers if p in COMPILING):
            measure_cold(case, n, peer, args, rows[peer])
    for peer in peers:
        m = rows[peer]
        if m.cold_status in ("timeout", "error"):
            reason = m.extra["cold"].get("note") or f"over --max-seconds={args.max_seconds:g}"
            m.status, m.note = "skipped", f"cold run: {m.cold_status} ({reason})"
            continue
        measure_here(case, x, peer, args, m)
    return list(rows.values())


# --- reporting ----------------------------------------------------------------------


def _fmt_s(value: float | None, status: str | None = None) -> str:
    if value is None:
        return status or "–"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def _fmt_mb(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _by(rows: list[Measurement], case: str, n: int, peer: str) -> Measurement | None:
    return next((r for r in rows if (r.case, r.n, r.peer) == (case, n, peer)), None)


def agreement(rows: list[Measurement], args: argparse.Namespace) -> dict[int, tuple[float, bool]]:
    """Per row: log-likelihood difference per observed element from the NumPy EM's,
    and whether it (and its cold runs') lies within ``--ll-tol``."""
    out = {}
    for r in rows:
        ref = _by(rows, r.case, r.n, "numpy")
        if ref is None or ref.loglik is None:
            continue
        elements = r.n * CASES[r.case].d
        logliks = ([r.loglik] if r.loglik is not None else []) + r.cold_logliks
        if not logliks:
            continue
        deltas = [(ll - ref.loglik) / elements for ll in logliks]
        worst = max(deltas, key=abs)
        out[id(r)] = (worst, abs(worst) <= args.ll_tol)
    return out


def results_table(rows: list[Measurement], args: argparse.Namespace) -> str:
    """The main markdown table."""
    agree = agreement(rows, args)
    header = (
        "| case | n | method | cold s | 1st call, warm cache s | warm fit s | iters | "
        "peak MB traced / RSS | log-likelihood | Δ/elem vs NumPy | same optimum | "
        "warm / sklearn or hmmlearn | cold / pymc-extras |"
    )
    lines = [header, _rule(header)]
    for r in rows:
        case = CASES[r.case]
        # The library that fits this case outside PyMC (at most one of the two does).
        sk = _by(rows, r.case, r.n, "sklearn") or _by(rows, r.case, r.n, "hmmlearn")
        pmx = _by(rows, r.case, r.n, "pymc-extras")
        warm = r.warm_s
        if r.status != "ok":
            warm_text = f"{r.status}: {r.note}".replace("|", "/")
        elif r.note:  # some warm fits finished, a later one ran past the budget
            warm_text = f"{_fmt_s(warm)} ({r.note})"
        else:
            warm_text = _fmt_s(warm)
        vs_sk = (
            warm / sk.warm_s
            if warm is not None and sk is not None and sk.warm_s and r.peer != sk.peer
            else None
        )
        vs_pmx = (
            r.cold_s / pmx.cold_s
            if r.peer.startswith("pm_em") and pmx is not None and r.cold_s and pmx.cold_s
            else None
        )
        iters = "–"
        if r.n_iter is not None:
            iters = f"{r.n_iter}" + ("" if r.converged else " (not converged)")
            if r.peer == "pymc-extras":
                iters += " L-BFGS-B"
        delta, ok = agree.get(id(r), (None, None))
        same = "–" if ok is None else ("yes" if ok else "**NO**")
        cold_text = _fmt_s(r.cold_s, r.cold_status) if r.peer in COMPILING else "n/a"
        if r.cold_s is not None and "compiled_modules" in r.extra.get("cold", {}):
            cold_text += f" ({r.extra['cold']['compiled_modules']} modules)"
        cache_text = _fmt_s(r.warm_cache_s, r.warm_cache_status) if r.peer in COMPILING else "n/a"
        if r.peer in COMPILING and r.cold_status is None:
            cold_text = cache_text = "not run"
        memory = f"{_fmt_mb(r.traced_mb)} / {_fmt_mb(r.rss_mb)}"
        lines.append(
            f"| {case.title} | {r.n:,} | {PEER_LABELS[r.peer]} | {cold_text} | {cache_text} | "
            f"{warm_text} | {iters} | {memory} | "
            f"{'–' if r.loglik is None else f'{r.loglik:.4f}'} | "
            f"{'–' if delta is None else f'{delta:+.1e}'} | {same} | "
            f"{_fmt_ratio(vs_sk)} | {_fmt_ratio(vs_pmx)} |"
        )
    return "\n".join(lines)


def _rule(header: str) -> str:
    return "|" + "---|" * (header.count("|") - 1)


def targets_table(rows: list[Measurement], args: argparse.Namespace) -> str:
    """The project's targets, each met / missed / not measured."""
    header = "| target | case | n | pm_em | reference | pm_em / reference | result |"
    lines = [header, _rule(header)]

    def line(target, key, n, mine, ref, ratio_text, result):
        lines.append(
            f"| {target} | {CASES[key].title} | {n:,} | {mine} | {ref} | {ratio_text} | {result} |"
        )

    def verdict(ratio, limit):
        return "met" if ratio <= limit else "**missed**"

    measured = sorted({(r.case, r.n) for r in rows})
    target = "warm fit ≤ 1.0x scikit-learn"
    for key, n, peer in ((k, n, p) for k, n in measured for p in ("pm_em", "pm_em-jax")):
        pe, sk = _by(rows, key, n, peer), _by(rows, key, n, "sklearn")
        if key not in ("gmm1d", "mvgmm2d") or n < 100_000 or pe is None or sk is None:
            continue
        mine = f"{_fmt_s(pe.warm_s, pe.status)} ({PEER_LABELS[peer]})"
        ref = _fmt_s(sk.warm_s, sk.status)
        if pe.warm_s is None or sk.warm_s is None:
            line(target, key, n, mine, ref, "–", "not measured")
        else:
            ratio = pe.warm_s / sk.warm_s
            line(target, key, n, mine, ref, _fmt_ratio(ratio), verdict(ratio, 1.0))

    target = "cold time ≤ 1/3 of pymc-extras' cold find_MAP"
    for key, n, peer in ((k, n, p) for k, n in measured for p in ("pm_em", "pm_em-jax")):
        pe, pmx = _by(rows, key, n, peer), _by(rows, key, n, "pymc-extras")
        if pe is None or pmx is None or pe.cold_status is None or pmx.cold_status is None:
            continue
        mine = f"{_fmt_s(pe.cold_s, pe.cold_status)} ({PEER_LABELS[peer]})"
        if pe.cold_s is not None and pmx.cold_s is not None:
            ratio = pe.cold_s / pmx.cold_s
            line(target, key, n, mine, _fmt_s(pmx.cold_s), _fmt_ratio(ratio), verdict(ratio, 1 / 3))
        elif pe.cold_s is not None and pmx.cold_status == "timeout":
            # pymc-extras ran past the budget, so the ratio is at most this bound.
            bound = pe.cold_s / args.max_seconds
            result = "met" if bound <= 1 / 3 else "not decided (pymc-extras timed out)"
            ref = f"> {args.max_seconds:g} (timeout)"
            line(target, key, n, mine, ref, f"< {_fmt_ratio(bound)}", result)
        else:
            line(target, key, n, mine, _fmt_s(pmx.cold_s, pmx.cold_status), "–", "not measured")

    target = "cold first fit ≤ 10 s"
    for key, n in measured:
        for peer in ("pm_em", "pm_em-jax"):
            pe = _by(rows, key, n, peer)
            if pe is None or pe.cold_status is None:
                continue
            mine = f"{_fmt_s(pe.cold_s, pe.cold_status)} ({PEER_LABELS[peer]})"
            result = "not measured" if pe.cold_s is None else verdict(pe.cold_s, 10.0)
            line(target, key, n, mine, "10 s", "–", result)

    target = "warm fit (JAX) ≤ 1.0x the C backend"
    for key, n in measured:
        pe, c = _by(rows, key, n, "pm_em-jax"), _by(rows, key, n, "pm_em")
        if pe is None or c is None or pe.warm_s is None or c.warm_s is None:
            continue
        ratio = pe.warm_s / c.warm_s
        line(
            target,
            key,
            n,
            _fmt_s(pe.warm_s),
            _fmt_s(c.warm_s),
            _fmt_ratio(ratio),
            verdict(ratio, 1.0),
        )

    target = "peak memory (traced) ≤ 2x scikit-learn"
    for key, n in measured:
        pe, sk = _by(rows, key, n, "pm_em"), _by(rows, key, n, "sklearn")
        if n < 1_000_000 or pe is None or sk is None:
            continue
        mine, ref = f"{_fmt_mb(pe.traced_mb)} MB", f"{_fmt_mb(sk.traced_mb)} MB"
        if pe.traced_mb is None or sk.traced_mb is None:
            line(target, key, n, mine, ref, "–", "not measured")
        else:
            ratio = pe.traced_mb / sk.traced_mb
            line(target, key, n, mine, ref, _fmt_ratio(ratio), verdict(ratio, 2.0))
    if len(lines) == 2:
        lines.append("| (no target applies to the cases run) | | | | | | |")
    return "\n".join(lines)


def report(rows: list[Measurement], args: argparse.Namespace, env: dict[str, Any]) -> str:
    """Everything printed at the end of a run, as markdown."""
    notes = [
        *environment_notes(env, " ".join(["python", *sys.argv])),
        f"tol: pm_em {args.tol:g} per observed element; NumPy EM the same rule; "
        f"scikit-learn tol·d; hmmlearn tol·N; pymc-extras L-BFGS-B ftol = tol·N/|logp(start)|, "
        f"gtol = tol·N. Same optimum: |Δ log-likelihood| / N ≤ {args.ll_tol:g}. "
        f"Warm fit: median of {args.repeats} (1 when the first call took over "
        f"{SLOW_FIRST_CALL_S:g} s). Budget: {args.max_seconds:g} s per call.",
    ]
    setup = env.get("pytensor_setup")
    if setup and setup.get("status") == "ok":
        notes.append(
            f"Cold times include PyTensor's one-time build of its own modules, common to "
            f"pm_em and pymc-extras: {setup['seconds']:.1f} s for a trivial function in an "
            "empty compiledir (measured separately)."
        )
    out = ["## Results", "", *[f"- {line}" for line in notes], "", results_table(rows, args)]
    out += ["", "## Targets", "", targets_table(rows, args)]
    problems = [r for r in rows if r.status != "ok" or r.note or r.extra.get("warnings")]
    if problems:
        out += ["", "Notes:"]
        for r in problems:
            if r.status != "ok" or r.note:
                detail = f"{r.status}: {r.note}"
            else:
                detail = "warning: " + "; ".join(r.extra["warnings"])
            out.append(f"- {r.case} n={r.n:,} {PEER_LABELS[r.peer]}: {detail}")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = benchmark_parser(__doc__, tol=1e-8, max_iter=1000)
    parser.add_argument("--quick", action="store_true", help="small cases, a few minutes")
    parser.add_argument(
        "--cases",
        default=None,
        help="comma-separated CASE:N (cases: " + ", ".join(CASES) + "), e.g. gmm1d:1000,zip:1000",
    )
    parser.add_argument(
        "--peers", default=",".join(PEERS), help="comma-separated subset of " + ", ".join(PEERS)
    )
    parser.add_argument(
        "--cold",
        choices=("plan", "all", "none"),
        default="plan",
        help="which cases get cold-start subprocesses (plan: every full case; "
        "with --quick only the first)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="time budget of each call (default 300, 120 with --quick); past it the "
        "call is stopped and reported as timeout",
    )
    parser.add_argument("--repeats", type=int, default=None, help="warm fits (default 3, 1 quick)")
    parser.add_argument(
        "--ll-tol",
        type=float,
        default=1e-6,
        help="same optimum when |Δ log-likelihood| per observed element ≤ this",
    )
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip memory")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.max_seconds is None:
        args.max_seconds = 120.0 if args.quick else 300.0
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(args.peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; choose from {PEERS}")
    return args


def plan(args: argparse.Namespace) -> list[Planned]:
    """The cases this run measures."""
    if args.cases:
        chosen = []
        for item in args.cases.split(","):
            key, _, n = item.partition(":")
            if key not in CASES or not n.isdigit():
                raise SystemExit(f"--cases: expected CASE:N, CASE in {list(CASES)}; got {item!r}")
            chosen.append(Planned(key, int(n)))
    else:
        chosen = QUICK_PLAN if args.quick else FULL_PLAN
    if args.cold == "plan":
        return chosen
    return [replace(step, cold=args.cold == "all") for step in chosen]


def main() -> None:
    """Run the plan and print the markdown report."""
    args = parse_args()
    if args.worker:
        worker(args)
        return
    started = time.perf_counter()
    chosen = plan(args)
    env = environment()
    wants_cold = any(step.cold for step in chosen) and set(args.peers) & set(COMPILING)
    env["pytensor_setup"] = measure_setup(args) if wants_cold else None
    rows: list[Measurement] = []
    for step in chosen:
        rows += run_case(step, args)
    text = report(rows, args, env)
    print(text)
    progress(f"done in {time.perf_counter() - started:.0f} s")
    if args.json is not None:
        record = {
            "environment": env,
            "settings": settings(args),
            "rows": [asdict(r) | {"warm_s": r.warm_s} for r in rows],
        }
        write_record(args.json, record)


if __name__ == "__main__":
    main()

"""What every benchmark script shares: the command line's common options, progress on
stderr, the environment recorded next to the figures, the report's opening lines and
the JSON record.

A script supplies ``measure(args)`` (the figures) and ``report(results, args, env,
seconds)`` (markdown); :func:`run_benchmark` does the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def benchmark_parser(
    doc: str,
    *,
    tol: float,
    max_iter: int,
    seed: int = 20240601,
    repeats: int | None = None,
    starts: int | None = None,
) -> argparse.ArgumentParser:
    """A parser with the options every benchmark takes (``--tol``, ``--max-iter``,
    ``--seed``, ``--json``), and ``--repeats`` / ``--starts`` when given a default."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--tol", type=float, default=tol, help="tol per observation")
    parser.add_argument("--max-iter", type=int, default=max_iter, help="iteration cap")
    parser.add_argument("--seed", type=int, default=seed, help="seed of the data")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure")
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats, help="warm fits per method")
    if starts is not None:
        parser.add_argument("--starts", type=int, default=starts, help="jittered starts")
    return parser


def parse_command_line(
    parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> argparse.Namespace:
    """The parsed options, with ``argv`` kept for the report's "Run" line."""
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


def progress(message: str) -> None:
    """Say on stderr what is running."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def environment() -> dict[str, Any]:
    """Versions, machine and BLAS facts worth keeping next to the figures."""
    from importlib.metadata import PackageNotFoundError, version

    import pytensor

    versions = {}
    packages = (
        "numpy",
        "scipy",
        "scikit-learn",
        "hmmlearn",
        "pymc",
        "pytensor",
        "pymc-extras",
        "jax",
    )
    for package in packages:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    try:
        revision = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "pm_em")
        revision += " + uncommitted changes to pm_em/" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        revision = "unknown"
    try:
        from threadpoolctl import threadpool_info

        blas = ", ".join(
            f"{p['internal_api']} {p.get('version')} ({p.get('architecture')}, "
            f"{p['num_threads']} threads)"
            for p in threadpool_info()
            if p.get("user_api") == "blas"
        )
    except ImportError:
        blas = "unknown"
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {memory_gb:.0f} GiB",
        "versions": versions,
        "pm_em_revision": revision,
        "numpy_blas": blas,
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", "unset"),
        "pytensor_blas_ldflags": pytensor.config.blas__ldflags or "none linked",
        "load_average_at_start": os.getloadavg(),
    }


def environment_notes(env: dict[str, Any], command: str, seconds: float | None = None) -> list[str]:
    """The report's opening lines: the command, the machine, the versions, BLAS, load."""
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v != "not installed")
    took = "" if seconds is None else f", {seconds / 60:.1f} minutes"
    return [
        f"Run {env['date']}: `{command}`{took}",
        f"Machine: {env['machine']}; Python {env['python']}; {versions}; pm_em at "
        f"{env['pm_em_revision']}",
        f"BLAS: NumPy {env['numpy_blas'] or 'unknown'} (OPENBLAS_CORETYPE="
        f"{env['openblas_coretype']}); PyTensor: {env['pytensor_blas_ldflags']}. "
        f"Load average (1 min) at start {env['load_average_at_start'][0]:.1f}, at end "
        f"{os.getloadavg()[0]:.1f}: other work on the machine slows every method.",
    ]


def script_notes(env: dict[str, Any], args: argparse.Namespace, seconds: float) -> list[str]:
    """:func:`environment_notes` of a script run as ``python benchmarks/<script> ...``."""
    command = " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *args.argv])
    return environment_notes(env, command, seconds)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The options, as JSON takes them."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def _jsonable(value):
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    return str(value)


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Every figure as JSON (arrays as lists, anything else unknown as text)."""
    path.write_text(json.dumps(record, indent=2, default=_jsonable))


def run_benchmark(
    args: argparse.Namespace,
    measure: Callable[[argparse.Namespace], Any],
    report: Callable[[Any, argparse.Namespace, dict[str, Any], float], str],
    record: Callable[[Any], dict[str, Any]],
) -> None:
    """Measure, print the markdown report, and write the JSON record if asked."""
    began = time.perf_counter()
    env = environment()
    results = measure(args)
    env["load_average_at_end"] = os.getloadavg()
    seconds = time.perf_counter() - began
    print(report(results, args, env, seconds))
    progress(f"done in {seconds:.0f} s")
    if args.json is not None:
        write_record(args.json, {"environment": env, "settings": settings(args), **record(results)})

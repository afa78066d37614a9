"""Chunked EM at scale: the 1-D two-component mixture at n = 10^6, 10^7, 10^8.

The data are written to a memory-mapped ``.npy`` file (in blocks, never whole in
memory) and fitted with ``pm_em.find_MAP(model, data={"x": mapped})``, the model
declared on the first chunk: in this process, and on a 2-worker ``LocalCluster``
(one thread each). scikit-learn's ``GaussianMixture`` (the data in memory) is the
reference where it fits. Every measurement runs in a fresh process, so that its peak
RSS (``VmHWM``) is its own; on the cluster, the workers' peaks are reported too.

Time per iteration: the wall time between the first and the last iteration's end,
over the iterations between (a fixed number: ``tol=0``), so compilation, the
cluster's start and the first chunk reads are not counted.

With ``--n-init K`` (K > 1) every runner fits K jittered starts (seed 0) of the fixed
number of iterations each, and reports ``seconds``: the wall time of all the starts
(after a warm-up iteration of every start compiled everything); on the cluster the
starts run side by side (one driver thread each, ``cluster``) or one after another
(``cluster-sequential``). ``cluster-async``: side by side, with actors that serve
two calls at once (an async method running each call in a thread of a 2-thread
pool, with that thread's own copy of the compiled kernel), where pm_em's actor
serves one call at a time.

Usage::

    python benchmarks/scale.py                 # 1e6 and 1e7, all runners
    python benchmarks/scale.py --n 1e8 --runners chunks cluster --iterations 3
    python benchmarks/scale.py --n 1e6 --n-init 4 --runners cluster cluster-sequential

The data file goes to ``--dir`` (default /tmp) and is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from rss import status_bytes  # noqa: E402

BLOCK = 1_000_000
START = {"w": np.array([0.5, 0.5]), "mu": np.array([-1.0, 1.0]), "sigma": np.array([1.0, 1.0])}


def write_data(path: Path, n: int, seed: int = 0) -> None:
    """Two Gaussians (-2, 1) and (3, 0.7), weights 0.4 / 0.6, block by block."""
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype="float64", shape=(n,))
    for start in range(0, n, BLOCK):
        size = min(BLOCK, n - start)
        first = rng.random(size) < 0.4
        out[start : start + size] = np.where(
            first, rng.normal(-2.0, 1.0, size), rng.normal(3.0, 0.7, size)
        )
    out.flush()
    del out


def chunk_length(n: int) -> int:
    return min(n // 4, BLOCK)


def model_on(first_rows):
    import pymc as pm

    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Normal("mu", 0.0, 10.0, shape=2)
        sigma = pm.HalfNormal("sigma", 5.0, shape=2)
        z = pm.Categorical("z", w, shape=len(first_rows))
        pm.Normal("x", mu[z], sigma[z], observed=np.asarray(first_rows))
    return model


class ConcurrentChunkWorker:
    """A :class:`pm_em.chunks.distributed.ChunkWorker` serving ``threads`` calls at
    once (``cluster-async``). Defined here, it travels to the workers by value."""

    def __init__(self, kernel, threads: int = 2):
        import threading
        from concurrent.futures import ThreadPoolExecutor

        from pm_em.chunks.distributed import ChunkWorker

        self._inner = ChunkWorker(kernel)
        self.kernel = kernel
        self.chunks = self._inner.chunks
        self._pool = ThreadPoolExecutor(threads)
        self._local = threading.local()

    def load(self, indices, loaders) -> int:
        return self._inner.load(indices, loaders)

    def _level(self, level, values, totals, indices):
        import pickle

        from pm_em.chunks.executor import add_into

        # A compiled function keeps its own storage: one copy of the kernel per thread.
        kernel = getattr(self._local, "kernel", None)
        if kernel is None:
            kernel = self._local.kernel = pickle.loads(pickle.dumps(self.kernel))
        values = [np.array(v, copy=True) for v in values]
        totals = [[np.array(t, copy=True) for t in level_totals] for level_totals in totals]
        total = None
        for index in indices:
            total = add_into(total, kernel(level, values, self.chunks[index], totals))
        return total

    async def level(self, level, values, totals, indices):
        import asyncio

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._level, level, values, totals, indices)


class IterationClock:
    """Progress reporter (:class:`pm_em.fit.progress.EMProgress`'s protocol)
    recording when each iteration of start 0 ends."""

    def __init__(self):
        self.ends = []

    def start(self, restart):
        def iteration(iteration, logp):
            if restart == 0:
                self.ends.append(time.perf_counter())

        return iteration

    def finish(self, restart, logp):
        pass


def _peak_rss() -> int:
    """This process's peak RSS in bytes (defined here, so that it is sent to Dask
    workers by value)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_chunks(
    path: str,
    iterations: int,
    workers: int,
    n_init: int = 1,
    concurrent: bool = True,
    concurrent_actors: bool = False,
) -> dict:
    from pm_em import EM
    from pm_em.chunks import distributed
    from pm_em.chunks.fit import ChunkedEM
    from pm_em.fit.loop import best_start, run_starts
    from pm_em.fit.starts import start_points

    mapped = np.load(path, mmap_mode="r")
    n = mapped.shape[0]
    em = EM(model_on(mapped[: chunk_length(n)]))
    client = cluster = None
    if workers:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, dashboard_address=None, processes=True
        )
        client = Client(cluster)
    if concurrent_actors:
        # The executor creates its actors from this module attribute.
        distributed.ChunkWorker = ConcurrentChunkWorker
    routine = ChunkedEM(em, {"x": mapped}, client=client, concurrent_starts=concurrent)
    if n_init == 1:
        starts = [em.to_values(START)]
    else:
        starts = [em.to_values(p) for p in start_points(em, "jitter", n_init, 0)]
    clock = IterationClock()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tol=0: "did not converge" by design
        # Compile every level (here and on the workers) before the clock starts.
        run_starts(routine, starts, tol=0.0, max_iter=1, accelerate=None)
        begin = time.perf_counter()
        states, histories = run_starts(
            routine, starts, tol=0.0, max_iter=iterations, accelerate=None, progress=clock
        )
        seconds = time.perf_counter() - begin
    best = best_start(histories)
    record = {
        # One chunk's kernel per level, in this process: what a worker computes per
        # chunk of a pass (its share of an iteration: chunks per worker x this sum).
        "chunk_seconds": _chunk_seconds(routine, starts[0]),
        # One pass of level 0 over every chunk, as the driver sees it (the workers'
        # kernels and the calls' round trips).
        "pass_seconds": _pass_seconds(routine, starts[0]),
        "seconds_per_iteration": float(np.diff(clock.ends).mean()),
        "n_init": n_init,
        "concurrent_starts": routine.concurrent_starts,
        "seconds": seconds,
        "n_chunks": routine.n_chunks,
        "chunk_length": chunk_length(n),
        "logp": states[best].logp,
        "restart_logp": [h.logp[-1] for h in histories],
        "mu": em.to_point(states[best].values)["mu"].tolist(),
        "rss_peak_mb": status_bytes("VmHWM") / 2**20,
    }
    if client is not None:
        peaks = client.run(_peak_rss)
        record["worker_rss_peak_mb"] = [v / 2**20 for v in peaks.values()]
        client.close()
        cluster.close()
    return record


def _chunk_seconds(routine, values, repeats: int = 3) -> list[float]:
    """Best of ``repeats`` wall times of one full chunk's statistics, per level."""
    start, stop = routine.executor.ranges[0]
    arrays = [source.read(start, stop) for source in routine.sources]
    first = routine.kernel(0, values, arrays, [])
    totals = [routine.kernel.split_first(first)[1]]
    seconds = []
    for level in range(routine.n_levels):
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            out = routine.kernel(level, values, arrays, totals[:level])
            times.append(time.perf_counter() - begin)
        seconds.append(min(times))
        if level > 0:
            totals.append(out)
    return seconds


def _pass_seconds(routine, values, repeats: int = 3) -> float:
    """Best of ``repeats`` wall times of one level-0 pass over every chunk."""
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        routine.executor.level(0, values, [])
        times.append(time.perf_counter() - begin)
    return min(times)


def run_sklearn(path: str, iterations: int) -> dict:
    from sklearn.mixture import GaussianMixture

    x = np.load(path)[:, None]  # in memory
    gm = GaussianMixture(
        2,
        max_iter=iterations,
        tol=0.0,
        weights_init=START["w"],
        means_init=START["mu"][:, None],
        precisions_init=(1.0 / START["sigma"] ** 2)[:, None, None],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        begin = time.perf_counter()
        gm.fit(x)
        elapsed = time.perf_counter() - begin
    return {
        # Its fit includes one extra E-step (the final one): counted as an iteration.
        "seconds_per_iteration": elapsed / (gm.n_iter_ + 1),
        "mu": gm.means_.ravel().tolist(),
        "rss_peak_mb": status_bytes("VmHWM") / 2**20,
    }


def worker_main(args) -> None:
    if args.runner == "sklearn":
        record = run_sklearn(args.path, args.iterations)
    else:
        workers = 2 if args.runner.startswith("cluster") else 0
        concurrent = args.runner != "cluster-sequential"
        record = run_chunks(
            args.path,
            args.iterations,
            workers,
            args.n_init,
            concurrent,
            concurrent_actors=args.runner == "cluster-async",
        )
    print("RESULT " + json.dumps(record))


def measure(runner: str, path: Path, iterations: int, n_init: int = 1) -> dict:
    command = [sys.executable, __file__, "--worker", runner, "--path", str(path)]
    command += ["--iterations", str(iterations), "--n-init", str(n_init)]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{runner} failed:\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", nargs="*", type=float, default=[1e6, 1e7])
    parser.add_argument(
        "--runners",
        nargs="*",
        default=["chunks", "cluster", "sklearn"],
        help="which to run: chunks, cluster, cluster-sequential, cluster-async, sklearn",
    )
    parser.add_argument(
        "--n-init", type=int, default=1, help="starts per fit (pm_em runners; sklearn: 1)"
    )
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.runner = args.worker
        worker_main(args)
        return
    print(f"uptime: {os.popen('uptime').read().strip()}")
    for n in (int(v) for v in args.n):
        path = Path(args.dir) / f"pm_em_scale_{n}.npy"
        try:
            write_data(path, n)
            for runner in args.runners:
                if runner == "sklearn" and n > 10**7:
                    continue  # 10^8 rows x 2 components of float64 tables: not on this machine
                record = measure(runner, path, args.iterations, args.n_init)
                print(json.dumps({"n": n, "runner": runner, **record}), flush=True)
        finally:
            path.unlink(missing_ok=True)
    print(f"uptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()

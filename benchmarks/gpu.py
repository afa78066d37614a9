"""GPU smoke run: pm_em's JAX backend on a GPU, at sizes where one pays off.

From the repository root::

    python benchmarks/gpu.py            # 1-D mixture n = 10^7, HMM T = 10^6
    python benchmarks/gpu.py --n-mixture 100000 --n-hmm 10000   # smaller

Fits the 1-D two-component mixture and the 3-state Gaussian HMM (``cases.py``) with
``backend="jax"``, first fit (compiling) then a warm fit, and prints the time per EM
iteration of the warm fit. When JAX sees no GPU it says so and exits 0, so the
script can run anywhere. On a GPU the HMM's forward-backward takes its
parallel-in-time form (``jax.lax.associative_scan``) for chains of at least
``pm_em.estep.forward_backward_jax.PARALLEL_MIN_STEPS`` steps.
"""

from __future__ import annotations

import argparse
import sys
import time


def gpu_devices() -> list:
    """The GPUs JAX sees (empty without JAX, or without a GPU)."""
    try:
        import jax
    except ImportError:
        return []
    try:
        return list(jax.devices("gpu"))
    except RuntimeError:  # no GPU backend initialized
        return []


def fit(case_key: str, n: int, seed: int) -> str:
    """First and warm fit of one case; a one-line report."""
    from cases import CASES

    import pm_em

    case = CASES[case_key]
    x = case.simulate(n, seed)
    model = case.build_model(x)
    options = dict(
        initvals=case.initvals(case.start), random_seed=seed, progressbar=False, backend="jax"
    )
    start = time.perf_counter()
    pm_em.find_MAP(model, **options)
    first = time.perf_counter() - start
    start = time.perf_counter()
    idata = pm_em.find_MAP(model, **options)
    warm = time.perf_counter() - start
    n_iter = int(idata.em_stats["n_iter"])
    return (
        f"{case_key:6s} n = {n:>10,}: first fit {first:7.2f} s, warm fit {warm:7.2f} s, "
        f"{n_iter} iterations, {1e3 * warm / max(n_iter, 1):8.2f} ms per iteration"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-mixture", type=int, default=10_000_000)
    parser.add_argument("--n-hmm", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=20240601)
    args = parser.parse_args(argv)
    gpus = gpu_devices()
    if not gpus:
        print("No GPU visible to JAX: skipping the GPU smoke run.")
        return 0
    print(f"JAX devices: {gpus}")
    print(fit("gmm1d", args.n_mixture, args.seed), flush=True)
    print(fit("hmm", args.n_hmm, args.seed), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""EM beside MCMC on the notes' two-component normal mixture.

The data are those of ``gaussian_mixture.py`` (the "Expectation Maximization
Algorithm" notes: N(2, 0.5) with probability 0.4, N(5, 1) with probability 0.6,
n = 1000), now with proper priors so that the posterior is proper and NUTS is
well-behaved. The one model object is fitted twice:

* by EM (``pm_em.find_MAP``), which returns the MAP and the responsibilities, with
  standard errors from the Laplace approximation at the MAP (``pm_em.fit_laplace``);
* by NUTS (``pm.sample``) after ``pymc_extras.marginalize`` sums the latent labels
  out (NUTS cannot sample a discrete variable), with ``recover_marginals`` adding
  each draw's responsibilities ``lp_z``.

A mixture's likelihood is the same under any renaming of its components, so the
two chains may settle in different labellings (label switching). ``pm_em.compare``
first relabels every draw to match the EM solution (``pm_em.relabel``), then
tabulates the EM estimate against the posterior; the comparison plot is saved next
to this script as ``em_vs_mcmc.png``.
"""

import importlib.util
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pymc as pm  # noqa: E402
import pymc_extras as pmx  # noqa: E402

import pm_em  # noqa: E402
from pm_em.results.compare import compare  # noqa: E402
from pm_em.results.plots import plot_compare  # noqa: E402

HERE = Path(__file__).resolve().parent
PLOT_PATH = HERE / "em_vs_mcmc.png"


def _load_sibling(name):
    """Import ``examples/<name>.py`` by path (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


notes_mixture = _load_sibling("gaussian_mixture")


def build_model(x):
    """The notes' mixture with proper priors.

    ``InverseGamma(2, 1)`` on the scales keeps the MAP finite (a component cannot
    shrink onto one observation, where a mixture likelihood is unbounded) and is
    weak next to n = 1000 observations; ``Normal(0, 10)`` on the means and a flat
    Dirichlet on the weights are weak too.
    """
    coords = {"component": [0, 1], "obs": np.arange(len(x))}
    with pm.Model(coords=coords) as model:
        w = pm.Dirichlet("w", a=np.ones(2), dims="component")
        mu = pm.Normal("mu", 0.0, 10.0, dims="component")
        sigma = pm.InverseGamma("sigma", alpha=2.0, beta=1.0, dims="component")
        z = pm.Categorical("z", p=w, dims="obs")
        pm.Normal("x", mu=mu[z], sigma=sigma[z], observed=x, dims="obs")
    return model


def fit_em(model):
    """The MAP by EM; returns the result and the wall time of a first (compiling)
    and a second (warm) fit."""
    start = time.perf_counter()
    idata = pm_em.find_MAP(model, random_seed=1, progressbar=False)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    pm_em.find_MAP(model, random_seed=1, progressbar=False)
    warm = time.perf_counter() - start
    return idata, cold, warm


def fit_laplace(em_idata, model):
    """The Laplace approximation at the MAP, for the EM estimates' standard errors;
    returns it and its wall time."""
    start = time.perf_counter()
    laplace = pm_em.fit_laplace(em_idata, model=model, draws=1000, random_seed=3)
    return laplace, time.perf_counter() - start


def fit_nuts(model, draws=500, tune=500, chains=2, random_seed=7):
    """NUTS on the model with ``z`` marginalized, then the draws' ``lp_z``; returns the
    trace and the wall times of sampling and of recovering ``lp_z``."""
    marginal = pmx.marginalize(model, ["z"])
    start = time.perf_counter()
    trace = pm.sample(
        draws, tune=tune, chains=chains, random_seed=random_seed, progressbar=False, model=marginal
    )
    sampling = time.perf_counter() - start
    start = time.perf_counter()
    trace = pmx.recover_marginals(
        trace, model=marginal, var_names=["z"], return_samples=False, random_seed=random_seed
    )
    recovering = time.perf_counter() - start
    return trace, sampling, recovering


def main():
    x = notes_mixture.simulate_data()
    model = build_model(x)
    em_idata, em_cold, em_warm = fit_em(model)
    laplace_idata, laplace_time = fit_laplace(em_idata, model)
    trace, nuts_time, recover_time = fit_nuts(model)
    # Given the Laplace fit, compare() takes the MAP from its map group and the
    # standard errors (em_se) from its fit group.
    reference = laplace_idata

    truth = np.concatenate([notes_mixture.TRUE_W, notes_mixture.TRUE_MU, notes_mixture.TRUE_SIGMA])
    table = compare(reference, trace, model=model)
    table["truth"] = truth
    raw = compare(reference, trace, model=model, undo_label_switching=False)
    table.insert(table.columns.get_loc("r_hat") + 1, "r_hat_raw", raw["r_hat"])
    print(f"EM (MAP) beside NUTS, 2 chains x 500 draws, n = {len(x)}:")
    with pd.option_context("display.width", 140, "display.max_columns", 20):
        print(table.dropna(axis="columns", how="all").round(4))
    print("(r_hat_raw: the draws before relabelling)")

    axes = plot_compare(reference, trace, model=model, figsize=(12, 6), textsize=9)
    figure = axes.flat[0].figure
    figure.suptitle(
        "NUTS posteriors (relabelled) with the EM estimate (red line) "
        "and its Laplace 94% interval (shaded)"
    )
    figure.tight_layout()
    figure.savefig(PLOT_PATH, dpi=100)
    print(f"comparison plot: {PLOT_PATH}")

    attrs = em_idata.posterior.attrs
    print(
        f"EM: log-likelihood {attrs['log_likelihood']:.3f}, {attrs['n_params']} parameters, "
        f"BIC {attrs['bic']:.2f}; {int(em_idata.em_stats['n_iter'])} iterations"
    )
    print(
        f"wall time: EM {em_cold:.1f} s first fit (compilation included), {em_warm:.2f} s "
        f"warm refit; NUTS {nuts_time:.1f} s (compilation included), recover_marginals "
        f"{recover_time:.1f} s; Laplace {laplace_time:.1f} s"
    )


if __name__ == "__main__":
    main()

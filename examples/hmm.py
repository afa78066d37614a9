"""Three-state Gaussian hidden Markov model: EM (Baum–Welch) beside NUTS.

A hidden state ``s_t`` moves between three regimes by the transition matrix ``P``
(row ``i`` holds the probabilities of moving from state ``i``), starting from ``pi``;
each observation is ``Normal(mu[s_t], sigma[s_t])``. The chain is declared with
``pymc_extras.DiscreteMarkovChain``, and pm_em fits it by Baum–Welch: a
forward–backward E-step and closed-form updates of ``P``, ``pi``, ``mu`` and
``sigma``. The priors are flat, so the MAP is the maximum-likelihood estimate.

The same model object is then sampled by NUTS after pymc-extras marginalizes the
chain out, and the posterior summary is printed beside the EM estimates.
"""

import arviz as az
import numpy as np
import pandas as pd
import pymc as pm
import pymc_extras as pmx
from pymc.model.transform.optimization import freeze_dims_and_data

import pm_em

TRUE_P = np.array(
    [
        [0.90, 0.05, 0.05],
        [0.05, 0.90, 0.05],
        [0.10, 0.20, 0.70],
    ]
)
TRUE_PI = np.array([0.5, 0.3, 0.2])
TRUE_MU = np.array([-1.0, 1.0, 3.0])
# Small enough that log p(y) stays above about -700 at T = 300, which pymc-extras'
# marginalized chain needs for finite gradients (see ``sample_marginalized``).
TRUE_SIGMA = np.array([0.4, 0.3, 0.5])


def simulate_data(n_steps=300, seed=20260601):
    """A state path of ``n_steps`` and its observations.

    Returns
    -------
    y : numpy.ndarray of shape (n_steps,)
    states : numpy.ndarray of int, shape (n_steps,)
    """
    rng = np.random.default_rng(seed)
    states = np.empty(n_steps, dtype=int)
    states[0] = rng.choice(3, p=TRUE_PI)
    for t in range(1, n_steps):
        states[t] = rng.choice(3, p=TRUE_P[states[t - 1]])
    return rng.normal(TRUE_MU[states], TRUE_SIGMA[states]), states


def build_model(y):
    """The HMM with its chain written out, flat priors.

    ``dims="time"`` of length ``T`` gives a chain of ``T`` states (pymc-extras counts
    ``steps = T - 1`` transitions). ``P``'s first dim is the state moved from, so it
    needs a coordinate of its own.
    """
    coords = {"state": [0, 1, 2], "state_from": [0, 1, 2], "time": np.arange(len(y))}
    with pm.Model(coords=coords) as model:
        P = pm.Dirichlet("P", a=np.ones((3, 3)), dims=("state_from", "state"))
        pi = pm.Dirichlet("pi", a=np.ones(3), dims="state")
        mu = pm.Flat("mu", dims="state")
        sigma = pm.HalfFlat("sigma", dims="state")
        # An explicit init_dist: pymc-extras warns and assumes a uniform one otherwise.
        s = pmx.DiscreteMarkovChain("s", P=P, init_dist=pm.Categorical.dist(p=pi), dims="time")
        pm.Normal("y", mu=mu[s], sigma=sigma[s], observed=y, dims="time")
    return model


def initial_values(y):
    """A start from the data: distinct means (the default point is a symmetric
    saddle), a common spread, sticky transitions."""
    return {
        "P": np.full((3, 3), 0.1) + 0.7 * np.eye(3),
        "pi": np.full(3, 1 / 3),
        "mu": np.quantile(y, [0.15, 0.5, 0.85]),
        "sigma": np.full(3, y.std() / 2),
    }


def sample_marginalized(model, start, draws=300, tune=300, chains=2, random_seed=7):
    """NUTS on ``model`` with the chain marginalized out by pymc-extras.

    What works with pymc-extras 0.10 and PyTensor 2.38, measured on this example:

    * ``freeze_dims_and_data`` first: the marginalized chain's log-density needs a
      constant chain length, and a length taken from the model's coords is a shared
      variable (``NotConstantValueError`` otherwise).
    * Its forward recursion is a scan whose ``logsumexp`` is not stabilized inside the
      scan, so the gradient is NaN as soon as the forward log-messages drop below about
      -709 (``exp`` underflows): this is a bound on ``log p(y)``, not on T. With the
      default C backend at T = 300, data with ``sigma = (0.7, 0.5, 1.0)``
      (``log p(y)`` about -780) gave a NaN gradient at the start and NUTS returned
      garbage (every draw divergent, r_hat 2.2); ``mode="FAST_COMPILE"`` gave a log
      density of -inf, and ``mode="NUMBA"`` the same NaN gradient. This example's
      ``TRUE_SIGMA`` keeps ``log p(y)`` near -200, where the C backend works (no
      divergences, r_hat 1.00 in about 50 s on 2 cores).

    Raises
    ------
    RuntimeError
        If the gradient of the marginalized log-density is not finite at ``start``
        (the data's log-likelihood is too far below zero for pymc-extras' forward
        recursion), rather than sampling with NaN gradients.
    """
    marginal = pmx.marginalize(freeze_dims_and_data(model), ["s"])
    unconstrained = marginal.initial_point()
    for name, value in start.items():
        rv = marginal[name]
        transform = marginal.rvs_to_transforms.get(rv)
        unconstrained[marginal.rvs_to_values[rv].name] = (
            value if transform is None else transform.forward(value, *rv.owner.inputs).eval()
        )
    gradient = marginal.compile_dlogp()(unconstrained)
    if not np.all(np.isfinite(gradient)):
        raise RuntimeError(
            "pymc-extras' marginalized chain has a non-finite gradient at the start "
            "(its forward recursion underflows once log p(y) drops below about -709)."
        )
    return pm.sample(
        draws,
        tune=tune,
        chains=chains,
        # Every chain from the same start, unjittered: PyMC's default jitter (uniform
        # +-1 on the unconstrained values) can swap two means, and a chain that starts
        # in another labelling of the states stays there (r_hat 1.8 when it did here).
        init="adapt_diag",
        initvals=start,
        random_seed=random_seed,
        progressbar=False,
        model=marginal,
    )


def summary_beside_em(trace, idata, truth):
    """ArviZ's posterior summary with the EM estimates and the truth as extra columns."""
    names = list(truth)
    summary = az.summary(trace, var_names=names, kind="all", round_to=4)
    summary["ess_bulk"] = summary["ess_bulk"].round().astype(int)
    em = idata.posterior.squeeze(("chain", "draw"))
    em_values = np.concatenate([em[name].values.ravel() for name in names])
    true_values = np.concatenate([np.ravel(truth[name]) for name in names])
    columns = ["mean", "sd", "hdi_3%", "hdi_97%", "r_hat", "ess_bulk"]
    return pd.concat(
        [
            pd.DataFrame({"EM (MAP)": em_values}, index=summary.index).round(4),
            summary[columns],
            pd.DataFrame({"truth": true_values}, index=summary.index),
        ],
        axis=1,
    )


def main():
    y, states = simulate_data()
    model = build_model(y)
    start = initial_values(y)
    idata = pm_em.find_MAP(model, initvals=start, tol=1e-10, random_seed=1, progressbar=False)
    truth = {"P": TRUE_P, "pi": TRUE_PI, "mu": TRUE_MU, "sigma": TRUE_SIGMA}

    em = idata.posterior.squeeze(("chain", "draw"))
    print(f"EM (Baum–Welch), T = {len(y)}: {int(idata.em_stats['n_iter'])} iterations")
    print(f"{'':<10}{'pm_em':>10}{'truth':>8}")
    for name in ("mu", "sigma", "pi"):
        for k in range(3):
            print(f"{name}[{k}]".ljust(10) + f"{float(em[name][k]):>10.4f}{truth[name][k]:>8.2f}")
    for i in range(3):
        row = " ".join(f"{float(p):.3f}" for p in em["P"][i])
        print(f"P[{i}, :]   {row}   truth " + " ".join(f"{p:.2f}" for p in TRUE_P[i]))
    # A single sequence carries one draw of the initial state, so the MLE of pi is a
    # vertex of the simplex (EM moves pi there geometrically); NUTS shows its prior.
    viterbi = em["s"].values
    print(f"Viterbi path (s) equals the simulated states at {np.mean(viterbi == states):.1%}")

    trace = sample_marginalized(model, start)
    print("\nNUTS on the marginalized model (2 chains x 300 draws) beside EM:")
    with pd.option_context("display.width", 120, "display.max_columns", 20):
        print(summary_beside_em(trace, idata, truth))


if __name__ == "__main__":
    main()

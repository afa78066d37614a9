"""Zero-inflated Poisson counts, the inflation label treated as latent.

The exercise of the "Expectation Maximization Algorithm" notes: a count is a
Poisson(1.5) draw with probability psi = 0.4 and a structural zero otherwise.
The latent ``z`` is 1 for the Poisson component; x ~ Poisson(z * rate), so a
structural zero has log-probability 0 at x = 0 and -inf at x > 0.  With flat
priors the MAP is the MLE, whose score equations give an independent reference:
psi * rate = mean(x) and mean(x) * (1 - exp(-rate)) = rate * P(x > 0).
"""

import numpy as np
import pymc as pm
from scipy.optimize import brentq

import pm_em

TRUE_RATE = 1.5
TRUE_PSI = 0.4


def simulate_data(n=1000, seed=1977):
    """Counts, each Poisson with probability psi and zero otherwise."""
    rng = np.random.default_rng(seed)
    return rng.poisson(TRUE_RATE, size=n) * (rng.random(n) < TRUE_PSI)


def build_model(x):
    """Latent Bernoulli inflation label per count, flat priors."""
    with pm.Model(coords={"obs": np.arange(len(x))}) as model:
        psi = pm.Uniform("psi", 0.0, 1.0)
        rate = pm.HalfFlat("rate")
        z = pm.Bernoulli("z", p=psi, dims="obs")
        pm.Poisson("x", mu=z * rate, observed=x, dims="obs")
    return model


def score_equation_mle(x):
    """Solve the ZIP score equations directly (no EM)."""
    mean, positive = x.mean(), np.mean(x > 0)
    rate = brentq(lambda r: mean * -np.expm1(-r) - r * positive, 1e-12, mean / positive)
    return {"psi": mean / rate, "rate": rate}


def main():
    x = simulate_data()
    idata = pm_em.find_MAP(
        build_model(x),
        initvals={"psi": 0.5, "rate": 1.0},  # the seed's run_em defaults
        tol=1e-12,
        random_seed=4,
        progressbar=False,
    )
    post = idata.posterior.squeeze(("chain", "draw"))
    reference = score_equation_mle(x)
    truth = {"psi": TRUE_PSI, "rate": TRUE_RATE}
    print(f"{'':<6}{'pm_em':>10}{'score eq.':>11}{'truth':>8}")
    for name in ("psi", "rate"):
        print(f"{name:<6}{float(post[name]):>10.5f}{reference[name]:>11.5f}{truth[name]:>8.2f}")
    p_structural = np.exp(post["lp_z"].sel(lp_z_dim=0).values)
    print(
        f"P(structural zero | x = 0) = {p_structural[x == 0][0]:.4f}; "
        f"{np.mean(x == 0):.1%} of counts are zero"
    )


if __name__ == "__main__":
    main()

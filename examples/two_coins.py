"""Two coins of unknown bias, the coin behind each trial unknown.

The motivating example of "Lecture 15 - EM Algorithm": each of n trials picks
one of two coins uniformly at random and tosses it m times; only the number of
heads is recorded.  The latent ``coin`` per trial is Bernoulli(0.5) and the
heads are Binomial(m, p[coin]).  Uniform(0, 1) priors on p are flat, so the
MAP is the MLE.  The reference is the estimate we could make if the coins were
known (heads per toss of each coin), next to the simulated truth.
"""

import numpy as np
import pymc as pm

import pm_em

N_TOSSES = 10
TRUE_P = np.array([0.3, 0.8])


def simulate_data(n_trials=50, seed=2008):
    """Heads per trial and, for the comparison only, the coin used."""
    rng = np.random.default_rng(seed)
    coin = rng.integers(0, 2, size=n_trials)
    heads = rng.binomial(N_TOSSES, TRUE_P[coin])
    return heads, coin


def build_model(heads, n_tosses=N_TOSSES):
    """Latent coin per trial, Binomial tosses given the coin."""
    coords = {"coins": [0, 1], "trial": np.arange(len(heads))}
    with pm.Model(coords=coords) as model:
        p = pm.Uniform("p", 0.0, 1.0, dims="coins")
        # np.float64, not 0.5: PyTensor would store the literal 0.5 as float32.
        coin = pm.Bernoulli("coin", p=np.float64(0.5), dims="trial")
        pm.Binomial("heads", n=n_tosses, p=p[coin], observed=heads, dims="trial")
    return model


def initial_values():
    """The seed's step 1: pick distinct initial values for p_1 and p_2."""
    return {"p": np.array([0.4, 0.6])}


def main():
    heads, coin = simulate_data()
    idata = pm_em.find_MAP(
        build_model(heads),
        initvals=initial_values(),
        tol=1e-12,
        random_seed=3,
        progressbar=False,
    )
    post = idata.posterior.squeeze(("chain", "draw"))
    known_coin_mle = [heads[coin == k].sum() / (N_TOSSES * (coin == k).sum()) for k in (0, 1)]
    print(f"{'':<6}{'pm_em':>10}{'coins known':>13}{'truth':>8}")
    for k in (0, 1):
        print(f"p[{k}]  {float(post['p'][k]):>10.4f}{known_coin_mle[k]:>13.4f}{TRUE_P[k]:>8.2f}")
    agreement = np.mean(post["coin"].values == coin)
    print(f"most probable coin matches the simulated one in {agreement:.0%} of trials")


if __name__ == "__main__":
    main()

"""The methods compared: how each is set up and fitted from the common start.

`make_fit` returns a function of no arguments that runs one complete fit and returns
a `Fit`. Setting up (building the PyMC model, marginalizing it) happens in
`make_fit`; compiling happens in the first call of the returned function, as a user
sees it. Every method gets the same data, the same start and the same stopping rule,
as far as its API allows (see ``README.md``, "Same start, same stopping rule").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from cases import Case, Params

PEERS = ("numpy", "sklearn", "hmmlearn", "pm_em", "pm_em-jax", "pymc-extras")

#: Methods that compile PyTensor code, so have a cold start worth measuring.
COMPILING = ("pm_em", "pm_em-jax", "pymc-extras")


@dataclass
class Fit:
    """What one fit returned.

    Parameters
    ----------
    params : dict of str to numpy.ndarray
        Final parameters in the case's NumPy parameterization, canonical order.
    n_iter : int
        Iterations as the method counts them (EM iterations; L-BFGS-B iterations for
        pymc-extras).
    converged : bool
        The method's own convergence flag.
    extra : dict
        Method-specific facts (reported log-density, stop message, warnings).
    """

    params: Params
    n_iter: int
    converged: bool
    extra: dict[str, Any] = field(default_factory=dict)


def make_fit(
    peer: str, case: Case, x: np.ndarray, tol: float, max_iter: int, seed: int
) -> Callable[[], Fit]:
    """Set up ``peer`` on ``case`` and return its fit function.

    Parameters
    ----------
    peer : str
        One of `PEERS`.
    case : Case
        The problem.
    x : numpy.ndarray
        The data.
    tol : float
        pm_em's tolerance: change of the log-density per observed element.
    max_iter : int
        Iteration cap.
    seed : int
        pm_em's ``random_seed`` (its start is fully given by ``initvals``).

    Returns
    -------
    callable
        One complete fit per call.
    """
    builders = {
        "numpy": _numpy,
        "sklearn": _sklearn,
        "hmmlearn": _hmmlearn,
        "pm_em": partial(_pm_em, backend="c"),
        "pm_em-jax": partial(_pm_em, backend="jax"),
        "pymc-extras": _pymc_extras,
    }
    return builders[peer](case, x, tol, max_iter, seed)


def _numpy(case: Case, x: np.ndarray, tol: float, max_iter: int, seed: int) -> Callable[[], Fit]:
    """Textbook EM in log space, stopping by pm_em's rule.

    Iteration 0 is an E-step at the start (its log-likelihood comes with it); each
    iteration is then one closed-form M-step and one E-step, and the loop stops when
    the log-likelihood changed by less than ``tol`` per observed element: pm_em's
    order and rule, so both count the same iterations.
    """
    n_elements = x.size

    def fit() -> Fit:
        params = case.start
        loglik, stats = case.e_step(x, params)
        for iteration in range(1, max_iter + 1):
            params = case.m_step(x, stats)
            previous = loglik
            loglik, stats = case.e_step(x, params)
            if abs(loglik - previous) / n_elements < tol:
                return Fit(case.canonical(params), iteration, True, {"reported": loglik})
        return Fit(case.canonical(params), max_iter, False, {"reported": loglik})

    return fit


def _sklearn(case: Case, x: np.ndarray, tol: float, max_iter: int, seed: int) -> Callable[[], Fit]:
    """scikit-learn's ``GaussianMixture`` from the common start.

    Its ``tol`` bounds the change of the mean log-likelihood per *row*, pm_em's per
    observed *element*, so it gets ``tol * d``. ``reg_covar=0`` so that it estimates
    the plain MLE. It computes its initial responsibilities before replacing the
    parameters by the ``*_init`` values, so the cheapest kind is asked for.
    """
    from sklearn.mixture import GaussianMixture

    X = x.reshape(x.shape[0], -1)
    options = {
        "tol": tol * case.d,
        "reg_covar": 0.0,
        "max_iter": max_iter,
        "n_init": 1,
        "init_params": "random_from_data",
        "random_state": 0,
        **case.sklearn,
    }

    def fit() -> Fit:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gm = GaussianMixture(**options).fit(X)
        return Fit(
            case.canonical(case.from_sklearn(gm)),
            int(gm.n_iter_),
            bool(gm.converged_),
            {"reported": float(gm.lower_bound_) * X.shape[0], "warnings": _messages(caught)},
        )

    return fit


def _hmmlearn(case: Case, x: np.ndarray, tol: float, max_iter: int, seed: int) -> Callable[[], Fit]:
    """hmmlearn's Baum-Welch from the common start.

    Its ``tol`` bounds the change of the *total* log-likelihood, so it gets ``tol * N``
    for ``N`` observed elements: pm_em's rule. Like scikit-learn, each of its
    iterations is E-step, M-step, test, so it returns parameters one M-step past the
    log-likelihoods it compared, and its ``monitor_.iter`` counts one more. Its own
    ``monitor_.converged`` is also true when ``n_iter`` runs out, so convergence is
    read from its history instead.
    """
    X = x.reshape(x.shape[0], -1)
    tol_total = tol * x.size

    def fit() -> Fit:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = case.hmmlearn(tol_total, max_iter).fit(X)
        history = list(model.monitor_.history)
        converged = len(history) >= 2 and history[-1] - history[-2] < tol_total
        return Fit(
            case.canonical(case.from_hmmlearn(model)),
            int(model.monitor_.iter),
            bool(converged),
            {"reported": float(history[-1]), "warnings": _messages(caught)},
        )

    return fit


def _posterior_reader(idata) -> Callable[[str], np.ndarray]:
    """``get(name)``: a posterior variable without its (chain, draw) = (1, 1) axes."""

    def get(name: str) -> np.ndarray:
        values = np.asarray(idata.posterior[name])
        return values.reshape(values.shape[2:])

    return get


def _pm_em(
    case: Case, x: np.ndarray, tol: float, max_iter: int, seed: int, backend: str | None = None
) -> Callable[[], Fit]:
    """``pm_em.find_MAP`` on the model with its latent written out, compiled with
    ``backend`` (``pm_em``: C; ``pm_em-jax``: JAX, the default backend).

    The model object is built once; the first call compiles the EM routine (and
    caches it on the model), later calls reuse it.
    """
    import pm_em

    model = case.build_model(x)
    initvals = case.initvals(case.start)

    def fit() -> Fit:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            idata = pm_em.find_MAP(
                model,
                initvals=initvals,
                tol=tol,
                max_iter=max_iter,
                random_seed=seed,
                progressbar=False,
                backend=backend,
            )
        stats = idata.em_stats
        logp = np.asarray(stats["logp"], dtype=float).ravel()
        logp = logp[np.isfinite(logp)]
        extra = {
            "reported": float(logp[-1]) if logp.size else float("nan"),
            "log_likelihood_group": float(
                sum(float(idata.log_likelihood[v].sum()) for v in idata.log_likelihood)
            ),
            "warnings": _messages(caught),
        }
        return Fit(
            case.canonical(case.from_posterior(_posterior_reader(idata))),
            int(np.asarray(stats["n_iter"]).ravel()[0]),
            bool(np.asarray(stats["converged"]).ravel()[0]),
            extra,
        )

    return fit


def _pymc_extras(
    case: Case, x: np.ndarray, tol: float, max_iter: int, seed: int
) -> Callable[[], Fit]:
    """pymc-extras: ``marginalize`` the latent, then its ``find_MAP`` (L-BFGS-B).

    L-BFGS-B stops when the *relative* decrease of the loss (the negative
    log-density, summed over observations) falls below ``ftol``. pm_em's rule is an
    absolute decrease below ``tol * N`` for ``N`` observed elements, so ``ftol`` is
    ``tol * N / |log-density at the start|``: at least as strict as pm_em's rule while
    ``|log-density|`` shrinks toward the optimum, as it does here. ``gtol`` (the
    projected-gradient rule) is ``tol * N``, a gradient of ``tol`` per element. Its
    ``find_MAP`` compiles the loss and gradient on every call.
    """
    import pymc_extras as pmx

    model = pmx.marginalize(case.build_model(x), ["z"])
    initvals = case.initvals(case.start)
    n_elements = x.size
    start_logp = case.loglik(x, case.start)
    ftol = tol * n_elements / max(abs(start_logp), 1.0)

    def fit() -> Fit:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            idata = pmx.find_MAP(
                method="L-BFGS-B",
                model=model,
                initvals=initvals,
                random_seed=seed,
                progressbar=False,
                ftol=ftol,
                gtol=tol * n_elements,
                maxiter=max_iter,
            )
        result = idata.optimizer_result
        extra = {
            "reported": -float(result["fun"]),
            "message": str(np.asarray(result["message"])),
            "ftol": ftol,
            "warnings": _messages(caught),
        }
        return Fit(
            case.canonical(case.from_posterior(_posterior_reader(idata))),
            int(result["nit"]) if "nit" in result else 0,
            bool(result["success"]),
            extra,
        )

    return fit


def _messages(caught: list[warnings.WarningMessage]) -> list[str]:
    """Distinct warning texts (first line each), for the JSON record."""
    return sorted({str(w.message).splitlines()[0] for w in caught if str(w.message).strip()})

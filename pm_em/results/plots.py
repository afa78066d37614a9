"""Plots of EM fits: convergence of every start, and EM estimates on MCMC posteriors.

matplotlib is imported when a plot is drawn, so ``import pm_em`` does not need it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import arviz as az
import numpy as np
import pymc as pm
from arviz.labels import BaseLabeller
from arviz.sel_utils import xarray_var_iter
from scipy.stats import norm

from pm_em.results.compare import (
    SAMPLE_DIMS,
    compare,
    compared_names,
    context_model,
    reference_latents,
    relabel,
)
from pm_em.results.inference_data import em_point

__all__ = ["plot_compare", "plot_convergence"]

#: Colour of the EM estimate and of the winning start.
EM_COLOR = "C3"


def plot_convergence(idata: az.InferenceData, ax=None, *, kind: str = "logp"):
    """The observed-data log-posterior per iteration, one line per start.

    Parameters
    ----------
    idata : az.InferenceData
        An EM result (:func:`pm_em.find_MAP`); its ``em_stats`` group holds every
        start's ``restart_logp`` (NaN after the start stopped) and the winner's index
        in ``attrs["best_restart"]``.
    ax : matplotlib.axes.Axes, optional
        Where to draw; a new figure by default.
    kind : {"logp", "gap"}, default "logp"
        ``"logp"``: the log-posterior itself; the y-axis starts at the lowest value
        from the third iteration on, since a start can lie orders of magnitude
        below the mode and would flatten every line. ``"gap"``: the winner's final
        log-posterior minus each value, on a log scale, where EM's linear
        convergence shows as a straight line.

    Returns
    -------
    matplotlib.axes.Axes
        The winning start drawn thick in colour, the others thin and grey, starts
        stopped at a degenerate solution dotted.

    Examples
    --------
    >>> idata = pm_em.find_MAP(model, n_init=5, random_seed=1)  # doctest: +SKIP
    >>> ax = pm_em.plot_convergence(idata)  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    if kind not in ("logp", "gap"):
        raise ValueError(f"kind must be 'logp' or 'gap', got {kind!r}.")
    stats = idata.em_stats
    if "restart_logp" in stats:
        traces = np.atleast_2d(stats["restart_logp"].values).astype(float)
        best = int(stats.attrs.get("best_restart", 0))
    else:  # a result from before restarts were recorded: the one run
        traces = np.atleast_2d(stats["logp"].values).astype(float)
        best = 0
    degenerate = (
        np.asarray(stats["restart_degenerate"].values, dtype=bool)
        if "restart_degenerate" in stats
        else np.zeros(len(traces), dtype=bool)
    )
    if kind == "gap":
        final = traces[best][np.isfinite(traces[best])][-1]
        traces = final - traces
        # log scale: the winner's last point (0) and starts above it are not drawn.
        traces[traces <= 0] = np.nan
    if ax is None:
        _, ax = plt.subplots()
    labelled_other = False
    for restart, trace in enumerate(traces):
        if restart == best:
            continue
        iterations = np.flatnonzero(np.isfinite(trace))
        ax.plot(
            iterations,
            trace[iterations],
            color="0.6",
            linewidth=1.0,
            linestyle=":" if degenerate[restart] else "-",
            label=None if labelled_other else "other starts",
        )
        labelled_other = True
    iterations = np.flatnonzero(np.isfinite(traces[best]))
    ax.plot(
        iterations,
        traces[best][iterations],
        color=EM_COLOR,
        linewidth=2.5,
        label=f"start {best} (best)",
        zorder=3,
    )
    ax.set_xlabel("iteration")
    if kind == "gap":
        ax.set_yscale("log")
        ax.set_ylabel("best final log-posterior - log-posterior")
    else:
        ax.set_ylabel("observed-data log-posterior")
        later = traces[:, 2:]
        if np.isfinite(later).any():
            low, high = np.nanmin(later), np.nanmax(traces)
            margin = 0.05 * (high - low) if high > low else 1.0
            ax.set_ylim(low - margin, high + margin)
    ax.set_title(f"EM convergence, {len(traces)} start{'s' if len(traces) > 1 else ''}")
    ax.legend(loc="upper right" if kind == "gap" else "lower right")
    return ax


def plot_compare(
    em_idata: az.InferenceData,
    mcmc_idata: az.InferenceData,
    var_names: str | Sequence[str] | None = None,
    *,
    ax=None,
    model: pm.Model | None = None,
    component_dims: Mapping[str, str | Sequence[str]] | None = None,
    hdi_prob: float = 0.94,
    undo_label_switching: bool = True,
    **plot_kwargs,
):
    """Each parameter's MCMC posterior with the EM estimate marked.

    One panel per scalar (``az.plot_posterior``: density, mean and HDI of the
    relabelled draws), with a vertical line at the EM estimate and, when the result
    carries standard errors (see :func:`pm_em.compare`), the Laplace interval
    ``em ± z se`` of the same probability as the HDI shaded around it.

    Parameters
    ----------
    em_idata, mcmc_idata, var_names
        As in :func:`pm_em.compare`.
    ax : array of matplotlib.axes.Axes, optional
        Passed to ``az.plot_posterior``.
    model, component_dims, hdi_prob, undo_label_switching
        As in :func:`pm_em.compare`.
    **plot_kwargs
        Passed to ``az.plot_posterior`` (e.g. ``figsize``, ``textsize``).

    Returns
    -------
    numpy.ndarray of matplotlib.axes.Axes
        As ``az.plot_posterior`` returns them; ``axes.flat[0].figure`` is the figure.

    Examples
    --------
    >>> axes = pm_em.plot_compare(em_idata, trace, model=model)  # doctest: +SKIP
    >>> axes.flat[0].figure.savefig("em_vs_mcmc.png")  # doctest: +SKIP
    """
    model = context_model(model)
    if undo_label_switching:
        mcmc_idata = relabel(mcmc_idata, em_idata, model, component_dims=component_dims)
    table = compare(
        em_idata,
        mcmc_idata,
        var_names,
        model=model,
        hdi_prob=hdi_prob,
        undo_label_switching=False,
    )
    names = compared_names(
        em_point(em_idata),
        mcmc_idata.posterior,
        var_names,
        model,
        reference_latents(em_point(em_idata)),
    )
    axes = az.plot_posterior(mcmc_idata, var_names=names, hdi_prob=hdi_prob, ax=ax, **plot_kwargs)
    axes = np.asarray(axes, dtype=object)
    by_title = {panel.get_title(): panel for panel in axes.flat}
    labeller = BaseLabeller()
    # Same iteration as az.plot_posterior's, so each scalar finds its panel by title.
    z = norm.ppf(0.5 + hdi_prob / 2)
    marked = []
    for var_name, sel, isel, _ in xarray_var_iter(
        mcmc_idata.posterior[names], combined=True, skip_dims=set(SAMPLE_DIMS)
    ):
        panel = by_title.get(labeller.make_label_vert(var_name, sel, isel))
        if panel is None:  # beyond ArviZ's plot.max_subplots
            continue
        row = table.loc[labeller.make_label_flat(var_name, sel, isel)]
        panel.axvline(row["em"], color=EM_COLOR, linewidth=2, label="EM (MAP)")
        if np.isfinite(row["em_se"]):
            panel.axvspan(
                row["em"] - z * row["em_se"],
                row["em"] + z * row["em_se"],
                color=EM_COLOR,
                alpha=0.12,
                zorder=0,
                label=f"Laplace {hdi_prob:.0%}",
            )
        marked.append(panel)
    if marked:
        marked[0].legend(loc="upper right", fontsize="small")
    return axes

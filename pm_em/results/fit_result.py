"""A finished EM run packaged: the point, the most probable latent values, the
Deterministics and the pointwise log-likelihood there (what becomes InferenceData
in :mod:`pm_em.results.inference_data`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pm_em.fit.loop import EMHistory, EMState
from pm_em.routine.compiled import LogResponsibilities

__all__ = ["FitResult", "fit_result", "most_probable"]


#: Rows per block when a function of an (n, K) table is taken block by block: a
#: few MB of temporaries, whatever n.
_BLOCK_ROWS = 1 << 16


def most_probable(log_resp: np.ndarray, support: np.ndarray, dtype) -> np.ndarray:
    """The most probable support value per element, ``log_resp.shape[:-1]``.

    ``np.argmax`` along the last axis copies its input whole when that axis is not
    contiguous (the E-step's responsibilities are a transposed view of its ``(K, n)``
    table); block by block over the leading axis, only a block is copied.
    """
    log_resp = np.asarray(log_resp)
    support = np.asarray(support).astype(dtype, copy=False)
    if log_resp.ndim == 1:
        return np.asarray(support[np.argmax(log_resp)])
    labels = np.empty(log_resp.shape[:-1], dtype=dtype)
    for start in range(0, log_resp.shape[0], _BLOCK_ROWS):
        block = slice(start, start + _BLOCK_ROWS)
        labels[block] = support[np.argmax(log_resp[block], axis=-1)]
    return labels


@dataclass
class FitResult:
    """Everything a fit returns, before it becomes InferenceData."""

    point: dict[str, np.ndarray]
    deterministics: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    log_resp: LogResponsibilities
    pointwise: dict[str, np.ndarray]
    logp: float
    history: EMHistory
    #: Every start's history (the fit's own alone when there was one start).
    restarts: list[EMHistory] = field(default_factory=list)
    best_restart: int = 0


def fit_result(routine, state: EMState, history: EMHistory) -> FitResult:
    """Package a final EM state: constrained point, most probable latent values,
    Deterministics there, and the pointwise log-likelihood.

    The most probable value is per element for an enumerated latent, and the most
    probable sequence (Viterbi path) for a Markov chain."""
    paths, predictive = routine.chain_outputs(state.values)
    labels = {
        lat.name: np.asarray(paths[lat.name]).astype(lat.value.type.dtype, copy=False)
        if lat.name in paths
        else most_probable(state.log_resp[lat.name], lat.support, lat.value.type.dtype)
        for lat in routine.latents
    }
    deterministics, pointwise = routine.result_outputs(state.values, labels, predictive)
    return FitResult(
        point=routine.to_point(state.values),
        deterministics=deterministics,
        labels=labels,
        log_resp=state.log_resp,
        pointwise=pointwise,
        logp=state.logp,
        history=history,
    )

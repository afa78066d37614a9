"""Degenerate EM solutions: a scale collapsing onto a point, a component left empty.

A mixture's likelihood is unbounded: a component whose location sits on one
observation and whose scale shrinks toward 0 makes it grow without limit, and EM
run from an unlucky start follows it there (each step shrinks the scale by orders
of magnitude). The MAP is finite only under a prior that keeps the scale away from
0 (an ``InverseGamma`` scale or a ``Gamma`` precision prior; a ``HalfNormal`` or
``HalfFlat`` scale prior does not, its density at 0 being finite). A component whose
expected count falls to ~0 is different: it is a mode on the boundary (a weight of
0, e.g. no zero inflation at all), bounded and legitimate, but its own parameters
are then not determined by the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pymc.distributions.transforms import CholeskyCovPacked
from pymc.logprob.transforms import LogTransform

__all__ = ["COLLAPSE_FACTOR", "Collapse", "find_collapse", "find_empty_components"]

#: A positive parameter that shrank (or grew) by this factor since the start of the
#: run is collapsing: no sane start is that far off, while a spike gets there in a
#: few steps.
COLLAPSE_FACTOR = 1e8

#: An expected count below this is an empty component.
EMPTY_COUNT = 1e-6


@dataclass(frozen=True)
class Collapse:
    """A positive parameter running to 0 (or infinity): the log-posterior is
    unbounded along it."""

    parameter: str
    index: tuple[int, ...]
    value: float

    def message(self) -> str:
        where = (
            f"{self.parameter}[{', '.join(map(str, self.index))}]"
            if self.index
            else (self.parameter)
        )
        return (
            f"Degenerate solution: {where} = {self.value:.3g} is collapsing (it moved by "
            f"more than a factor {COLLAPSE_FACTOR:.0e} from its start), so the "
            "log-posterior grows without bound, e.g. a component shrinking onto a "
            f"single observation. This start was stopped. Give '{self.parameter}' a "
            "prior that keeps the mode finite (an InverseGamma prior on a scale, or a "
            "Gamma prior on a precision), or use fewer components."
        )


def find_collapse(routine, start_values, values, logp: float) -> Collapse | None:
    """The first positive parameter element that collapsed between ``start_values``
    and ``values`` (value space, where a positive parameter is its log), or, when
    the log-posterior itself is no longer finite, the one that moved most."""
    threshold = np.log(COLLAPSE_FACTOR)
    worst = None
    for param, start, value in zip(routine.params, start_values, values):
        logs = _log_entries(param.transform, np.shape(value))
        if logs is None:
            continue
        moved = np.abs(np.asarray(value, dtype=float) - np.asarray(start, dtype=float))
        moved = np.where(logs, moved, 0.0)
        moved = np.where(np.isfinite(moved), moved, np.inf)
        if moved.size == 0:
            continue
        index = np.unravel_index(int(np.argmax(moved)), moved.shape)
        if worst is None or moved[index] > worst[0]:
            worst = (moved[index], param, index, np.exp(np.asarray(value)[index]))
    if worst is None:
        return None
    distance, param, index, value = worst
    unbounded = np.isnan(logp) or np.isposinf(logp)
    if distance > threshold or unbounded:
        return Collapse(param.name, tuple(int(i) for i in index), float(value))
    return None


def _log_entries(transform, shape) -> np.ndarray | None:
    """Which entries of a parameter's value are the log of a positive quantity that
    can collapse: all of them under a log transform, the diagonal of each packed
    Cholesky factor of an ``LKJCholeskyCov`` (a covariance shrinking onto a few
    observations); None for other transforms."""
    if isinstance(transform, LogTransform):
        return np.ones(shape, dtype=bool)
    if isinstance(transform, CholeskyCovPacked) and shape:
        # The packed lower triangle of an n x n factor, row by row: n(n+1)/2 entries,
        # the diagonal at 0, 2, 5, 9, ...
        size = shape[-1]
        n = int(round((np.sqrt(8 * size + 1) - 1) / 2))
        diagonal = np.zeros(size, dtype=bool)
        diagonal[np.cumsum(np.arange(1, n + 1)) - 1] = True
        return np.broadcast_to(diagonal, shape)
    return None


def find_empty_components(routine, log_resp) -> list[str]:
    """Descriptions of the support values whose expected count
    (:meth:`pm_em.fit.protocol.EMRoutine.expected_counts`) is below
    :data:`EMPTY_COUNT` (global latents, of size 1, are not components)."""
    empty = []
    for latent, support, counts in routine.expected_counts(log_resp):
        for value, count in zip(support, counts):
            if count < EMPTY_COUNT:
                empty.append(f"{latent} = {value} (expected count {count:.2g})")
    return empty

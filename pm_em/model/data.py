"""The data a compiled EM routine was built for.

A routine reads some facts from the model's data once, at build time: the latents'
sizes and the number of observations (from the data's shapes), and which latent
element each observation depends on (from index arrays such as ``group`` in
``mu[z[group]]``). New observations of the same shape (``pm.set_data``) need nothing:
the compiled functions read the ``pm.Data`` containers at every call. Anything else
makes the routine stale; :class:`DataBinding` tells which, so that the routine is
rebuilt (``find_MAP``) or refuses (``EM``) instead of computing with the old facts.

When EM runs on a rewritten copy of the user's model (observed mixture distributions,
:mod:`pm_em.model.implicit`), PyMC's copy has its own ``pm.Data`` containers; the binding
brings the user's current values into them before each use.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
import pymc as pm
from pytensor.compile.sharedvalue import SharedVariable
from pytensor.tensor.shape import Shape, Shape_i

__all__ = ["DataBinding", "note_reads", "recording_reads", "value_inputs"]

# The shared variables whose values were read while a routine was being built (None
# when no routine is being built).
_BUILD_READS: ContextVar[list | None] = ContextVar("pm_em_build_reads", default=None)


def value_inputs(outputs) -> list[SharedVariable]:
    """The shared variables whose values (not only shapes) ``outputs`` depend on."""
    found, seen, stack = [], set(), list(outputs)
    while stack:
        var = stack.pop()
        if var in seen:
            continue
        seen.add(var)
        if isinstance(var, SharedVariable):
            found.append(var)
        node = var.owner
        # A shape reads no values: shapes are checked apart.
        if node is None or isinstance(node.op, Shape | Shape_i):
            continue
        stack.extend(node.inputs)
    return found


@contextmanager
def recording_reads(enabled: bool = True):
    """Collect, in the yielded list, the shared variables whose values the build-time
    evaluations inside the block read (:func:`note_reads`); ``enabled=False`` pauses
    an enclosing recording (for reads that decide nothing, such as counting data)."""
    reads: list = []
    token = _BUILD_READS.set(reads if enabled else None)
    try:
        yield reads
    finally:
        _BUILD_READS.reset(token)


def note_reads(outputs) -> None:
    """Record the shared variables ``outputs`` read, when a routine is being built."""
    reads = _BUILD_READS.get()
    if reads is not None:
        reads.extend(v for v in value_inputs(outputs) if v not in reads)


def _mutable(model: pm.Model) -> dict[str, SharedVariable]:
    """The model's ``pm.Data`` and mutable dim lengths, by name."""
    shared = {v.name: v for v in model.data_vars}
    for dim, length in model.dim_lengths.items():
        if isinstance(length, SharedVariable):
            shared[f"dim {dim!r}"] = length
    return shared


def _value(variable: SharedVariable) -> np.ndarray:
    return np.asarray(variable.get_value(borrow=True))


class DataBinding:
    """The user's data as a routine saw them when it was built.

    Parameters
    ----------
    user_model : pm.Model
        The model the user holds and may ``pm.set_data`` on.
    model : pm.Model
        The model the routine was built from: ``user_model`` or its rewritten copy.
    structure_data : list of SharedVariable
        Variables of ``model`` whose values were read while the routine was built
        (:func:`recording_reads`): its structure and closed forms may depend on them.
    """

    def __init__(self, user_model: pm.Model, model: pm.Model, structure_data):
        self._user = _mutable(user_model)
        copy = _mutable(model) if model is not user_model else {}
        #: (user's variable, the copy's variable) pairs to keep in step.
        self._pairs = [
            (variable, copy[name])
            for name, variable in self._user.items()
            if name in copy and copy[name] is not variable
        ]
        self._structure = list(structure_data)
        self._shapes = self._current_shapes()
        self._structure_values = [_value(v).copy() for v in self._structure]

    def _current_shapes(self) -> dict[str, tuple]:
        # A mutable dim length is a shape: its value counts (JAX compiles it in).
        return {
            name: (int(_value(v)),) if name.startswith("dim ") else _value(v).shape
            for name, v in self._user.items()
        }

    def refresh(self) -> str | None:
        """Bring the user's current data into the routine's model; say what makes the
        routine stale (None when it is current)."""
        shapes = self._current_shapes()
        changed = [
            f"{name}: {self._shapes.get(name)} -> {shape}"
            for name, shape in shapes.items()
            if self._shapes.get(name) != shape
        ]
        if changed:
            return (
                f"The model's data changed shape since this EM routine was built "
                f"({'; '.join(changed)}): its latents' sizes and the links between "
                "observations and latent elements were read from the old shapes."
            )
        for user, copy in self._pairs:
            copy.set_value(user.get_value(borrow=True), borrow=True)
        for variable, built in zip(self._structure, self._structure_values):
            if not np.array_equal(_value(variable), built):
                return (
                    f"The values of '{variable.name}' changed since this EM routine was "
                    "built: which latent element each observation depends on was read "
                    "from them."
                )
        return None

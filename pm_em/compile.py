"""The one place where pm_em turns graphs into callables."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytensor
from pytensor.compile.mode import Mode
from pytensor.graph.basic import Variable

from pm_em.data import note_reads

__all__ = ["CompiledFunction", "compile_function", "evaluate_once"]

# Graphs evaluated once at build time: pure Python thunks, so that no C code is
# generated and compiled for them (the first C compilation of an op costs seconds).
_ONCE = Mode(linker="py", optimizer="fast_compile")


def compile_function(
    inputs: Sequence[Variable],
    outputs: Sequence[Variable],
    compile_kwargs: dict | None = None,
):
    """Compile ``outputs`` as a function of ``inputs`` (positional), returning a list.

    Parameters
    ----------
    inputs, outputs : sequence of Variable
    compile_kwargs : dict, optional
        Passed to :func:`pytensor.function` (e.g. ``{"mode": "NUMBA"}``).
    """
    kwargs = {"on_unused_input": "ignore", **(compile_kwargs or {})}
    return CompiledFunction(pytensor.function(list(inputs), list(outputs), **kwargs))


class CompiledFunction:
    """A compiled PyTensor function whose floating-point arguments are cast to the
    dtype of their input.

    pm_em's own arithmetic (scipy's optimizer, SQUAREM's extrapolation, the starts)
    is in float64, while the model's value variables are in ``floatX``: float32 under
    ``floatX="float32"``. PyTensor refuses a float64 array for a float32 input (it
    would lose precision), so every value crosses into a compiled graph here, cast
    to the graph's own dtype: the one place where that loss is accepted, on purpose.
    A float64 input given float64 arrays is passed through untouched (no copy), so
    float64 models compute exactly as before. This is narrower than PyTensor's
    ``allow_input_downcast``: integer inputs (the latents' values) are left alone,
    and a float array given for one is still refused.

    Parameters
    ----------
    fn : pytensor.compile.function.types.Function
    """

    def __init__(self, fn):
        self.fn = fn
        self.maker = fn.maker
        #: Per explicit input, the float dtype to cast to, or None (not a float
        #: input). Implicit inputs (shared variables) are not passed by the caller.
        dtypes = [
            getattr(inp.variable.type, "dtype", "") for inp in fn.maker.inputs if not inp.implicit
        ]
        self._dtypes = [d if d.startswith("float") else None for d in dtypes]

    def __call__(self, *args):
        if len(args) != len(self._dtypes):
            return self.fn(*args)  # PyTensor's own error names what is wrong
        return self.fn(*(_cast(a, d) for a, d in zip(args, self._dtypes)))


def _cast(value, dtype: str | None):
    """``value`` as an array of ``dtype`` (a float dtype), or unchanged when None."""
    if dtype is None:
        return value
    value = np.asarray(value)
    if value.dtype == dtype:
        return value
    # Beyond float32's range a value becomes inf, which is what the float32 graph
    # would compute for it anyway; numpy's overflow warning would only be noise.
    with np.errstate(over="ignore"):
        return value.astype(dtype)


def evaluate_once(
    inputs: Sequence[Variable], outputs: Sequence[Variable], values: Sequence
) -> list:
    """Evaluate small analysis graphs a single time (cheap to compile, not to run)."""
    if not outputs:
        return []
    note_reads(outputs)  # what a routine being built depends on (pm_em.data)
    fn = pytensor.function(list(inputs), list(outputs), on_unused_input="ignore", mode=_ONCE)
    return CompiledFunction(fn)(*values)

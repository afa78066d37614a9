"""The one place where pm_em turns graphs into callables."""

from __future__ import annotations

from collections.abc import Sequence

import pytensor
from pytensor.compile.mode import Mode
from pytensor.graph.basic import Variable

__all__ = ["compile_function", "evaluate_once"]

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
    fn = pytensor.function(list(inputs), list(outputs), **kwargs)
    return fn


def evaluate_once(
    inputs: Sequence[Variable], outputs: Sequence[Variable], values: Sequence
) -> list:
    """Evaluate small analysis graphs a single time (cheap to compile, not to run)."""
    if not outputs:
        return []
    fn = pytensor.function(list(inputs), list(outputs), on_unused_input="ignore", mode=_ONCE)
    return fn(*values)

"""The one place where pm_em turns graphs into callables, and where the backend
(the PyTensor mode that compiles them) is chosen.

Backends. ``"jax"`` (the default when JAX can be imported) traces each function with
JAX and compiles it with XLA: seconds for a new model. ``"c"`` (the fallback) is
PyTensor's default mode: C thunks, cached on disk, tens of seconds for a new model on
an empty cache. ``PM_EM_BACKEND`` in the environment overrides the default; an
explicit ``backend=`` overrides both. Under JAX, ``Alloc`` results are cast
to their declared dtype (:mod:`pm_em.jax_dispatch`): PyTensor's dispatch leaves them
weakly typed, and float32 constants then pulled float64 arithmetic down to float32.

JAX compiles for static shapes only, so a JAX function sees the model's data
through :func:`freeze_shapes`: every ``pm.Data`` container with its current shape
made static, and every mutable dim length as its current value. The containers'
values are still read at every call (``pm.set_data`` of the same shape needs no
recompiling); a new shape makes the routine stale (:mod:`pm_em.model.data`), as with C.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import pytensor
import pytensor.tensor as pt
from pytensor.compile.mode import Mode, get_mode
from pytensor.compile.sharedvalue import SharedVariable
from pytensor.graph.basic import Variable
from pytensor.graph.replace import graph_replace, vectorize_graph
from pytensor.graph.rewriting.utils import rewrite_graph
from pytensor.graph.traversal import applys_between, graph_inputs
from pytensor.tensor.blockwise import Blockwise
from pytensor.tensor.random.type import RandomType
from pytensor.tensor.subtensor import AdvancedIncSubtensor, AdvancedSubtensor
from pytensor.tensor.type import TensorType
from pytensor.tensor.variable import TensorConstant

from pm_em.model.data import note_reads

__all__ = [
    "BACKENDS",
    "CompiledFunction",
    "JAXFunction",
    "ONCE_MODE",
    "compile_function",
    "compile_small",
    "constant_masks_as_indices",
    "default_backend",
    "evaluate_once",
    "freeze_shapes",
    "resolve_backend",
]

#: The backends a routine can be compiled with, and the PyTensor mode of each (None:
#: PyTensor's configured default mode, C thunks).
BACKENDS = {"jax": "JAX", "c": None}

# Graphs evaluated once at build time: pure Python thunks, so that no C code is
# generated and compiled for them (the first C compilation of an op costs seconds).
ONCE_MODE = _ONCE = Mode(linker="py", optimizer="fast_compile")


@functools.cache
def _jax_mode() -> Mode:
    """PyTensor's JAX mode without ``local_usmm`` and without elementwise fusion.

    ``local_usmm`` turns a sparse dot into a BLAS ``usmm`` (which JAX cannot run), and
    its pattern reads ``config.blas__ldflags`` at every ``z - a * y`` with a scalar
    ``a``: the first read in a process detects the BLAS flags by compiling and
    running test programs with g++, 0.3 to 0.5 s of a cold JAX fit that compiles
    nothing in C. pm_em's graphs have no sparse dot, so they are rewritten the same.

    PyTensor's fusion merges chains of elementwise ops into ``Composite`` ops, so
    that C loops over the data once. XLA fuses elementwise ops itself, so under JAX
    the fused graph runs no faster (warm fits of the 1-D mixture and the HMM took the
    same time, iterations and log-posterior, to 10 decimals), while the fusion pass
    was about a sixth of the rewriting time of the 61 JAX functions that
    tests/test_closed_form.py compiles (6.5 s of 38 s).
    """
    return get_mode(BACKENDS["jax"]).excluding("local_usmm", "fusion")


def default_backend() -> str:
    """``PM_EM_BACKEND`` when set, else ``"jax"`` when JAX is installed, else ``"c"``."""
    chosen = os.environ.get("PM_EM_BACKEND", "").strip().lower()
    if chosen:
        return resolve_backend(chosen)
    return "jax" if _jax_installed() else "c"


@functools.cache
def _jax_installed() -> bool:
    """Whether JAX imports (an installed but broken JAX makes C the default)."""
    try:
        import jax  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str | None, compile_kwargs: dict | None = None) -> str:
    """The backend to use: ``backend`` checked, or the default.

    A ``mode`` in ``compile_kwargs`` is PyTensor's own choice and wins; it then
    names the backend (``"jax"`` for JAX modes, ``"c"`` for any other) and may not
    contradict an explicit ``backend``.

    Raises
    ------
    ValueError
        For an unknown backend, or a ``backend`` that contradicts ``compile_kwargs``.
    ImportError
        For ``"jax"`` when JAX is not installed.
    """
    mode = (compile_kwargs or {}).get("mode")
    if mode is not None:
        implied = "jax" if "jax" in str(getattr(mode, "linker", mode)).lower() else "c"
        if backend is not None and backend != implied:
            raise ValueError(
                f"backend={backend!r} contradicts compile_kwargs['mode']={mode!r}; "
                "pass one of them."
            )
        backend = implied
    if backend is None:
        return default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}.")
    if backend == "jax" and not _jax_installed():
        raise ImportError(
            "backend='jax' needs JAX: pip install jax (or pass backend='c' to compile C)."
        )
    return backend


def freeze_shapes(outputs: Sequence[Variable]) -> list[Variable]:
    """``outputs`` with the shapes of the data they read made static.

    Each tensor ``pm.Data`` container (a shared variable) is seen through
    ``specify_shape`` at its current shape, and each shared integer scalar (a mutable
    dim length) is replaced by its current value: shapes computed from them become
    constants, as JAX requires. The containers stay inputs of the function, so their
    values are read at every call.
    """
    replace = {}
    for var in graph_inputs(outputs):
        if not isinstance(var, SharedVariable) or not isinstance(var.type, TensorType):
            continue
        value = np.asarray(var.get_value(borrow=True))
        if var.type.ndim == 0 and var.type.dtype.startswith(("int", "uint")):
            replace[var] = pt.constant(value, dtype=var.type.dtype)
        elif var.type.ndim > 0:
            replace[var] = pt.specify_shape(var, value.shape)
    outputs = list(outputs)
    if replace:
        outputs = list(graph_replace(outputs, replace, strict=False))
    if any(isinstance(v.type, RandomType) for v in graph_inputs(outputs)):
        # A random variable whose shape alone is read (C's rewrites drop it later):
        # its shape from its parameters instead, so that no RNG reaches JAX's linker,
        # which cannot take one as an input here.
        outputs = rewrite_graph(
            outputs, include=("canonicalize", "ShapeOpt", "local_shape_to_shape_i")
        )
    return outputs


def constant_masks_as_indices(outputs: Sequence[Variable]) -> list[Variable]:
    """``outputs`` with every constant boolean index replaced by its integer indices.

    PyMC imputes missing data by writing the imputed values through a constant mask
    (``x[mask].set(x_missing)``), and enumerating a latent vectorizes that write
    (``Blockwise``). JAX takes a concrete boolean mask, but vectorizing traces every
    input, the mask included, and JAX cannot index with a traced boolean mask
    (``NonConcreteBooleanIndexError``). ``mask.nonzero()`` selects the same entries,
    traced or not; PyTensor's own rewrite (``bool_idx_to_nonzero``) runs for Numba
    only, and not inside a ``Blockwise``.
    """
    outputs = list(outputs)
    # One node at a time: a replacement may read the output of another masked node.
    while True:
        for node in applys_between(graph_inputs(outputs), outputs):
            replacement = _integer_indexed(node)
            if replacement is not None:
                outputs = list(graph_replace(outputs, {node.outputs[0]: replacement}, strict=False))
                break
        else:
            return outputs


def _integer_indexed(node) -> Variable | None:
    """The output of an (advanced, possibly vectorized) indexing ``node`` with its
    constant boolean indices as integer indices, or None when it has none."""
    vectorized = isinstance(node.op, Blockwise)
    core_op = node.op.core_op if vectorized else node.op
    if not isinstance(core_op, AdvancedSubtensor | AdvancedIncSubtensor):
        return None
    n_data = 1 if isinstance(core_op, AdvancedSubtensor) else 2
    signatures = node.op.inputs_sig if vectorized else [None] * len(node.inputs)
    masks = [
        _constant_mask(idx, None if sig is None else len(sig))
        for idx, sig in zip(node.inputs[n_data:], signatures[n_data:], strict=True)
    ]
    if all(mask is None for mask in masks):
        return None
    # Inside a Blockwise, the indexing is rebuilt on core stand-ins and vectorized
    # again over the node's inputs (PyTensor's rewrites then drop the Blockwise, as
    # for any integer index).
    standins = {}

    def core(var, sig):
        if vectorized:
            standins[var] = var.type.clone(shape=var.type.shape[var.type.ndim - len(sig) :])()
            return standins[var]
        return var

    data = [core(v, sig) for v, sig in zip(node.inputs[:n_data], signatures, strict=False)]
    indices = []
    for idx, sig, mask in zip(node.inputs[n_data:], signatures[n_data:], masks, strict=True):
        if mask is None:
            indices.append(core(idx, sig))
        else:
            indices.extend(pt.constant(i, dtype="int64") for i in np.nonzero(mask))
    output = core_op(*data, *indices)
    if not vectorized:
        return output
    return vectorize_graph(output, replace={standin: var for var, standin in standins.items()})


def _constant_mask(var, core_ndim: int | None) -> np.ndarray | None:
    """The boolean array a constant mask holds, or None when ``var`` is not one.

    ``core_ndim``: inside a ``Blockwise``, the mask's core dimensions; leading axes of
    length one (the mask broadcast over the batch, as vectorizing leaves it) are
    dropped, and a mask with batch axes of its own is not taken.
    """
    if core_ndim is not None:
        while var.owner is not None and getattr(var.owner.op, "is_left_expand_dims", False):
            var = var.owner.inputs[0]
    if not isinstance(var, TensorConstant) or var.type.dtype != "bool":
        return None
    mask = np.asarray(var.data)
    if core_ndim is None:
        return mask
    if any(length != 1 for length in mask.shape[: mask.ndim - core_ndim]):
        return None
    return mask.reshape(mask.shape[mask.ndim - core_ndim :])


def compile_function(
    inputs: Sequence[Variable],
    outputs: Sequence[Variable],
    compile_kwargs: dict | None = None,
    backend: str = "c",
):
    """Compile ``outputs`` as a function of ``inputs`` (positional), returning a list.

    Parameters
    ----------
    inputs, outputs : sequence of Variable
    compile_kwargs : dict, optional
        Passed to :func:`pytensor.function`; a ``mode`` there wins over ``backend``.
    backend : {"c", "jax"}, default "c"
        As resolved by :func:`resolve_backend`.
    """
    kwargs = {"on_unused_input": "ignore", **(compile_kwargs or {})}
    if "mode" not in kwargs and BACKENDS[backend] is not None:
        kwargs["mode"] = _jax_mode() if backend == "jax" else BACKENDS[backend]
    if backend == "jax":
        return JAXFunction(inputs, outputs, kwargs)
    return CompiledFunction(pytensor.function(list(inputs), list(outputs), **kwargs))


def compile_small(
    inputs: Sequence[Variable],
    outputs: Sequence[Variable],
    compile_kwargs: dict | None = None,
    backend: str = "c",
):
    """:func:`compile_function` for small graphs called a few times per fit (the
    transforms between a point and the value variables).

    Under JAX these run as Python thunks: tracing and compiling them with XLA costs
    about half a second each on a cold start, to save microseconds per call. C keeps
    its (cached) compiled code, and a ``mode`` in ``compile_kwargs`` still wins.
    """
    if backend != "jax" or "mode" in (compile_kwargs or {}):
        return compile_function(inputs, outputs, compile_kwargs, backend)
    kwargs = {"on_unused_input": "ignore", **(compile_kwargs or {}), "mode": _ONCE}
    return CompiledFunction(pytensor.function(list(inputs), list(outputs), **kwargs))


@contextmanager
def _quiet_jax():
    """Silence what JAX says, by design, about pm_em's graphs."""
    with warnings.catch_warnings():
        # JAX drops PyMC's parameter checks (Check{...} ops) from a traced graph and
        # says so for each. pm_em checks start values itself (pm_em.diagnostics), and
        # the M-step moves on the unconstrained space, inside every check.
        warnings.filterwarnings("ignore", message="Skipping .* JAX tracing", category=UserWarning)
        # A graph that reads only the shape of a random variable keeps its RNG among
        # the function's inputs; JAX says it uses a copy. Nothing draws from it.
        warnings.filterwarnings(
            "ignore", message="The RandomType SharedVariables", category=UserWarning
        )
        # Under floatX="float32", PyTensor's gradients may add a float64 term into a
        # float32 slice (AdvancedIncSubtensor); C casts it down, and so does JAX for
        # now, announcing that it will refuse later. Pinned below that JAX release.
        warnings.filterwarnings(
            "ignore", message="scatter inputs have incompatible types", category=FutureWarning
        )
        yield


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
    to_numpy : bool, default False
        Return NumPy arrays (a JAX function returns JAX arrays; on the CPU the
        conversion shares their memory).
    """

    def __init__(self, fn, to_numpy: bool = False):
        self.fn = fn
        self.maker = fn.maker
        self._to_numpy = to_numpy
        #: Per explicit input, the float dtype to cast to, or None (not a float
        #: input). Implicit inputs (shared variables) are not passed by the caller.
        dtypes = [
            getattr(inp.variable.type, "dtype", "") for inp in fn.maker.inputs if not inp.implicit
        ]
        self._dtypes = [d if d.startswith("float") else None for d in dtypes]

    def __call__(self, *args):
        if len(args) != len(self._dtypes):
            return self.fn(*args)  # PyTensor's own error names what is wrong
        outputs = self.fn(*(_cast(a, d) for a, d in zip(args, self._dtypes)))
        if self._to_numpy:
            return [np.asarray(v) for v in outputs]
        return outputs


class JAXFunction(CompiledFunction):
    """A function compiled with JAX for the shapes of its arguments.

    JAX compiles for static shapes, and PyTensor's graphs compute some shapes from
    their inputs' (a slice of ``theta_flat`` reshaped to a parameter's shape). The
    function is therefore compiled at its first call, with each input's shape and the
    data's (:func:`freeze_shapes`) made static, and again for arguments of new shapes
    (as ``jax.jit`` itself retraces for them).

    Parameters
    ----------
    inputs, outputs : sequence of Variable
    kwargs : dict
        For :func:`pytensor.function`, ``mode`` included.
    """

    def __init__(self, inputs, outputs, kwargs):
        import pm_em.estep.forward_backward_jax  # noqa: F401  (registers the HMM Ops with JAX)
        import pm_em.jax_dispatch  # noqa: F401  (Alloc keeps its dtype under JAX)

        self._inputs = list(inputs)
        self._outputs = constant_masks_as_indices(freeze_shapes(outputs))
        self._kwargs = kwargs
        self._by_shapes = {}
        self._last = None
        self._to_numpy = True
        self._dtypes = [
            d if d.startswith("float") else None
            for d in (getattr(v.type, "dtype", "") for v in self._inputs)
        ]

    def _compiled(self, shapes):
        fn = self._by_shapes.get(shapes)
        if fn is None:
            outputs = self._outputs
            if shapes is not None:
                fixed = {
                    v: pt.specify_shape(v, shape)
                    for v, shape in zip(self._inputs, shapes)
                    if isinstance(v.type, TensorType) and None in v.type.shape
                }
                if fixed:
                    outputs = list(graph_replace(outputs, fixed, strict=False))
            with _quiet_jax():
                fn = pytensor.function(self._inputs, outputs, **self._kwargs)
            self._by_shapes[shapes] = fn
        self._last = fn
        return fn

    @property
    def fn(self):
        """The function last called (compiled without input shapes if none was)."""
        return self._last if self._last is not None else self._compiled(None)

    @property
    def maker(self):
        return self.fn.maker

    def __call__(self, *args):
        if len(args) != len(self._dtypes):
            return self.fn(*args)  # PyTensor's own error names what is wrong
        args = [_cast(a, d) for a, d in zip(args, self._dtypes)]
        shapes = tuple(np.shape(a) for a in args)
        with _quiet_jax():
            outputs = self._compiled(shapes)(*args)
        return [np.asarray(v) for v in outputs]


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
    note_reads(outputs)  # what a routine being built depends on (pm_em.model.data)
    fn = pytensor.function(list(inputs), list(outputs), on_unused_input="ignore", mode=_ONCE)
    return CompiledFunction(fn)(*values)

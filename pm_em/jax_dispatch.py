"""Corrections to PyTensor's JAX dispatch: JAX's float64 is on, and an ``Alloc``
returns its declared dtype.

PyTensor turns JAX's float64 (``jax_enable_x64``) on or off once, when its JAX
dispatch is first imported, after ``floatX``: a process that imported it under
``floatX="float32"`` computed every float64 graph in float32 (JAX silently demotes
what it cannot represent), the forward-backward Op's float64 outputs included.
Importing this module turns it on: JAX then computes each array in the dtype
PyTensor's graph declares, float32 ones in float32.

PyTensor's JAX linker hands a 0-d constant to JAX as a Python scalar, and JAX types
an array made from a Python scalar *weakly*: ``jnp.broadcast_to(0.0, shape)`` is a
float64 array that gives way to any other float type it meets. So ``pt.zeros(n)``
(``Alloc`` of the constant ``0.0``), filled by ``inc_subtensor`` (which keeps the
weak type), then met by a float32 constant, say ``pt.switch(mask, h, 0.0)`` (PyTensor
stores the literal ``0.0`` as float32), is computed in float32 under JAX, although
PyTensor's graph says float64 and the C backend computes float64. The closed-form
MvNormal mean (:mod:`pm_em.mstep.closed_form.mvnormal`) builds its linear system this way,
and came out ~1e-7 off under JAX.

Importing this module wraps PyTensor's ``Alloc`` dispatch so that its result is cast
to the node's output dtype, a strong type: JAX then promotes as PyTensor's types
say. Arrays of other origins are unaffected (a cast to their own dtype is free).
PyTensor's own fix for the same kind of bug in ``ARange``: pymc-devs/pytensor#2298.
"""

from __future__ import annotations

import jax
from pytensor.link.jax.dispatch import jax_funcify
from pytensor.tensor.basic import Alloc

__all__ = ["jax_funcify_Alloc"]

# After PyTensor's import above, which sets it from floatX.
jax.config.update("jax_enable_x64", True)

_pytensor_alloc = jax_funcify.dispatch(Alloc)


def jax_funcify_Alloc(op, node, **kwargs):
    """PyTensor's ``Alloc`` for JAX, its result strongly typed as ``node`` declares."""
    alloc = _pytensor_alloc(op, node=node, **kwargs)
    dtype = node.outputs[0].dtype

    def strong_alloc(*inputs):
        return alloc(*inputs).astype(dtype)

    return strong_alloc


# Registered once, whatever reloads the module: a second registration would wrap
# this wrapper, not PyTensor's.
if getattr(_pytensor_alloc, "__module__", None) != __name__:
    jax_funcify.register(Alloc)(jax_funcify_Alloc)

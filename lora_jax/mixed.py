"""Mixed-adapter batches: each row of a batch with its own slot of a stacked adapter.

A stack of adapters (:func:`lora_jax.multi.stack`) holds ``n`` slots along a
leading axis of every ``a`` and ``b``; ``adapter_ids[row]`` picks the slot of
each row of the batch, ``-1`` for none. Each row's factors are gathered and
the kind's term (:mod:`lora_jax.kinds`) runs per row under ``jax.vmap``, so
the products stay factored and the cost does not grow with ``n``. Front-end
neutral: the linen front end calls it with each layer call's
:class:`~lora_jax.kinds.Call`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.kinds import Call


def check_ids(adapter_ids, lora_params):
    """``adapter_ids`` as a 1-D integer array; raises when they or the stack cannot work.

    >>> check_ids([0, -1, 1], {"q": {"a": None, "b": None}})
    Array([ 0, -1,  1], dtype=int32)
    """
    if lora_params is None:
        raise ValueError("adapter_ids need stacked adapters (lora_jax.multi.stack), but lora_params is None")
    ids = jnp.asarray(adapter_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"adapter_ids must be a 1-D integer array (one slot per row, -1 for none), "
                         f"got shape {list(ids.shape)} dtype {ids.dtype}")
    return ids


def _check_range(ids, n: int, name: str):
    """Raises for ids outside ``[-1, n)`` when they are concrete (under ``jit`` they are not)."""
    try:
        values = np.asarray(ids)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    bad = sorted({int(v) for v in values if not -1 <= v < n})
    if bad:
        raise ValueError(f"layer {name!r}: adapter_ids {bad} are out of range; the stacked adapter has "
                         f"{n} slots (0..{n - 1}), and -1 means no adapter")


def _split_first(args, kwargs, name):
    """``(x, rebuild)``: the call's first input and a function giving ``(args, kwargs)`` with it replaced."""
    if args:
        return args[0], lambda x: ((x, *args[1:]), kwargs)
    return kwargs[name], lambda x: (args, {**kwargs, name: x})


def _zero_rows(v, valid):
    """``v`` with the rows of no valid slot set to zero, so that they send no gradient anywhere.

    An unused row still runs through the product (with slot 0's gathered factors); with its
    inputs and factors zeroed, a NaN input (a row an earlier layer poisoned) cannot reach
    slot 0's gradient as ``0 * NaN``.

    >>> _zero_rows(jnp.array([[1.0, jnp.nan], [2.0, 3.0]]), jnp.array([False, True]))
    Array([[0., 0.],
           [2., 3.]], dtype=float32)
    """
    return jnp.where(valid.reshape((-1,) + (1,) * (v.ndim - 1)), v, jnp.zeros((), v.dtype))


def _mask_rows(y, ids, valid):
    """Row -1 uses no adapter; an id outside ``[-1, n)`` poisons its row with NaN rather than
    silently clamping (under jit the ids cannot be checked when traced). The NaN is the other
    branch of a ``where``, a constant: it carries no gradient into the factors."""
    rows = (-1,) + (1,) * (y.ndim - 1)
    y = jnp.where((ids >= 0).reshape(rows), y, jnp.zeros((), y.dtype))
    return jnp.where((valid | (ids == -1)).reshape(rows), y, jnp.full((), jnp.nan, y.dtype))


def mixed_term(term: Callable, call: Call, ids, name: str, *, input_name: str = "inputs"):
    """The term of a call whose row ``i`` uses slot ``ids[i]`` of the stacked factors ``call.a``, ``call.b``.

    ``input_name`` is the keyword of the call's input (``"query"`` for ``Embed.attend``).

    >>> from lora_jax.kinds import KINDS, View
    >>> a, b = jnp.stack([jnp.ones((3, 1)), 2 * jnp.ones((3, 1))]), jnp.ones((2, 1, 2))
    >>> call = Call(View((3, 2)), (jnp.ones((3, 3)),), {}, a, b, scale=1.0)
    >>> mixed_term(KINDS["dense"].terms["__call__"], call, jnp.array([1, -1, 0]), "q")
    Array([[6., 6.],
           [0., 0.],
           [3., 3.]], dtype=float32)
    """
    x, rebuild = _split_first(call.args, call.kwargs, input_name)
    n = call.a.shape[0]
    if x.ndim == 0 or x.shape[0] != ids.shape[0]:
        raise ValueError(f"layer {name!r}: a mixed-adapter batch gives {ids.shape[0]} adapter_ids, but "
                         f"the layer's input has shape {list(x.shape)}; rows must be its leading axis")
    _check_range(ids, n, name)
    x = call.drop(x)
    valid = (ids >= 0) & (ids < n)
    slot = jnp.where(valid, ids, 0)
    x, a_rows, b_rows = (_zero_rows(v, valid) for v in (x, jnp.take(call.a, slot, axis=0),
                                                      jnp.take(call.b, slot, axis=0)))

    def one_row(xr, ar, br):
        args, kwargs = rebuild(xr[None])
        return term(dataclasses.replace(call, args=args, kwargs=kwargs, a=ar, b=br, drop=lambda v: v))[0]

    return _mask_rows(jax.vmap(one_row)(x, a_rows, b_rows), ids, valid)

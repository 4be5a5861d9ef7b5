"""Contraction plumbing for the adapter terms of :mod:`lora_jax.kinds`: arrays only.

The DenseGeneral and Einsum terms take the layer's input, the factors, and a
``lowrank(x, a, b)`` callable that computes ``scale * (x @ a) @ b`` on
``[..., in]`` inputs (:meth:`lora_jax.kinds.Call.lowrank`: the layer's scale,
impl and precision), and move axes so that the factored 2-D path is used
wherever the layer allows it.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

_RANK_LABELS = "ZYXWVUTSRQPONMLKJIHGFEDCBAzyxwvutsrqponmlkjihgfedcba"


def dense_general(x, a, b, axis, lowrank: Callable, promote: Callable = lambda *t: t):
    """The term of a ``DenseGeneral``/``LinearGeneral`` contracting ``x``'s ``axis`` with the kernel's leading dims.

    ``x``'s contracted axes move last and flatten, so the product is one 2-D
    factored matmul; ``promote`` casts ``(x, a, b)`` to the layer's dtype.

    >>> lowrank = lambda x, a, b: x @ a @ b
    >>> dense_general(jnp.ones((2, 3, 4)), jnp.ones((3, 4, 1)), jnp.ones((1, 5)), (1, 2), lowrank).shape
    (2, 5)
    """
    axis = tuple(sorted(ax % x.ndim for ax in axis))
    free = tuple(d for d in range(x.ndim) if d not in axis)
    x = jnp.transpose(x, free + axis) if free + axis != tuple(range(x.ndim)) else x
    free_shape = x.shape[:len(free)]
    x, a2, b2 = promote(x.reshape(*free_shape, -1), a, b)
    r = a2.shape[-1]
    return lowrank(x, a2.reshape(-1, r), b2.reshape(r, -1)).reshape(*free_shape, *b.shape[1:])


def parse_einsum(spec: str) -> tuple[str, str, str]:
    """``"btd,dk->btk"`` -> ``("btd", "dk", "btk")`` (spaces ignored).

    >>> parse_einsum("b t d, d k -> b t k")
    ('btd', 'dk', 'btk')
    """
    lhs, rest = spec.replace(" ", "").split(",")
    rhs, out = rest.split("->")
    return lhs, rhs, out


def einsum_shapes(lhs: str, rhs: str, out: str, w_shape) -> tuple[tuple, tuple]:
    """``(in_shape, out_shape)`` of an Einsum kernel; ``NotImplementedError`` for kernels LoRA cannot split.

    >>> einsum_shapes("btd", "dhk", "bthk", (8, 2, 4))
    ((8,), (2, 4))
    """
    if "." in lhs + rhs + out:
        raise NotImplementedError("Einsum with '...' is not supported")
    contracted = "".join(label for label in rhs if label not in out)
    kept = "".join(label for label in rhs if label in out)
    if any(label in lhs for label in kept):
        raise NotImplementedError(f"Einsum {lhs},{rhs}->{out}: kernel dims shared by input and output")
    if rhs != contracted + kept:
        raise NotImplementedError(f"Einsum {lhs},{rhs}->{out}: the kernel's contracted dims must come "
                                  f"before its output dims (kernel '{rhs}', expected '{contracted + kept}')")
    w_shape = tuple(w_shape)
    return w_shape[:len(contracted)], w_shape[len(contracted):]


def einsum(lhs: str, rhs: str, out: str, x, a, b, lowrank: Callable, scale: float):
    """The term of an Einsum layer; ``x``, ``a``, ``b`` already in the layer's dtype.

    A pure projection (every input label but the contracted ones kept, in any
    order) goes through the 2-D factored path and one transpose; anything else
    (an input label summed away) through two einsums.

    >>> lowrank = lambda x, a, b: x @ a @ b
    >>> einsum("btd", "dk", "bkt", jnp.ones((2, 3, 4)), jnp.ones((4, 1)), jnp.ones((1, 5)), lowrank, 1.0).shape
    (2, 5, 3)
    """
    contracted = "".join(label for label in rhs if label not in out)
    kept_out = rhs[len(contracted):]
    free = "".join(label for label in lhs if label not in contracted)
    if sorted(free + kept_out) == sorted(out) and all(label in out for label in free):
        order = tuple(lhs.index(label) for label in free + contracted)
        xt = jnp.transpose(x, order).reshape(*(x.shape[lhs.index(label)] for label in free), -1)
        r = a.shape[-1]
        y = lowrank(xt, a.reshape(-1, r), b.reshape(r, -1)).reshape(*xt.shape[:-1], *b.shape[1:])
        cur = free + kept_out
        return jnp.transpose(y, tuple(cur.index(label) for label in out))
    rank = next(ch for ch in _RANK_LABELS if ch not in lhs + rhs + out)
    kept_free = "".join(label for label in free if label in out)
    h = jnp.einsum(f"{lhs},{contracted}{rank}->{kept_free}{rank}", x, a)
    return jnp.einsum(f"{kept_free}{rank},{rank}{kept_out}->{out}", h, b) * scale

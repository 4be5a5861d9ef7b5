"""The LoRA math on arrays: factored products, the materialised delta, merge.

Shapes follow the Flax layout. A weight of shape ``lead + in_shape + out_shape``
(``lead`` being stacked-layer axes from ``nn.scan``/``nn.vmap``) has an adapter
``a`` of shape ``lead + in_shape + (r,)`` and ``b`` of shape
``lead + (r,) + out_shape``; ``delta = scale * tensordot(a, b, 1)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Impl = Literal["fast", "plain"]
IMPLS = ("fast", "plain")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _lowrank_2d(x, a, b, scale, precision):
    return jnp.matmul(jnp.matmul(x, a, precision=precision) * scale, b, precision=precision)


def _lowrank_2d_fwd(x, a, b, scale, precision):
    hs = jnp.matmul(x, a, precision=precision) * scale
    return jnp.matmul(hs, b, precision=precision), (x, a, b, hs)


def _lowrank_2d_bwd(scale, precision, residuals, g):
    # Every product here is a plain 2-D matmul over (tokens, features) views, and
    # the scale rides on the [tokens, r] side. On XLA:CPU the weight-side
    # gradients of an N-D einsum make XLA copy transposed activation gradients;
    # these 2-D forms do not.
    x, a, b, hs = residuals
    db = jnp.matmul(hs.T, g, precision=precision)
    dh = jnp.matmul(g, b.T, precision=precision) * scale
    da = jnp.matmul(x.T, dh, precision=precision)
    dx = jnp.matmul(dh, a.T, precision=precision)
    return dx, da, db


_lowrank_2d.defvjp(_lowrank_2d_fwd, _lowrank_2d_bwd)


def lowrank(x, a, b, scale: float, *, impl: Impl = "fast", precision=None):
    """``scale * (x @ a) @ b`` without forming ``a @ b``.

    Args:
      x: ``[..., in]`` activations.
      a: ``[in, r]``; b: ``[r, out]``. All three share one dtype.
      scale: the LoRA scaling (a Python number).
      impl: ``"fast"`` uses a custom VJP on 2-D ``(tokens, features)`` views;
        ``"plain"`` is ordinary autodiff of the same product (the reference).
      precision: passed to the matmuls.

    Returns:
      ``[..., out]``.

    >>> x = jnp.ones((2, 3, 4)); a = jnp.ones((4, 2)); b = jnp.ones((2, 5))
    >>> lowrank(x, a, b, 0.5).shape, float(lowrank(x, a, b, 0.5)[0, 0, 0])
    ((2, 3, 5), 4.0)
    """
    if impl == "plain":
        return jnp.matmul(jnp.matmul(x, a, precision=precision), b, precision=precision) * scale
    if impl != "fast":
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    lead = x.shape[:-1]
    y = _lowrank_2d(x.reshape(-1, x.shape[-1]), a, b, scale, precision)
    return y.reshape(*lead, b.shape[-1])


def split_shape(w_shape, a_shape, b_shape) -> tuple[tuple, tuple, tuple]:
    """Splits a weight shape into ``(lead, in_shape, out_shape)`` given its adapter.

    Raises ``ValueError`` if the three shapes are not a weight and its adapter.

    >>> split_shape((3, 4, 2, 5), (3, 4, 8), (3, 8, 2, 5))      # 3 stacked layers, in [4], out [2, 5]
    ((3,), (4,), (2, 5))
    """
    w_shape, a_shape, b_shape = tuple(w_shape), tuple(a_shape), tuple(b_shape)
    n_lead = len(a_shape) + len(b_shape) - 2 - len(w_shape)
    ok = n_lead >= 0 and len(a_shape) >= n_lead + 2 and len(b_shape) >= n_lead + 2
    if ok:
        lead, n_in = w_shape[:n_lead], len(a_shape) - 1 - n_lead
        in_shape, out_shape = w_shape[n_lead:n_lead + n_in], w_shape[n_lead + n_in:]
        ok = (a_shape == lead + in_shape + a_shape[-1:]
              and b_shape == lead + a_shape[-1:] + out_shape)
    if not ok:
        raise ValueError(f"adapter shapes a{list(a_shape)}, b{list(b_shape)} do not fit a weight of "
                         f"shape {list(w_shape)} (expected a = lead+in+[r], b = lead+[r]+out)")
    return lead, in_shape, out_shape


def delta(a, b, scale: float, w_shape, *, dtype=jnp.float32):
    """The materialised update ``scale * a @ b`` reshaped to ``w_shape``, in ``dtype``.

    >>> a = jnp.ones((3, 4, 2)); b = jnp.ones((3, 2, 5))   # 3 stacked layers
    >>> delta(a, b, 0.5, (3, 4, 5))[1, 0, 0]
    Array(1., dtype=float32)
    """
    lead, in_shape, out_shape = split_shape(w_shape, a.shape, b.shape)
    r = a.shape[-1]
    a2 = a.astype(dtype).reshape(*lead, math.prod(in_shape), r)
    b2 = b.astype(dtype).reshape(*lead, r, math.prod(out_shape))
    d = jnp.matmul(a2 * jnp.asarray(scale, dtype), b2, precision=jax.lax.Precision.HIGHEST)
    return d.reshape(tuple(w_shape))


def merge_weight(w, a, b, scale: float):
    """``w + scale * a @ b``, computed in float32 and cast back to ``w.dtype``.

    >>> merge_weight(jnp.zeros((2, 2)), jnp.ones((2, 1)), jnp.ones((1, 2)), 0.5)[0]
    Array([0.5, 0.5], dtype=float32)
    """
    return fold(w, {"a": a, "b": b}, scale).weight


def unmerge_weight(w, a, b, scale: float):
    """``w - scale * a @ b``, computed in float32 and cast back to ``w.dtype``.

    >>> unmerge_weight(jnp.ones((2, 2)), jnp.ones((2, 1)), jnp.ones((1, 2)), 0.5)[0]
    Array([0.5, 0.5], dtype=float32)
    """
    return fold(w, {"a": a, "b": b}, scale, unmerge=True).weight


def kaiming_uniform(key, shape, dtype, fan_in: int):
    """Uniform on ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``.

    This is PyTorch's ``kaiming_uniform_(a=sqrt(5))``, which PEFT applies to
    ``lora_A``: gain ``sqrt(2 / (1 + 5))`` times ``sqrt(3 / fan_in)``.

    >>> bool(jnp.all(jnp.abs(kaiming_uniform(jax.random.key(0), (16, 2), jnp.float32, 16)) <= 0.25))
    True
    """
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def init_factors(key, init: str, kind: str, lead, in_shape, out_shape, rank: int, dtype):
    """Initial ``(a, b)`` for one layer, so that ``a @ b == 0`` (the model is unchanged).

    PEFT's conventions: Dense-like layers get A kaiming-uniform (per stacked
    layer, fan-in ``prod(in_shape)``) and B zero; embeddings the other way
    round, A zero and B standard normal. ``"gaussian"`` draws A from
    ``N(0, 1/r^2)`` instead (embeddings unchanged).

    >>> a, b = init_factors(jax.random.key(0), "default", "embed", (), (10,), (4,), 2, jnp.float32)
    >>> a.shape, b.shape, bool(jnp.all(a == 0))
    ((10, 2), (2, 4), True)
    """
    a_shape = tuple(lead) + tuple(in_shape) + (rank,)
    b_shape = tuple(lead) + (rank,) + tuple(out_shape)
    if kind == "embed":
        return jnp.zeros(a_shape, dtype), jax.random.normal(key, b_shape, dtype)
    if init == "gaussian":
        a = jax.random.normal(key, a_shape, dtype) / rank
    else:
        a = kaiming_uniform(key, a_shape, dtype, math.prod(in_shape))
    return a, jnp.zeros(b_shape, dtype)


# ---- DoRA (Liu et al., 2024): W' = m * (W + s A B) / ||W + s A B||, the norm per output feature

def _flat_factors(w, a, b, dtype=jnp.float32):
    """``w``, ``a``, ``b`` as ``lead + [in, out]``, ``lead + [in, r]``, ``lead + [r, out]`` in ``dtype``."""
    lead, in_shape, out_shape = split_shape(w.shape, a.shape, b.shape)
    n_in, n_out, r = math.prod(in_shape), math.prod(out_shape), a.shape[-1]
    return (w.astype(dtype).reshape(*lead, n_in, n_out), a.astype(dtype).reshape(*lead, n_in, r),
            b.astype(dtype).reshape(*lead, r, n_out), lead + out_shape)


def dora_norm(w, a, b, scale: float, *, impl: Impl = "fast"):
    """``||W + scale * A @ B||`` over the input axes, per output feature (shape ``lead + out_shape``).

    ``"fast"`` never forms the ``[in, out]`` sum: it expands the squared norm
    as ``||W_j||^2 + 2 s (W^T A)_j . B_j + s^2 B_j^T (A^T A) B_j``, which costs
    one ``[out, in] x [in, r]`` product instead of an ``in x out`` temporary.
    ``"plain"`` forms ``W + s A B`` (the reference). Both run in float32.

    >>> w = jnp.array([[3.0, 0.0], [0.0, 1.0]]); a = jnp.array([[0.0], [1.0]]); b = jnp.array([[4.0, 0.0]])
    >>> dora_norm(w, a, b, 1.0), dora_norm(w, a, b, 1.0, impl="plain")
    (Array([5., 1.], dtype=float32), Array([5., 1.], dtype=float32))
    """
    w2, a2, b2, shape = _flat_factors(w, a, b)
    hi = jax.lax.Precision.HIGHEST
    if impl == "plain":
        return jnp.linalg.norm(w2 + scale * jnp.matmul(a2, b2, precision=hi), axis=-2).reshape(shape)
    if impl != "fast":
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    cross = jnp.sum(jnp.matmul(jnp.swapaxes(a2, -1, -2), w2, precision=hi) * b2, axis=-2)
    gram = jnp.matmul(jnp.swapaxes(a2, -1, -2), a2, precision=hi)
    quad = jnp.sum(jnp.matmul(gram, b2, precision=hi) * b2, axis=-2)
    sq = jnp.sum(w2 * w2, axis=-2) + (2.0 * scale) * cross + (scale * scale) * quad
    return jnp.sqrt(jnp.maximum(sq, 0.0)).reshape(shape)


def dora_factor_shape(w_shape, a_shape, b_shape) -> tuple:
    """The shape that broadcasts a per-output-feature vector over a weight: ``lead + [1]*len(in) + out``.

    >>> dora_factor_shape((3, 4, 5), (3, 4, 2), (3, 2, 5))
    (3, 1, 5)
    """
    lead, in_shape, out_shape = split_shape(w_shape, a_shape, b_shape)
    return lead + (1,) * len(in_shape) + out_shape


def dora_merge_weight(w, a, b, m, scale: float):
    """``m * (W + s A B) / ||W + s A B||`` per output feature, in float32, cast back to ``w.dtype``.

    >>> w = jnp.array([[3.0, 0.0], [4.0, 2.0]]); a = jnp.zeros((2, 1)); b = jnp.zeros((1, 2))
    >>> dora_merge_weight(w, a, b, jnp.array([10.0, 1.0]), 1.0)
    Array([[6., 0.],
           [8., 1.]], dtype=float32)
    """
    v = w.astype(jnp.float32) + delta(a, b, scale, w.shape)
    factor = m.astype(jnp.float32) / dora_norm(w, a, b, scale, impl="plain")
    return (v * factor.reshape(dora_factor_shape(w.shape, a.shape, b.shape))).astype(w.dtype)


# ---- folding an adapter into (or out of) one weight: every merge and unmerge comes here

def is_quantized(weight) -> bool:
    """Whether a base weight is stored quantized (an object with ``dequantize()``, see :mod:`lora_jax.quant`).

    >>> is_quantized(jnp.ones(2))
    False
    """
    return callable(getattr(weight, "dequantize", None))


def float_value(weight):
    """A base weight's float value: dequantized if it is stored quantized, else itself.

    >>> float_value(jnp.ones(2))
    Array([1., 1.], dtype=float32)
    """
    return weight.dequantize() if is_quantized(weight) else weight


class Folded(NamedTuple):
    """One weight with its adapter folded in or out (:func:`fold`).

    ``weight`` is stored as the input weight was (its dtype; re-quantized if it
    was quantized); ``exact`` is the float32 value before it was stored.
    """

    weight: Any
    exact: Any

    def rounding(self) -> dict:
        """What storing cost: ``{"method", "max_abs_error", "max_abs_weight", "rel_error"}``.

        ``method`` is the quantization method (``None`` for a float weight),
        ``max_abs_error`` is ``max |stored - exact|``, ``rel_error`` divides it by ``max |exact|``.

        >>> node = {"a": jnp.ones((2, 1)), "b": jnp.ones((1, 2))}
        >>> report = fold(jnp.ones((2, 2), jnp.bfloat16), node, 1e-3).rounding()
        >>> report["method"], round(report["max_abs_error"], 6)      # 1.001 rounds to 1 in bfloat16
        (None, 0.001)
        """
        stored = float_value(self.weight).astype(jnp.float32)
        err = float(jnp.max(jnp.abs(stored - self.exact)))
        top = float(jnp.max(jnp.abs(self.exact)))
        method = self.weight.method if is_quantized(self.weight) else None
        return {"method": method, "max_abs_error": err, "max_abs_weight": top, "rel_error": err / top if top else 0.0}


def _check_fold(w, node: Mapping, name: str, unmerge: bool, requantize: bool):
    if is_quantized(w) and not requantize:
        raise ValueError(f"layer {name!r}: the base weight is stored quantized; {'unmerge' if unmerge else 'merge'} "
                         f"into it must re-quantize, which rounds. Use lora_jax.quant.merge_quantized, which "
                         f"reports that rounding error")
    if unmerge and "m" in node:
        raise ValueError(
            f"layer {name!r}: a DoRA merge cannot be undone from the merged weight alone (it keeps only "
            f"the direction of W + s*A@B and the magnitude m, not the norm it divided by). Keep the "
            f"base params, which merge never modifies, instead of unmerging")


def _folded(w32, node: Mapping, scale: float, unmerge: bool, out_in: bool):
    """``W +- scale * A @ B`` (DoRA: ``m * V / ||V||``) in float32, laid out as ``w32``."""
    swap = (lambda v: jnp.swapaxes(v, -1, -2)) if out_in else (lambda v: v)
    if "m" in node:
        return swap(dora_merge_weight(swap(w32), node["a"], node["b"], node["m"], scale))
    shape = w32.shape[:-2] + w32.shape[:-3:-1] if out_in else w32.shape
    d = swap(delta(node["a"], node["b"], scale, shape))
    return w32 - d if unmerge else w32 + d


def fold(w, node: Mapping, scale: float, *, unmerge: bool = False, out_in: bool = False,
         requantize: bool = False, name: str = "") -> Folded:
    """Folds one adapter into its weight, ``W + scale * A @ B`` (or out of it, ``unmerge=True``).

    The sum is formed in float32 and stored as ``w`` was: cast back to its
    dtype, or re-quantized with its own settings when it is stored quantized
    and ``requantize`` (else that raises: re-quantizing rounds). A DoRA node
    (with ``"m"``) merges to ``m * V / ||V||`` with ``V = W + scale * A @ B``;
    its unmerge raises (the norm it divided by is gone).

    Args:
      w: the weight, ``lead + in_shape + out_shape`` (``out_in``: its last two axes swapped).
      node: the adapter, ``{"a", "b"}`` (and DoRA's ``"m"``).
      scale: the adapter's scaling.
      name: the layer's name, for messages.

    >>> node = {"a": jnp.ones((2, 1)), "b": jnp.array([[1.0, 2.0, 3.0]])}
    >>> fold(jnp.zeros((2, 3)), node, 1.0).weight[0], fold(jnp.zeros((3, 2)), node, 1.0, out_in=True).weight[:, 0]
    (Array([1., 2., 3.], dtype=float32), Array([1., 2., 3.], dtype=float32))
    """
    _check_fold(w, node, name, unmerge, requantize)
    try:
        exact = _folded(float_value(w).astype(jnp.float32), node, scale, unmerge, out_in)
    except ValueError as err:
        if not name:
            raise
        raise ValueError(f"layer {name!r}: {err}") from None
    stored = w.requantize(exact) if is_quantized(w) else exact.astype(w.dtype)
    return Folded(stored, exact)

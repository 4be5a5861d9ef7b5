"""The LoRA math in NumPy float64: the test oracle.

Every function here is the textbook formula on the merged weight
``W + scale * A @ B`` (or its closed-form gradient), written for clarity,
never for speed. JAX results are checked against it.
"""

from __future__ import annotations

import itertools
import math

import numpy as np


def _f64(*arrays):
    return [np.asarray(x, dtype=np.float64) for x in arrays]


def scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA.

    >>> scaling(16, 4), scaling(16, 4, use_rslora=True)
    (4.0, 8.0)
    """
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def delta(a, b, scale: float):
    """``scale * A @ B`` for ``a`` of shape ``in + (r,)`` and ``b`` of shape ``(r,) + out``."""
    a, b = _f64(a, b)
    return scale * np.tensordot(a, b, axes=1)


def merge(w, a, b, scale: float):
    """``W + scale * A @ B``."""
    return _f64(w)[0] + delta(a, b, scale)


def unmerge(w, a, b, scale: float):
    """``W - scale * A @ B``."""
    return _f64(w)[0] - delta(a, b, scale)


def dense(x, w, a, b, scale: float, bias=None):
    """A Dense layer with an adapter: ``x @ (W + scale * A @ B) + bias``.

    >>> dense(np.ones((1, 2)), np.zeros((2, 2)), np.ones((2, 1)), np.ones((1, 2)), 0.5)
    array([[1., 1.]])
    """
    x, = _f64(x)
    y = x @ merge(w, a, b, scale)
    return y if bias is None else y + np.asarray(bias, np.float64)


def dense_general(x, w, a, b, scale: float, axis: tuple[int, ...], bias=None):
    """A DenseGeneral layer contracting the (sorted) ``axis`` of ``x`` with the kernel's leading dims."""
    x, = _f64(x)
    axis = tuple(sorted(ax % x.ndim for ax in axis))
    y = np.tensordot(x, merge(w, a, b, scale), axes=(axis, tuple(range(len(axis)))))
    return y if bias is None else y + np.asarray(bias, np.float64)


def einsum(spec: str, x, w, a, b, scale: float):
    """An Einsum layer ``einsum(spec, x, W + scale * A @ B)``."""
    x, = _f64(x)
    return np.einsum(spec, x, merge(w, a, b, scale))


def embed(ids, table, a, b, scale: float):
    """Embedding lookup in ``table + scale * A @ B`` (``a``: ``[vocab, r]``, ``b``: ``[r, dim]``)."""
    return merge(table, a, b, scale)[np.asarray(ids)]


def attend(query, table, a, b, scale: float):
    """A tied output head: ``query @ (table + scale * A @ B).T``."""
    q, = _f64(query)
    return q @ merge(table, a, b, scale).T


def conv(x, w, a, b, scale: float, strides=None, padding="VALID", bias=None):
    """An N-d convolution (NHWC input, HWIO kernel) with the merged kernel, by direct summation.

    ``padding`` is ``"VALID"``, ``"SAME"`` or explicit ``[(lo, hi), ...]``.
    """
    x, = _f64(x)
    k = merge(w, a, b, scale)
    spatial = k.shape[:-2]
    strides = tuple(strides or (1,) * len(spatial))
    if padding == "SAME":
        pads = []
        for n, ks, s in zip(x.shape[1:-1], spatial, strides):
            total = max((math.ceil(n / s) - 1) * s + ks - n, 0)
            pads.append((total // 2, total - total // 2))
    elif padding == "VALID":
        pads = [(0, 0)] * len(spatial)
    else:
        pads = [tuple(p) for p in padding]
    x = np.pad(x, [(0, 0)] + pads + [(0, 0)])
    out_sizes = [(n - ks) // s + 1 for n, ks, s in zip(x.shape[1:-1], spatial, strides)]
    y = np.zeros((x.shape[0], *out_sizes, k.shape[-1]))
    for pos in itertools.product(*(range(n) for n in out_sizes)):
        window = tuple(slice(p * s, p * s + ks) for p, s, ks in zip(pos, strides, spatial))
        patch = x[(slice(None), *window, slice(None))]
        y[(slice(None), *pos, slice(None))] = np.tensordot(patch, k, axes=len(spatial) + 1)
    return y if bias is None else y + np.asarray(bias, np.float64)


def lowrank_grads(x, a, b, scale: float, g):
    """Closed-form gradients of ``sum(g * scale * (x @ A) @ B)``.

    With ``X`` the ``[tokens, in]`` view of ``x`` and ``G`` the ``[tokens, out]``
    view of ``g``: ``dA = scale * X.T @ G @ B.T``, ``dB = scale * (X @ A).T @ G``,
    ``dx = scale * G @ B.T @ A.T``.

    Returns:
      ``(dx, dA, dB)``, with ``dx`` shaped like ``x``.
    """
    x, a, b, g = _f64(x, a, b, g)
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    da = scale * x2.T @ g2 @ b.T
    db = scale * (x2 @ a).T @ g2
    dx = scale * g2 @ b.T @ a.T
    return dx.reshape(x.shape), da, db


def dora_weight(w, a, b, m, scale: float):
    """DoRA's effective weight ``m * V / ||V||`` with ``V = W + scale * A @ B``, the norm per output column.

    ``w`` is ``[in, out]``. ``||m * V / ||V|| ||`` is ``|m|`` column by column:

    >>> v = dora_weight(np.eye(2), np.ones((2, 1)), np.ones((1, 2)), np.array([3.0, 4.0]), 1.0)
    >>> np.linalg.norm(v, axis=0)
    array([3., 4.])
    """
    v = merge(w, a, b, scale)
    return v * (_f64(m)[0] / np.linalg.norm(v, axis=0))


def dora_dense(x, w, a, b, m, scale: float, bias=None):
    """A DoRA Dense layer: ``x @ dora_weight(...) + bias``."""
    x, = _f64(x)
    y = x @ dora_weight(w, a, b, m, scale)
    return y if bias is None else y + np.asarray(bias, np.float64)


def dora_grads(x, w, a, b, m, scale: float, g):
    """Closed-form gradients of ``sum(g * dora_dense(x, ...))`` with the norm held constant.

    With ``n = ||W + s A B||`` per column treated as a constant (as PEFT and
    the DoRA paper do), ``c = m / n`` and ``H = G * c`` (``G`` the ``[tokens,
    out]`` view of ``g``): ``dm = sum_t G * (X @ V) / n``, ``dA = s X.T @ H @ B.T``,
    ``dB = s (X @ A).T @ H``, ``dx = H @ (W + s A B).T``.

    Returns:
      ``(dx, dA, dB, dm)``, with ``dx`` shaped like ``x``.
    """
    x, w, a, b, m, g = _f64(x, w, a, b, m, g)
    v = merge(w, a, b, scale)
    n = np.linalg.norm(v, axis=0)
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    h = g2 * (m / n)
    dm = np.sum(g2 * (x2 @ v), axis=0) / n
    da = scale * x2.T @ h @ b.T
    db = scale * (x2 @ a).T @ h
    dx = h @ v.T
    return dx.reshape(x.shape), da, db, dm

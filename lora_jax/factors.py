"""Per-layer factor maths in float64 NumPy: layer geometry, QR, the small SVD, truncation, errors.

A layer's adapter holds ``a`` ``[..., in, r]`` and ``b`` ``[..., r, out]``; its
delta is ``scale * a @ b``. With thin QR factors ``a = Q_a R_a`` and
``b^T = Q_b R_b``, ``a @ b = Q_a (R_a R_b^T) Q_b^T`` and the orthonormal ``Q``
factors keep singular values and vectors, so only the small ``r x r`` core is
decomposed and the ``[in, out]`` delta is never formed. Leading axes (layers
stacked by ``nn.scan``) are decomposed slice by slice.

:func:`layers` reads an adapter into that form, checked against the base's
shapes, and :func:`to_tree` writes factors back as a LoRA tree;
:mod:`lora_jax.multi`, :mod:`lora_jax.analysis` and :mod:`lora_jax.adapter_set`
build on them. ``terms`` below are ``(c_i, a_i, b_i)`` triples standing for
``sum_i c_i * a_i @ b_i``.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import tree
from lora_jax.config import Adapter, LoraConfig
from lora_jax.core import split_shape


class LayerGeometry(NamedTuple):
    """Where one adapter node sits: its layer's name and path, the weight's dims, the node itself."""

    name: str
    path: tuple
    lead: tuple
    in_shape: tuple
    out_shape: tuple
    node: Mapping


class LayerFactors(NamedTuple):
    """One adapted layer's factors as float64 matrices, and what it takes to write them back.

    Attributes:
      path, lead, in_shape, out_shape: as :class:`LayerGeometry`.
      a: ``[L, I, r]`` with ``L = prod(lead)`` and ``I = prod(in_shape)``.
      b: ``[L, r, O]`` with ``O = prod(out_shape)``.
      scale: the adapter's scale at this layer.
      dtype: the dtype the factors are stored in.
    """

    path: tuple
    lead: tuple
    in_shape: tuple
    out_shape: tuple
    a: np.ndarray
    b: np.ndarray
    scale: float
    dtype: np.dtype


def as_adapter(item, label: str = "adapter") -> Adapter:
    """An :class:`~lora_jax.config.Adapter` from an adapter value or a ``(LoraConfig, lora_params)`` pair.

    An adapter value is anything with ``.config`` and ``.lora_params``
    (``Adapter``, ``Combined``, ``PeftAdapter``); ``label`` names the argument
    in the error.

    >>> cfg = LoraConfig(rank=1)
    >>> as_adapter((cfg, {"q": {}})) == Adapter(cfg, {"q": {}})
    True
    """
    if isinstance(item, Adapter):
        return item
    if hasattr(item, "lora_params") and isinstance(getattr(item, "config", None), LoraConfig):
        return Adapter(item.config, item.lora_params)
    if isinstance(item, Sequence) and len(item) == 2 and isinstance(item[0], LoraConfig):
        return Adapter(*item)
    raise TypeError(f"{label}: expected an Adapter(config, lora_params) or a (LoraConfig, lora_params) pair, "
                    f"got {type(item).__name__}")


def base_shapes(base_params):
    """The base params with each leaf as a ``jax.ShapeDtypeStruct``: all that the checks here read.

    >>> base_shapes({"q": {"kernel": np.zeros((3, 2), np.float32)}})["q"]["kernel"]
    ShapeDtypeStruct(shape=(3, 2), dtype=float32)
    """
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base_params)


def geometry(base_params, adapter: Adapter, label: str = "adapter") -> Iterator[LayerGeometry]:
    """Yields each adapted layer's :class:`LayerGeometry`, checked against the base's shapes.

    Raises ``ValueError`` naming ``label`` and the layer for an empty tree, a
    DoRA node, a layer missing from the base, or factors that do not fit it.

    >>> base = {"blk": {"kernel": np.zeros((2, 4, 3))}}   # 2 stacked layers
    >>> lora = {"blk": {"a": np.zeros((2, 4, 1)), "b": np.zeros((2, 1, 3))}}
    >>> [g[:5] for g in geometry(base, Adapter(LoraConfig(rank=1), lora))]
    [('blk', ('blk',), (2,), (4,), (3,))]
    """
    nodes = tree.adapter_nodes(adapter.lora_params)
    if not nodes:
        raise ValueError(f"{label}: the LoRA tree holds no adapters ({{'a', 'b'}} nodes)")
    for path, node in nodes.items():
        name = "/".join(path)
        if "m" in node:
            raise ValueError(f"{label}: layer {name!r} is a DoRA adapter (it has a magnitude 'm'); "
                             f"this operation works on plain LoRA adapters only")
        try:
            base_node = tree.get_path(base_params, path)
        except KeyError as err:
            raise ValueError(f"{label}: layer {name!r} is not in the base params "
                             f"(missing {err.args[0]!r})") from None
        w = base_node[tree.weight_name(base_node, path)]
        try:
            lead, in_shape, out_shape = split_shape(w.shape, node["a"].shape, node["b"].shape)
        except ValueError as err:
            raise ValueError(f"{label}: layer {name!r}: {err}") from None
        yield LayerGeometry(name, path, tuple(lead), tuple(in_shape), tuple(out_shape), node)


def layers(base_params, adapter: Adapter, label: str = "adapter") -> dict[str, LayerFactors]:
    """The adapter's layers as float64 ``[L, I, r]``/``[L, r, O]`` factors with their scales, by layer name.

    >>> lora = {"q": {"a": np.ones((3, 1)), "b": np.ones((1, 2))}}
    >>> q = layers({"q": {"kernel": np.zeros((3, 2))}}, Adapter(LoraConfig(rank=1, alpha=2), lora))["q"]
    >>> q.a.shape, q.b.shape, q.scale
    ((1, 3, 1), (1, 1, 2), 2.0)
    """
    out = {}
    for g in geometry(base_params, adapter, label):
        a, b = g.node["a"], g.node["b"]
        n_lead, r = math.prod(g.lead), a.shape[-1]
        a64 = np.asarray(a, np.float64).reshape(n_lead, math.prod(g.in_shape), r)
        b64 = np.asarray(b, np.float64).reshape(n_lead, r, math.prod(g.out_shape))
        out[g.name] = LayerFactors(g.path, g.lead, g.in_shape, g.out_shape, a64, b64,
                                   adapter.config.scaling(g.name, r), np.dtype(a.dtype))
    return out


def qr(a, b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(q_a, core, q_b)`` with ``a @ b == q_a @ core @ q_b^T``: thin QR of ``a`` and ``b^T``, per slice.

    ``q_a`` and ``q_b`` have orthonormal columns and ``core = R_a R_b^T`` is at
    most ``r x r``.

    >>> a, b = np.array([[3.0], [4.0]]), np.array([[1.0, 0.0, 0.0]])
    >>> q_a, core, q_b = qr(a, b)
    >>> np.allclose(q_a @ core @ q_b.T, a @ b), abs(core).tolist()
    (True, [[5.0]])
    """
    q_a, r_a = np.linalg.qr(a)
    q_b, r_b = np.linalg.qr(np.swapaxes(b, -1, -2))
    return q_a, r_a @ np.swapaxes(r_b, -1, -2), q_b


def svd(a, b, scale: float = 1.0, *, k: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(U, s, Vt)`` of ``scale * a @ b`` per slice of the leading axes, from the factors alone.

    Thin: ``U`` is ``[..., in, k]``, ``s`` ``[..., k]`` (largest first), ``Vt``
    ``[..., k, out]``, with ``k`` at most ``min(r, in, out)`` (all of them by
    default).

    >>> u, s, vt = svd(np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]), np.eye(2), 0.5)
    >>> s.tolist(), u.shape, vt.shape
    ([1.0, 0.5], (3, 2), (2, 2))
    """
    q_a, core, q_b = qr(scale * np.asarray(a, np.float64), np.asarray(b, np.float64))
    u, s, vt = np.linalg.svd(core)
    k = s.shape[-1] if k is None else min(k, s.shape[-1])
    return q_a @ u[..., :, :k], s[..., :k], vt[..., :k, :] @ np.swapaxes(q_b, -1, -2)


def singular_values(a, b, scale: float) -> np.ndarray:
    """The singular values of ``scale * a @ b``, largest first, with ``a`` and ``b`` flattened to 2-D.

    ``a`` is ``[..., in, r]`` (read as ``[prod(...) * in, r]``) and ``b``
    ``[r, ...]`` (read as ``[r, prod(...)]``).

    >>> a = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]); b = np.eye(2)
    >>> singular_values(a, b, 0.5).tolist()
    [1.0, 0.5]
    """
    a = np.asarray(a, np.float64).reshape(-1, np.shape(a)[-1])
    b = np.asarray(b, np.float64).reshape(np.shape(b)[0], -1)
    return np.linalg.svd(qr(a, b)[1], compute_uv=False) * abs(scale)


def truncated(a, b, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Factors of the best rank-``rank`` approximation of ``a @ b`` per slice (Eckart-Young), ``rank`` wide.

    The singular values are split evenly, ``sqrt(s)`` into each factor;
    columns beyond ``min(r, in, out)`` are zeros.

    >>> a2, b2 = truncated(np.array([[2.0, 0.0], [0.0, 1.0]]), np.eye(2), 3)
    >>> a2.shape, np.round(a2 @ b2, 12).tolist()
    ((2, 3), [[2.0, 0.0], [0.0, 1.0]])
    >>> a1, b1 = truncated(np.array([[2.0, 0.0], [0.0, 1.0]]), np.eye(2), 1)
    >>> np.round(a1 @ b1, 12).tolist()
    [[2.0, 0.0], [0.0, 0.0]]
    """
    u, s, vt = svd(a, b, k=rank)
    root = np.sqrt(s)
    a_out, b_out = u * root[..., None, :], root[..., :, None] * vt
    pad = rank - s.shape[-1]
    if pad:
        a_out = np.concatenate([a_out, np.zeros(a_out.shape[:-1] + (pad,))], -1)
        b_out = np.concatenate([b_out, np.zeros(b_out.shape[:-2] + (pad, b_out.shape[-1]))], -2)
    return a_out, b_out


def concat(terms: Sequence[tuple]) -> tuple[np.ndarray, np.ndarray]:
    """One pair ``(a, b)`` with ``a @ b == sum_i c_i a_i @ b_i``: ``[c_1 a_1, ...]`` and ``[b_1; ...]``.

    >>> a, b = concat([(2.0, np.ones((3, 1)), np.ones((1, 2))), (-1.0, np.ones((3, 2)), np.ones((2, 2)))])
    >>> a.shape, b.shape, (a @ b)[0].tolist()
    ((3, 3), (3, 2), [0.0, 0.0])
    """
    return np.concatenate([c * a for c, a, _ in terms], -1), np.concatenate([b for _, _, b in terms], -2)


def frobenius2(a, b) -> np.ndarray:
    """``||a @ b||_F^2`` per leading slice of ``[L, I, r]``/``[L, r, O]`` factors, from ``r x r`` Gram matrices.

    >>> frobenius2(np.ones((1, 3, 1)), np.ones((1, 1, 2))).tolist()
    [6.0]
    """
    return np.einsum("lrs,lrs->l", np.einsum("lir,lis->lrs", a, a), np.einsum("lro,lso->lrs", b, b))


def relative_error(a, b, terms: Sequence[tuple]) -> float:
    """``||a @ b - exact||_F / ||exact||_F`` with ``exact = sum_i c_i a_i @ b_i``, all ``[L, ...]`` factors.

    0.0 where ``exact`` and ``a @ b`` are both zero, ``inf`` where only ``exact`` is.

    >>> one = (np.ones((1, 2, 1)), np.ones((1, 1, 2)))
    >>> relative_error(*one, [(2.0, *one)]), relative_error(*one, [(1.0, *one)])
    (0.5, 0.0)
    """
    exact_a, exact_b = concat(terms)
    norm2 = float(frobenius2(exact_a, exact_b).sum())
    diff2 = float(frobenius2(np.concatenate([a, -exact_a], -1), np.concatenate([b, exact_b], -2)).sum())
    if norm2 == 0.0:
        return 0.0 if diff2 == 0.0 else math.inf
    return math.sqrt(max(diff2, 0.0) / norm2)


def measured_errors(lora_params, factors: Mapping[str, LayerFactors],
                    terms: Mapping[str, Sequence[tuple]]) -> dict[str, float]:
    """Per layer of ``factors``, :func:`relative_error` of ``lora_params``' (rounded) factors against its ``terms``.

    >>> lora = {"q": {"a": np.ones((2, 1), np.float32), "b": np.ones((1, 2), np.float32)}}
    >>> q = layers({"q": {"kernel": np.zeros((2, 2))}}, Adapter(LoraConfig(rank=1), lora))
    >>> measured_errors(lora, q, {"q": [(0.5, q["q"].a, q["q"].b)]})
    {'q': 1.0}
    """
    errors = {}
    for name, layer in factors.items():
        node = tree.get_path(lora_params, layer.path)
        a, b = (np.asarray(node[x], np.float64) for x in ("a", "b"))
        n_lead, r = layer.a.shape[0], a.shape[-1]
        errors[name] = relative_error(a.reshape(n_lead, -1, r), b.reshape(n_lead, r, -1), terms[name])
    return errors


def scale_one_config(ranks: Mapping[str, int]) -> LoraConfig:
    """A config with ``alpha == rank`` at every layer of ``ranks`` (scale 1), targeting exactly them.

    >>> cfg = scale_one_config({"q": 4, "v": 4, "o": 2})
    >>> cfg.rank, [cfg.scaling(name) for name in ("q", "v", "o")]
    (4, [1.0, 1.0, 1.0])
    """
    # Sorted, so that the config does not depend on the trees' key order (jit sorts dict keys too).
    names = sorted(ranks)
    counts = collections.Counter(ranks[name] for name in names)
    common = max(counts, key=lambda r: (counts[r], r))
    odd = tuple((f"re:{re.escape(name)}", ranks[name]) for name in names if ranks[name] != common)
    targets = ("re:(?:" + "|".join(re.escape(name) for name in names) + ")",)
    return LoraConfig(rank=common, alpha=common, targets=targets, rank_pattern=odd,
                      alpha_pattern=tuple((p, float(r)) for p, r in odd))


def to_tree(outputs: Mapping[str, tuple], factors: Mapping[str, LayerFactors], dtype, *, slots: int = 0) -> dict:
    """Float64 ``(a, b)`` per layer name, ``[L, (slots,) I, r]``/``[L, (slots,) r, O]``, as a LoRA tree in ``dtype``.

    Each layer is reshaped to its geometry in ``factors``: ``a`` to
    ``lead + (slots,) + in_shape + (r,)``, ``b`` to ``lead + (slots, r) + out_shape``
    (no slot axis when ``slots`` is 0).

    >>> lora = {"q": {"a": np.ones((3, 1)), "b": np.ones((1, 2))}}
    >>> q = layers({"q": {"kernel": np.zeros((3, 2))}}, Adapter(LoraConfig(rank=1), lora))
    >>> out = to_tree({"q": (q["q"].a, q["q"].b)}, q, np.float32)
    >>> out["q"]["a"].shape, out["q"]["b"].dtype
    ((3, 1), dtype('float32'))
    """
    out: dict = {}
    for name, (a, b) in outputs.items():
        g = factors[name]
        r, n = a.shape[-1], ((slots,) if slots else ())
        a = a.reshape(*g.lead, *n, *g.in_shape, r).astype(dtype)
        b = b.reshape(*g.lead, *n, r, *g.out_shape).astype(dtype)
        out = tree.set_path(out, g.path, {"a": jnp.asarray(a), "b": jnp.asarray(b)})
    return out

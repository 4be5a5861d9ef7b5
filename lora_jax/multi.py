"""Several adapters for one base: exact combination, named sets, stacks for mixed batches.

Every function here works on the trees alone (no front end). The math of a
combination runs on the small factors in float64 NumPy, layer by layer, and
the result is cast back to the adapters' dtype.

Scale convention of the adapters this module *returns*: their config has
``alpha == rank`` at every layer, so their scale is exactly 1 and the inputs'
weights and scales (``w_i * alpha_i / r_i``, or ``/ sqrt(r_i)`` for rsLoRA) are
carried by the factors. Because that config depends only on which layers are
adapted and at what rank, every combination with the same structure has the
same config, and a function jitted for one serves all of them without
recompiling. (Trained adapters keep the project convention: scale is never
folded into their stored factors.)
"""

from __future__ import annotations

import collections
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.config import LoraConfig
from lora_jax.core import split_shape
from lora_jax.tree import adapters as adapter_nodes
from lora_jax.tree import get_path, set_path, weight_name

METHODS = ("cat", "svd", "linear")


class Adapter(NamedTuple):
    """One adapter: its config and its LoRA tree (``{...path: {"a", "b"}}``)."""

    config: LoraConfig
    lora: Mapping


class Combined(NamedTuple):
    """The result of :func:`combine`.

    Attributes:
      config, lora: the combined adapter (scale 1 at every layer).
      errors: per layer name, ``||delta - exact||_F / ||exact||_F`` where
        ``exact = sum_i w_i * delta_i``, measured in float64 on the factors as
        returned (so it includes the final rounding to the adapters' dtype);
        0.0 where the exact delta is zero and so is the result.
    """

    config: LoraConfig
    lora: dict
    errors: dict

    @property
    def adapter(self) -> Adapter:
        return Adapter(self.config, self.lora)


class _Layer(NamedTuple):
    path: tuple
    lead: tuple
    in_shape: tuple
    out_shape: tuple
    a: np.ndarray  # [L, I, r] float64, L = prod(lead), I = prod(in_shape)
    b: np.ndarray  # [L, r, O]
    scale: float
    dtype: np.dtype


def _base_shapes(base_params):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base_params)


def _as_adapter(item, label: str) -> Adapter:
    if isinstance(item, Adapter):
        return item
    if isinstance(item, Sequence) and len(item) == 2 and isinstance(item[0], LoraConfig):
        return Adapter(*item)
    raise TypeError(f"{label}: expected an Adapter(config, lora) or a (LoraConfig, lora) pair, "
                    f"got {type(item).__name__}")


def _geometry(base, adapter: Adapter, label: str):
    """Yields ``(name, path, lead, in_shape, out_shape, node)`` per layer, checked against the base shapes."""
    nodes = adapter_nodes(adapter.lora)
    if not nodes:
        raise ValueError(f"{label}: the LoRA tree holds no adapters ({{'a', 'b'}} nodes)")
    for path, node in nodes.items():
        name = "/".join(path)
        if "m" in node:
            raise ValueError(f"{label}: layer {name!r} is a DoRA adapter (it has a magnitude 'm'); "
                             f"this operation works on plain LoRA adapters only")
        try:
            base_node = get_path(base, path)
        except KeyError as err:
            raise ValueError(f"{label}: layer {name!r} is not in the base params "
                             f"(missing {err.args[0]!r})") from None
        w = base_node[weight_name(base_node, path)]
        try:
            lead, in_shape, out_shape = split_shape(w.shape, node["a"].shape, node["b"].shape)
        except ValueError as err:
            raise ValueError(f"{label}: layer {name!r}: {err}") from None
        yield name, path, tuple(lead), tuple(in_shape), tuple(out_shape), node


def _layers(base, adapter: Adapter, label: str) -> dict[str, _Layer]:
    """The adapter's layers as float64 ``[L, I, r]``/``[L, r, O]`` factors with their scales."""
    out = {}
    for name, path, lead, in_shape, out_shape, node in _geometry(base, adapter, label):
        a, b = node["a"], node["b"]
        n_lead, r = math.prod(lead), a.shape[-1]
        a64 = np.asarray(a, np.float64).reshape(n_lead, math.prod(in_shape), r)
        b64 = np.asarray(b, np.float64).reshape(n_lead, r, math.prod(out_shape))
        out[name] = _Layer(path, lead, in_shape, out_shape, a64, b64,
                           adapter.config.scaling(name, r), np.dtype(a.dtype))
    return out


def _check_weights(weights, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    weights = list(weights)
    if len(weights) != n:
        raise ValueError(f"combine: {len(weights)} weights for {n} adapters")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"combine: weights[{i}] must be a finite number, got {w!r}")
    return [float(w) for w in weights]


def _scale_one_config(ranks: Mapping[str, int]) -> LoraConfig:
    """A config with ``alpha == rank`` at every layer of ``ranks`` (scale 1), targeting exactly them."""
    # Sorted, so that the config does not depend on the trees' key order (jit sorts dict keys too).
    names = sorted(ranks)
    counts = collections.Counter(ranks[name] for name in names)
    common = max(counts, key=lambda r: (counts[r], r))
    odd = tuple((f"re:{re.escape(name)}", ranks[name]) for name in names if ranks[name] != common)
    targets = ("re:(?:" + "|".join(re.escape(name) for name in names) + ")",)
    return LoraConfig(rank=common, alpha=common, targets=targets, rank_pattern=odd,
                      alpha_pattern=tuple((p, float(r)) for p, r in odd))


def _to_tree(outputs: Mapping[str, tuple], geometry: Mapping[str, _Layer], dtype, *, slots: int = 0) -> dict:
    """Float64 ``(a, b)`` per layer (``[L, (n,) I, r]``, ``[L, (n,) r, O]``) -> a LoRA tree in ``dtype``."""
    tree: dict = {}
    for name, (a, b) in outputs.items():
        g = geometry[name]
        r, n = a.shape[-1], ((slots,) if slots else ())
        a = a.reshape(*g.lead, *n, *g.in_shape, r).astype(dtype)
        b = b.reshape(*g.lead, *n, r, *g.out_shape).astype(dtype)
        tree = set_path(tree, g.path, {"a": jnp.asarray(a), "b": jnp.asarray(b)})
    return tree


def _fro2(a, b) -> np.ndarray:
    """``||a @ b||_F^2`` per leading slice, from the ``r x r`` Gram matrices."""
    return np.einsum("lrs,lrs->l", np.einsum("lir,lis->lrs", a, a), np.einsum("lro,lso->lrs", b, b))


def _relative_error(a_out, b_out, terms) -> float:
    exact_a = np.concatenate([c * t.a for c, t in terms], axis=-1)
    exact_b = np.concatenate([t.b for _, t in terms], axis=-2)
    norm2 = float(_fro2(exact_a, exact_b).sum())
    diff2 = float(_fro2(np.concatenate([a_out, -exact_a], -1), np.concatenate([b_out, exact_b], -2)).sum())
    if norm2 == 0.0:
        return 0.0 if diff2 == 0.0 else math.inf
    return math.sqrt(max(diff2, 0.0) / norm2)


def _measured_errors(lora, geometry: Mapping[str, _Layer], terms: Mapping[str, list]) -> dict[str, float]:
    """Per layer, the relative error of the returned (rounded) factors against ``sum c_i A_i B_i``."""
    errors = {}
    for name, g in geometry.items():
        node = get_path(lora, g.path)
        a, b = (np.asarray(node[x], np.float64) for x in ("a", "b"))
        n_lead, r = g.a.shape[0], a.shape[-1]
        errors[name] = _relative_error(a.reshape(n_lead, -1, r), b.reshape(n_lead, r, -1), terms[name])
    return errors


# ---- the three methods, on one layer. ``terms`` are ``(c_i, layer_i)`` with ``c_i = w_i * scale_i``
# for the adapters present at the layer.

def _cat(entries, n_lead: int, n_in: int, n_out: int):
    """Exact: ``[c_1 A_1, ..., c_n A_n]`` and ``[B_1; ...; B_n]``.

    ``entries`` holds ``(c_i, layer_i or None, rank_i)`` for every adapter; an
    absent one adds a zero block of its rank.
    """
    a_parts, b_parts = [], []
    for c, layer, rank in entries:
        if layer is None:
            a_parts.append(np.zeros((n_lead, n_in, rank)))
            b_parts.append(np.zeros((n_lead, rank, n_out)))
        else:
            a_parts.append(c * layer.a)
            b_parts.append(layer.b)
    return np.concatenate(a_parts, -1), np.concatenate(b_parts, -2)


def _svd(terms, rank: int):
    """The best rank-``rank`` approximation of ``sum c_i A_i B_i``, via QR of the factors."""
    a = np.concatenate([c * t.a for c, t in terms], -1)
    b = np.concatenate([t.b for _, t in terms], -2)
    qa, ra = np.linalg.qr(a)
    qb, rb = np.linalg.qr(np.swapaxes(b, -1, -2))
    u, s, vt = np.linalg.svd(ra @ np.swapaxes(rb, -1, -2))
    k = min(rank, s.shape[-1])
    root = np.sqrt(s[:, :k])
    a_out = (qa @ u[:, :, :k]) * root[:, None, :]
    b_out = root[:, :, None] * (vt[:, :k, :] @ np.swapaxes(qb, -1, -2))
    pad = rank - k
    if pad:
        a_out = np.concatenate([a_out, np.zeros(a_out.shape[:-1] + (pad,))], -1)
        b_out = np.concatenate([b_out, np.zeros((b_out.shape[0], pad, b_out.shape[-1]))], -2)
    return a_out, b_out


def _linear(terms, name: str):
    """PEFT's "linear": ``A = sum sign(c_i) sqrt|c_i| A_i``, ``B = sum sqrt|c_i| B_i`` (same ranks only)."""
    ranks = {t.a.shape[-1] for _, t in terms}
    if len(ranks) > 1:
        raise ValueError(f"combine(method='linear'): layer {name!r} has adapters of different ranks "
                         f"{sorted(ranks)}; 'linear' needs equal ranks (use 'cat' or 'svd')")
    a = sum(np.sign(c) * math.sqrt(abs(c)) * t.a for c, t in terms)
    b = sum(math.sqrt(abs(c)) * t.b for c, t in terms)
    return a, b


def _dtype_of(layer_sets) -> np.dtype:
    return jnp.result_type(*{t.dtype for layers in layer_sets for t in layers.values()})


def _union(layer_sets) -> dict[str, _Layer]:
    """One geometry per layer name across all adapters, in first-seen order."""
    geometry = {}
    for layers in layer_sets:
        for name, layer in layers.items():
            geometry.setdefault(name, layer)
    return geometry


def combine(adapters: Sequence, weights: Sequence[float] | None = None, *, base_params, method: str = "cat",
            rank: int | None = None) -> Combined:
    """One adapter whose delta is (or approximates) ``sum_i weights[i] * delta_i``.

    ``delta_i = scale_i * A_i @ B_i`` with each adapter's own scale (alpha,
    rank, rsLoRA, rank/alpha patterns all honoured). Adapters may target
    different layers: where one is absent, it contributes nothing.

    Methods:
      ``"cat"``: exact. A layer's rank is the sum of the adapters' ranks there
        (an absent adapter adds a zero block of the rank its config gives that
        layer, so uniform inputs give a uniform result).
      ``"svd"``: the best rank-``rank`` approximation (Eckart-Young, in the
        Frobenius norm) of the exact sum, computed from QR factors of the
        stacked factors without forming the dense delta. ``rank`` defaults to
        the largest input rank at each layer.
      ``"linear"``: PEFT's cheap mix, ``A = sum sign(c_i) sqrt|c_i| A_i`` and
        ``B = sum sqrt|c_i| B_i`` with ``c_i = w_i scale_i``, for adapters of
        equal rank. It is **not** the weighted sum of deltas: the product holds
        the cross terms ``A_i B_j``. It is exact for a single adapter;
        ``errors`` says how far off it is otherwise.

    Args:
      adapters: :class:`Adapter` values (or ``(config, lora)`` pairs).
      weights: one finite number per adapter (negative allowed); default all 1.
      base_params: the base model's params (arrays or ``jax.ShapeDtypeStruct``;
        only shapes are read), used to check every adapter against its layer.
      method: ``"cat"``, ``"svd"`` or ``"linear"``.
      rank: the target rank for ``"svd"`` (not accepted by the other methods).

    Returns:
      :class:`Combined` ``(config, lora, errors)``; its config has scale 1.

    >>> import jax.numpy as jnp
    >>> base = {"q": {"kernel": jnp.zeros((3, 2))}}
    >>> one = Adapter(LoraConfig(rank=1, alpha=2), {"q": {"a": jnp.ones((3, 1)), "b": jnp.ones((1, 2))}})
    >>> out = combine([one, one], [1.0, -0.5], base_params=base)
    >>> out.config.scaling("q", 2), out.lora["q"]["a"].shape, out.errors
    (1.0, (3, 2), {'q': 0.0})
    """
    if method not in METHODS:
        raise ValueError(f"combine: method must be one of {METHODS}, got {method!r}")
    if rank is not None and method != "svd":
        raise ValueError(f"combine: rank= applies to method='svd' only (method={method!r})")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1):
        raise ValueError(f"combine: rank must be a positive int, got {rank!r}")
    items = [_as_adapter(item, f"combine: adapters[{i}]") for i, item in enumerate(adapters)]
    if not items:
        raise ValueError("combine: no adapters given")
    weights = _check_weights(weights, len(items))
    base = _base_shapes(base_params)
    layer_sets = [_layers(base, item, f"combine: adapters[{i}]") for i, item in enumerate(items)]
    geometry = _union(layer_sets)
    outputs, all_terms = {}, {}
    for name, g in geometry.items():
        terms = [(w * layers[name].scale, layers[name]) for w, layers in zip(weights, layer_sets)
                 if name in layers]
        if method == "cat":
            entries = [(w * layers[name].scale if name in layers else 0.0, layers.get(name),
                        item.config.rank_for(name)) for w, item, layers in zip(weights, items, layer_sets)]
            outputs[name] = _cat(entries, g.a.shape[0], g.a.shape[1], g.b.shape[-1])
        elif method == "svd":
            outputs[name] = _svd(terms, rank or max(t.a.shape[-1] for _, t in terms))
        else:
            outputs[name] = _linear(terms, name)
        all_terms[name] = terms
    lora = _to_tree(outputs, geometry, _dtype_of(layer_sets))
    errors = _measured_errors(lora, geometry, all_terms)
    config = _scale_one_config({name: a.shape[-1] for name, (a, _) in outputs.items()})
    return Combined(config, lora, errors)


class Stacked(NamedTuple):
    """Adapters stacked on a new axis for mixed-adapter batches (see :func:`stack`).

    Attributes:
      config: scale 1 at every layer (each adapter's scale is in its slot).
      lora: the stacked tree: ``a`` is ``lead + (n,) + in + (r,)``, ``b`` is
        ``lead + (n, r) + out``, with ``lead`` the stacked-layer axes.
      names: the adapter of each slot, in order.
    """

    config: LoraConfig
    lora: dict
    names: tuple

    def ids(self, rows: Sequence[str | None]) -> np.ndarray:
        """``adapter_ids`` for a batch: each row's slot, ``-1`` for ``None`` (the base model).

        >>> Stacked(None, {}, ("formal", "casual")).ids(["casual", None, "formal"])
        array([ 1, -1,  0], dtype=int32)
        """
        index = {name: i for i, name in enumerate(self.names)}
        unknown = sorted({row for row in rows if row is not None and row not in index})
        if unknown:
            raise KeyError(f"adapters {unknown} are not in this stack (it holds {list(self.names)})")
        return np.asarray([-1 if row is None else index[row] for row in rows], np.int32)


def stack(adapters: Mapping[str, Adapter], *, base_params) -> Stacked:
    """Stacks named adapters slot by slot, for one forward over a batch whose rows use different adapters.

    At each layer adapted by any of them, slot ``i`` holds adapter ``i``'s
    factors with its scale carried by ``a``, zero-padded to the largest rank
    there; an adapter that does not adapt the layer gets zeros (it leaves the
    layer as the base). Pass the result to a front end's apply function with
    ``adapter_ids`` (``lora_apply(module, stacked.config)(base, stacked.lora,
    x, adapter_ids=stacked.ids(rows))``).

    >>> import jax.numpy as jnp
    >>> base = {"q": {"kernel": jnp.zeros((3, 2))}}
    >>> one = Adapter(LoraConfig(rank=1), {"q": {"a": jnp.ones((3, 1)), "b": jnp.ones((1, 2))}})
    >>> two = Adapter(LoraConfig(rank=2), {"q": {"a": jnp.ones((3, 2)), "b": jnp.ones((2, 2))}})
    >>> s = stack({"one": one, "two": two}, base_params=base)
    >>> s.names, s.lora["q"]["a"].shape, s.lora["q"]["b"].shape
    (('one', 'two'), (2, 3, 2), (2, 2, 2))
    """
    if not isinstance(adapters, Mapping) or not adapters:
        raise ValueError("stack: expected a non-empty mapping {name: Adapter}")
    items = {name: _as_adapter(item, f"stack: adapter {name!r}") for name, item in adapters.items()}
    base = _base_shapes(base_params)
    layer_sets = [_layers(base, item, f"stack: adapter {name!r}") for name, item in items.items()]
    geometry = _union(layer_sets)
    outputs = {}
    for name, g in geometry.items():
        rank = max(layers[name].a.shape[-1] if name in layers else item.config.rank_for(name)
                   for item, layers in zip(items.values(), layer_sets))
        n_lead, n_in, n_out = g.a.shape[0], g.a.shape[1], g.b.shape[-1]
        a = np.zeros((n_lead, len(items), n_in, rank))
        b = np.zeros((n_lead, len(items), rank, n_out))
        for slot, layers in enumerate(layer_sets):
            if name in layers:
                t = layers[name]
                r = t.a.shape[-1]
                a[:, slot, :, :r], b[:, slot, :r, :] = t.scale * t.a, t.b
        outputs[name] = (a, b)
    lora = _to_tree(outputs, geometry, _dtype_of(layer_sets), slots=len(items))
    config = _scale_one_config({name: a.shape[-1] for name, (a, _) in outputs.items()})
    return Stacked(config, lora, tuple(items))

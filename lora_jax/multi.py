"""Several adapters for one base: exact combination, named sets, stacks for mixed batches.

Every function here works on the trees alone (no front end). The math of a
combination runs on the small factors in float64 NumPy, layer by layer
(:mod:`lora_jax.factors`), and the result is cast back to the adapters' dtype.

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

import functools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from lora_jax import deprecation, factors
from lora_jax.config import Adapter, LoraConfig  # noqa: F401 - Adapter re-exported: lora_jax.multi.Adapter

METHODS = ("cat", "svd", "linear")


def old_order_shim(old: str, new: str) -> Callable[[Callable], Callable]:
    """Lets a ``base_params``-first function take its 0.1 argument order too, with a DeprecationWarning.

    A 0.1 call is told apart by type: its first argument is not the base but
    the adapters, with ``base_params=`` given as a keyword
    (``combine(adapters, base_params=base)``), or a ``LoraConfig``, which moves
    to ``config=`` (``pissa(config, base, lora)``). It warns
    ``"old is deprecated ...; use new"`` and is reordered.

    >>> @old_order_shim("f(x, *, base_params)", "f(base_params, x)")
    ... def f(base_params, x):
    ...     return base_params - x
    >>> f(5, 2)
    3
    """

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def shim(*args, **kwargs):
            config_first = bool(args) and isinstance(args[0], LoraConfig)
            if config_first or (args and "base_params" in kwargs):
                deprecation.warn(old, new)
                front = (kwargs.pop("base_params"),) if "base_params" in kwargs else ()
                if config_first:
                    args, kwargs = args[1:], {**kwargs, "config": args[0]}
                args = (*front, *args)
            return fn(*args, **kwargs)

        return shim

    return wrap


class Combined(NamedTuple):
    """The result of :func:`combine`.

    Attributes:
      config, lora_params: the combined adapter (scale 1 at every layer).
      errors: per layer name, ``||delta - exact||_F / ||exact||_F`` where
        ``exact = sum_i w_i * delta_i``, measured in float64 on the factors as
        returned (so it includes the final rounding to the adapters' dtype);
        0.0 where the exact delta is zero and so is the result.
    """

    config: LoraConfig
    lora_params: dict
    errors: dict

    lora = deprecation.renamed_attribute("Combined", "lora", "lora_params")

    @property
    def adapter(self) -> Adapter:
        return Adapter(self.config, self.lora_params)


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


# ---- the three methods, on one layer. ``terms`` are ``(c_i, a_i, b_i)`` with ``c_i = w_i * scale_i``
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


def _linear(terms, name: str):
    """PEFT's "linear": ``A = sum sign(c_i) sqrt|c_i| A_i``, ``B = sum sqrt|c_i| B_i`` (same ranks only)."""
    ranks = {a.shape[-1] for _, a, _ in terms}
    if len(ranks) > 1:
        raise ValueError(f"combine(method='linear'): layer {name!r} has adapters of different ranks "
                         f"{sorted(ranks)}; 'linear' needs equal ranks (use 'cat' or 'svd')")
    a = sum(np.sign(c) * math.sqrt(abs(c)) * a for c, a, _ in terms)
    b = sum(math.sqrt(abs(c)) * b for c, _, b in terms)
    return a, b


def _dtype_of(layer_sets) -> np.dtype:
    return jnp.result_type(*{t.dtype for layers in layer_sets for t in layers.values()})


def _union(layer_sets) -> dict[str, factors.LayerFactors]:
    """One geometry per layer name across all adapters, in first-seen order."""
    geometry = {}
    for layers in layer_sets:
        for name, layer in layers.items():
            geometry.setdefault(name, layer)
    return geometry


@old_order_shim("combine(adapters, weights, base_params=...)", "combine(base_params, adapters, weights)")
def combine(base_params, adapters: Sequence, weights: Sequence[float] | None = None, *, method: str = "cat",
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
      base_params: the base model's params (arrays or ``jax.ShapeDtypeStruct``;
        only shapes are read), used to check every adapter against its layer.
      adapters: :class:`Adapter` values (or ``(config, lora_params)`` pairs).
      weights: one finite number per adapter (negative allowed); default all 1.
      method: ``"cat"``, ``"svd"`` or ``"linear"``.
      rank: the target rank for ``"svd"`` (not accepted by the other methods).

    Returns:
      :class:`Combined` ``(config, lora_params, errors)``; its config has scale 1.

    >>> import jax.numpy as jnp
    >>> base = {"q": {"kernel": jnp.zeros((3, 2))}}
    >>> one = Adapter(LoraConfig(rank=1, alpha=2), {"q": {"a": jnp.ones((3, 1)), "b": jnp.ones((1, 2))}})
    >>> out = combine(base, [one, one], [1.0, -0.5])
    >>> out.config.scaling("q", 2), out.lora_params["q"]["a"].shape, out.errors
    (1.0, (3, 2), {'q': 0.0})
    """
    if method not in METHODS:
        raise ValueError(f"combine: method must be one of {METHODS}, got {method!r}")
    if rank is not None and method != "svd":
        raise ValueError(f"combine: rank= applies to method='svd' only (method={method!r})")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1):
        raise ValueError(f"combine: rank must be a positive int, got {rank!r}")
    items = [factors.as_adapter(item, f"combine: adapters[{i}]") for i, item in enumerate(adapters)]
    if not items:
        raise ValueError("combine: no adapters given")
    weights = _check_weights(weights, len(items))
    base = factors.base_shapes(base_params)
    layer_sets = [factors.layers(base, item, f"combine: adapters[{i}]") for i, item in enumerate(items)]
    geometry = _union(layer_sets)
    outputs, all_terms = {}, {}
    for name, g in geometry.items():
        terms = [(w * layers[name].scale, layers[name].a, layers[name].b) for w, layers in zip(weights, layer_sets)
                 if name in layers]
        if method == "cat":
            entries = [(w * layers[name].scale if name in layers else 0.0, layers.get(name),
                        item.config.rank_for(name)) for w, item, layers in zip(weights, items, layer_sets)]
            outputs[name] = _cat(entries, g.a.shape[0], g.a.shape[1], g.b.shape[-1])
        elif method == "svd":
            outputs[name] = factors.truncated(*factors.concat(terms), rank or max(a.shape[-1] for _, a, _ in terms))
        else:
            outputs[name] = _linear(terms, name)
        all_terms[name] = terms
    lora_params = factors.to_tree(outputs, geometry, _dtype_of(layer_sets))
    errors = factors.measured_errors(lora_params, geometry, all_terms)
    config = factors.scale_one_config({name: a.shape[-1] for name, (a, _) in outputs.items()})
    return Combined(config, lora_params, errors)


class Stacked(NamedTuple):
    """Adapters stacked on a new axis for mixed-adapter batches (see :func:`stack`).

    Attributes:
      config: scale 1 at every layer (each adapter's scale is in its slot).
      lora_params: the stacked tree: ``a`` is ``lead + (n,) + in + (r,)``, ``b`` is
        ``lead + (n, r) + out``, with ``lead`` the stacked-layer axes.
      names: the adapter of each slot, in order.
    """

    config: LoraConfig
    lora_params: dict
    names: tuple

    lora = deprecation.renamed_attribute("Stacked", "lora", "lora_params")

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


@old_order_shim("stack(adapters, base_params=...)", "stack(base_params, adapters)")
def stack(base_params, adapters: Mapping[str, Adapter]) -> Stacked:
    """Stacks named adapters slot by slot, for one forward over a batch whose rows use different adapters.

    At each layer adapted by any of them, slot ``i`` holds adapter ``i``'s
    factors with its scale carried by ``a``, zero-padded to the largest rank
    there; an adapter that does not adapt the layer gets zeros (it leaves the
    layer as the base). Pass the result to a front end's apply function with
    ``adapter_ids`` (``lora_apply(module, stacked.config)(base, stacked.lora_params,
    x, adapter_ids=stacked.ids(rows))``).

    >>> import jax.numpy as jnp
    >>> base = {"q": {"kernel": jnp.zeros((3, 2))}}
    >>> one = Adapter(LoraConfig(rank=1), {"q": {"a": jnp.ones((3, 1)), "b": jnp.ones((1, 2))}})
    >>> two = Adapter(LoraConfig(rank=2), {"q": {"a": jnp.ones((3, 2)), "b": jnp.ones((2, 2))}})
    >>> s = stack(base, {"one": one, "two": two})
    >>> s.names, s.lora_params["q"]["a"].shape, s.lora_params["q"]["b"].shape
    (('one', 'two'), (2, 3, 2), (2, 2, 2))
    """
    if not isinstance(adapters, Mapping) or not adapters:
        raise ValueError("stack: expected a non-empty mapping {name: Adapter}")
    items = {name: factors.as_adapter(item, f"stack: adapter {name!r}") for name, item in adapters.items()}
    base = factors.base_shapes(base_params)
    layer_sets = [factors.layers(base, item, f"stack: adapter {name!r}") for name, item in items.items()]
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
    lora_params = factors.to_tree(outputs, geometry, _dtype_of(layer_sets), slots=len(items))
    config = factors.scale_one_config({name: a.shape[-1] for name, (a, _) in outputs.items()})
    return Stacked(config, lora_params, tuple(items))

"""Whole-tree operations: find adapters, merge them into the base, unmerge, count.

A LoRA tree mirrors the base params tree; an *adapter node* is a dict holding
arrays ``"a"`` and ``"b"`` at the path of the layer it adapts. These functions
never import a front end: they work on the trees alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import jax
import numpy as np

from lora_jax import core
from lora_jax.config import LoraConfig

WEIGHT_NAMES = ("kernel", "embedding")


def is_adapter_node(node) -> bool:
    """Whether ``node`` is an adapter: a dict holding arrays ``"a"`` and ``"b"``."""
    return (isinstance(node, Mapping) and "a" in node and "b" in node
            and not isinstance(node["a"], Mapping) and not isinstance(node["b"], Mapping))


def adapters(lora_params) -> dict[tuple[str, ...], Mapping]:
    """``{path: {"a": ..., "b": ...}}`` for every adapter node, in tree order.

    >>> adapters({"blk": {"q": {"a": 1, "b": 2}}})
    {('blk', 'q'): {'a': 1, 'b': 2}}
    """
    found = {}

    def walk(node, path):
        if is_adapter_node(node):
            found[path] = node
        elif isinstance(node, Mapping):
            for key, child in node.items():
                walk(child, path + (str(key),))

    walk(lora_params, ())
    return found


def adapter_paths(lora_params) -> list[tuple[str, ...]]:
    """The paths of all adapter nodes."""
    return list(adapters(lora_params))


def get_path(tree, path):
    """``tree[path[0]][path[1]]...``; raises ``KeyError`` naming the missing path."""
    node = tree
    for i, key in enumerate(path):
        if not isinstance(node, Mapping) or key not in node:
            raise KeyError("/".join(path[:i + 1]))
        node = node[key]
    return node


def set_path(tree, path, value) -> dict:
    """A copy of ``tree`` with ``value`` at ``path``; only the dicts along the path are new.

    >>> set_path({"x": {"y": 1}}, ("x", "z"), 2)
    {'x': {'y': 1, 'z': 2}}
    """
    if not path:
        return value
    new = dict(tree) if isinstance(tree, Mapping) else {}
    new[path[0]] = set_path(new.get(path[0], {}), path[1:], value)
    return new


def weight_name(base_node, path) -> str:
    """The weight leaf (``"kernel"`` or ``"embedding"``) of the base layer at ``path``; raises if none."""
    for name in WEIGHT_NAMES:
        if isinstance(base_node, Mapping) and name in base_node:
            return name
    raise ValueError(f"layer {'/'.join(path)!r}: base params have no {' or '.join(WEIGHT_NAMES)} here "
                     f"(found {sorted(base_node) if isinstance(base_node, Mapping) else type(base_node).__name__})")


def adapted_layers(base_params, lora_params):
    """Yields ``(path, weight, base_node, adapter_node, (lead, in_shape, out_shape))`` per adapter, in tree order.

    ``weight`` is the key of the adapted weight in ``base_node`` and the
    shapes are :func:`lora_jax.core.split_shape` of it. Raises ``ValueError``
    naming the layer when an adapter has no layer in ``base_params`` or its
    factors do not fit the weight.

    >>> import jax.numpy as jnp
    >>> base = {"q": {"kernel": jnp.zeros((4, 3))}}
    >>> lora = {"q": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 3))}}
    >>> [(path, weight, split) for path, weight, _, _, split in adapted_layers(base, lora)]
    [(('q',), 'kernel', ((), (4,), (3,)))]
    """
    for path, node in adapters(lora_params).items():
        name = "/".join(path)
        try:
            base_node = get_path(base_params, path)
        except KeyError as err:
            raise ValueError(f"adapter {name!r} has no layer in base params (missing {err.args[0]!r})") from None
        weight = weight_name(base_node, path)
        try:
            split = core.split_shape(np.shape(base_node[weight]), np.shape(node["a"]), np.shape(node["b"]))
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from None
        yield path, weight, base_node, node, split


def is_quantized(weight) -> bool:
    """Whether a base weight is stored quantized (an object with ``dequantize()``, see :mod:`lora_jax.quant`)."""
    return callable(getattr(weight, "dequantize", None))


def check_dora(name: str, node, config: LoraConfig):
    """Raises unless the adapter node has a DoRA magnitude ``"m"`` exactly when ``config.use_dora``."""
    if ("m" in node) != config.use_dora:
        has = "has a DoRA magnitude 'm'" if "m" in node else "has no DoRA magnitude 'm'"
        raise ValueError(f"layer {name!r}: the adapter {has}, but LoraConfig.use_dora is {config.use_dora}")


def _fold(base_params, lora_params, config: LoraConfig, fn: Callable, what: str) -> dict:
    out = base_params
    for path, weight, base_node, node, _ in adapted_layers(base_params, lora_params):
        name, w, a = "/".join(path), base_node[weight], node["a"]
        if is_quantized(w):
            raise ValueError(f"layer {name!r}: the base weight is stored quantized; {what} into it must "
                             f"re-quantize, which rounds. Use lora_jax.quant.merge_quantized, which reports "
                             f"that rounding error")
        check_dora(name, node, config)
        scale = config.scaling(name, a.shape[-1])
        if "m" in node:
            if what != "merge":
                raise ValueError(
                    f"layer {name!r}: a DoRA merge cannot be undone from the merged weight alone (it keeps only "
                    f"the direction of W + s*A@B and the magnitude m, not the norm it divided by). Keep the "
                    f"base params, which merge never modifies, instead of unmerging")
            new = core.dora_merge_weight(w, a, node["b"], node["m"], scale)
        else:
            new = fn(w, a, node["b"], scale)
        out = set_path(out, path + (weight,), new)
    return out


def merge(base_params, lora_params, config: LoraConfig) -> dict:
    """Folds every adapter into its weight: ``W + scale * A @ B`` (float32, cast back).

    The result is a plain params tree for the unmodified module. DoRA adapters
    (``config.use_dora``) fold to ``m * V / ||V||`` with ``V = W + scale * A @ B``.

    >>> import jax.numpy as jnp
    >>> base = {"q": {"kernel": jnp.zeros((4, 3))}}
    >>> lora = {"q": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 3))}}
    >>> merge(base, lora, LoraConfig(rank=2, alpha=4))["q"]["kernel"][0]
    Array([4., 4., 4.], dtype=float32)
    """
    return _fold(base_params, lora_params, config, core.merge_weight, "merge")


def unmerge(merged_params, lora_params, config: LoraConfig) -> dict:
    """Inverse of :func:`merge`: ``W - scale * A @ B`` (float32, cast back).

    Exact up to one rounding of ``W + delta`` to the weight's dtype. DoRA
    merges cannot be undone from the merged tree (the norm they divided by is
    gone); this raises for them.

    >>> import jax.numpy as jnp
    >>> base = {"q": {"kernel": jnp.zeros((4, 3))}}
    >>> lora = {"q": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 3))}}
    >>> cfg = LoraConfig(rank=2)
    >>> unmerge(merge(base, lora, cfg), lora, cfg)["q"]["kernel"][0]
    Array([0., 0., 0.], dtype=float32)
    """
    return _fold(merged_params, lora_params, config, core.unmerge_weight, "unmerge")


def count_params(tree: Any) -> int:
    """The number of scalars in a pytree of arrays (or of ``jax.ShapeDtypeStruct``).

    >>> count_params({"a": np.zeros((3, 4)), "b": [np.zeros(5)]})
    17
    """
    return int(sum(np.prod(getattr(leaf, "shape", np.shape(leaf)), dtype=np.int64) for leaf in jax.tree.leaves(tree)))

"""Whole-tree operations: find adapters, merge them into the base, unmerge, count.

A LoRA tree mirrors the base params tree; an *adapter node* is a dict holding
arrays ``"a"`` and ``"b"`` at the path of the layer it adapts. These functions
never import a front end: they work on the trees alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterator

import jax
import numpy as np

from lora_jax import core, deprecation
from lora_jax.config import Adapter, LoraConfig
from lora_jax.core import is_quantized  # noqa: F401 - re-exported: lora_jax.tree.is_quantized
from lora_jax.kinds import WEIGHT_NAMES  # noqa: F401 - re-exported: the Flax layers' weight leaf names


def is_adapter_node(node) -> bool:
    """Whether ``node`` is an adapter: a dict holding arrays ``"a"`` and ``"b"``.

    >>> is_adapter_node({"a": 1, "b": 2}), is_adapter_node({"a": {"b": 1}, "b": 2})
    (True, False)
    """
    return (isinstance(node, Mapping) and "a" in node and "b" in node
            and not isinstance(node["a"], Mapping) and not isinstance(node["b"], Mapping))


def adapter_nodes(lora_params) -> dict[tuple[str, ...], Mapping]:
    """``{path: {"a": ..., "b": ...}}`` for every adapter node, in tree order.

    (Called ``adapters`` before 0.2; the old name warns. An :class:`Adapter` is
    a config and a whole tree; its nodes are what this returns.)

    >>> adapter_nodes({"blk": {"q": {"a": 1, "b": 2}}})
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
    """The paths of all adapter nodes.

    >>> adapter_paths({"blk": {"q": {"a": 1, "b": 2}, "k": {"a": 1, "b": 2}}})
    [('blk', 'q'), ('blk', 'k')]
    """
    return list(adapter_nodes(lora_params))


def get_path(tree, path):
    """``tree[path[0]][path[1]]...``; raises ``KeyError`` naming the missing path.

    >>> get_path({"x": {"y": 1}}, ("x", "y"))
    1
    """
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
    """The weight leaf (``"kernel"`` or ``"embedding"``) of the base layer at ``path``; raises if none.

    >>> weight_name({"embedding": 0}, ("embed",))
    'embedding'
    """
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
    for path, node in adapter_nodes(lora_params).items():
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


def check_dora(name: str, node, config: LoraConfig):
    """Raises unless the adapter node has a DoRA magnitude ``"m"`` exactly when ``config.use_dora``.

    >>> check_dora("q", {"a": 1, "b": 2}, LoraConfig(rank=1, use_dora=True))
    Traceback (most recent call last):
    ValueError: layer 'q': the adapter has no DoRA magnitude 'm', but LoraConfig.use_dora is True
    """
    if ("m" in node) != config.use_dora:
        has = "has a DoRA magnitude 'm'" if "m" in node else "has no DoRA magnitude 'm'"
        raise ValueError(f"layer {name!r}: the adapter {has}, but LoraConfig.use_dora is {config.use_dora}")


def layer_scale(name: str, node, config: LoraConfig) -> float:
    """The scale of the adapter node of layer ``name``, once its DoRA magnitude agrees with ``config``.

    >>> layer_scale("q", {"a": np.ones((4, 2)), "b": np.ones((2, 3))}, LoraConfig(rank=2, alpha=4))
    2.0
    """
    check_dora(name, node, config)
    return config.scaling(name, np.shape(node["a"])[-1])


def fold_layers(base_params, lora_params, config: LoraConfig, *, unmerge: bool = False,
                requantize: bool = False) -> Iterator[tuple[tuple[str, ...], core.Folded]]:
    """Yields ``(weight path, folded)`` per adapter, in tree order: :func:`lora_jax.core.fold` of each weight.

    One layer's float32 sum exists at a time. ``requantize`` re-quantizes
    weights stored quantized (else they raise); :func:`merge`, :func:`unmerge`
    and :func:`lora_jax.quant.merge_quantized` write the results back.

    >>> import jax.numpy as jnp
    >>> base = {"q": {"kernel": jnp.zeros((4, 3))}}
    >>> lora = {"q": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 3))}}
    >>> [(where, folded.weight[0]) for where, folded in fold_layers(base, lora, LoraConfig(rank=2))]
    [(('q', 'kernel'), Array([8., 8., 8.], dtype=float32))]
    """
    for path, weight, base_node, node, _ in adapted_layers(base_params, lora_params):
        name = "/".join(path)
        folded = core.fold(base_node[weight], node, layer_scale(name, node, config), unmerge=unmerge,
                           requantize=requantize, name=name)
        yield path + (weight,), folded


def _written(tree, folds) -> dict:
    for where, folded in folds:
        tree = set_path(tree, where, folded.weight)
    return tree


def merge(base_params, lora_params, config: LoraConfig | None = None) -> dict:
    """Folds every adapter into its weight: ``W + scale * A @ B`` (float32, cast back).

    The result is a plain params tree for the unmodified module. DoRA adapters
    (``config.use_dora``) fold to ``m * V / ||V||`` with ``V = W + scale * A @ B``.
    ``lora_params`` may be an :class:`~lora_jax.config.Adapter` value, with ``config`` omitted.

    >>> import jax.numpy as jnp
    >>> base = {"q": {"kernel": jnp.zeros((4, 3))}}
    >>> lora = {"q": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 3))}}
    >>> merge(base, lora, LoraConfig(rank=2, alpha=4))["q"]["kernel"][0]
    Array([4., 4., 4.], dtype=float32)
    """
    lora_params, config = Adapter.unpack(lora_params, config, where="merge")
    return _written(base_params, fold_layers(base_params, lora_params, config))


def unmerge(merged_params, lora_params, config: LoraConfig | None = None) -> dict:
    """Inverse of :func:`merge`: ``W - scale * A @ B`` (float32, cast back).

    Exact up to one rounding of ``W + delta`` to the weight's dtype. DoRA
    merges cannot be undone from the merged tree (the norm they divided by is
    gone); this raises for them. ``lora_params`` may be an adapter value, as in :func:`merge`.

    >>> import jax.numpy as jnp
    >>> base = {"q": {"kernel": jnp.zeros((4, 3))}}
    >>> lora = {"q": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 3))}}
    >>> cfg = LoraConfig(rank=2)
    >>> unmerge(merge(base, lora, cfg), lora, cfg)["q"]["kernel"][0]
    Array([0., 0., 0.], dtype=float32)
    """
    lora_params, config = Adapter.unpack(lora_params, config, where="unmerge")
    return _written(merged_params, fold_layers(merged_params, lora_params, config, unmerge=True))


def count_params(tree: Any) -> int:
    """The number of scalars in a pytree of arrays (or of ``jax.ShapeDtypeStruct``).

    >>> count_params({"a": np.zeros((3, 4)), "b": [np.zeros(5)]})
    17
    """
    return int(sum(np.prod(getattr(leaf, "shape", np.shape(leaf)), dtype=np.int64) for leaf in jax.tree.leaves(tree)))


__getattr__ = deprecation.module_getattr(__name__, {"adapters": (lambda: adapter_nodes, "lora_jax.tree.adapter_nodes")})

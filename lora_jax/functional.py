"""LoRA for any JAX function of a params pytree: plain dicts, haiku params, equinox modules.

``lora_apply_fn(fn, config)`` adapts ``fn(params, *args)`` by adding
``scale * A @ B`` to the targeted weight leaves *inside* the traced function.
That is the universal way, and its cost is stated plainly: it forms each
layer's dense delta in the forward pass and, under ``jax.grad``, a
weight-shaped gradient per adapted layer before reducing it to ``A`` and
``B``. The linen front end (:func:`lora_jax.lora_apply`) computes
``(x @ A) @ B`` factored and never forms either; use it where the model is a
linen module.

What is a weight: every floating leaf with at least two dimensions. Its last
two axes are the matrix, any axes before them are stacked layers (as
``nn.scan``/``jax.lax.scan`` over layers makes). ``layout`` says how the
matrix is used: ``"in_out"`` for ``x @ W`` (Flax, haiku: ``[in, out]``) or
``"out_in"`` for ``W @ x`` (PyTorch, equinox: ``[out, in]``); it may also be a
function of the layer name and the leaf. The factors always follow the
``in``/``out`` roles: ``a`` is ``lead + (in, r)``, ``b`` is ``lead + (r, out)``.

Layer names are the tree path joined by ``/`` with a trailing generic weight
name dropped (``kernel``, ``weight``, ``w``, ``embedding``), so
``{"attn": {"q_proj": {"kernel": W}}}`` is the layer ``attn/q_proj`` and
``LoraConfig`` targets, presets and patterns work as for linen. A leaf named
``embedding``, or in a layer whose name contains ``embed``, counts as an
embedding (the ``"embedding"`` preset; PEFT's embedding init). The output
head, which ``"all-linear"`` leaves out, is recognised by its name only
(``lm_head``, ``head``, ``classifier``, ``score``, ``logits``, ``output``):
unlike the linen front end, this one cannot see which layer's output the
function returns.
The LoRA tree is a nested dict keyed by those names.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import jax.numpy as jnp

from lora_jax import core, deprecation
from lora_jax.config import Adapter, LoraConfig
from lora_jax.kinds import WEIGHT_NAMES, init_adapter, is_head, layer_name
from lora_jax.targets import Layer, select
from lora_jax.tree import adapter_nodes, layer_scale, set_path

# The Flax layers' weight names (the kind table's, lora_jax.tree.WEIGHT_NAMES), and what other libraries call a
# layer's matrix in a plain params pytree: ``weight`` (PyTorch, equinox), ``w`` (haiku).
GENERIC_WEIGHT_NAMES = frozenset(WEIGHT_NAMES) | {"weight", "w"}
LAYOUTS = ("in_out", "out_in")
Layout = Union[str, Callable[[str, Any], str]]


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _layer_path(key_path) -> tuple[tuple[str, ...], str]:
    """``(layer path, weight name)``: the leaf's path with a generic weight name split off."""
    names = tuple(_key_name(k) for k in key_path)
    if names and names[-1].lower() in GENERIC_WEIGHT_NAMES:
        return names[:-1], names[-1]
    return names, ""


def _layout_of(layout: Layout, name: str, leaf) -> str:
    value = layout(name, leaf) if callable(layout) else layout
    if value not in LAYOUTS:
        raise ValueError(f"layout for {name!r} must be one of {LAYOUTS}, got {value!r}")
    return value


def _is_weight(leaf) -> bool:
    return hasattr(leaf, "shape") and len(leaf.shape) >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating)


def find_weights(params, *, layout: Layout = "in_out") -> list[Layer]:
    """The adaptable leaves of ``params`` as :class:`~lora_jax.targets.Layer` records, in tree order.

    >>> params = {"attn": {"q_proj": {"kernel": jnp.zeros((4, 6))}}, "norm": jnp.zeros(4)}
    >>> [(l.name, l.in_shape, l.out_shape) for l in find_weights(params)]
    [('attn/q_proj', (4,), (6,))]
    """
    layers, seen = [], {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if not _is_weight(leaf):
            continue
        path, weight = _layer_path(key_path)
        name = layer_name(path)
        if name in seen:
            raise ValueError(f"two weight leaves map to the layer name {name!r} ({seen[name]!r} and "
                             f"{weight!r}); rename one or target them by their full path")
        seen[name] = weight
        shape = tuple(leaf.shape)
        lead, (n_in, n_out) = shape[:-2], shape[-2:]
        if _layout_of(layout, name, leaf) == "out_in":
            n_in, n_out = n_out, n_in
        embed = weight.lower() == "embedding" or any("embed" in p.lower() for p in path)
        layers.append(Layer(path=path, kind="embed" if embed else "dense", lead=lead, in_shape=(n_in,),
                            out_shape=(n_out,), weight=weight, context=tuple(p.lower() for p in path[:-1]),
                            is_head=is_head("embed" if embed else "dense", path)))
    return layers


def init_lora_fn(base_params, config: LoraConfig, *, rng, layout: Layout = "in_out", dtype=jnp.float32) -> dict:
    """Creates the LoRA tree for the weight leaves of ``base_params`` that ``config`` targets.

    Same initialisation as the linen front end (PEFT's: A kaiming-uniform and
    B zero; for embeddings A zero and B normal), keyed per layer by
    ``fold_in(rng, crc32(name))``.

    >>> params = {"up": {"w": jnp.ones((4, 6))}, "down": {"w": jnp.ones((6, 4))}}
    >>> lora = init_lora_fn(params, LoraConfig(rank=2, targets="up"), rng=jax.random.key(0))
    >>> jax.tree.map(jnp.shape, lora)
    {'up': {'a': (4, 2), 'b': (2, 6)}}

    The order of 0.1, ``init_lora_fn(params, config, ...)``, still works until 0.3 and warns.
    """
    if isinstance(base_params, LoraConfig):
        deprecation.warn("init_lora_fn(params, config, ...)", "init_lora_fn(base_params, config, ...)")
        base_params, config = config, base_params
    config.require_plain("init_lora_fn")
    lora: dict = {}
    for layer in select(config, find_weights(base_params, layout=layout)):
        lora = set_path(lora, layer.path, init_adapter(rng, layer, config, dtype=dtype))
    return lora


def _fold(params, lora_params, config, layout: Layout, unmerge: bool = False):
    lora_params, config = Adapter.unpack(lora_params, config, where="unmerge_fn" if unmerge else "merge_fn")
    config.require_plain("lora_jax.functional")
    nodes = {layer_name(path): node for path, node in adapter_nodes(lora_params).items()}
    used = set()

    def leaf_fn(key_path, leaf):
        name = layer_name(_layer_path(key_path)[0])
        if name not in nodes or not _is_weight(leaf):
            return leaf
        used.add(name)
        scale = layer_scale(name, nodes[name], config)
        out_in = _layout_of(layout, name, leaf) == "out_in"
        return core.fold(leaf, nodes[name], scale, unmerge=unmerge, out_in=out_in, name=name).weight

    out = jax.tree_util.tree_map_with_path(leaf_fn, params)
    unused = sorted(set(nodes) - used)
    if unused:
        raise ValueError(f"adapters with no weight leaf in params: {unused} (layer names are tree paths "
                         f"with a trailing {sorted(GENERIC_WEIGHT_NAMES)} dropped)")
    return out


def merge_fn(base_params, lora_params, config: LoraConfig | None = None, *, layout: Layout = "in_out"):
    """``base_params`` with ``W + scale * A @ B`` at every adapted leaf (float32, cast back); same tree type.

    ``lora_params`` may be an :class:`~lora_jax.config.Adapter` value, with ``config`` omitted.

    >>> params = {"up": {"w": jnp.zeros((2, 3))}}
    >>> lora = {"up": {"a": jnp.ones((2, 1)), "b": jnp.ones((1, 3))}}
    >>> merge_fn(params, lora, LoraConfig(rank=1, alpha=2))["up"]["w"][0]
    Array([2., 2., 2.], dtype=float32)
    """
    return _fold(base_params, lora_params, config, layout)


def unmerge_fn(merged_params, lora_params, config: LoraConfig | None = None, *, layout: Layout = "in_out"):
    """Inverse of :func:`merge_fn`: ``W - scale * A @ B`` at every adapted leaf.

    >>> params = {"up": {"weight": jnp.zeros((3, 2))}}                  # PyTorch layout: [out, in]
    >>> lora = {"up": {"a": jnp.ones((2, 1)), "b": jnp.ones((1, 3))}}
    >>> unmerge_fn(params, lora, LoraConfig(rank=1, alpha=2), layout="out_in")["up"]["weight"][:, 0]
    Array([-2., -2., -2.], dtype=float32)
    """
    return _fold(merged_params, lora_params, config, layout, unmerge=True)


def lora_apply_fn(fn: Callable[..., Any], config: LoraConfig, *, layout: Layout = "in_out") -> Callable[..., Any]:
    """Makes ``apply(base_params, lora_params, *args, **kwargs) == fn(merge_fn(base_params, lora_params, config), *args, **kwargs)``.

    ``lora_params=None`` calls ``fn`` on ``base_params`` unchanged. The result composes
    with ``jax.jit``, ``jax.grad`` (differentiate ``lora_params``; ``base_params`` get no
    gradient unless you ask for one) and ``jax.vmap``. Cost: each adapted
    layer's delta is formed densely inside the function, and its gradient is
    weight-shaped before it reaches ``A`` and ``B``: memory and time like a
    full fine-tune's weight gradients for those layers, without the optimizer
    state. For linen modules, :func:`lora_jax.lora_apply` avoids both.

    >>> def mlp(p, x):
    ...     return jnp.tanh(x @ p["up"]["w"]) @ p["down"]["w"]
    >>> params = {"up": {"w": jnp.ones((4, 6)) / 4}, "down": {"w": jnp.ones((6, 2)) / 6}}
    >>> cfg = LoraConfig(rank=2, targets="re:.*")
    >>> lora = init_lora_fn(params, cfg, rng=jax.random.key(0))
    >>> apply = lora_apply_fn(mlp, cfg)
    >>> x = jnp.ones((3, 4))
    >>> bool(jnp.array_equal(apply(params, lora, x), mlp(params, x)))   # B = 0 at init
    True
    """
    config.require_plain("lora_apply_fn")

    def apply(base_params, lora_params, *args, **kwargs):
        if lora_params is None:
            return fn(base_params, *args, **kwargs)
        return fn(_fold(base_params, lora_params, config, layout), *args, **kwargs)

    return apply

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

import zlib
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp

from lora_jax import core
from lora_jax.config import LoraConfig
from lora_jax.targets import HEAD_NAMES, Layer, select
from lora_jax.tree import adapters, check_dora, set_path

GENERIC_WEIGHT_NAMES = frozenset({"kernel", "weight", "w", "embedding"})
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
        name = "/".join(path)
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
                            is_head=bool(path) and path[-1].lower() in HEAD_NAMES))
    return layers


def init_lora_fn(config: LoraConfig, params, *, rng, layout: Layout = "in_out", dtype=jnp.float32) -> dict:
    """Creates the LoRA tree for the weight leaves of ``params`` that ``config`` targets.

    Same initialisation as the linen front end (PEFT's: A kaiming-uniform and
    B zero; for embeddings A zero and B normal), keyed per layer by
    ``fold_in(rng, crc32(name))``.

    >>> params = {"up": {"w": jnp.ones((4, 6))}, "down": {"w": jnp.ones((6, 4))}}
    >>> lora = init_lora_fn(LoraConfig(rank=2, targets="up"), params, rng=jax.random.key(0))
    >>> jax.tree.map(jnp.shape, lora)
    {'up': {'a': (4, 2), 'b': (2, 6)}}
    """
    config.require_plain("init_lora_fn")
    lora: dict = {}
    for layer in select(config, find_weights(params, layout=layout)):
        key = jax.random.fold_in(rng, zlib.crc32(layer.name.encode()))
        a, b = core.init_factors(key, config.init, layer.kind, layer.lead, layer.in_shape, layer.out_shape,
                                 config.rank_for(layer.name), dtype)
        lora = set_path(lora, layer.path, {"a": a, "b": b})
    return lora


def _fold(params, lora, config: LoraConfig, layout: Layout, sign: float):
    config.require_plain("lora_jax.functional")
    nodes = {"/".join(path): node for path, node in adapters(lora).items()}
    used = set()

    def leaf_fn(key_path, leaf):
        path, _ = _layer_path(key_path)
        name = "/".join(path)
        if name not in nodes or not _is_weight(leaf):
            return leaf
        used.add(name)
        check_dora(name, nodes[name], config)
        a, b = nodes[name]["a"], nodes[name]["b"]
        out_in = _layout_of(layout, name, leaf) == "out_in"
        shape = tuple(leaf.shape)
        in_out_shape = shape[:-2] + (shape[-1], shape[-2]) if out_in else shape
        try:
            d = core.delta(a, b, sign * config.scaling(name, a.shape[-1]), in_out_shape)
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from None
        d = jnp.swapaxes(d, -1, -2) if out_in else d
        return (leaf.astype(jnp.float32) + d).astype(leaf.dtype)

    out = jax.tree_util.tree_map_with_path(leaf_fn, params)
    unused = sorted(set(nodes) - used)
    if unused:
        raise ValueError(f"adapters with no weight leaf in params: {unused} (layer names are tree paths "
                         f"with a trailing {sorted(GENERIC_WEIGHT_NAMES)} dropped)")
    return out


def merge_fn(params, lora, config: LoraConfig, *, layout: Layout = "in_out"):
    """``params`` with ``W + scale * A @ B`` at every adapted leaf (float32, cast back); same tree type.

    >>> params = {"up": {"w": jnp.zeros((2, 3))}}
    >>> lora = {"up": {"a": jnp.ones((2, 1)), "b": jnp.ones((1, 3))}}
    >>> merge_fn(params, lora, LoraConfig(rank=1, alpha=2))["up"]["w"][0]
    Array([2., 2., 2.], dtype=float32)
    """
    return _fold(params, lora, config, layout, 1.0)


def unmerge_fn(params, lora, config: LoraConfig, *, layout: Layout = "in_out"):
    """Inverse of :func:`merge_fn`: ``W - scale * A @ B`` at every adapted leaf."""
    return _fold(params, lora, config, layout, -1.0)


def lora_apply_fn(fn: Callable[..., Any], config: LoraConfig, *, layout: Layout = "in_out") -> Callable[..., Any]:
    """Makes ``apply(params, lora, *args, **kwargs) == fn(merge_fn(params, lora), *args, **kwargs)``.

    ``lora=None`` calls ``fn`` on ``params`` unchanged. The result composes
    with ``jax.jit``, ``jax.grad`` (differentiate ``lora``; ``params`` get no
    gradient unless you ask for one) and ``jax.vmap``. Cost: each adapted
    layer's delta is formed densely inside the function, and its gradient is
    weight-shaped before it reaches ``A`` and ``B``: memory and time like a
    full fine-tune's weight gradients for those layers, without the optimizer
    state. For linen modules, :func:`lora_jax.lora_apply` avoids both.

    >>> def mlp(p, x):
    ...     return jnp.tanh(x @ p["up"]["w"]) @ p["down"]["w"]
    >>> params = {"up": {"w": jnp.ones((4, 6)) / 4}, "down": {"w": jnp.ones((6, 2)) / 6}}
    >>> cfg = LoraConfig(rank=2, targets="re:.*")
    >>> lora = init_lora_fn(cfg, params, rng=jax.random.key(0))
    >>> apply = lora_apply_fn(mlp, cfg)
    >>> x = jnp.ones((3, 4))
    >>> bool(jnp.array_equal(apply(params, lora, x), mlp(params, x)))   # B = 0 at init
    True
    """
    config.require_plain("lora_apply_fn")

    def apply(params, lora, *args, **kwargs):
        if lora is None:
            return fn(params, *args, **kwargs)
        return fn(_fold(params, lora, config, layout, 1.0), *args, **kwargs)

    return apply

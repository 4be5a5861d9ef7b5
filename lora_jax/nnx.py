"""LoRA for ``flax.nnx`` modules: the adapters live inside the model as Variables.

:func:`attach` returns a copy of a model in which every targeted
``nnx.Linear``/``LinearGeneral``/``Einsum``/``Conv``/``Embed`` holds two
:class:`LoraParam` Variables, ``a`` (``in_shape + (r,)``) and ``b``
(``(r,) + out_shape``), and adds ``scale * (x @ a) @ b`` to its output (for
``Embed`` to both the lookup and ``attend``). Layouts, initialisation,
scaling and target selection are those of :mod:`lora_jax.linen`; the adapter
of the layer at ``layers/0/attn/query`` sits at ``layers/0/attn/query/a`` and
``.../b`` in ``nnx.state(model, LoraParam)``, and the base weights keep their
paths (``layers/0/attn/query/kernel``), so base checkpoints still load.

Training the adapters alone is a Variable filter away::

    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=LoraParam)
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, LoraParam))(model, batch)

``LoraParam`` is deliberately *not* an ``nnx.Param``: a ``nnx.Param`` filter
selects the base weights only, so no gradient or optimizer state is ever
computed for them by accident.

How a layer is adapted: its class is swapped, in the copy, for a subclass
created once per layer class (``LoraLinear`` for ``nnx.Linear``) whose
``__call__``/``attend`` add the low-rank term. The instance keeps its own
Variables and attributes, so shared layers and containers (``nnx.List``)
need no surgery, and the graph stays an ordinary NNX graph (split, merge,
``nnx.jit``, ``nnx.grad``, ``nnx.Optimizer``).

Stacked layers (built with ``nnx.vmap``, run with ``nnx.scan``) get adapters
stacked along the same leading axes: the weight's extra leading axes, compared
with the shape its layer attributes describe, are the stacking axes.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax import core, deprecation, kinds
from lora_jax.config import LoraConfig
from lora_jax.kinds import DROPOUT_RNG, layer_name
from lora_jax.targets import Layer, select


class LoraParam(nnx.Variable):
    """An adapter factor (``a`` or ``b``) of a layer. Not an ``nnx.Param`` (see the module docstring).

    >>> issubclass(LoraParam, nnx.Param)
    False
    """


# The first class in a layer's MRO that is listed decides its kind (lora_jax.kinds).
KINDS = kinds.table(dense=nnx.Linear, dense_general=nnx.LinearGeneral, einsum=nnx.Einsum, conv=nnx.Conv,
                    embed=nnx.Embed)
# One layer's weight shape, read off its attributes (a stacked weight has more axes in front); else kernel_shape.
_LAYER_SHAPE = {
    "dense": lambda layer: (layer.in_features, layer.out_features),
    "dense_general": lambda layer: (*layer.in_features, *layer.out_features),
    "embed": lambda layer: (layer.num_embeddings, layer.features),
}


def _kind_of(layer) -> kinds.Kind | None:
    return kinds.kind_of(KINDS, type(layer))


def _conv(layer, x, kernel):
    """The layer's own convolution with ``kernel``, without bias.

    ``nnx.Conv.__call__`` only reads attributes, so it runs on a stand-in
    carrying ``kernel``: the padding modes (CAUSAL, CIRCULAR ...) stay nnx's own code.
    """
    stand_in = types.SimpleNamespace(**{**vars(layer), "kernel": kernel, "bias": None, "use_bias": False,
                                        "out_features": kernel.shape[-1], "kernel_shape": kernel.shape})
    return nnx.Conv.__call__(stand_in, x)


def _view(layer, kind: kinds.Kind) -> kinds.View:
    """What the kinds read off an nnx layer."""
    batch = getattr(layer, "batch_axis", None)
    return kinds.View(
        weight_shape=tuple(_LAYER_SHAPE.get(kind.name, lambda l: l.kernel_shape)(layer)),
        axis=getattr(layer, "axis", -1), batch=f"LinearGeneral with batch_axis={dict(batch)!r}" if batch else "",
        einsum=getattr(layer, "einsum_str", None), groups=getattr(layer, "feature_group_count", 1),
        masked=getattr(layer, "mask", None) is not None,
        promote=lambda *arrays: layer.promote_dtype(arrays, dtype=layer.dtype),
        precision=getattr(layer, "precision", None), conv=functools.partial(_conv, layer))


# ---- adapted layer classes


def _adapter_term(layer, method: str, args, kwargs):
    kind = _kind_of(layer)
    a, b, view = layer.a[...], layer.b[...], _view(layer, kind)
    kinds.check_fit(layer.lora_path, kind.weight, getattr(layer, kind.weight).shape, a, b,
                    ((), *kind.shapes(view, args, kwargs)),
                    " (stacked adapters must be sliced by nnx.scan/nnx.vmap along with the weights)")
    drop = getattr(layer, "lora_dropout", None) if kind.dropout else None
    call = kinds.Call(view, args, kwargs, a, b, layer.lora_scale, layer.lora_impl, drop or (lambda x: x))
    return kind.terms[method](call)


def _adapted_method(base_method, name: str):
    def method(self, *args, **kwargs):
        y = base_method(self, *args, **kwargs)
        return y + _adapter_term(self, name, args, kwargs).astype(y.dtype)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = base_method.__doc__
    return method


_ADAPTED: dict[type, type] = {}
# What attach adds to a layer, and merge removes.
_ATTRS = ("a", "b", "lora_dropout", "lora_scale", "lora_impl", "lora_path")


def _adapted_class(cls: type) -> type:
    """``Lora<cls>``: ``cls`` whose kind methods add the adapter term; one class per ``cls``.

    One class per layer class keeps graphdefs, and so ``nnx.jit`` caches, stable.
    """
    if cls not in _ADAPTED:
        methods = {name: _adapted_method(getattr(cls, name), name) for name in kinds.kind_of(KINDS, cls).terms}
        _ADAPTED[cls] = type(f"Lora{cls.__name__}", (cls,),
                             {**methods, "__module__": __name__, "lora_base_class": cls})
    return _ADAPTED[cls]


def _is_adapted(layer) -> bool:
    return type(layer) in _ADAPTED.values()


# ---- discovery


def _record(path, layer, kind: kinds.Kind, modules: dict) -> Layer:
    # Like linen: the names of the enclosing modules and the class names of every ancestor.
    context = tuple(str(n).lower() for n in path[:-1]) + tuple(
        type(modules[path[:i]]).__name__.lower() for i in range(len(path)) if path[:i] in modules)
    record = kinds.describe(kind, _view(layer, kind), path, getattr(layer, kind.weight).shape, context=context)
    if _is_adapted(layer):
        return dataclasses.replace(record, unsupported="it already has an adapter (merge it first)")
    return record


def _find(model) -> list[tuple[Layer, Any]]:
    modules = dict(nnx.iter_modules(model))
    found = []
    for path, layer in modules.items():
        kind = _kind_of(layer)
        if kind is not None:
            found.append((_record(path, layer, kind, modules), layer))
    return found


def find_layers(model: nnx.Module) -> list[Layer]:
    """Every adaptable layer of an NNX model, as :class:`~lora_jax.targets.Layer` records.

    Paths are attribute paths joined by ``/`` (``layers/0/attn/query``). The
    model is not run: shapes come from the layers' attributes. So, unlike
    linen's ``find_layers``, the output head is recognised by name only
    (``lm_head``, ``head``, ``classifier``, ``score``, ``logits``, ``output``).

    >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> [(l.name, l.kind, l.in_shape, l.out_shape) for l in find_layers(model)]
    [('', 'dense', (4,), (3,))]
    """
    return [layer for layer, _ in _find(model)]


# ---- attach / merge / unmerge


def _keys(rngs):
    """``(init key, dropout stream or None)`` from an ``nnx.Rngs`` or a key."""
    if isinstance(rngs, nnx.Rngs):
        return rngs.params(), (rngs[DROPOUT_RNG] if DROPOUT_RNG in rngs else None)
    if isinstance(rngs, jax.Array):
        return rngs, None
    raise TypeError(f"rngs must be an nnx.Rngs or a jax.random key, got {type(rngs).__name__}")


def _adapt(model, config: LoraConfig, factors: Callable, *, dropout_rngs=None, impl="fast"):
    """A copy of ``model`` with ``(a, b) = factors(record)`` attached to each targeted layer."""
    if impl not in core.IMPLS:
        raise ValueError(f"impl must be one of {core.IMPLS}, got {impl!r}")
    config.require_plain("lora_jax.nnx")
    model = nnx.clone(model)  # new Variables over the same (immutable) arrays: no weight is copied
    found = _find(model)
    chosen = {layer.path for layer in select(config, [layer for layer, _ in found])}
    for record, layer in found:
        if record.path in chosen:
            _attach_one(layer, record, config, factors, impl, dropout_rngs)
    return model


def _attach_one(layer, record: Layer, config: LoraConfig, factors: Callable, impl, dropout_rngs):
    """Turns ``layer`` into its adapted class, holding ``(a, b) = factors(record)``."""
    clash = sorted(set(_ATTRS) & set(vars(layer)))
    if clash:
        raise ValueError(f"layer {record.name!r} already has attributes {clash}, which the adapter needs")
    a, b = factors(record)
    layer.a, layer.b = LoraParam(a), LoraParam(b)
    layer.lora_scale = config.scaling(record.name, a.shape[-1])
    layer.lora_impl, layer.lora_path = impl, record.name
    if config.dropout > 0 and dropout_rngs is not None and _kind_of(layer).dropout:
        if record.lead:
            raise NotImplementedError(f"layer {record.name!r}: adapter dropout on stacked layers "
                                      f"(nnx.vmap/nnx.scan) is not supported")
        layer.lora_dropout = nnx.Dropout(config.dropout, rng_collection=DROPOUT_RNG, rngs=dropout_rngs)
    # Bypasses nnx's __setattr__, which would record "__class__" as a graph attribute.
    object.__setattr__(layer, "__class__", _adapted_class(type(layer)))


def attach(model: nnx.Module, config: LoraConfig, *, rngs, dtype=jnp.float32,
           impl: core.Impl = "fast") -> nnx.Module:
    """A copy of ``model`` with a fresh adapter on every layer ``config`` targets.

    The input model is left as it is; the copy's Variables are new objects
    holding the same arrays (nothing is copied in memory). Each adapter is
    initialised as PEFT's (the output is unchanged until training moves it),
    with key ``fold_in(key, crc32(path))``, as :func:`lora_jax.linen.init_lora`.

    Args:
      model: an ``nnx.Module``.
      config: the adapter's config (targets, ranks, scaling, dropout, init).
      rngs: an ``nnx.Rngs`` (the init key is drawn from its ``params``
        stream; a ``"lora_dropout"`` stream, if present, drives adapter
        dropout) or a ``jax.random`` key (init only). Dropout, as in linen,
        is applied only with that stream, and not in ``model.eval()`` mode.
      dtype: the adapters' dtype (float32 by default, as PEFT upcasts).
      impl: ``"fast"`` (custom VJP on 2-D views) or ``"plain"`` (reference).

    Returns:
      The adapted model. ``nnx.state(model, LoraParam)`` holds the adapters,
      ``nnx.state(model, nnx.Param)`` the base weights, at their original paths.

    Raises:
      ValueError: a target that matches no layer, a rank larger than a layer,
        or a targeted layer that cannot take an adapter (the message names it).

    >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> lora = attach(model, LoraConfig(rank=2, targets="re:.*"), rngs=jax.random.key(1))
    >>> jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(lora, LoraParam)))
    {'a': (4, 2), 'b': (2, 3)}
    >>> x = jnp.ones((1, 4))
    >>> bool(jnp.array_equal(lora(x), model(x)))
    True
    """
    key, stream = _keys(rngs)

    def fresh(record):
        node = kinds.init_adapter(key, record, config, dtype=dtype)
        return node["a"], node["b"]

    return _adapt(model, config, fresh, dropout_rngs=stream, impl=impl)


def _adapted_layers(model) -> list:
    return [layer for _, layer in nnx.iter_modules(model) if _is_adapted(layer)]


def _fold(layer, *, unmerge: bool = False):
    """Folds the layer's adapter into its weight (or out of it), in place."""
    w = getattr(layer, _kind_of(layer).weight)
    node = {"a": layer.a[...], "b": layer.b[...]}
    w.set_value(core.fold(w[...], node, layer.lora_scale, unmerge=unmerge, name=layer.lora_path).weight)


def merge(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with every adapter folded in: plain layers, ``W + scale * A @ B``.

    The sum is computed in float32 and cast back to the weight's dtype; the
    scale is the one the layer was adapted with. The result has the base
    model's classes and state paths (no ``a``/``b``), for zero-overhead inference.

    >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> lora = attach(model, LoraConfig(rank=2, targets="re:.*"), rngs=jax.random.key(1))
    >>> lora.b[...] = jnp.ones((2, 3))
    >>> merged = merge(lora)
    >>> type(merged).__name__, sorted(nnx.to_pure_dict(nnx.state(merged)))
    ('Linear', ['bias', 'kernel'])
    >>> x = jnp.ones((1, 4))
    >>> bool(jnp.allclose(merged(x), lora(x)))
    True
    """
    model = nnx.clone(model)
    for layer in _adapted_layers(model):
        _fold(layer)
        for name in _ATTRS:
            if name in vars(layer):
                delattr(layer, name)
        object.__setattr__(layer, "__class__", type(layer).lora_base_class)
    return model


def _flat(tree, prefix=()) -> dict[str, Any]:
    """``{"path/to/leaf": array}`` for a nested ``nnx.State`` or dict (int keys and their strings agree)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, prefix + (key,)))
        else:
            out[layer_name(prefix + (key,))] = value[...] if isinstance(value, nnx.Variable) else value
    return out


def unmerge(model: nnx.Module, lora_params=None, config: LoraConfig | None = None, *, impl: core.Impl = "fast",
            adapters=None) -> nnx.Module:
    """The inverse of :func:`merge`: re-attaches ``lora_params`` to a merged model, ``W - scale * A @ B``.

    Args:
      model: a plain (merged) model.
      lora_params: the adapters as ``nnx.state(adapted, LoraParam)``, or its pure dict.
      config: the config they were attached with; it must target exactly the
        layers ``lora_params`` holds.
      adapters: the 0.1 name of ``lora_params`` (warns; removed in 0.3).

    Returns:
      An adapted copy of ``model``. Exact up to one rounding of ``W + delta``
      to the weight's dtype. Adapter dropout is not restored (attach again
      for training with dropout).

    >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> cfg = LoraConfig(rank=2, targets="re:.*")
    >>> lora = attach(model, cfg, rngs=jax.random.key(1))
    >>> lora.b[...] = jnp.ones((2, 3))
    >>> back = unmerge(merge(lora), nnx.state(lora, LoraParam), cfg)
    >>> bool(jnp.allclose(back.kernel[...], model.kernel[...], atol=1e-6))
    True
    """
    if adapters is not None:
        deprecation.warn("lora_jax.nnx.unmerge(adapters=...)", "lora_jax.nnx.unmerge(model, lora_params, config)")
        lora_params = adapters
    if lora_params is None or config is None:
        raise TypeError("lora_jax.nnx.unmerge needs the model, its lora_params and their config")
    flat = _flat(lora_params)

    def given(record):
        keys = tuple(layer_name(record.path + (leaf,)) for leaf in ("a", "b"))
        if any(k not in flat for k in keys):
            raise ValueError(f"layer {record.name!r} is targeted by config but lora_params has no "
                             f"{' / '.join(k for k in keys if k not in flat)}")
        a, b = (jnp.asarray(flat.pop(k)) for k in keys)
        split = (record.lead, record.in_shape, record.out_shape)
        kinds.check_fit(record.name, record.weight, sum(split, ()), a, b, split)
        return a, b

    model = _adapt(model, config, given, impl=impl)
    if flat:
        raise ValueError(f"lora_params at paths that config does not target: {sorted(flat)}")
    for layer in _adapted_layers(model):
        _fold(layer, unmerge=True)
    return model

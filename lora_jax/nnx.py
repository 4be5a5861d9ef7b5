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
import types
import zlib
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax import core, terms
from lora_jax.config import LoraConfig
from lora_jax.targets import HEAD_NAMES, LINEAR_KINDS, Layer, select

DROPOUT_RNG = "lora_dropout"


class LoraParam(nnx.Variable):
    """An adapter factor (``a`` or ``b``) of a layer. Not an ``nnx.Param`` (see the module docstring).

    >>> issubclass(LoraParam, nnx.Param)
    False
    """


# ---- per-kind handlers: shapes(layer, args, kwargs) -> (in_shape, out_shape); term(call) -> array


@dataclasses.dataclass(frozen=True)
class _Call:
    """What a kind handler needs to compute one adapter term."""

    layer: Any
    args: tuple
    kwargs: dict
    a: jax.Array
    b: jax.Array
    scale: float
    impl: str
    drop: Callable

    def x(self, name="inputs"):
        return self.args[0] if self.args else self.kwargs[name]

    def promote(self, *arrays, **kwargs):
        return self.layer.promote_dtype(arrays, dtype=self.layer.dtype, **kwargs)

    def lowrank(self, x, a, b):
        return core.lowrank(x, a, b, self.scale, impl=self.impl, precision=getattr(self.layer, "precision", None))


def _linear_shapes(layer, args=(), kwargs=None):
    return (layer.in_features,), (layer.out_features,)


def _linear_term(c: _Call):
    return c.lowrank(*c.promote(c.drop(c.x()), c.a, c.b))


def _general_shapes(layer, args=(), kwargs=None):
    if layer.batch_axis:
        raise NotImplementedError(f"LinearGeneral with batch_axis={dict(layer.batch_axis)!r} is not supported")
    return tuple(layer.in_features), tuple(layer.out_features)


def _general_term(c: _Call):
    return terms.dense_general(c.drop(c.x()), c.a, c.b, c.layer.axis, c.lowrank, c.promote)


def _einsum_spec(layer, args=(), kwargs=None):
    spec = (kwargs or {}).get("einsum_str", args[1] if len(args) > 1 else None) or layer.einsum_str
    if spec is None:
        raise NotImplementedError("Einsum without an einsum_str is not supported")
    return terms.parse_einsum(spec)


def _einsum_shapes(layer, args=(), kwargs=None):
    return terms.einsum_shapes(*_einsum_spec(layer, args, kwargs), layer.kernel_shape)


def _einsum_term(c: _Call):
    x, a, b = c.promote(c.drop(c.x()), c.a, c.b)
    return terms.einsum(*_einsum_spec(c.layer, c.args, c.kwargs), x, a, b, c.lowrank, c.scale)


def _conv_shapes(layer, args=(), kwargs=None):
    if layer.feature_group_count != 1:
        raise NotImplementedError(f"Conv with feature_group_count={layer.feature_group_count} is not supported")
    if layer.mask is not None:
        raise NotImplementedError("Conv with a kernel mask is not supported")
    return tuple(layer.kernel_shape[:-1]), tuple(layer.kernel_shape[-1:])


def _conv_term(c: _Call):
    x, a, b = c.promote(c.drop(c.x()), c.a, c.b)
    # A is a convolution with the layer's own geometry (strides, padding, dilation)
    # and r output channels; B a 1x1 projection. nnx.Conv.__call__ only reads
    # attributes, so it runs on a stand-in carrying A as its kernel: the padding
    # modes (CAUSAL, CIRCULAR ...) stay nnx's own code.
    stand_in = types.SimpleNamespace(**{**vars(c.layer), "kernel": a, "bias": None, "use_bias": False,
                                        "out_features": a.shape[-1], "kernel_shape": a.shape})
    h = nnx.Conv.__call__(stand_in, x)
    return jnp.matmul(h * c.scale, b, precision=c.layer.precision)


def _embed_shapes(layer, args=(), kwargs=None):
    return (layer.num_embeddings,), (layer.features,)


def _embed_lookup_term(c: _Call):
    a, b = c.promote(c.a, c.b)
    return jnp.matmul(jnp.take(a, c.x(), axis=0) * c.scale, b)


def _embed_attend_term(c: _Call):
    # query @ (scale * A @ B).T == scale * (query @ B.T) @ A.T
    q, a, b = c.promote(c.x("query"), c.a, c.b)
    return c.lowrank(q, b.T, a.T)


@dataclasses.dataclass(frozen=True)
class _Kind:
    name: str
    weight: str
    shapes: Callable
    terms: dict
    dropout: bool = True  # PEFT applies no dropout to embedding adapters


# The first class in a layer's MRO that is listed decides its kind.
KINDS: dict[type, _Kind] = {
    nnx.Linear: _Kind("dense", "kernel", _linear_shapes, {"__call__": _linear_term}),
    nnx.LinearGeneral: _Kind("dense_general", "kernel", _general_shapes, {"__call__": _general_term}),
    nnx.Einsum: _Kind("einsum", "kernel", _einsum_shapes, {"__call__": _einsum_term}),
    nnx.Conv: _Kind("conv", "kernel", _conv_shapes, {"__call__": _conv_term}),
    nnx.Embed: _Kind("embed", "embedding", _embed_shapes,
                     {"__call__": _embed_lookup_term, "attend": _embed_attend_term}, dropout=False),
}


def _kind_of_cls(cls: type) -> _Kind | None:
    return next((KINDS[c] for c in cls.__mro__ if c in KINDS), None)


def _kind_of(layer) -> _Kind | None:
    return _kind_of_cls(type(layer))


# ---- adapted layer classes


def _adapter_term(layer, method: str, args, kwargs):
    kind = _kind_of(layer)
    a, b = layer.a[...], layer.b[...]
    in_shape, out_shape = kind.shapes(layer, args, kwargs)
    r = a.shape[-1]
    if tuple(a.shape) != (*in_shape, r) or tuple(b.shape) != (r, *out_shape):
        raise ValueError(f"layer {layer.lora_path!r}: adapter a{list(a.shape)}, b{list(b.shape)} does not fit "
                         f"its {kind.weight} (expected a {list(in_shape) + [r]}, b {[r] + list(out_shape)}); "
                         f"stacked adapters must be sliced by nnx.scan/nnx.vmap along with the weights")
    drop = getattr(layer, "lora_dropout", None) if kind.dropout else None
    call = _Call(layer, args, kwargs, a, b, layer.lora_scale, layer.lora_impl, drop or (lambda x: x))
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
        methods = {name: _adapted_method(getattr(cls, name), name) for name in _kind_of_cls(cls).terms}
        _ADAPTED[cls] = type(f"Lora{cls.__name__}", (cls,),
                             {**methods, "__module__": __name__, "lora_base_class": cls})
    return _ADAPTED[cls]


def _is_adapted(layer) -> bool:
    return type(layer) in _ADAPTED.values()


# ---- discovery


def _name(path) -> str:
    return "/".join(map(str, path))


def _record(path, layer, kind: _Kind, modules: dict) -> Layer:
    names = tuple(map(str, path))
    # Like linen: the names of the enclosing modules and the class names of every ancestor.
    context = tuple(n.lower() for n in names[:-1]) + tuple(
        type(modules[path[:i]]).__name__.lower() for i in range(len(path)) if path[:i] in modules)
    w_shape = tuple(getattr(layer, kind.weight).shape)
    unsupported, lead = "", ()
    try:
        in_shape, out_shape = kind.shapes(layer)
    except NotImplementedError as err:
        unsupported, in_shape, out_shape = str(err), w_shape, ()
    per_layer = tuple(in_shape) + tuple(out_shape)
    n_lead = len(w_shape) - len(per_layer)
    if not unsupported:
        if n_lead < 0 or w_shape[n_lead:] != per_layer:
            unsupported = f"its {kind.weight} {list(w_shape)} does not end with the layer's shape {list(per_layer)}"
        lead = w_shape[:max(n_lead, 0)]
    if _is_adapted(layer):
        unsupported = "it already has an adapter (merge it first)"
    head = kind.name in LINEAR_KINDS and bool(names) and names[-1].lower() in HEAD_NAMES
    return Layer(path=names, kind=kind.name, lead=tuple(lead), in_shape=tuple(in_shape),
                 out_shape=tuple(out_shape), weight=kind.weight, context=context, is_head=head,
                 unsupported=unsupported)


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
        if record.path not in chosen:
            continue
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
    return model


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
        layer_key = jax.random.fold_in(key, zlib.crc32(record.name.encode()))
        return core.init_factors(layer_key, config.init, record.kind, record.lead, record.in_shape,
                                 record.out_shape, config.rank_for(record.name), dtype)

    return _adapt(model, config, fresh, dropout_rngs=stream, impl=impl)


def _adapted_layers(model):
    return [(_name(path), layer) for path, layer in nnx.iter_modules(model) if _is_adapted(layer)]


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
    for _, layer in _adapted_layers(model):
        w = getattr(layer, _kind_of(layer).weight)
        w.set_value(core.merge_weight(w[...], layer.a[...], layer.b[...], layer.lora_scale))
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
            out[_name(prefix + (key,))] = value[...] if isinstance(value, nnx.Variable) else value
    return out


def unmerge(model: nnx.Module, adapters, config: LoraConfig, *, impl: core.Impl = "fast") -> nnx.Module:
    """The inverse of :func:`merge`: re-attaches ``adapters`` to a merged model, ``W - scale * A @ B``.

    Args:
      model: a plain (merged) model.
      adapters: the adapters as ``nnx.state(adapted, LoraParam)``, or its pure dict.
      config: the config they were attached with; it must target exactly the
        layers ``adapters`` holds.

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
    flat = _flat(adapters)

    def given(record):
        keys = tuple(_name(record.path + (leaf,)) for leaf in ("a", "b"))
        if any(k not in flat for k in keys):
            raise ValueError(f"layer {record.name!r} is targeted by config but adapters has no "
                             f"{' / '.join(k for k in keys if k not in flat)}")
        a, b = (jnp.asarray(flat.pop(k)) for k in keys)
        r = a.shape[-1]
        lead = tuple(record.lead)
        if a.shape != (*lead, *record.in_shape, r) or b.shape != (*lead, r, *record.out_shape):
            raise ValueError(f"layer {record.name!r}: adapter a{list(a.shape)}, b{list(b.shape)} does not fit "
                             f"its {record.weight} (expected a {list(lead + record.in_shape) + [r]}, "
                             f"b {list(lead) + [r] + list(record.out_shape)})")
        return a, b

    model = _adapt(model, config, given, impl=impl)
    if flat:
        raise ValueError(f"adapters at paths that config does not target: {sorted(flat)}")
    for _, layer in _adapted_layers(model):
        w = getattr(layer, _kind_of(layer).weight)
        w.set_value(core.unmerge_weight(w[...], layer.a[...], layer.b[...], layer.lora_scale))
    return model

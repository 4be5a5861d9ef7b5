"""The layer kinds LoRA adapts: one table for every front end (linen, nnx, functional).

A :class:`Kind` says how one layer's weight splits into input and output dims,
which adapter term each adapted method adds, whether the adapter's input gets
dropout, whether DoRA applies, and whether :mod:`lora_jax.quant` quantizes it by
default. It knows no Flax module. A front end finds its layers (a map from its
layer classes to kinds), reads what a kind needs off a layer into a
:class:`View` (one layer's weight shape, DenseGeneral axes, the einsum spec,
conv geometry) together with how to call it (promote to the layer's dtype,
precision, its own convolution with another kernel), and hands each call to
the kind's term as a :class:`Call`. The contraction plumbing the terms share is
in :mod:`lora_jax.contract`.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lora_jax import contract, core
from lora_jax.config import LoraConfig
from lora_jax.targets import HEAD_NAMES, LINEAR_KINDS, Layer

#: The rng stream (linen ``rngs`` key, nnx ``Rngs`` stream) that drives adapter dropout.
DROPOUT_RNG = "lora_dropout"


def layer_name(path) -> str:
    """A layer's name: its path joined by ``/``.

    >>> layer_name(("layers", 0, "attn"))
    'layers/0/attn'
    """
    return "/".join(map(str, path))


def _identity(x):
    return x


def _same(*arrays):
    return arrays


@dataclasses.dataclass(frozen=True)
class View:
    """What a front end reads off one layer, and how it calls it.

    Attributes:
      weight_shape: one layer's weight shape (without stacking axes).
      axis: DenseGeneral: the input axes it contracts (an int or a tuple).
      batch: DenseGeneral: its batch axes in words (``"DenseGeneral with batch_dims=(0,)"``), empty if none.
      einsum: Einsum: the layer's spec (a call may pass its own).
      groups, masked: Conv: ``feature_group_count``, and whether it has a kernel mask.
      promote: ``(*arrays) -> arrays`` in the layer's compute dtype.
      precision: the layer's matmul precision.
      conv: Conv: ``(x, kernel) -> y``, the layer's own convolution run with another kernel.
    """

    weight_shape: tuple
    axis: Any = -1
    batch: str = ""
    einsum: str | None = None
    groups: int = 1
    masked: bool = False
    promote: Callable = _same
    precision: Any = None
    conv: Callable | None = None


@dataclasses.dataclass(frozen=True)
class Call:
    """One call of an adapted layer: what a kind's term needs."""

    view: View
    args: tuple
    kwargs: Mapping
    a: Any
    b: Any
    scale: float
    impl: str = "fast"
    drop: Callable = _identity

    def x(self, name: str = "inputs"):
        """The call's input: its first argument, or the keyword ``name``."""
        return self.args[0] if self.args else self.kwargs[name]

    def lowrank(self, x, a, b):
        """``scale * (x @ a) @ b`` on ``[..., in]`` inputs, factored (:func:`lora_jax.core.lowrank`)."""
        return core.lowrank(x, a, b, self.scale, impl=self.impl, precision=self.view.precision)


# ---- per kind: shapes(view, args, kwargs) -> (in_shape, out_shape), NotImplementedError for a layer LoRA
# cannot adapt; term(call) -> the adapter's addition to the layer's output

def _axes(axis) -> tuple:
    return tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)


def _einsum_spec(view: View, args, kwargs) -> tuple[str, str, str]:
    spec = kwargs.get("einsum_str", args[1] if len(args) > 1 else None) or view.einsum
    if spec is None:
        raise NotImplementedError("Einsum without an einsum_str is not supported")
    return contract.parse_einsum(spec)


def _dense_shapes(view: View, args, kwargs):
    return view.weight_shape[:1], view.weight_shape[1:]


def _general_shapes(view: View, args, kwargs):
    if view.batch:
        raise NotImplementedError(f"{view.batch} is not supported")
    n_in = len(_axes(view.axis))
    return view.weight_shape[:n_in], view.weight_shape[n_in:]


def _einsum_shapes(view: View, args, kwargs):
    return contract.einsum_shapes(*_einsum_spec(view, args, kwargs), view.weight_shape)


def _conv_shapes(view: View, args, kwargs):
    if view.groups != 1:
        raise NotImplementedError(f"Conv with feature_group_count={view.groups} is not supported")
    if view.masked:
        raise NotImplementedError("Conv with a kernel mask is not supported")
    return view.weight_shape[:-1], view.weight_shape[-1:]


def _dense_term(c: Call):
    return c.lowrank(*c.view.promote(c.drop(c.x()), c.a, c.b))


def _general_term(c: Call):
    return contract.dense_general(c.drop(c.x()), c.a, c.b, _axes(c.view.axis), c.lowrank, c.view.promote)


def _einsum_term(c: Call):
    x, a, b = c.view.promote(c.drop(c.x()), c.a, c.b)
    return contract.einsum(*_einsum_spec(c.view, c.args, c.kwargs), x, a, b, c.lowrank, c.scale)


def _conv_term(c: Call):
    x, a, b = c.view.promote(c.drop(c.x()), c.a, c.b)
    # A is a convolution with the layer's own geometry (strides, padding, dilation)
    # and r output channels; B is a 1x1 projection to the outputs.
    return jnp.matmul(c.view.conv(x, a) * c.scale, b, precision=c.view.precision)


def _lookup_term(c: Call):
    a, b = c.view.promote(c.a, c.b)
    return jnp.matmul(jnp.take(a, c.x(), axis=0) * c.scale, b)


def _attend_term(c: Call):
    # query @ (scale * A @ B).T == scale * (query @ B.T) @ A.T
    q, a, b = c.view.promote(c.x("query"), c.a, c.b)
    return c.lowrank(q, b.T, a.T)


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of layer.

    Attributes:
      name: ``"dense"``, ``"dense_general"``, ``"einsum"``, ``"conv"`` or ``"embed"``.
      weight: the name of its weight leaf.
      shapes: ``(view, args, kwargs) -> (in_shape, out_shape)`` of one layer's weight.
      terms: the adapted methods, each to its term ``(call) -> array``.
      dropout: whether the adapter's input gets dropout (as PEFT: not on embeddings).
      dora: whether DoRA supports it.
      quantize: whether :func:`lora_jax.quant.quantize_base` quantizes it by default
        (QLoRA keeps embeddings in high precision).
    """

    name: str
    weight: str
    shapes: Callable
    terms: Mapping[str, Callable]
    dropout: bool = True
    dora: bool = False
    quantize: bool = True


KINDS: dict[str, Kind] = {kind.name: kind for kind in (
    Kind("dense", "kernel", _dense_shapes, {"__call__": _dense_term}, dora=True),
    Kind("dense_general", "kernel", _general_shapes, {"__call__": _general_term}, dora=True),
    Kind("einsum", "kernel", _einsum_shapes, {"__call__": _einsum_term}),
    Kind("conv", "kernel", _conv_shapes, {"__call__": _conv_term}),
    Kind("embed", "embedding", _dense_shapes, {"__call__": _lookup_term, "attend": _attend_term},
         dropout=False, quantize=False),
)}
#: The names of the Flax layers' weight leaves, in table order: ``("kernel", "embedding")``.
WEIGHT_NAMES = tuple(dict.fromkeys(kind.weight for kind in KINDS.values()))
DORA_KINDS = tuple(name for name, kind in KINDS.items() if kind.dora)
QUANTIZED_KINDS = tuple(name for name, kind in KINDS.items() if kind.quantize)


def table(**classes: type) -> dict[type, Kind]:
    """A front end's map from its layer classes to kinds, given as ``kind name=class`` for every kind.

    >>> class Linear: pass
    >>> table(dense=Linear)[Linear].name
    'dense'
    """
    unknown = sorted(set(classes) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown layer kinds {unknown}; the kinds are {list(KINDS)}")
    return {cls: KINDS[name] for name, cls in classes.items()}


def kind_of(classes: Mapping[type, Kind], cls: type) -> Kind | None:
    """The kind of a layer class: that of the first class in its MRO that ``classes`` lists.

    >>> class Base: pass
    >>> class Mine(Base): pass
    >>> kind_of({Base: KINDS["dense"]}, Mine).name, kind_of({Base: KINDS["dense"]}, int)
    ('dense', None)
    """
    return next((classes[c] for c in cls.__mro__ if c in classes), None)


def is_head(kind: str, path, returned: bool = False) -> bool:
    """Whether a layer is the output head: a linear layer the model's output comes from, or named like a head.

    >>> is_head("dense", ("lm_head",)), is_head("embed", ("lm_head",)), is_head("dense", ("up",), returned=True)
    (True, False, True)
    """
    named = bool(path) and str(path[-1]).lower() in HEAD_NAMES
    return kind in LINEAR_KINDS and (returned or named)


def describe(kind: Kind, view: View, path, stored_shape, *, context=(), args=(), kwargs=None) -> Layer:
    """The :class:`~lora_jax.targets.Layer` record of one layer.

    ``stored_shape`` is the weight as stored; axes in front of one layer's
    weight (``view.weight_shape``) are stacked layers. A layer the kind cannot
    adapt gets the reason in ``unsupported``.

    >>> layer = describe(KINDS["dense"], View((4, 3)), ("blocks", "up"), (2, 4, 3))
    >>> layer.name, layer.lead, layer.in_shape, layer.out_shape, layer.unsupported
    ('blocks/up', (2,), (4,), (3,), '')
    """
    one, stored, unsupported = tuple(view.weight_shape), tuple(stored_shape), ""
    try:
        in_shape, out_shape = kind.shapes(view, args, kwargs or {})
    except NotImplementedError as err:
        in_shape, out_shape, unsupported = one, (), str(err)
    n_lead = len(stored) - len(one)
    if not unsupported and (n_lead < 0 or stored[n_lead:] != one):
        unsupported = (f"its {kind.weight} {list(stored)} does not end with one layer's shape {list(one)} "
                       f"(stacked layers must be stacked along leading axes)")
    path = tuple(map(str, path))
    return Layer(path=path, kind=kind.name, lead=stored[:max(n_lead, 0)], in_shape=tuple(in_shape),
                 out_shape=tuple(out_shape), weight=kind.weight, context=tuple(context),
                 is_head=is_head(kind.name, path), unsupported=unsupported)


def check_fit(name: str, weight: str, w_shape, a, b, split, note: str = ""):
    """Raises unless ``a`` is ``lead + in_shape + [r]`` and ``b`` is ``lead + [r] + out_shape``.

    ``split`` is ``(lead, in_shape, out_shape)``; the message names the layer,
    its ``weight`` of shape ``w_shape``, and ends with ``note``.

    >>> check_fit("q", "kernel", (4, 3), jnp.ones((5, 2)), jnp.ones((2, 3)), ((), (4,), (3,)))
    Traceback (most recent call last):
    ValueError: layer 'q': adapter a[5, 2], b[2, 3] does not fit its kernel [4, 3]; expected a [4, 2], b [2, 3]
    """
    lead, in_shape, out_shape = (tuple(part) for part in split)
    r = a.shape[-1]
    want_a, want_b = (*lead, *in_shape, r), (*lead, r, *out_shape)
    if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
        raise ValueError(f"layer {name!r}: adapter a{list(a.shape)}, b{list(b.shape)} does not fit its {weight} "
                         f"{list(w_shape)}; expected a {list(want_a)}, b {list(want_b)}{note}")


def check_dora_kind(name: str, kind: str):
    """Raises unless DoRA supports layers of ``kind``.

    >>> check_dora_kind("emb", "embed")
    Traceback (most recent call last):
    ValueError: layer 'emb': DoRA is supported on Dense and DenseGeneral layers, not 'embed'; exclude this layer \
from LoraConfig.targets or set use_dora=False
    """
    if kind not in DORA_KINDS:
        raise ValueError(f"layer {name!r}: DoRA is supported on Dense and DenseGeneral layers, not {kind!r}; "
                         f"exclude this layer from LoraConfig.targets or set use_dora=False")


def init_adapter(rng, layer: Layer, config: LoraConfig, *, dtype=jnp.float32, weight=None) -> dict:
    """One layer's initial adapter node, as PEFT initialises it: the model's output is unchanged.

    Dense-like kinds get A kaiming-uniform and B zero, embeddings A zero and B
    normal (:func:`lora_jax.core.init_factors`). The key is
    ``fold_in(rng, crc32(layer.name))``, so a layer's initial value does not
    depend on which other layers are targeted. With ``config.use_dora`` the
    node also holds the magnitude ``m = ||W||`` per output feature, from the
    layer's ``weight`` (stored quantized or not).

    >>> layer = Layer(path=("q",), kind="dense", lead=(), in_shape=(4,), out_shape=(3,))
    >>> node = init_adapter(jax.random.key(0), layer, LoraConfig(rank=2))
    >>> jax.tree.map(jnp.shape, node), bool(jnp.all(node["b"] == 0))
    ({'a': (4, 2), 'b': (2, 3)}, True)
    """
    key = jax.random.fold_in(rng, zlib.crc32(layer.name.encode()))
    a, b = core.init_factors(key, config.init, layer.kind, layer.lead, layer.in_shape, layer.out_shape,
                             config.rank_for(layer.name), dtype)
    if not config.use_dora:
        return {"a": a, "b": b}
    check_dora_kind(layer.name, layer.kind)
    # With B = 0 the magnitude starts at ||W|| per output feature: the model is unchanged.
    return {"a": a, "b": b, "m": core.dora_norm(core.float_value(weight), a, b, 0.0).astype(dtype)}

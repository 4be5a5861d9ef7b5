"""LoRA for ``flax.linen`` modules, by method interception.

The adapters live in their own variable collection, ``"lora"``, whose tree
mirrors the ``"params"`` tree: the adapter of the layer at ``layers_0/attn/query``
is ``lora["layers_0"]["attn"]["query"] == {"a": ..., "b": ...}``. While the
adapted apply function runs, ``flax.linen.intercept_methods`` wraps every
``Dense``/``DenseGeneral``/``Einsum``/``Conv``/``Embed`` call: when the layer
has an adapter in the ``"lora"`` collection, the low-rank term is added to the
layer's output. Lifted transforms see the collection like any other:
``nn.scan``/``nn.vmap`` must map it along the layer axis
(``variable_axes={"params": 0, "lora": 0}``, or ``{True: 0}``).
"""

from __future__ import annotations

import contextlib
import threading
import zlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import dtypes as flax_dtypes

from lora_jax import core, terms
from lora_jax.config import LoraConfig
from lora_jax.targets import HEAD_NAMES, LINEAR_KINDS, Layer, select
from lora_jax.tree import adapter_paths, check_dora, get_path, is_quantized, set_path

COLLECTION = "lora"
DROPOUT_RNG = "lora_dropout"

_local = threading.local()


@contextlib.contextmanager
def _passthrough():
    """Module calls made while computing an adapter term are not intercepted."""
    _local.busy = getattr(_local, "busy", 0) + 1
    try:
        yield
    finally:
        _local.busy -= 1


def _promote(module, *arrays):
    promote = getattr(module, "promote_dtype", flax_dtypes.promote_dtype)
    return promote(*arrays, dtype=module.dtype)


def _first_arg(args, kwargs, name):
    return args[0] if args else kwargs[name]


class _Call:
    """What a kind handler needs to compute one adapter term."""

    def __init__(self, module, method, args, kwargs, a, b, scale, impl, drop):
        self.module, self.method, self.args, self.kwargs = module, method, args, kwargs
        self.a, self.b, self.scale, self.impl, self.drop = a, b, scale, impl, drop

    def lowrank(self, x, a, b):
        precision = getattr(self.module, "precision", None)
        return core.lowrank(x, a, b, self.scale, impl=self.impl, precision=precision)


# ---- per-kind handlers: shapes(module, weight_shape, args, kwargs) -> (in, out) and term(call)

def _dense_shapes(module, w_shape, args, kwargs):
    return w_shape[:1], w_shape[1:]


def _dense_term(c: _Call):
    x, a, b = _promote(c.module, c.drop(_first_arg(c.args, c.kwargs, "inputs")), c.a, c.b)
    return c.lowrank(x, a, b)


def _dense_general_axes(module, ndim):
    axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    return tuple(sorted(ax % ndim for ax in axis))


def _dense_general_shapes(module, w_shape, args, kwargs):
    if module.batch_dims not in ((), None):
        raise NotImplementedError(f"DenseGeneral with batch_dims={module.batch_dims!r} is not supported")
    x = _first_arg(args, kwargs, "inputs")
    n_axis = len(_dense_general_axes(module, x.ndim))
    return w_shape[:n_axis], w_shape[n_axis:]


def _dense_general_term(c: _Call):
    x = c.drop(_first_arg(c.args, c.kwargs, "inputs"))
    return terms.dense_general(x, c.a, c.b, _dense_general_axes(c.module, x.ndim), c.lowrank,
                               lambda *t: _promote(c.module, *t))


def _einsum_spec(module, args, kwargs):
    return terms.parse_einsum(kwargs.get("einsum_str", args[1] if len(args) > 1 else None) or module.einsum_str)


def _einsum_shapes(module, w_shape, args, kwargs):
    return terms.einsum_shapes(*_einsum_spec(module, args, kwargs), w_shape)


def _einsum_term(c: _Call):
    x, a, b = _promote(c.module, c.drop(_first_arg(c.args, c.kwargs, "inputs")), c.a, c.b)
    return terms.einsum(*_einsum_spec(c.module, c.args, c.kwargs), x, a, b, c.lowrank, c.scale)


def _conv_shapes(module, w_shape, args, kwargs):
    if module.feature_group_count != 1:
        raise NotImplementedError(f"Conv with feature_group_count={module.feature_group_count} is not supported")
    if module.mask is not None:
        raise NotImplementedError("Conv with a kernel mask is not supported")
    return w_shape[:-1], w_shape[-1:]


def _conv_term(c: _Call):
    x, a, b = _promote(c.module, c.drop(_first_arg(c.args, c.kwargs, "inputs")), c.a, c.b)
    # A is a convolution with the base layer's own geometry (strides, padding,
    # dilation) and r output channels; B is a 1x1 projection to the outputs.
    a_conv = c.module.clone(parent=None, features=a.shape[-1], use_bias=False)
    with _passthrough():
        h = a_conv.apply({"params": {"kernel": a}}, x)
    return jnp.matmul(h * c.scale, b, precision=c.module.precision)


def _embed_shapes(module, w_shape, args, kwargs):
    return w_shape[:1], w_shape[1:]


def _embed_lookup_term(c: _Call):
    a, b = _promote(c.module, c.a, c.b)
    h = jnp.take(a, _first_arg(c.args, c.kwargs, "inputs"), axis=0)
    return jnp.matmul(h * c.scale, b)


def _embed_attend_term(c: _Call):
    # query @ (scale * A @ B).T == scale * (query @ B.T) @ A.T
    q, a, b = _promote(c.module, _first_arg(c.args, c.kwargs, "query"), c.a, c.b)
    return c.lowrank(q, b.T, a.T)


class _Kind:
    def __init__(self, name, weight, shapes, **terms):
        self.name, self.weight, self.shapes, self.terms = name, weight, shapes, terms


# Order matters: the first class in a module's MRO that is listed decides its kind.
KINDS: dict[type, _Kind] = {
    nn.Dense: _Kind("dense", "kernel", _dense_shapes, __call__=_dense_term),
    nn.DenseGeneral: _Kind("dense_general", "kernel", _dense_general_shapes, __call__=_dense_general_term),
    nn.Einsum: _Kind("einsum", "kernel", _einsum_shapes, __call__=_einsum_term),
    nn.Conv: _Kind("conv", "kernel", _conv_shapes, __call__=_conv_term),
    nn.Embed: _Kind("embed", "embedding", _embed_shapes, __call__=_embed_lookup_term,
                    attend=_embed_attend_term),
}


def _kind_of(module) -> _Kind | None:
    for cls in type(module).__mro__:
        if cls in KINDS:
            return KINDS[cls]
    return None


def _handled(context) -> _Kind | None:
    if getattr(_local, "busy", 0):
        return None
    kind = _kind_of(context.module)
    return kind if kind is not None and context.method_name in kind.terms else None


def _name(path) -> str:
    return "/".join(path)


def _base_call(kind: _Kind, context, args, kwargs, next_fun):
    """The layer's own output. A quantized weight (any object with ``dequantize()``, as
    :mod:`lora_jax.quant` makes) is dequantized for this call only, inside the traced
    function, so only one layer's float weight exists at a time."""
    w = context.module.get_variable("params", kind.weight)
    if not is_quantized(w):
        return next_fun(*args, **kwargs)
    layer = context.module.clone(parent=None)
    others = {k: v for k, v in context.module.variables["params"].items() if k != kind.weight}

    # Under jax.checkpoint the backward pass dequantizes again instead of keeping every
    # layer's float weight as a residual, which would cost the float base's memory anyway.
    @jax.checkpoint
    def run(w, others):
        with _passthrough():
            return layer.apply({"params": {**others, kind.weight: w.dequantize()}}, *args,
                               method=context.method_name, **kwargs)

    return run(w, others)


def weight_value(module, kind: _Kind):
    """The float value of ``module``'s adapted weight (dequantized if it is stored quantized)."""
    w = module.get_variable("params", kind.weight)
    return w.dequantize() if is_quantized(w) else w


# ---- discovery

def _context(module) -> tuple[str, ...]:
    names = [p.lower() for p in module.path[:-1]]
    parent = module.parent
    while isinstance(parent, nn.Module):
        names.append(type(parent).__name__.lower())
        parent = parent.parent
    return tuple(names)


def _record(records, base_params, kind, module, args, kwargs, output):
    path = tuple(module.path)
    if path in records:
        return
    w_seen = module.get_variable("params", kind.weight).shape
    try:
        w_full = get_path(base_params, path + (kind.weight,)).shape
    except KeyError:
        raise ValueError(f"layer {_name(path)!r}: no '{kind.weight}' at this path of base_params") from None
    n_lead = len(w_full) - len(w_seen)
    unsupported = ""
    if n_lead < 0 or tuple(w_full[n_lead:]) != tuple(w_seen):
        unsupported = (f"its weight {list(w_full)} is stacked along a non-leading axis "
                       f"(one layer sees {list(w_seen)})")
    try:
        in_shape, out_shape = kind.shapes(module, tuple(w_seen), args, kwargs)
    except NotImplementedError as err:
        unsupported, in_shape, out_shape = str(err), tuple(w_seen), ()
    records[path] = (Layer(path=path, kind=kind.name, lead=tuple(w_full[:max(n_lead, 0)]),
                           in_shape=tuple(in_shape), out_shape=tuple(out_shape), weight=kind.weight,
                           context=_context(module), unsupported=unsupported), output)


def find_layers(module: nn.Module, base_params, *args, extra_variables=None, rngs=None, **kwargs) -> list[Layer]:
    """Every adaptable layer the module calls on ``args``, in call order.

    Runs ``module.apply`` abstractly (``jax.eval_shape``: no FLOPs, no memory).

    >>> import flax.linen as nn
    >>> model = nn.Dense(3)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    >>> [(l.name, l.kind, l.in_shape, l.out_shape) for l in find_layers(model, params, jnp.ones((1, 4)))]
    [('', 'dense', (4,), (3,))]
    """
    records: dict = {}

    def interceptor(next_fun, call_args, call_kwargs, context):
        kind = _handled(context)
        if kind is None:
            return next_fun(*call_args, **call_kwargs)
        out = _base_call(kind, context, call_args, call_kwargs, next_fun)
        _record(records, base_params, kind, context.module, call_args, call_kwargs, out)
        return out

    def run(params):
        with nn.intercept_methods(interceptor):
            out = module.apply({"params": params, **(extra_variables or {})}, *args, rngs=rngs, **kwargs)
        leaves = jax.tree.leaves(out)
        return [path for path, (_, o) in records.items() if any(o is leaf for leaf in leaves)]

    head_paths = set()
    jax.eval_shape(lambda p: head_paths.update(run(p)), base_params)
    layers = []
    for path, (layer, _) in records.items():
        head = layer.kind in LINEAR_KINDS and (path in head_paths or (path and path[-1].lower() in HEAD_NAMES))
        layers.append(layer if not head else Layer(**{**layer.__dict__, "is_head": True}))
    return layers


def init_lora(config: LoraConfig, module: nn.Module, base_params, *args, rng,
              dtype=jnp.float32, extra_variables=None, rngs=None, **kwargs) -> dict:
    """Creates the LoRA tree for the layers ``config`` targets.

    The module is traced abstractly on ``args``/``kwargs`` to find its layers.
    Adapters of stacked layers (``nn.scan``) get the stacking axes in front.
    Each layer's key is ``fold_in(rng, crc32(path))``, so an adapter's initial
    value does not depend on which other layers are targeted.

    Args:
      config: the adapter's hyper-parameters.
      module: the linen module; base_params: its ``"params"`` collection.
      *args, **kwargs: example inputs, as for ``module.apply``.
      rng: a ``jax.random`` key.
      dtype: the adapters' dtype (float32 by default, as PEFT upcasts).
      extra_variables: other collections the module needs (e.g. ``batch_stats``).
      rngs: rngs the module's own apply needs.

    Returns:
      ``{path...: {"a": [..., in, r], "b": [..., r, out]}}`` mirroring ``base_params``.

    >>> import flax.linen as nn
    >>> model = nn.Dense(6)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    >>> lora = init_lora(LoraConfig(rank=2, targets="re:.*"), model, params, jnp.ones((1, 4)),
    ...                  rng=jax.random.key(1))
    >>> jax.tree.map(jnp.shape, lora)
    {'a': (4, 2), 'b': (2, 6)}
    """
    layers = find_layers(module, base_params, *args, extra_variables=extra_variables, rngs=rngs, **kwargs)
    lora: dict = {}
    for layer in select(config, layers):
        key = jax.random.fold_in(rng, zlib.crc32(layer.name.encode()))
        a, b = core.init_factors(key, config.init, layer.kind, layer.lead, layer.in_shape,
                                 layer.out_shape, config.rank_for(layer.name), dtype)
        node = {"a": a, "b": b}
        if config.use_dora:
            _check_dora_kind(layer.name, layer.kind)
            w = get_path(base_params, layer.path + (layer.weight,))
            w = w.dequantize() if is_quantized(w) else w
            # With B = 0 the magnitude starts at ||W|| per output feature: the model is unchanged.
            node["m"] = core.dora_norm(w, a, b, 0.0).astype(dtype)
        lora = set_path(lora, layer.path, node)
    return lora


DORA_KINDS = ("dense", "dense_general")


def _check_dora_kind(name: str, kind: str):
    if kind not in DORA_KINDS:
        raise ValueError(f"layer {name!r}: DoRA is supported on Dense and DenseGeneral layers, not {kind!r}; "
                         f"exclude this layer from LoraConfig.targets or set use_dora=False")


# ---- the adapted apply

def _dropout(module, rate):
    if rate == 0.0 or not module.has_rng(DROPOUT_RNG):
        return lambda x: x
    key = module.make_rng(DROPOUT_RNG)

    def drop(x):
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))

    return drop


def _split_first(args, kwargs, name):
    """``(x, rebuild)``: the call's first input and a function giving ``(args, kwargs)`` with it replaced."""
    if args:
        return args[0], lambda x: ((x, *args[1:]), kwargs)
    return kwargs[name], lambda x: (args, {**kwargs, name: x})


def _mixed_term(term, c: _Call, ids, name: str):
    """Each row of the batch with its own slot of a stacked adapter (``ids[row]``; -1: none)."""
    x, rebuild = _split_first(c.args, c.kwargs, "query" if c.method == "attend" else "inputs")
    n = c.a.shape[0]
    if x.ndim == 0 or x.shape[0] != ids.shape[0]:
        raise ValueError(f"layer {name!r}: a mixed-adapter batch gives {ids.shape[0]} adapter_ids, but "
                         f"the layer's input has shape {list(x.shape)}; rows must be its leading axis")
    _check_range(ids, n, name)
    x = c.drop(x)
    valid = (ids >= 0) & (ids < n)
    slot = jnp.where(valid, ids, 0)
    a_rows, b_rows = jnp.take(c.a, slot, axis=0), jnp.take(c.b, slot, axis=0)

    def one_row(xr, ar, br):
        args, kwargs = rebuild(xr[None])
        return term(_Call(c.module, c.method, args, kwargs, ar, br, c.scale, c.impl, lambda v: v))[0]

    y = jax.vmap(one_row)(x, a_rows, b_rows)
    rows = (-1,) + (1,) * (y.ndim - 1)
    # Row -1 uses no adapter; an id outside [-1, n) poisons its row with NaN rather than
    # silently clamping (under jit the ids cannot be checked when traced).
    y = jnp.where((ids >= 0).reshape(rows), y, jnp.zeros((), y.dtype))
    return jnp.where((valid | (ids == -1)).reshape(rows), y, jnp.full((), jnp.nan, y.dtype))


def _adapter_term(config, impl, kind, context, args, kwargs, ids=None, lora=None):
    module = context.module
    a, b = (module.get_variable(COLLECTION, k) if lora is None else lora[k] for k in ("a", "b"))
    name = _name(module.path)
    w = module.get_variable("params", kind.weight)
    in_shape, out_shape = kind.shapes(module, tuple(w.shape), args, kwargs)
    slots = a.shape[:1] if ids is not None else ()
    r = a.shape[-1]
    if tuple(a.shape) != (*slots, *in_shape, r) or tuple(b.shape) != (*slots, r, *out_shape):
        stacked = "adapter_ids were given, so a stacked adapter [n, ...] is expected; " if slots else ""
        raise ValueError(f"layer {name!r}: adapter a{list(a.shape)}, b{list(b.shape)} does not fit its "
                         f"{kind.weight} {list(w.shape)}; {stacked}expected a {list(slots + in_shape) + [r]}, "
                         f"b {list(slots) + [r] + list(out_shape)} "
                         f"(stacked layers: is 'lora' mapped by nn.scan/nn.vmap?)")
    drop = _dropout(module, config.dropout) if kind.name != "embed" else (lambda x: x)
    call = _Call(module, context.method_name, args, kwargs, a, b, config.scaling(name, r), impl, drop)
    term = kind.terms[context.method_name]
    with _passthrough():
        return term(call) if ids is None else _mixed_term(term, call, ids, name)


def _dora_output(config, impl, kind, context, args, kwargs, y, ids):
    """DoRA: ``g * y + (1 - g) * bias + scale * (x @ A) @ (B * g)`` with ``g = m / ||W + s A B||``.

    This equals ``x @ (g * (W + s A B)) + bias`` while reusing the layer's own
    output ``y``: the base matmul is neither repeated forward nor backward (its
    gradient arrives scaled by ``g``), and ``g`` rides on ``B``'s columns, so
    the product stays factored. The norm is a constant for autodiff (PEFT and
    the paper's section 4.3 detach it).
    """
    module = context.module
    name = _name(module.path)
    check_dora(name, ("m",) if module.has_variable(COLLECTION, "m") else (), config)
    _check_dora_kind(name, kind.name)
    if ids is not None:
        raise ValueError(f"layer {name!r}: mixed-adapter batches (adapter_ids) do not support DoRA adapters")
    a, b, m = (module.get_variable(COLLECTION, k) for k in ("a", "b", "m"))
    w = weight_value(module, kind)
    _, _, out_shape = core.split_shape(w.shape, a.shape, b.shape)
    if tuple(m.shape) != tuple(out_shape):
        raise ValueError(f"layer {name!r}: DoRA magnitude m{list(m.shape)} does not fit the layer's "
                         f"output features {list(out_shape)}")
    scale = config.scaling(name, a.shape[-1])
    norm = jax.lax.stop_gradient(core.dora_norm(w, a, b, scale, impl=impl))
    g = m.astype(jnp.float32) / norm
    lift = lambda v, ndim: v.reshape((1,) * (ndim - v.ndim) + v.shape)
    base = lift(g, y.ndim) * y
    if module.has_variable("params", "bias"):
        base = base + lift((1.0 - g) * module.get_variable("params", "bias"), y.ndim)
    scaled = {"a": a, "b": b * lift(g, b.ndim).astype(b.dtype)}
    term = _adapter_term(config, impl, kind, context, args, kwargs, lora=scaled)
    return (base + term).astype(y.dtype)


def _check_ids(adapter_ids, lora_params):
    if lora_params is None:
        raise ValueError("adapter_ids need stacked adapters (lora_jax.multi.stack), but lora_params is None")
    ids = jnp.asarray(adapter_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"adapter_ids must be a 1-D integer array (one slot per row, -1 for none), "
                         f"got shape {list(ids.shape)} dtype {ids.dtype}")
    return ids


def _check_range(ids, n: int, name: str):
    """Raises for ids outside ``[-1, n)`` when they are concrete (under ``jit`` they are not)."""
    try:
        values = np.asarray(ids)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    bad = sorted({int(v) for v in values if not -1 <= v < n})
    if bad:
        raise ValueError(f"layer {name!r}: adapter_ids {bad} are out of range; the stacked adapter has "
                         f"{n} slots (0..{n - 1}), and -1 means no adapter")


def lora_apply(module: nn.Module, config: LoraConfig, *, impl: core.Impl = "fast",
               check_unused: bool = True) -> Callable[..., Any]:
    """Makes ``apply(base_params, lora_params, *args, **kwargs)`` for ``module`` with adapters.

    The returned function runs ``module.apply`` and adds ``scale * (x @ A) @ B``
    at every layer that has an adapter in ``lora_params``. ``lora_params=None``
    runs the base model. It composes with ``jax.jit``, ``jax.grad``,
    ``jax.vmap``, ``jax.checkpoint``/``nn.remat`` and ``nn.scan`` (map the
    ``"lora"`` collection along the layer axis).

    Args:
      module: the linen module.
      config: the adapters' config (scaling, dropout).
      impl: ``"fast"`` (custom VJP on 2-D views; the default) or ``"plain"``
        (ordinary autodiff, kept as the reference).
      check_unused: raise if an adapter in ``lora_params`` was never applied
        (a typo in a path, or an ``nn.scan`` that does not map ``"lora"``).

    The apply function also takes ``rngs``, ``method``, ``mutable`` (as
    ``module.apply``) and ``extra_variables`` (other collections). Dropout on
    the adapter input is active only when ``rngs`` holds a ``"lora_dropout"`` key.

    Mixed-adapter batches: with ``adapter_ids`` (an int array, one entry per
    row of the batch), ``lora_params`` is a stack of adapters
    (:func:`lora_jax.multi.stack`, with its ``config``) and row ``i`` uses slot
    ``adapter_ids[i]``, or no adapter for ``-1``. Rows are the leading axis of
    every adapted layer's input. Each row's factors are gathered and the
    products stay factored; the cost does not grow with the number of slots.
    Out-of-range ids raise when concrete and give NaN rows under ``jit``.

    >>> import flax.linen as nn
    >>> model, x = nn.Dense(6), jnp.ones((1, 4))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> cfg = LoraConfig(rank=2, targets="re:.*")
    >>> lora = init_lora(cfg, model, params, x, rng=jax.random.key(1))
    >>> apply = lora_apply(model, cfg)
    >>> bool(jnp.array_equal(apply(params, lora, x), model.apply({"params": params}, x)))
    True
    """
    if impl not in core.IMPLS:
        raise ValueError(f"impl must be one of {core.IMPLS}, got {impl!r}")

    def apply(base_params, lora_params, *args, rngs=None, method=None, mutable=False,
              extra_variables=None, adapter_ids=None, **kwargs):
        ids = None if adapter_ids is None else _check_ids(adapter_ids, lora_params)
        variables = {"params": base_params, **(extra_variables or {})}
        if lora_params is not None:
            variables[COLLECTION] = lora_params
        used = set()

        def interceptor(next_fun, call_args, call_kwargs, context):
            kind = _handled(context)
            if kind is None:
                return next_fun(*call_args, **call_kwargs)
            y = _base_call(kind, context, call_args, call_kwargs, next_fun)
            if not context.module.has_variable(COLLECTION, "a"):
                return y
            used.add(tuple(context.module.path))
            if config.use_dora or context.module.has_variable(COLLECTION, "m"):
                return _dora_output(config, impl, kind, context, call_args, call_kwargs, y, ids)
            term = _adapter_term(config, impl, kind, context, call_args, call_kwargs, ids)
            return y + term.astype(y.dtype)

        with nn.intercept_methods(interceptor):
            out = module.apply(variables, *args, rngs=rngs, method=method, mutable=mutable, **kwargs)
        if check_unused and lora_params is not None:
            unused = sorted(set(adapter_paths(lora_params)) - used)
            if unused:
                raise ValueError(
                    "adapters never applied: " + ", ".join(map(repr, map(_name, unused)))
                    + ". The module did not call these layers, or an nn.scan/nn.vmap does not map the "
                    "'lora' collection (use variable_axes={'params': 0, 'lora': 0}). "
                    "Pass check_unused=False to lora_apply if this is intended.")
        return out

    return apply

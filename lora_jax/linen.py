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
import dataclasses
import itertools
import threading
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes

from lora_jax import core, deprecation, kinds, mixed
from lora_jax.config import LoraConfig
from lora_jax.kinds import DORA_KINDS, DROPOUT_RNG, layer_name  # noqa: F401 - DORA_KINDS re-exported
from lora_jax.targets import Layer, select
from lora_jax.tree import adapter_paths, check_dora, get_path, set_path

COLLECTION = "lora"

# The first class in a module's MRO that is listed decides its kind (lora_jax.kinds).
KINDS = kinds.table(dense=nn.Dense, dense_general=nn.DenseGeneral, einsum=nn.Einsum, conv=nn.Conv, embed=nn.Embed)

# The keyword name of each adapted method's input.
_INPUT_NAMES = {"__call__": "inputs", "attend": "query"}

_local = threading.local()


@contextlib.contextmanager
def _running(context):
    """Marks a module run by this front end: ``("record",)`` (finding layers) or ``("adapt", config, ids, used)``."""
    stack = _local.__dict__.setdefault("runs", [])
    stack.append(context)
    try:
        yield
    finally:
        stack.pop()


def _current_run():
    stack = getattr(_local, "runs", None)
    return stack[-1] if stack else None


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


def _conv(module, x, kernel):
    """The module's own convolution (its strides, padding, dilation) with ``kernel``, without bias."""
    return module.clone(parent=None, features=kernel.shape[-1], use_bias=False).apply({"params": {"kernel": kernel}}, x)


def _view(module, w_shape) -> kinds.View:
    """What the kinds read off a linen layer (one layer's weight is the variable it sees)."""
    batch = getattr(module, "batch_dims", ())
    return kinds.View(
        weight_shape=tuple(w_shape), axis=getattr(module, "axis", -1),
        batch=f"DenseGeneral with batch_dims={batch!r}" if batch not in ((), None) else "",
        einsum=getattr(module, "einsum_str", None), groups=getattr(module, "feature_group_count", 1),
        masked=getattr(module, "mask", None) is not None, promote=lambda *arrays: _promote(module, *arrays),
        precision=getattr(module, "precision", None), conv=lambda x, kernel: _conv(module, x, kernel))


def _handled(context) -> kinds.Kind | None:
    if getattr(_local, "busy", 0):
        return None
    kind = kinds.kind_of(KINDS, type(context.module))
    return kind if kind is not None and context.method_name in kind.terms else None


def _base_call(kind: kinds.Kind, context, args, kwargs, next_fun):
    """The layer's own output. A quantized weight (any object with ``dequantize()``, as
    :mod:`lora_jax.quant` makes) is dequantized for this call only, inside the traced
    function, so only one layer's float weight exists at a time."""
    w = context.module.get_variable("params", kind.weight)
    if not core.is_quantized(w):
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


def weight_value(module, kind: kinds.Kind):
    """The float value of ``module``'s adapted weight (dequantized if it is stored quantized).

    >>> import flax.linen as nn
    >>> layer = nn.Dense(3).bind({"params": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}})
    >>> weight_value(layer, KINDS[nn.Dense]).shape
    (2, 3)
    """
    return core.float_value(module.get_variable("params", kind.weight))


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
    try:
        stored = get_path(base_params, path + (kind.weight,)).shape
    except KeyError:
        raise ValueError(f"layer {layer_name(path)!r}: no '{kind.weight}' at this path of base_params") from None
    view = _view(module, module.get_variable("params", kind.weight).shape)
    records[path] = (kinds.describe(kind, view, path, stored, context=_context(module), args=args, kwargs=kwargs),
                     output)


def _recorder(records: dict, base_params):
    """An interceptor that records each adaptable layer called (and its output) into ``records``."""

    def interceptor(next_fun, call_args, call_kwargs, context):
        kind = _handled(context)
        if kind is None:
            return next_fun(*call_args, **call_kwargs)
        out = _base_call(kind, context, call_args, call_kwargs, next_fun)
        _record(records, base_params, kind, context.module, call_args, call_kwargs, out)
        return out

    return interceptor


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

    def run(params):
        with _running(("record",)), nn.intercept_methods(_recorder(records, base_params)):
            out = module.apply({"params": params, **(extra_variables or {})}, *args, rngs=rngs, **kwargs)
        leaves = jax.tree.leaves(out)
        return [path for path, (_, o) in records.items() if any(o is leaf for leaf in leaves)]

    head_paths = set()
    jax.eval_shape(lambda p: head_paths.update(run(p)), base_params)
    layers = []
    for path, (layer, _) in records.items():
        layers.append(dataclasses.replace(layer, is_head=kinds.is_head(layer.kind, path, path in head_paths)))
    return layers


def init_lora(module: nn.Module, base_params, config: LoraConfig, *args, rng,
              dtype=jnp.float32, extra_variables=None, rngs=None, **kwargs) -> dict:
    """Creates the LoRA tree for the layers ``config`` targets.

    The module is traced abstractly on ``args``/``kwargs`` to find its layers.
    Adapters of stacked layers (``nn.scan``) get the stacking axes in front.
    Each layer's key is ``fold_in(rng, crc32(path))``, so an adapter's initial
    value does not depend on which other layers are targeted.

    Args:
      module: the linen module; base_params: its ``"params"`` collection.
      config: the adapter's hyper-parameters.
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
    >>> lora = init_lora(model, params, LoraConfig(rank=2, targets="re:.*"), jnp.ones((1, 4)),
    ...                  rng=jax.random.key(1))
    >>> jax.tree.map(jnp.shape, lora)
    {'a': (4, 2), 'b': (2, 6)}

    The order of 0.1, ``init_lora(config, module, base_params, ...)``, still
    works until 0.3 and warns.
    """
    if isinstance(module, LoraConfig):
        deprecation.warn("init_lora(config, module, base_params, ...)", "init_lora(module, base_params, config, ...)")
        module, base_params, config = base_params, config, module
    layers = find_layers(module, base_params, *args, extra_variables=extra_variables, rngs=rngs, **kwargs)
    lora: dict = {}
    for layer in select(config, layers):
        weight = get_path(base_params, layer.path + (layer.weight,))
        lora = set_path(lora, layer.path, kinds.init_adapter(rng, layer, config, dtype=dtype, weight=weight))
    return lora


# ---- the adapted apply

def _dropout(module, rate):
    if rate == 0.0 or not module.has_rng(DROPOUT_RNG):
        return lambda x: x
    key = module.make_rng(DROPOUT_RNG)

    def drop(x):
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))

    return drop


def _adapter_term(config, impl, kind, context, args, kwargs, ids=None, lora=None):
    module = context.module
    a, b = (module.get_variable(COLLECTION, k) if lora is None else lora[k] for k in ("a", "b"))
    name, method = layer_name(module.path), context.method_name
    w_shape = module.get_variable("params", kind.weight).shape
    view = _view(module, w_shape)
    slots = a.shape[:1] if ids is not None else ()
    note = " (adapter_ids were given: a stacked adapter [n, ...] is expected)" if slots else (
        " (stacked layers: is 'lora' mapped by nn.scan/nn.vmap?)")
    kinds.check_fit(name, kind.weight, w_shape, a, b, (slots, *kind.shapes(view, args, kwargs)), note)
    drop = _dropout(module, config.dropout) if kind.dropout else (lambda x: x)
    call = kinds.Call(view, args, kwargs, a, b, config.scaling(name, a.shape[-1]), impl, drop)
    with _passthrough():
        if ids is None:
            return kind.terms[method](call)
        return mixed.mixed_term(kind.terms[method], call, ids, name, input_name=_INPUT_NAMES[method])


def _dora_output(config, impl, kind, context, args, kwargs, y, ids):
    """DoRA: ``g * y + (1 - g) * bias + scale * (x @ A) @ (B * g)`` with ``g = m / ||W + s A B||``.

    This equals ``x @ (g * (W + s A B)) + bias`` while reusing the layer's own
    output ``y``: the base matmul is neither repeated forward nor backward (its
    gradient arrives scaled by ``g``), and ``g`` rides on ``B``'s columns, so
    the product stays factored. The norm is a constant for autodiff (PEFT and
    the paper's section 4.3 detach it).
    """
    module = context.module
    name = layer_name(module.path)
    check_dora(name, ("m",) if module.has_variable(COLLECTION, "m") else (), config)
    kinds.check_dora_kind(name, kind.name)
    if ids is not None:
        raise ValueError(f"layer {name!r}: mixed-adapter batches (adapter_ids) do not support DoRA adapters")
    a, b, m = (module.get_variable(COLLECTION, k) for k in ("a", "b", "m"))
    g = _dora_gain(name, weight_value(module, kind), a, b, m, config.scaling(name, a.shape[-1]), impl)
    lift = lambda v, ndim: v.reshape((1,) * (ndim - v.ndim) + v.shape)
    base = lift(g, y.ndim) * y
    if module.has_variable("params", "bias"):
        base = base + lift((1.0 - g) * module.get_variable("params", "bias"), y.ndim)
    scaled = {"a": a, "b": b * lift(g, b.ndim).astype(b.dtype)}
    term = _adapter_term(config, impl, kind, context, args, kwargs, lora=scaled)
    return (base + term).astype(y.dtype)


def _dora_gain(name: str, w, a, b, m, scale: float, impl):
    """``g = m / ||W + s A B||`` per output feature; the norm is a constant for autodiff."""
    _, _, out_shape = core.split_shape(w.shape, a.shape, b.shape)
    if tuple(m.shape) != tuple(out_shape):
        raise ValueError(f"layer {name!r}: DoRA magnitude m{list(m.shape)} does not fit the layer's "
                         f"output features {list(out_shape)}")
    norm = jax.lax.stop_gradient(core.dora_norm(w, a, b, scale, impl=impl))
    return m.astype(jnp.float32) / norm


def _adapting(config: LoraConfig, impl, ids, used: set):
    """An interceptor that adds each adapter's term to its layer's output and records the layer in ``used``."""

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
        return y + _adapter_term(config, impl, kind, context, call_args, call_kwargs, ids).astype(y.dtype)

    return interceptor


def _check_used(lora_params, used: set):
    unused = sorted(set(adapter_paths(lora_params)) - used)
    if unused:
        raise ValueError(
            "adapters never applied: " + ", ".join(map(repr, map(layer_name, unused)))
            + ". The module did not call these layers, or an nn.scan/nn.vmap does not map the "
            "'lora' collection (use variable_axes={'params': 0, 'lora': 0}). "
            "Pass check_unused=False to lora_apply if this is intended.")


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
    >>> lora = init_lora(model, params, cfg, x, rng=jax.random.key(1))
    >>> apply = lora_apply(model, cfg)
    >>> bool(jnp.array_equal(apply(params, lora, x), model.apply({"params": params}, x)))
    True
    """
    if impl not in core.IMPLS:
        raise ValueError(f"impl must be one of {core.IMPLS}, got {impl!r}")

    def apply(base_params, lora_params, *args, rngs=None, method=None, mutable=False,
              extra_variables=None, adapter_ids=None, **kwargs):
        ids = None if adapter_ids is None else mixed.check_ids(adapter_ids, lora_params)
        variables = {"params": base_params, **(extra_variables or {})}
        if lora_params is not None:
            variables[COLLECTION] = lora_params
        used: set = set()
        with _running(("adapt", config, ids, used)), nn.intercept_methods(_adapting(config, impl, ids, used)):
            out = module.apply(variables, *args, rngs=rngs, method=method, mutable=mutable, **kwargs)
        if check_unused and lora_params is not None:
            _check_used(lora_params, used)
        return out

    return apply


# ---- several Dense layers on one input, as one matmul

def fused_dense(layers, x) -> list:
    """The outputs of ``nn.Dense`` layers that share the input ``x``, computed as one matmul.

    ``[layer(x) for layer in layers]`` in value (the same products, columns
    side by side), but the base weights are concatenated into one
    ``x @ [W_1 | W_2 | ...]``, and inside :func:`lora_apply` the adapters of
    these layers into one ``x @ [A_1 | A_2 | ...]`` followed by each layer's own
    ``B``: fewer, larger matmuls, and ``x`` is read once instead of once per
    layer. Parameters and adapters keep their per-layer layout (Hugging Face's
    and PEFT's ``q_proj``/``k_proj``/``v_proj``), so files, merging, sharding
    and targeting see separate layers as before.

    The layers are called one by one (the same result, unfused) whenever
    fusing would change what they compute or what the front end sees: while
    initialising or finding layers, when the layers differ in type, dtype,
    precision or bias, for quantized weights, and for adapters with DoRA,
    dropout or mixed-adapter batches (``adapter_ids``).

    >>> class Pair(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return fused_dense([nn.Dense(3, name="q"), nn.Dense(2, name="k")], x)
    >>> x = jnp.ones((1, 4))
    >>> params = Pair().init(jax.random.key(0), x)["params"]
    >>> [y.shape for y in Pair().apply({"params": params}, x)]
    [(1, 3), (1, 2)]
    """
    layers = list(layers)
    run = _current_run()
    if not _fusable(layers, run):
        return [layer(x) for layer in layers]
    first = layers[0]
    kernels = [layer.get_variable("params", "kernel") for layer in layers]
    sizes = [k.shape[-1] for k in kernels]
    x_c, *kernels = _promote(first, x, *kernels)
    y = jax.lax.dot_general(x_c, jnp.concatenate(kernels, axis=-1), (((x_c.ndim - 1,), (0,)), ((), ())),
                            precision=first.precision)
    if first.use_bias:
        biases = _promote(first, *(layer.get_variable("params", "bias") for layer in layers))
        y = y + jnp.concatenate(biases).reshape((1,) * (y.ndim - 1) + (-1,))
    outputs = jnp.split(y, list(itertools.accumulate(sizes))[:-1], axis=-1)
    if run is None or run[0] != "adapt":
        return outputs
    _, config, _, used = run
    adapted = [i for i, layer in enumerate(layers) if layer.has_variable(COLLECTION, "a")]
    if not adapted:
        return outputs
    factors = []
    for i in adapted:
        layer = layers[i]
        a, b = (layer.get_variable(COLLECTION, k) for k in ("a", "b"))
        name = layer_name(layer.path)
        kinds.check_fit(name, "kernel", kernels[i].shape, a, b, ((), kernels[i].shape[:1], kernels[i].shape[1:]))
        factors.append((i, a, b, config.scaling(name, a.shape[-1])))
        used.add(tuple(layer.path))
    x_a, *a_list = _promote(first, x, *(a for _, a, _, _ in factors))
    h = jnp.matmul(x_a, jnp.concatenate(a_list, axis=-1), precision=first.precision)
    start = 0
    for i, a, b, scale in factors:
        h_i = h[..., start:start + a.shape[-1]] * scale
        start += a.shape[-1]
        (b,) = _promote(first, b)
        outputs[i] = outputs[i] + jnp.matmul(h_i, b, precision=first.precision).astype(outputs[i].dtype)
    return outputs


def _fusable(layers, run) -> bool:
    first = layers[0]
    if len(layers) < 2 or first.is_initializing() or (run is not None and run[0] != "adapt"):
        return False
    same = lambda attr: all(getattr(layer, attr) == getattr(first, attr) for layer in layers)
    if not (all(type(layer) is nn.Dense for layer in layers) and same("dtype") and same("precision")
            and same("use_bias") and same("param_dtype")):
        return False
    if any(core.is_quantized(layer.get_variable("params", "kernel")) for layer in layers):
        return False
    if run is None:
        return True
    _, config, ids, _ = run
    has_adapter = [layer.has_variable(COLLECTION, "a") for layer in layers]
    if any(has_adapter) and (ids is not None or config.use_dora or config.dropout > 0.0
                             or any(layer.has_variable(COLLECTION, "m") for layer in layers)):
        return False
    dtypes = {layer.get_variable(COLLECTION, "a").dtype for layer, has in zip(layers, has_adapter) if has}
    return len(dtypes) <= 1

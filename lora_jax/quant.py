"""QLoRA: the frozen base stored quantized and dequantized on the fly.

Two storage formats for a base weight of shape ``lead + in_shape + out_shape``
(``lead``: stacked-layer axes from ``nn.scan``), each quantized per stacked layer:

* ``"int8"`` (:class:`Int8Weight`): symmetric, one absmax scale per output
  channel (over the input axes); ``w ~= q * absmax / 127``.
* ``"nf4"`` (:class:`NF4Weight`): 4-bit NormalFloat (Dettmers et al., 2023,
  "QLoRA"): each layer's weight is flattened into blocks of ``block_size``
  values, each value divided by its block's absmax is rounded to the nearest of
  16 levels placed at normal quantiles (:func:`nf4_levels`), and two 4-bit
  codes share a byte. With ``double_quant`` the float32 block absmaxes are
  themselves stored as int8 (:class:`QuantizedAbsmax`).

A quantized weight is a pytree whose leaves all keep the ``lead`` axes, with a
``.shape`` and ``.dtype`` of the float weight it stands for and a traceable
``.dequantize()``. :func:`lora_jax.lora_apply` runs a layer whose weight has
``dequantize()`` on the dequantized value, for that call only, inside the
traced function: under ``nn.scan`` one layer's float weight exists at a time.
Adapters stay float. Merging an adapter into a quantized base re-quantizes,
which rounds; :func:`merge_quantized` reports that rounding.

Flax's own layers cannot read a quantized weight: run a quantized base through
``lora_apply`` (with ``lora_params=None`` for the base model alone).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lora_jax.config import Adapter, LoraConfig, compile_pattern
from lora_jax.core import is_quantized
from lora_jax.kinds import QUANTIZED_KINDS, layer_name
from lora_jax.linen import find_layers  # linen does not import quant: no cycle
from lora_jax.tree import fold_layers, get_path, set_path

__all__ = ["METHODS", "NF4_OFFSET", "Int8Weight", "MergeReport", "NF4Weight", "QuantizedAbsmax",
           "dequantize_tree", "is_quantized", "merge_quantized", "nbytes", "nf4_levels", "quantize",
           "quantize_base"]

METHODS = ("int8", "nf4")
#: The probability of the largest NF4 level (the QLoRA paper / bitsandbytes ``create_normal_map``).
NF4_OFFSET = 0.9677083
#: Block absmaxes per int8 scale under double quantization (as QLoRA).
ABSMAX_GROUP = 256


def nf4_levels(offset: float = NF4_OFFSET) -> np.ndarray:
    """The 16 NF4 levels in ``[-1, 1]`` (float64, ascending), built from normal quantiles.

    Eight positive levels are the standard normal quantiles of 8 evenly spaced
    probabilities from ``offset`` down to (not including) 0.5, seven negative
    ones mirror 7 probabilities on the same range, and 0 is exact; all are
    divided by the largest. There is one more positive level than negative so
    that zero is representable (QLoRA, section 3 and appendix E).

    >>> levels = nf4_levels()
    >>> len(levels), levels[[0, 7, 15]].tolist(), round(float(levels[8]), 6)
    (16, [-1.0, 0.0, 1.0], 0.07958)
    """
    normal = statistics.NormalDist()
    positive = [normal.inv_cdf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    negative = [-normal.inv_cdf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    levels = np.sort(np.array(positive + [0.0] + negative))
    return levels / levels[-1]


_LEVELS = nf4_levels()
_LEVELS32 = _LEVELS.astype(np.float32)
# A value's code is the number of midpoints below it: the nearest level, ties going down.
_MIDPOINTS32 = ((_LEVELS[1:] + _LEVELS[:-1]) / 2).astype(np.float32)


def _bytes(x) -> int:
    return math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize


def _safe(scale):
    """``scale`` with zeros replaced by one: an all-zero channel or block quantizes to zero codes."""
    return jnp.where(scale > 0, scale, jnp.ones((), scale.dtype))


# ---- the stored types

@struct.dataclass
class Int8Weight:
    """A weight stored as int8 codes with one float32 scale per output channel.

    ``q``: int8 ``lead + in + out``; ``scale``: float32 ``lead + [1]*len(in) + out``.
    The value is ``q * scale`` in ``dtype``.

    >>> w = quantize(jnp.array([[1.0, -0.5], [0.5, 2.0]]), "int8")
    >>> w.q.tolist(), w.shape, w.dequantize().tolist()
    ([[127, -32], [64, 127]], (2, 2), [[1.0, -0.5039370059967041], [0.5039370059967041, 2.0]])
    """

    q: Any
    scale: Any
    n_in: int = struct.field(pytree_node=False)
    n_out: int = struct.field(pytree_node=False)
    dtype: Any = struct.field(pytree_node=False)

    method = "int8"

    @property
    def shape(self) -> tuple:
        return tuple(self.q.shape)

    @property
    def n_lead(self) -> int:
        return len(self.q.shape) - self.n_in - self.n_out

    def dequantize(self):
        """The float weight, ``q * scale`` cast to ``dtype``."""
        return (self.q.astype(jnp.float32) * self.scale).astype(self.dtype)

    def requantize(self, w):
        """``w`` (same shape) quantized with this weight's settings."""
        return quantize(w, "int8", lead=self.n_lead, in_axes=self.n_in, dtype=self.dtype)


@struct.dataclass
class QuantizedAbsmax:
    """NF4 block absmaxes stored in 8 bits (double quantization).

    ``q``: int8 ``lead + [blocks]``; ``scale``: float32 ``lead + [groups]``, one
    per ``group_size`` blocks; ``mean``: float32 ``lead + [1]``. The absmax of
    block ``i`` is ``mean + q[i] * scale[i // group_size]``.

    >>> qa = QuantizedAbsmax.of(jnp.array([1.0, 2.0, 3.0]))
    >>> qa.q.tolist(), qa.values().tolist()
    ([-127, 0, 127], [1.0, 2.0, 3.0])
    """

    q: Any
    scale: Any
    mean: Any
    group_size: int = struct.field(pytree_node=False)

    @classmethod
    def of(cls, absmax, group_size: int = ABSMAX_GROUP) -> "QuantizedAbsmax":
        """Quantizes float ``absmax`` (``lead + [blocks]``): the mean subtracted, symmetric int8 per group."""
        return cls(*_quantize_absmax(absmax, group_size), group_size=group_size)

    def values(self):
        """The float32 absmaxes ``lead + [blocks]``."""
        lead, n = self.q.shape[:-1], self.q.shape[-1]
        groups = _grouped(self.q.astype(jnp.float32), self.group_size)
        vals = (groups * self.scale[..., None]).reshape(*lead, -1)[..., :n]
        return vals + self.mean


@struct.dataclass
class NF4Weight:
    """A weight stored as 4-bit NormalFloat codes, blockwise, per stacked layer.

    ``codes``: uint8 ``lead + [blocks, block_size // 2]``, two codes a byte (the
    even element of a pair in the low nibble); ``absmax``: float32
    ``lead + [blocks]``, or a :class:`QuantizedAbsmax`. Each layer's weight of
    shape ``layer_shape`` is flattened (C order) and zero-padded to whole blocks.

    >>> w = quantize(jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "nf4", block_size=4)
    >>> w.codes.shape, w.shape, w.block_size, w.dequantize()[0].tolist()
    ((2, 2), (2, 3), 4, [-1.0, -0.5250730514526367, -0.18477343022823334])
    """

    codes: Any
    absmax: Any
    layer_shape: tuple = struct.field(pytree_node=False)
    dtype: Any = struct.field(pytree_node=False)

    method = "nf4"

    @property
    def shape(self) -> tuple:
        return tuple(self.codes.shape[:-2]) + tuple(self.layer_shape)

    @property
    def n_lead(self) -> int:
        return len(self.codes.shape) - 2

    @property
    def block_size(self) -> int:
        return 2 * self.codes.shape[-1]

    @property
    def double_quant(self) -> bool:
        return isinstance(self.absmax, QuantizedAbsmax)

    def scales(self):
        """The float32 block absmaxes, ``lead + [blocks]``."""
        return self.absmax.values() if self.double_quant else self.absmax

    def dequantize(self):
        """The float weight: each code's level times its block's absmax, cast to ``dtype``."""
        lead = self.codes.shape[:-2]
        pairs = jnp.stack([self.codes & 0xF, self.codes >> 4], axis=-1).astype(jnp.int32)
        idx = pairs.reshape(*self.codes.shape[:-1], self.block_size)
        values = jnp.take(jnp.asarray(_LEVELS32), idx) * self.scales()[..., None]
        flat = values.reshape(*lead, -1)[..., :math.prod(self.layer_shape)]
        return flat.reshape(self.shape).astype(self.dtype)

    def requantize(self, w):
        """``w`` (same shape) quantized with this weight's settings."""
        return quantize(w, "nf4", lead=self.n_lead, block_size=self.block_size,
                        double_quant=self.double_quant, dtype=self.dtype)


# ---- the quantizers (per stacked layer: reductions never cross the lead axes)

def _grouped(x, size: int):
    """``lead + [n]`` zero-padded to whole groups and shaped ``lead + [groups, size]``."""
    lead, n = x.shape[:-1], x.shape[-1]
    pad = -n % size
    return jnp.pad(x, [(0, 0)] * len(lead) + [(0, pad)]).reshape(*lead, (n + pad) // size, size)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_int8(w, n_lead: int, n_in: int):
    w32 = w.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w32), axis=tuple(range(n_lead, n_lead + n_in)), keepdims=True)
    scale = absmax / 127.0
    q = jnp.clip(jnp.round(w32 / _safe(scale)), -127, 127).astype(jnp.int8)
    return q, scale


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_nf4(w, n_lead: int, block_size: int):
    lead = w.shape[:n_lead]
    blocks = _grouped(w.astype(jnp.float32).reshape(*lead, -1), block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    idx = jnp.searchsorted(jnp.asarray(_MIDPOINTS32), blocks / _safe(absmax)[..., None]).astype(jnp.uint8)
    return idx[..., 0::2] | (idx[..., 1::2] << 4), absmax


@functools.partial(jax.jit, static_argnums=(1,))
def _quantize_absmax(absmax, group_size: int):
    n = absmax.shape[-1]
    mean = jnp.mean(absmax, axis=-1, keepdims=True)
    groups = _grouped(absmax - mean, group_size)
    scale = jnp.max(jnp.abs(groups), axis=-1) / 127.0
    q = jnp.clip(jnp.round(groups / _safe(scale)[..., None]), -127, 127).astype(jnp.int8)
    return q.reshape(*absmax.shape[:-1], -1)[..., :n], scale, mean


def _check_options(method, block_size, double_quant, where: str = "quantize"):
    if method not in METHODS:
        raise ValueError(f"{where}: method must be one of {METHODS}, got {method!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) \
            or block_size <= 0 or block_size % 2:
        raise ValueError(f"{where}: block_size must be a positive even int (two 4-bit codes share a byte), "
                         f"got {block_size!r}")
    if double_quant and method != "nf4":
        raise ValueError(f"{where}: double_quant quantizes NF4 block absmaxes; method {method!r} has none")


def quantize(w, method: str = "nf4", *, lead: int = 0, in_axes: int = 1, block_size: int = 64,
             double_quant: bool = False, dtype=None):
    """Quantizes one weight array, per stacked layer.

    Args:
      w: a float array ``lead + in_shape + out_shape``.
      method: ``"int8"`` or ``"nf4"``.
      lead: the number of leading stacked-layer axes (``nn.scan``); each slice is
        quantized on its own and every stored array keeps these axes.
      in_axes: the number of input axes after ``lead`` (int8 reduces over them:
        one scale per output channel).
      block_size: values per NF4 block (positive, even).
      double_quant: store the NF4 block absmaxes in 8 bits.
      dtype: the dtype ``dequantize()`` returns (default ``w.dtype``).

    Returns:
      an :class:`Int8Weight` or :class:`NF4Weight`.

    >>> w = jnp.ones((3, 8, 4))                       # 3 stacked layers of [8, 4]
    >>> q = quantize(w, "nf4", lead=1, block_size=16)
    >>> q.codes.shape, q.absmax.shape, q.shape, bool(jnp.all(q.dequantize() == w))
    ((3, 2, 8), (3, 2), (3, 8, 4), True)
    """
    _check_options(method, block_size, double_quant)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"quantize: expected a float weight, got dtype {w.dtype}")
    if not 0 <= lead <= w.ndim:
        raise ValueError(f"quantize: lead={lead} axes do not fit a weight of shape {list(w.shape)}")
    dtype = jnp.dtype(dtype or w.dtype)
    if method == "int8":
        if not 1 <= in_axes <= w.ndim - lead:
            raise ValueError(f"quantize: in_axes={in_axes} does not fit a weight of shape {list(w.shape)} "
                             f"with lead={lead}")
        q, scale = _quantize_int8(w, lead, in_axes)
        return Int8Weight(q, scale, n_in=in_axes, n_out=w.ndim - lead - in_axes, dtype=dtype)
    codes, absmax = _quantize_nf4(w, lead, int(block_size))
    if double_quant:
        absmax = QuantizedAbsmax.of(absmax)
    return NF4Weight(codes, absmax, layer_shape=tuple(w.shape[lead:]), dtype=dtype)


def dequantize_tree(tree):
    """``tree`` with every quantized weight replaced by its float value.

    >>> tree = {"q": {"kernel": quantize(jnp.ones((4, 2)), "int8"), "bias": jnp.zeros(2)}}
    >>> jax.tree.map(jnp.shape, dequantize_tree(tree))
    {'q': {'bias': (2,), 'kernel': (4, 2)}}
    """
    return jax.tree.map(lambda x: _dequantize(x) if is_quantized(x) else x, tree, is_leaf=is_quantized)


_dequantize = jax.jit(lambda w: w.dequantize())


def nbytes(tree, *, as_dtype=None) -> int:
    """The bytes a params tree takes: quantized weights count every stored array (codes, scales, constants).

    With ``as_dtype``, the bytes the same tree would take with every float
    leaf, and every quantized weight, stored as ``as_dtype`` (integer leaves
    unchanged): the float32 or bfloat16 copy to compare with.

    >>> tree = {"kernel": quantize(jnp.ones((64, 64)), "nf4"), "bias": jnp.zeros(64)}
    >>> nbytes(tree), nbytes(tree, as_dtype=jnp.float32), nbytes(tree, as_dtype=jnp.bfloat16)
    (2560, 16640, 8320)
    """
    total = 0
    for leaf in jax.tree.leaves(tree, is_leaf=is_quantized):
        if as_dtype is not None and (is_quantized(leaf) or jnp.issubdtype(leaf.dtype, jnp.floating)):
            total += math.prod(leaf.shape) * np.dtype(as_dtype).itemsize
        else:
            total += sum(_bytes(x) for x in jax.tree.leaves(leaf))
    return total


# ---- a whole model's base

def _choose(layers, targets, include_head: bool):
    """The layers to quantize: ``targets`` (patterns) or the default kinds; the head only with ``include_head``."""
    layers = [l for l in layers if include_head or not l.is_head]
    if targets is None:
        return [l for l in layers if l.kind in QUANTIZED_KINDS]
    chosen = set()
    for entry in (targets,) if isinstance(targets, str) else tuple(targets):
        pattern = compile_pattern(entry, field="targets")
        hits = {l.path for l in layers if pattern.fullmatch(l.name)}
        if not hits:
            names = "\n  ".join(f"{l.name} ({l.kind})" for l in layers)
            head = "" if include_head else " (the output head is left out unless include_head=True)"
            raise ValueError(f"quantize_base: targets entry {entry!r} matches no layer{head}; layers:\n  {names}")
        chosen |= hits
    return [l for l in layers if l.path in chosen]


def quantize_base(module, base_params, *args, method: str = "nf4", block_size: int = 64,
                  double_quant: bool = False, targets=None, include_head: bool = False,
                  extra_variables=None, rngs=None, **kwargs):
    """The base params tree with the weights of the model's linear and conv layers quantized.

    The layers are found as :func:`lora_jax.find_layers` finds them (tracing
    ``module`` abstractly on ``args``/``kwargs``). By default every Dense,
    DenseGeneral, Einsum and Conv weight is quantized except the output head;
    embeddings, biases and norms stay as they are (QLoRA keeps them in high
    precision). Stacked layers are quantized per layer.

    Args:
      module, base_params, *args, **kwargs: as for :func:`lora_jax.init_lora`.
      method, block_size, double_quant: as for :func:`quantize`.
      targets: path globs / ``re:`` regexes of the layers to quantize instead of
        the default (each must match a layer; embeddings may be named here).
      include_head: let the output head be quantized (by default, or when ``targets`` names it).
      extra_variables, rngs: other collections and rngs the module's apply needs.

    Returns:
      a new params tree (the other leaves are the same objects).

    >>> import flax.linen as nn
    >>> model, x = nn.Sequential([nn.Dense(8), nn.Dense(2)]), jnp.ones((1, 4))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> q = quantize_base(model, params, x, method="int8", include_head=True)
    >>> type(q["layers_0"]["kernel"]).__name__, type(q["layers_1"]["kernel"]).__name__
    ('Int8Weight', 'Int8Weight')
    """
    _check_options(method, block_size, double_quant, where="quantize_base")
    layers = find_layers(module, base_params, *args, extra_variables=extra_variables, rngs=rngs, **kwargs)
    out = base_params
    for layer in _choose(layers, targets, include_head):
        w = get_path(base_params, layer.path + (layer.weight,))
        if is_quantized(w):
            raise ValueError(f"layer {layer.name!r}: its {layer.weight} is already quantized")
        if not jnp.issubdtype(w.dtype, jnp.floating):
            raise ValueError(f"layer {layer.name!r}: cannot quantize a {w.dtype} {layer.weight}")
        q = quantize(w, method, lead=len(layer.lead), in_axes=len(layer.in_shape), block_size=block_size,
                     double_quant=double_quant)
        out = set_path(out, layer.path + (layer.weight,), q)
    return out


# ---- merging into a quantized base

@dataclasses.dataclass(frozen=True)
class MergeReport:
    """The rounding :func:`merge_quantized` introduced.

    ``layers`` maps each merged layer's path to ``{"method", "max_abs_error",
    "max_abs_weight", "rel_error"}``: ``max_abs_error`` is
    ``max |dequantize(requantized) - merged|`` with ``merged`` the float32
    ``W + scale * A @ B``, and ``rel_error`` divides it by ``max |merged|``.
    An adapted weight that is not quantized is merged as
    :func:`lora_jax.merge` does (method ``None``; the error is its dtype's rounding).

    >>> MergeReport({"q": {"method": "nf4", "max_abs_error": 0.1, "max_abs_weight": 2.0, "rel_error": 0.05}})
    MergeReport(layers=1, max_abs_error=0.1, max_rel_error=0.05)
    """

    layers: dict

    @property
    def max_abs_error(self) -> float:
        return max((v["max_abs_error"] for v in self.layers.values()), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((v["rel_error"] for v in self.layers.values()), default=0.0)

    def __repr__(self) -> str:
        return (f"MergeReport(layers={len(self.layers)}, max_abs_error={self.max_abs_error:.4g}, "
                f"max_rel_error={self.max_rel_error:.4g})")


def merge_quantized(base_params, lora_params, config: LoraConfig | None = None):
    """Merges adapters into a quantized base: dequantize, add in float32, re-quantize, report the rounding.

    Each adapted weight becomes ``W + scale * A @ B`` (float32, from the
    dequantized ``W``), quantized again with the weight's own method and
    settings. The re-quantization rounds the merged weight; the returned
    :class:`MergeReport` says by how much, per layer and overall. The merged
    model differs from the adapted one by that rounding (merge into a float
    base, ``merge(dequantize_tree(base_params), ...)``, to avoid it). ``lora_params``
    may be an :class:`~lora_jax.config.Adapter` value, with ``config`` omitted.

    Returns:
      ``(new_base_params, report)``.

    DoRA adapters (``config.use_dora``) merge as :func:`lora_jax.merge` folds
    them, ``m * V / ||V||``, before the re-quantization. Raises ``ValueError``,
    naming the layer, for adapters that do not fit their weights.

    >>> base = {"q": {"kernel": quantize(jnp.eye(4), "int8")}}
    >>> lora = {"q": {"a": jnp.ones((4, 1)), "b": jnp.full((1, 4), 0.25)}}
    >>> merged, report = merge_quantized(base, lora, LoraConfig(rank=1, alpha=1))
    >>> [round(v, 4) for v in merged["q"]["kernel"].dequantize()[0].tolist()]   # 0.25 rounds to 25/127 * 1.25
    [1.25, 0.2461, 0.2461, 0.2461]
    >>> round(report.max_abs_error, 4)
    0.0039
    """
    lora_params, config = Adapter.unpack(lora_params, config, where="merge_quantized")
    out, rows = base_params, {}
    for where, folded in fold_layers(base_params, lora_params, config, requantize=True):
        rows[layer_name(where[:-1])] = folded.rounding()
        out = set_path(out, where, folded.weight)
    return out, MergeReport(rows)

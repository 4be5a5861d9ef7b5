"""Which layers get adapters: the layers a model has, matched against a config.

A front end (``lora_jax.linen``) discovers the adaptable layers of a model as
:class:`Layer` records; :func:`select` applies a :class:`LoraConfig` to them.

Kind presets, decided per layer from its path and the class names of the
modules around it (lower-cased):

* ``"attention"``: a linear layer inside a module whose name or class contains
  ``attn`` or ``attention``, or a linear layer named like an attention
  projection (``q_proj``, ``query``, ``qkv``, ``o_proj``, ``wq`` ...);
* ``"mlp"``: a linear layer (not attention) inside a module whose name or class
  contains ``mlp``, ``ffn``, ``feed_forward``/``feedforward``, or named like an
  MLP projection (``gate_proj``, ``up_proj``, ``down_proj``, ``fc1``, ``wi`` ...);
* ``"embedding"``: every ``nn.Embed``;
* ``"all-linear"``: every ``Dense``/``DenseGeneral``/``Einsum`` except the output
  head. The head is the linear layer whose output the model returns unchanged,
  or a linear layer whose own name is ``lm_head``, ``head``, ``classifier``,
  ``score``, ``logits`` or ``output``.
"""

from __future__ import annotations

import dataclasses
import math
import re

from lora_jax.config import PRESETS, LoraConfig, compile_pattern

LINEAR_KINDS = ("dense", "dense_general", "einsum")
HEAD_NAMES = frozenset({"lm_head", "head", "classifier", "score", "logits", "output"})
_ATTN_CONTEXT = re.compile(r"attn|attention")
_MLP_CONTEXT = re.compile(r"mlp|ffn|feed_?forward")
_ATTN_NAME = re.compile(r"(q|k|v|o|qkv|kv|query|key|value|out)_proj|query|key|value|qkv|w[qkvo]|c_attn")
_MLP_NAME = re.compile(r"(gate|up|down|gate_up)_proj|fc[12]|w[123]|wi(_[01])?|c_fc|c_proj")


@dataclasses.dataclass(frozen=True)
class Layer:
    """One adaptable layer of a model.

    Attributes:
      path: the module path (the layer's key path in the params tree).
      kind: ``"dense"``, ``"dense_general"``, ``"einsum"``, ``"conv"`` or ``"embed"``.
      lead: stacked-layer axes of the weight (``nn.scan``/``nn.vmap``), else ``()``.
      in_shape, out_shape: the weight's input and output dims, per layer.
      weight: the name of the weight leaf (``"kernel"`` or ``"embedding"``).
      context: lower-cased names and class names of the enclosing modules.
      is_head: whether this is the model's output head.
      unsupported: why this layer cannot take an adapter (empty if it can).
    """

    path: tuple[str, ...]
    kind: str
    lead: tuple[int, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    weight: str = "kernel"
    context: tuple[str, ...] = ()
    is_head: bool = False
    unsupported: str = ""

    @property
    def name(self) -> str:
        return "/".join(self.path)

    @property
    def max_rank(self) -> int:
        return min(math.prod(self.in_shape), math.prod(self.out_shape))


def _role(layer: Layer) -> str | None:
    if layer.kind not in LINEAR_KINDS or layer.is_head:
        return None
    own = layer.path[-1].lower() if layer.path else ""
    if any(_ATTN_CONTEXT.search(c) for c in layer.context):
        return "attention"
    if any(_MLP_CONTEXT.search(c) for c in layer.context):
        return "mlp"
    if _ATTN_NAME.fullmatch(own):
        return "attention"
    if _MLP_NAME.fullmatch(own):
        return "mlp"
    return None


def _preset_matches(preset: str, layer: Layer) -> bool:
    if preset == "embedding":
        return layer.kind == "embed"
    if preset == "all-linear":
        return layer.kind in LINEAR_KINDS and not layer.is_head
    return _role(layer) == preset


def _matches(entry, layer: Layer, field: str) -> bool:
    if isinstance(entry, str) and entry in PRESETS and field == "targets":
        return _preset_matches(entry, layer)
    return compile_pattern(entry, field=field).fullmatch(layer.name) is not None


def _available(layers) -> str:
    return "\n  ".join(f"{layer.name} ({layer.kind}, in {list(layer.in_shape)}, out {list(layer.out_shape)})"
                       for layer in layers)


def select(config: LoraConfig, layers: list[Layer]) -> list[Layer]:
    """The layers ``config`` targets, in model order.

    Raises ``ValueError`` when a targets or exclude entry matches no layer (the
    message lists the available layers), or when the rank exceeds
    ``min(in, out)`` of a selected layer.
    """
    if not layers:
        raise ValueError("the model has no adaptable layer (Dense, DenseGeneral, Einsum, Conv or Embed)")
    chosen = set()
    for field in ("targets", "exclude"):
        for entry in getattr(config, field):
            hits = {layer.path for layer in layers if _matches(entry, layer, field)}
            if not hits:
                raise ValueError(f"LoraConfig.{field} entry {entry!r} matches no layer; "
                                 f"available layers:\n  {_available(layers)}")
            chosen = chosen | hits if field == "targets" else chosen - hits
    selected = [layer for layer in layers if layer.path in chosen]
    if not selected:
        raise ValueError(f"LoraConfig.exclude {config.exclude!r} removes every targeted layer")
    for field in ("rank_pattern", "alpha_pattern"):
        for pattern, _ in getattr(config, field):
            if not any(compile_pattern(pattern).fullmatch(layer.name) for layer in selected):
                raise ValueError(f"LoraConfig.{field} entry {pattern!r} matches no adapted layer; "
                                 f"adapted layers:\n  {_available(selected)}")
    for layer in selected:
        if layer.unsupported:
            raise ValueError(f"layer {layer.name!r} ({layer.kind}) cannot take an adapter: {layer.unsupported}")
        rank = config.rank_for(layer.name)
        if rank > layer.max_rank:
            raise ValueError(f"rank {rank} is larger than min(in, out) = {layer.max_rank} of layer "
                             f"{layer.name!r} (in {list(layer.in_shape)}, out {list(layer.out_shape)})")
    return selected

"""The decoder's hyper-parameters: :class:`DecoderConfig` (and :class:`RopeScaling`), each field checked.

Every Llama-family architecture is one :class:`DecoderConfig` with its own
defaults (the architecture files subclass it); the module that computes with
it is :mod:`lora_jax.models.decoder`, which re-exports these names. This
module needs JAX only for the activation functions and dtypes.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "llama3")
#: ``DecoderConfig.layer_types`` entries (Hugging Face's names): full causal attention, or a window.
LAYER_TYPES = ("full_attention", "sliding_attention")
#: ``DecoderConfig.hidden_act``: the MLP's gate activation, as transformers' ``ACT2FN`` computes it.
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
#: ``DecoderConfig.attention_implementation``: ``"auto"`` picks per backend and inputs
#: (:func:`lora_jax.models.decoder.attention_implementation`).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
#: ``DecoderConfig.remat_policy``: what a rematerialised layer keeps from its forward pass
#: (names of ``jax.checkpoint_policies``; "nothing_saveable" recomputes the whole layer).
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")


def _positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def _positive_number(value) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


_EXPECTED = {_positive_int: "a positive int", _positive_number: "a positive finite number", _is_bool: "a bool"}


def _checked(owner: str, field: str, value, check):
    """``value`` (ints as int, numbers as float) if ``check`` accepts it; else a ValueError naming the field."""
    if not check(value):
        raise ValueError(f"{owner}.{field} must be {_EXPECTED[check]}, got {value!r}")
    if check is _positive_int:
        return int(value)
    return float(value) if check is _positive_number else bool(value)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling, as Hugging Face's ``rope_scaling`` / ``rope_parameters``.

    ``rope_type`` ``"linear"`` divides every frequency by ``factor``;
    ``"llama3"`` divides only the low frequencies and interpolates between
    (Llama 3.1's scheme, which needs the remaining fields).
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope scaling type {self.rope_type!r} is not supported; supported: {ROPE_TYPES}")
        for field in ("factor", "low_freq_factor", "high_freq_factor"):
            object.__setattr__(self, field, _checked("rope_scaling", field, getattr(self, field), _positive_number))
        _checked("rope_scaling", "original_max_position_embeddings", self.original_max_position_embeddings,
                 _positive_int)
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must be larger than "
                             f"low_freq_factor ({self.low_freq_factor}) for llama3 rope scaling")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of the decoder, named as in Hugging Face's ``LlamaConfig``.

    The architectures differ only in these fields (their config classes,
    :class:`~lora_jax.models.llama.LlamaConfig`,
    :class:`~lora_jax.models.mistral.MistralConfig`,
    :class:`~lora_jax.models.qwen.Qwen2Config`,
    :class:`~lora_jax.models.qwen.Qwen3Config`,
    :class:`~lora_jax.models.gemma.Gemma2Config`,
    :class:`~lora_jax.models.gemma.Gemma3TextConfig` and
    :class:`~lora_jax.models.phi3.Phi3Config`, set their defaults):

    * ``attention_bias``: a bias on ``q_proj``, ``k_proj``, ``v_proj`` and
      ``o_proj``; ``attention_output_bias`` overrides it for ``o_proj``
      (``None`` follows ``attention_bias``; Qwen2 has biases on q/k/v only).
    * ``mlp_bias``: a bias on ``gate_proj``, ``up_proj`` and ``down_proj``.
    * ``qk_norm``: an RMSNorm over each query and key head (``q_norm``,
      ``k_norm``, weights ``[head_dim]``) before the rotation (Qwen3).
    * ``sliding_window``: each position attends to itself and the
      ``sliding_window - 1`` positions before it (Mistral); ``None`` means
      the whole causal prefix. ``layer_types`` (one of :data:`LAYER_TYPES`
      per layer) limits the window to the ``"sliding_attention"`` layers
      (Gemma 2/3, Qwen); ``None`` means every layer slides when
      ``sliding_window`` is set, and no layer does when it is ``None``. ``sliding_rope_theta`` and
      ``sliding_rope_scaling`` give the sliding layers their own rotary
      settings (Gemma 3; ``None``: the same as the others).
    * ``hidden_act``: the MLP's gate activation (:data:`ACTIVATIONS`; Gemma's
      GeGLU is ``"gelu_pytorch_tanh"``).
    * ``norm_unit_offset``: every RMSNorm multiplies by ``1 + weight``, its
      weights starting at 0 (Gemma).
    * ``sandwich_norms``: a layer also normalises the attention's and the
      MLP's outputs before adding them (Gemma 2/3: ``input_layernorm``,
      ``post_attention_layernorm``, ``pre_feedforward_layernorm``,
      ``post_feedforward_layernorm``).
    * ``scale_embeddings``: the token embeddings are multiplied by
      ``sqrt(hidden_size)`` (rounded to ``dtype``) on input, not in the tied
      head (Gemma).
    * ``query_pre_attn_scalar``: the attention scores are scaled by its
      inverse square root instead of ``head_dim``'s (Gemma).
    * ``attn_logit_softcapping``, ``final_logit_softcapping``:
      ``cap * tanh(x / cap)`` on the attention scores (before the mask) and
      on the output logits (Gemma 2).
    * ``fused_modules``: q/k/v are one ``qkv_proj`` and gate/up one
      ``gate_up_proj`` in the params (Phi-3's layout: ``q|k|v`` and
      ``gate|up`` along the output dim), so an adapter on one is one adapter
      on the fused module, as in PEFT.
    * ``partial_rotary_factor``: the rotation turns only the first
      ``int(head_dim * partial_rotary_factor)`` dims of each head (Phi-3 family).

    ``head_dim`` defaults to ``hidden_size // num_attention_heads`` and
    ``num_key_value_heads`` to ``num_attention_heads`` (multi-head attention).
    ``scan_layers`` and ``remat`` are ours: one ``nn.scan`` over the decoder
    layers, and rematerialisation of each layer in the backward pass. So is
    ``activation_sharding``: a ``jax.sharding.NamedSharding`` for the residual
    stream ``[batch, seq, hidden]`` at each decoder layer's input (e.g.
    ``NamedSharding(mesh, P("data"))``), so that sharded training keeps every
    layer's activations split over the batch; XLA's propagation alone may
    replicate the batch inside the layers (see ``lora_jax.sharding``).

    Speed settings, also ours (none changes the model's function):

    * ``attention_implementation``: ``"xla"`` (the plain softmax over the
      ``[seq, seq]`` scores, any backend), ``"cudnn"`` (cuDNN's fused flash
      attention: GPU, bfloat16/float16, ``head_dim`` a multiple of 8 up to
      128), or ``"auto"`` (the default: cuDNN where those hold, else XLA);
      see :func:`lora_jax.models.decoder.attention_implementation`.
    * ``remat_policy``: with ``remat``, which values a layer keeps for its
      backward pass (one of :data:`REMAT_POLICIES`; the default keeps none).
    * ``fused_projections``: q/k/v, and gate/up, each computed as one matmul
      on their shared input, their adapters' ``A`` as one too
      (:func:`lora_jax.linen.fused_dense`); the parameters keep Hugging
      Face's separate layout.
    * ``loss_chunk_tokens``: the loss of ``model(ids, labels=ids)`` computes
      the output projection and the float32 log-softmax this many tokens at a
      time and recomputes them in the backward pass, so the ``[tokens, vocab]``
      logits never exist at once (see :meth:`DecoderForCausalLM.__call__`).
    """

    vocab_size: int = 4096
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    attention_implementation: str = "auto"
    fused_projections: bool = False
    loss_chunk_tokens: int = 2048
    activation_sharding: Any = None
    # Last, so that the fields above keep their positions from before the decoder was shared.
    attention_output_bias: bool | None = None
    qk_norm: bool = False
    sliding_window: int | None = None
    # Gemma 2/3 and Phi-3 (appended for the same reason).
    layer_types: tuple[str, ...] | None = None
    sliding_rope_theta: float | None = None
    sliding_rope_scaling: RopeScaling = RopeScaling()
    hidden_act: str = "silu"
    norm_unit_offset: bool = False
    sandwich_norms: bool = False
    scale_embeddings: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    fused_modules: bool = False
    partial_rotary_factor: float = 1.0

    def __post_init__(self):
        owner = type(self).__name__
        for field, check in _FIELD_CHECKS.items():
            if getattr(self, field) is not None or field not in _OPTIONAL_FIELDS:
                object.__setattr__(self, field, _checked(owner, field, getattr(self, field), check))
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"{owner}.hidden_size ({self.hidden_size}) must be a multiple of "
                                 f"num_attention_heads ({self.num_attention_heads}) unless head_dim is given")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{owner}.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        for field in ("rope_scaling", "sliding_rope_scaling"):
            if not isinstance(getattr(self, field), RopeScaling):
                raise ValueError(f"{owner}.{field} must be a RopeScaling, got {getattr(self, field)!r}")
        for field, allowed in (("attention_implementation", ATTENTION_IMPLEMENTATIONS),
                               ("remat_policy", REMAT_POLICIES), ("hidden_act", tuple(ACTIVATIONS))):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{owner}.{field} must be one of {allowed}, got {getattr(self, field)!r}")
        self._check_layer_types(owner)
        rotated = self.rotary_dim
        if self.partial_rotary_factor > 1 or rotated % 2 or not rotated:
            raise ValueError(f"{owner}.partial_rotary_factor ({self.partial_rotary_factor}) must leave an even, "
                             f"positive number of rotated dims of head_dim {self.head_dim}")

    def _check_layer_types(self, owner: str):
        if self.layer_types is not None:
            types = tuple(self.layer_types) if isinstance(self.layer_types, (list, tuple)) else None
            if types is None or len(types) != self.num_hidden_layers or any(t not in LAYER_TYPES for t in types):
                raise ValueError(f"{owner}.layer_types must list one of {LAYER_TYPES} per layer "
                                 f"({self.num_hidden_layers} layers), got {self.layer_types!r}")
            object.__setattr__(self, "layer_types", types)
        if self.scan_layers and len({self.layer_attention(i) for i in range(self.num_hidden_layers)}) > 1:
            raise ValueError(f"{owner}.scan_layers needs every layer alike, but layer_types mixes "
                             f"{sorted(set(self.layer_types))} (their windows or rotary settings differ); "
                             f"use unscanned layers")

    def is_sliding(self, layer: int) -> bool:
        """Whether ``layer`` attends over a window: ``sliding_window`` is set, and ``layer_types`` (if given) says so.

        As in transformers, a ``"sliding_attention"`` layer without a window attends fully.
        """
        return self.sliding_window is not None and (self.layer_types is None
                                                    or self.layer_types[layer] == "sliding_attention")

    def layer_attention(self, layer: int) -> tuple:
        """``(window, rope_theta, rope_scaling)`` of ``layer``: sliding layers may have their own rotary settings.

        >>> cfg = DecoderConfig(num_hidden_layers=2, sliding_window=4, layer_types=("sliding_attention",
        ...                     "full_attention"), sliding_rope_theta=100.0)
        >>> [cfg.layer_attention(i)[:2] for i in range(2)]
        [(4, 100.0), (None, 10000.0)]
        """
        if not self.is_sliding(layer):
            return None, self.rope_theta, self.rope_scaling
        if self.sliding_rope_theta is None:
            return self.sliding_window, self.rope_theta, self.rope_scaling
        return self.sliding_window, self.sliding_rope_theta, self.sliding_rope_scaling

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head the rotation turns: ``int(head_dim * partial_rotary_factor)``."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_scale(self) -> float:
        """The factor on ``q . k``: ``query_pre_attn_scalar ** -0.5`` (Gemma), else ``head_dim ** -0.5``."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def o_proj_bias(self) -> bool:
        """Whether ``o_proj`` has a bias: ``attention_output_bias``, else ``attention_bias``."""
        return self.attention_bias if self.attention_output_bias is None else self.attention_output_bias


# The type and range of each hyper-parameter (None is allowed for the optional ones).
_FIELD_CHECKS = {
    **dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "loss_chunk_tokens",
                     "sliding_window"), _positive_int),
    **dict.fromkeys(("rms_norm_eps", "rope_theta", "sliding_rope_theta", "query_pre_attn_scalar",
                     "attn_logit_softcapping", "final_logit_softcapping", "partial_rotary_factor"), _positive_number),
    **dict.fromkeys(("attention_bias", "attention_output_bias", "mlp_bias", "qk_norm", "tie_word_embeddings",
                     "scan_layers", "remat", "fused_projections", "norm_unit_offset", "sandwich_norms",
                     "scale_embeddings", "fused_modules"), _is_bool),
}
_OPTIONAL_FIELDS = ("num_key_value_heads", "head_dim", "attention_output_bias", "sliding_window",
                    "sliding_rope_theta", "query_pre_attn_scalar", "attn_logit_softcapping",
                    "final_logit_softcapping")

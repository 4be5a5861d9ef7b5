"""Gemma 2 and Gemma 3 (text): the shared decoder with Gemma's settings, under Hugging Face's ``gemma2`` and
``gemma3_text`` names.

What makes them Gemma is all :class:`~lora_jax.models.decoder.DecoderConfig`
fields: RMSNorm by ``1 + weight`` (``norm_unit_offset``), norms around both
the attention and the MLP (``sandwich_norms``), a GeGLU MLP
(``hidden_act="gelu_pytorch_tanh"``), token embeddings scaled by
``sqrt(hidden_size)`` (``scale_embeddings``), scores scaled by
``query_pre_attn_scalar ** -0.5``, sliding-window layers alternating with
full ones (``layer_types``) and a tied head. Gemma 2 soft-caps the attention
scores and the output logits; Gemma 3 instead normalises each query and key
head (``qk_norm``, with Gemma's norm) and gives its sliding layers their own
rotary base (``sliding_rope_theta``).

A multimodal Gemma 3 folder (``model_type`` ``"gemma3"``, the text model
under ``text_config``) is not read here: only the text-only ``gemma3_text``
checkpoints (such as Gemma 3 1B) are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

from lora_jax.io.fields import ConfigFieldError
from lora_jax.models.architecture import COMMON_FIELDS, PLAIN, HfArchitecture, read_window, rope_entry, rope_parameters
from lora_jax.models.decoder import LAYER_TYPES, DecoderConfig, DecoderForCausalLM

__all__ = ["Gemma2Config", "Gemma2ForCausalLM", "Gemma3TextConfig", "Gemma3ForCausalLM"]

#: transformers' Gemma window when ``config.json`` has no ``sliding_window``.
HF_GEMMA_WINDOW = 4096
#: transformers' Gemma 3 rotary bases when ``config.json`` names none: full layers, sliding layers.
HF_GEMMA3_THETA, HF_GEMMA3_SLIDING_THETA = 1_000_000.0, 10_000.0
#: transformers' Gemma 3 pattern when ``config.json`` has neither ``layer_types`` nor ``sliding_window_pattern``.
HF_GEMMA3_PATTERN = 6


@dataclasses.dataclass(frozen=True)
class Gemma2Config(DecoderConfig):
    """A :class:`~lora_jax.models.decoder.DecoderConfig` with Gemma 2's settings (Hugging Face's ``Gemma2ForCausalLM``).

    The sizes are the small defaults of :class:`DecoderConfig`; the odd parts
    are Gemma 2's (transformers' ``Gemma2Config`` defaults): caps 50 and 30,
    ``query_pre_attn_scalar`` 256, a window of 4096 on every other layer.

    >>> cfg = Gemma2Config(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, head_dim=32)
    >>> cfg.layer_types, cfg.attention_scale == 256 ** -0.5, cfg.final_logit_softcapping
    (('sliding_attention', 'full_attention'), True, 30.0)
    """

    hidden_act: str = "gelu_pytorch_tanh"
    norm_unit_offset: bool = True
    sandwich_norms: bool = True
    scale_embeddings: bool = True
    tie_word_embeddings: bool = True
    query_pre_attn_scalar: float | None = 256.0
    sliding_window: int | None = 4096
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    #: without ``layer_types``, every ``PATTERN``-th layer is full and the others slide (transformers' default)
    PATTERN: ClassVar[int] = 2

    def __post_init__(self):
        if self.layer_types is None:
            object.__setattr__(self, "layer_types", _alternating(self.num_hidden_layers, self.PATTERN))
        super().__post_init__()


class Gemma2ForCausalLM(DecoderForCausalLM):
    """The decoder for a :class:`Gemma2Config` (Hugging Face's ``Gemma2ForCausalLM`` module paths).

    >>> import jax, jax.numpy as jnp
    >>> model = Gemma2ForCausalLM(Gemma2Config(vocab_size=32, hidden_size=16, intermediate_size=24,
    ...                                        num_hidden_layers=2, num_attention_heads=2, sliding_window=2))
    >>> ids = jnp.zeros((1, 5), jnp.int32)
    >>> sorted(model.init(jax.random.key(0), ids)["params"]["model"]["layers_0"])   # doctest: +NORMALIZE_WHITESPACE
    ['input_layernorm', 'mlp', 'post_attention_layernorm', 'post_feedforward_layernorm',
     'pre_feedforward_layernorm', 'self_attn']
    """


@dataclasses.dataclass(frozen=True)
class Gemma3TextConfig(Gemma2Config):
    """A :class:`~lora_jax.models.decoder.DecoderConfig` with Gemma 3's settings (Hugging Face's ``Gemma3ForCausalLM``).

    Gemma 2's, without soft-capping, with q/k norms, five sliding layers per
    full one (window 4096 by default; released models use 512 or 1024) and
    their own rotary base.

    >>> cfg = Gemma3TextConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=6, head_dim=32,
    ...                        sliding_window=16)
    >>> cfg.qk_norm, cfg.attn_logit_softcapping, cfg.layer_attention(0)[:2], cfg.layer_attention(5)[:2]
    (True, None, (16, 10000.0), (None, 1000000.0))
    """

    qk_norm: bool = True
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    rope_theta: float = HF_GEMMA3_THETA
    sliding_rope_theta: float | None = HF_GEMMA3_SLIDING_THETA
    PATTERN: ClassVar[int] = HF_GEMMA3_PATTERN


class Gemma3ForCausalLM(DecoderForCausalLM):
    """The decoder for a :class:`Gemma3TextConfig` (Hugging Face's ``Gemma3ForCausalLM`` module paths).

    >>> import jax, jax.numpy as jnp
    >>> model = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
    ...                                            num_hidden_layers=2, num_attention_heads=2, sliding_window=2))
    >>> ids = jnp.zeros((1, 5), jnp.int32)
    >>> sorted(model.init(jax.random.key(0), ids)["params"]["model"]["layers_1"]["self_attn"])
    ['k_norm', 'k_proj', 'o_proj', 'q_norm', 'q_proj', 'v_proj']
    """


def _alternating(layers: int, pattern: int) -> tuple[str, ...]:
    """transformers' Gemma layer types: every ``pattern``-th layer (1-based) full, the others sliding."""
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers))


def _number_or_null(hf: Mapping, key: str, default, where: str):
    value = hf.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        raise ConfigFieldError(f"{where}: field {key!r} must be a positive number or null, got {value!r}")
    return value


def _layer_types(hf: Mapping, where: str, pattern: int) -> tuple[str, ...]:
    types = hf.get("layer_types")
    if types is None:
        return _alternating(hf["num_hidden_layers"], pattern)
    if not isinstance(types, list) or any(t not in LAYER_TYPES for t in types):
        raise ConfigFieldError(f"{where}: field 'layer_types' must list {LAYER_TYPES} entries, got {types!r}")
    return tuple(types)


def _read_common(hf: Mapping, where: str, caps: tuple, pattern: int) -> dict:
    """The keys Gemma 2 and 3 share; ``caps``: transformers' default soft-caps (attention, final)."""
    if hf.get("use_bidirectional_attention"):
        raise ConfigFieldError(f"{where}: field 'use_bidirectional_attention' is true; only causal attention is "
                               f"supported")
    act = hf.get("hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh" and act != "gelu_new":
        raise ConfigFieldError(f"{where}: field 'hidden_activation' is {act!r}; Gemma's MLP is supported with "
                               f"'gelu_pytorch_tanh' only")
    # A null window: the sliding layers attend fully, as in transformers.
    return {"hidden_act": act, "sliding_window": read_window(hf, where, HF_GEMMA_WINDOW), "layer_types": _layer_types(hf, where, pattern),
            "query_pre_attn_scalar": _number_or_null(hf, "query_pre_attn_scalar", 256, where),
            "attn_logit_softcapping": _number_or_null(hf, "attn_logit_softcapping", caps[0], where),
            "final_logit_softcapping": _number_or_null(hf, "final_logit_softcapping", caps[1], where)}


def _integral(value):
    """``value`` as an int when it is one (transformers types ``query_pre_attn_scalar`` as int)."""
    return int(value) if value is not None and float(value).is_integer() else value


def _write_common(config: DecoderConfig) -> dict:
    return {"hidden_activation": config.hidden_act, "sliding_window": config.sliding_window,
            "layer_types": list(config.layer_types), "query_pre_attn_scalar": _integral(config.query_pre_attn_scalar),
            "attn_logit_softcapping": config.attn_logit_softcapping,
            "final_logit_softcapping": config.final_logit_softcapping}


def _read_gemma2(hf: Mapping, where: str) -> dict:
    return _read_common(hf, where, (50.0, 30.0), Gemma2Config.PATTERN)


def _read_gemma3(hf: Mapping, where: str) -> dict:
    pattern = hf.get("sliding_window_pattern", HF_GEMMA3_PATTERN)
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
        raise ConfigFieldError(f"{where}: field 'sliding_window_pattern' must be a positive int, got {pattern!r}")
    return _read_common(hf, where, (None, None), pattern)


def _read_gemma3_rope(hf: Mapping, where: str) -> dict:
    """Gemma 3's rotary settings per layer type: transformers 5's ``rope_parameters`` by layer type, or 4's keys.

    transformers 4 wrote ``rope_theta`` and ``rope_scaling`` (full layers) and
    ``rope_local_base_freq`` (sliding layers).
    """
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping) and set(params) <= set(LAYER_TYPES) and params:
        full, sliding = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    else:
        legacy = hf.get("rope_scaling") or params or {}
        if not isinstance(legacy, Mapping):
            raise ConfigFieldError(f"{where}: field 'rope_scaling' must be an object, got {legacy!r}")
        full = {"rope_theta": hf.get("rope_theta", HF_GEMMA3_THETA), **legacy}
        sliding = {"rope_theta": hf.get("rope_local_base_freq", HF_GEMMA3_SLIDING_THETA)}
    theta, scaling = rope_entry(full, f"{where} (full_attention rope)", HF_GEMMA3_THETA)
    local, local_scaling = rope_entry(sliding, f"{where} (sliding_attention rope)", HF_GEMMA3_SLIDING_THETA)
    for source in (full, sliding):
        if source.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigFieldError(f"{where}: field 'partial_rotary_factor' is {source['partial_rotary_factor']!r}; "
                                   f"Gemma 3 rotates whole heads")
    return {"rope_theta": theta, "rope_scaling": scaling, "sliding_rope_theta": local,
            "sliding_rope_scaling": local_scaling}


def _write_gemma3_rope(config: DecoderConfig) -> dict:
    local = config.rope_theta if config.sliding_rope_theta is None else config.sliding_rope_theta
    scaling = config.rope_scaling if config.sliding_rope_theta is None else config.sliding_rope_scaling
    return {"rope_parameters": {"full_attention": rope_parameters(config.rope_theta, config.rope_scaling),
                                "sliding_attention": rope_parameters(local, scaling)}}


_GEMMA = {**{k: v for k, v in PLAIN.items() if k not in (
             "layer_types", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
             "sliding_rope_theta")},
          "norm_unit_offset": True, "sandwich_norms": True, "scale_embeddings": True, "attention_output_bias": None,
          "mlp_bias": False}
_FIELDS = tuple(f for f in COMMON_FIELDS if f != "hidden_act") + ("attention_bias",)
#: transformers' defaults for keys a Gemma ``config.json`` may omit (the released 2B-class sizes).
_DEFAULTS = {"vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
             "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "rms_norm_eps": 1e-6,
             "max_position_embeddings": 8192, "tie_word_embeddings": True}

GEMMA2_HF = HfArchitecture(
    model_type="gemma2", class_name="Gemma2ForCausalLM", config_class=Gemma2Config, module_class=Gemma2ForCausalLM,
    fields=_FIELDS, fixed={**_GEMMA, "qk_norm": False, "sliding_rope_theta": None}, defaults=_DEFAULTS,
    read=_read_gemma2, write=_write_common)

GEMMA3_HF = HfArchitecture(
    model_type="gemma3_text", class_name="Gemma3ForCausalLM", config_class=Gemma3TextConfig,
    module_class=Gemma3ForCausalLM, fields=_FIELDS, fixed={**_GEMMA, "qk_norm": True},
    defaults={**_DEFAULTS, "vocab_size": 262208, "max_position_embeddings": 131072},
    read=_read_gemma3, write=_write_common, rope=(_read_gemma3_rope, _write_gemma3_rope))

"""Qwen2 and Qwen3: the shared decoder under Hugging Face's ``qwen2`` and ``qwen3`` names.

Qwen2 has biases on ``q_proj``/``k_proj``/``v_proj`` but not on ``o_proj``.
Qwen3 has none by default (``attention_bias`` sets all four) and an RMSNorm
over each query and key head before the rotation (``q_norm``, ``k_norm``),
with an explicit ``head_dim``. Both can switch some layers to sliding-window
attention: with ``use_sliding_window``, the layers ``layer_types`` names
(or, without it, those from ``max_window_layers`` on) attend over
``sliding_window`` positions; without it every layer attends fully.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from lora_jax.io.fields import ConfigFieldError
from lora_jax.models.architecture import COMMON_FIELDS, PLAIN, HfArchitecture, read_window
from lora_jax.models.decoder import DecoderConfig, DecoderForCausalLM

__all__ = ["Qwen2Config", "Qwen2ForCausalLM", "Qwen3Config", "Qwen3ForCausalLM"]

#: transformers' ``Qwen3Config.head_dim`` when ``config.json`` has no such key.
HF_DEFAULT_QWEN3_HEAD_DIM = 128
#: transformers' ``sliding_window`` and ``max_window_layers`` (Qwen2 and Qwen3) when ``config.json`` has none.
HF_DEFAULT_SLIDING_WINDOW = 4096
HF_DEFAULT_MAX_WINDOW_LAYERS = 28


@dataclasses.dataclass(frozen=True)
class Qwen2Config(DecoderConfig):
    """A :class:`~lora_jax.models.decoder.DecoderConfig` for Hugging Face's ``Qwen2ForCausalLM``.

    >>> cfg = Qwen2Config(hidden_size=64, num_attention_heads=4)
    >>> cfg.attention_bias, cfg.o_proj_bias
    (True, False)
    """

    attention_bias: bool = True
    attention_output_bias: bool | None = False


class Qwen2ForCausalLM(DecoderForCausalLM):
    """The decoder for a :class:`Qwen2Config` (Hugging Face's ``Qwen2ForCausalLM`` module paths).

    >>> import jax, jax.numpy as jnp
    >>> model = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=24,
    ...                                      num_hidden_layers=1, num_attention_heads=2))
    >>> ids = jnp.zeros((1, 5), jnp.int32)
    >>> sorted(model.init(jax.random.key(0), ids)["params"]["model"]["layers_0"]["self_attn"]["k_proj"])
    ['bias', 'kernel']
    """


@dataclasses.dataclass(frozen=True)
class Qwen3Config(DecoderConfig):
    """A :class:`~lora_jax.models.decoder.DecoderConfig` for Hugging Face's ``Qwen3ForCausalLM``.

    >>> Qwen3Config(hidden_size=64, num_attention_heads=4, head_dim=32).qk_norm
    True
    """

    qk_norm: bool = True


class Qwen3ForCausalLM(DecoderForCausalLM):
    """The decoder for a :class:`Qwen3Config` (Hugging Face's ``Qwen3ForCausalLM`` module paths).

    >>> import jax, jax.numpy as jnp
    >>> model = Qwen3ForCausalLM(Qwen3Config(vocab_size=32, hidden_size=16, intermediate_size=24,
    ...                                      num_hidden_layers=1, num_attention_heads=2))
    >>> ids = jnp.zeros((1, 5), jnp.int32)
    >>> sorted(model.init(jax.random.key(0), ids)["params"]["model"]["layers_0"]["self_attn"])
    ['k_norm', 'k_proj', 'o_proj', 'q_norm', 'q_proj', 'v_proj']
    """


def _read(hf: Mapping, where: str) -> dict:
    """Sliding-window layers as transformers reads them: only with ``use_sliding_window``, per ``layer_types``.

    Without ``layer_types`` the layers from ``max_window_layers`` on slide.
    """
    use = hf.get("use_sliding_window", False)
    if not isinstance(use, bool):
        raise ConfigFieldError(f"{where}: field 'use_sliding_window' must be a bool, got {use!r}")
    window = read_window(hf, where, HF_DEFAULT_SLIDING_WINDOW) if use else None
    if window is None:   # transformers then gives every layer full attention, whatever layer_types says
        return {"sliding_window": None, "layer_types": None}
    types = hf.get("layer_types")
    if types is None:
        first = hf.get("max_window_layers", HF_DEFAULT_MAX_WINDOW_LAYERS)
        if isinstance(first, bool) or not isinstance(first, int) or first < 0:
            raise ConfigFieldError(f"{where}: field 'max_window_layers' must be a non-negative int, got {first!r}")
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(hf["num_hidden_layers"])]
    if not isinstance(types, list):
        raise ConfigFieldError(f"{where}: field 'layer_types' must be a list, got {types!r}")
    return {"sliding_window": window, "layer_types": tuple(types)}


def _write(config: DecoderConfig) -> dict:
    # max_window_layers is not written (layer_types says the same): a merged model keeps the base folder's
    # value (lora-jax merge carries over the keys save_pretrained does not write).
    types = ["sliding_attention" if config.is_sliding(i) else "full_attention"
             for i in range(config.num_hidden_layers)]
    use = "sliding_attention" in types
    return {"use_sliding_window": use, "sliding_window": config.sliding_window if use else None,
            "layer_types": types}


#: Qwen reads layer_types; the decoder's other Gemma/Phi-3 features stay off.
_PLAIN = {k: v for k, v in PLAIN.items() if k != "layer_types"}

QWEN2_HF = HfArchitecture(
    model_type="qwen2", class_name="Qwen2ForCausalLM", config_class=Qwen2Config, module_class=Qwen2ForCausalLM,
    fields=COMMON_FIELDS,
    fixed={**_PLAIN, "attention_bias": True, "attention_output_bias": False, "mlp_bias": False, "qk_norm": False},
    read=_read, write=_write)

QWEN3_HF = HfArchitecture(
    model_type="qwen3", class_name="Qwen3ForCausalLM", config_class=Qwen3Config, module_class=Qwen3ForCausalLM,
    fields=COMMON_FIELDS + ("attention_bias",),
    fixed={**_PLAIN, "attention_output_bias": None, "mlp_bias": False, "qk_norm": True},
    defaults={"head_dim": HF_DEFAULT_QWEN3_HEAD_DIM}, read=_read, write=_write)

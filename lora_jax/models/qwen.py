"""Qwen2 and Qwen3: the shared decoder under Hugging Face's ``qwen2`` and ``qwen3`` names.

Qwen2 has biases on ``q_proj``/``k_proj``/``v_proj`` but not on ``o_proj``.
Qwen3 has none by default (``attention_bias`` sets all four) and an RMSNorm
over each query and key head before the rotation (``q_norm``, ``k_norm``),
with an explicit ``head_dim``. Both can switch some layers to sliding-window
attention (``use_sliding_window``, ``layer_types``); we compute full
attention only, and refuse those settings by name rather than ignore them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from lora_jax.io.fields import ConfigFieldError
from lora_jax.models.architecture import COMMON_FIELDS, HfArchitecture
from lora_jax.models.decoder import DecoderConfig, DecoderForCausalLM

__all__ = ["Qwen2Config", "Qwen2ForCausalLM", "Qwen3Config", "Qwen3ForCausalLM"]

#: transformers' ``Qwen3Config.head_dim`` when ``config.json`` has no such key.
HF_DEFAULT_QWEN3_HEAD_DIM = 128


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
    """Refuses sliding-window layers; their window and layer count then do not matter."""
    if hf.get("use_sliding_window"):
        raise ConfigFieldError(f"{where}: field 'use_sliding_window' is {hf['use_sliding_window']!r}; sliding-window "
                               f"layers of {hf.get('model_type')} are not supported (only full attention)")
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or any(t != "full_attention" for t in layer_types):
            raise ConfigFieldError(f"{where}: field 'layer_types' must list only 'full_attention' layers (other "
                                   f"attention types are not supported), got {layer_types!r}")
    return {}


def _write(config: DecoderConfig) -> dict:
    # max_window_layers only matters with use_sliding_window, so it is not written: a merged model keeps the
    # base folder's value (lora-jax merge carries over the keys save_pretrained does not write).
    return {"use_sliding_window": False, "sliding_window": None,
            "layer_types": ["full_attention"] * config.num_hidden_layers}


QWEN2_HF = HfArchitecture(
    model_type="qwen2", class_name="Qwen2ForCausalLM", config_class=Qwen2Config, module_class=Qwen2ForCausalLM,
    fields=COMMON_FIELDS,
    fixed={"attention_bias": True, "attention_output_bias": False, "mlp_bias": False, "qk_norm": False,
           "sliding_window": None},
    read=_read, write=_write)

QWEN3_HF = HfArchitecture(
    model_type="qwen3", class_name="Qwen3ForCausalLM", config_class=Qwen3Config, module_class=Qwen3ForCausalLM,
    fields=COMMON_FIELDS + ("attention_bias",),
    fixed={"attention_output_bias": None, "mlp_bias": False, "qk_norm": True, "sliding_window": None},
    defaults={"head_dim": HF_DEFAULT_QWEN3_HEAD_DIM}, read=_read, write=_write)

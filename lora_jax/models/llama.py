"""Llama: the shared decoder as it is, under Hugging Face's ``llama`` name.

Every Llama-family architecture is :class:`~lora_jax.models.decoder.DecoderForCausalLM`
with its own :class:`~lora_jax.models.decoder.DecoderConfig` defaults; this
file holds Llama's (none to change) and its ``config.json`` name map. The
decoder's public names are re-exported here, where they lived before the
decoder was shared.
"""

from __future__ import annotations

import dataclasses

from lora_jax.models.architecture import COMMON_FIELDS, PLAIN, HfArchitecture
from lora_jax.models.decoder import (ATTENTION_IMPLEMENTATIONS, IGNORE_INDEX, REMAT_POLICIES, ROPE_TYPES,
                                     DecoderConfig, DecoderForCausalLM, RMSNorm, RopeScaling, attention_implementation,
                                     causal_lm_loss, init_cache, inverse_frequencies, rotary)

__all__ = ["ATTENTION_IMPLEMENTATIONS", "IGNORE_INDEX", "REMAT_POLICIES", "ROPE_TYPES", "LlamaConfig",
           "LlamaForCausalLM", "RMSNorm", "RopeScaling", "attention_implementation", "causal_lm_loss", "init_cache",
           "inverse_frequencies", "rotary"]


@dataclasses.dataclass(frozen=True)
class LlamaConfig(DecoderConfig):
    """A :class:`~lora_jax.models.decoder.DecoderConfig` for Hugging Face's ``LlamaForCausalLM``.

    Llama has optional biases on all four attention projections
    (``attention_bias``) and on the MLP (``mlp_bias``); no q/k norm and no
    sliding window.

    >>> LlamaConfig(hidden_size=64, num_attention_heads=4).head_dim
    16
    """


class LlamaForCausalLM(DecoderForCausalLM):
    """The decoder for a :class:`LlamaConfig` (Hugging Face's ``LlamaForCausalLM`` module paths).

    >>> import jax, jax.numpy as jnp
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
    ...                                      num_hidden_layers=1, num_attention_heads=2))
    >>> ids = jnp.zeros((1, 5), jnp.int32)
    >>> model.apply(model.init(jax.random.key(0), ids), ids).shape
    (1, 5, 32)
    """


HF = HfArchitecture(
    model_type="llama", class_name="LlamaForCausalLM", config_class=LlamaConfig, module_class=LlamaForCausalLM,
    fields=COMMON_FIELDS + ("attention_bias", "mlp_bias"),
    fixed={**PLAIN, "attention_output_bias": None, "qk_norm": False, "sliding_window": None})

"""Mistral: the shared decoder with sliding-window attention, under Hugging Face's ``mistral`` name.

Mistral is Llama without biases and with ``sliding_window``: each position
attends to itself and the ``sliding_window - 1`` positions before it (all
layers alike; ``null`` in ``config.json`` means the whole prefix).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from lora_jax.models.architecture import COMMON_FIELDS, PLAIN, HfArchitecture, read_window, write_window
from lora_jax.models.decoder import DecoderConfig, DecoderForCausalLM

__all__ = ["MistralConfig", "MistralForCausalLM"]

#: transformers' ``MistralConfig.sliding_window`` when ``config.json`` has no such key.
HF_DEFAULT_SLIDING_WINDOW = 4096


@dataclasses.dataclass(frozen=True)
class MistralConfig(DecoderConfig):
    """A :class:`~lora_jax.models.decoder.DecoderConfig` for Hugging Face's ``MistralForCausalLM``.

    ``sliding_window``: the attention window in positions (the query
    included), or ``None`` for full causal attention.

    >>> MistralConfig(hidden_size=64, num_attention_heads=4, sliding_window=8).sliding_window
    8
    """


class MistralForCausalLM(DecoderForCausalLM):
    """The decoder for a :class:`MistralConfig` (Hugging Face's ``MistralForCausalLM`` module paths).

    >>> import jax, jax.numpy as jnp
    >>> model = MistralForCausalLM(MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
    ...                                          num_hidden_layers=1, num_attention_heads=2, sliding_window=2))
    >>> ids = jnp.zeros((1, 5), jnp.int32)
    >>> model.apply(model.init(jax.random.key(0), ids), ids).shape
    (1, 5, 32)
    """


def _read(hf: Mapping, where: str) -> dict:
    """``sliding_window``: absent means transformers' default, ``null`` means none."""
    return {"sliding_window": read_window(hf, where, HF_DEFAULT_SLIDING_WINDOW)}


HF = HfArchitecture(
    model_type="mistral", class_name="MistralForCausalLM", config_class=MistralConfig,
    module_class=MistralForCausalLM, fields=COMMON_FIELDS,
    fixed={**PLAIN, "attention_bias": False, "attention_output_bias": None, "mlp_bias": False, "qk_norm": False},
    defaults={"num_key_value_heads": 8}, read=_read, write=write_window)

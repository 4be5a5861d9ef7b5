"""Phi-3: the shared decoder with fused projections, under Hugging Face's ``phi3`` name.

Phi-3 is Llama without biases whose q/k/v projections are one ``qkv_proj``
(``q|k|v`` along the output dim) and whose gate/up projections are one
``gate_up_proj`` (``gate|up``): ``DecoderConfig.fused_modules``. PEFT adapts
each fused module as one, and so do we. ``sliding_window`` (when not null)
applies to every layer, as in Mistral; ``partial_rotary_factor`` below 1
rotates only the leading dims of each head (Phi-4-mini, which is a
``phi3`` model). Long-context ``longrope`` scaling is not supported
(refused by name).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

from lora_jax.io.fields import ConfigFieldError
from lora_jax.models.architecture import (COMMON_FIELDS, PLAIN, HfArchitecture, read_rope, read_window, write_rope,
                                          write_window)
from lora_jax.models.decoder import DecoderConfig, DecoderForCausalLM

__all__ = ["Phi3Config", "Phi3ForCausalLM"]


@dataclasses.dataclass(frozen=True)
class Phi3Config(DecoderConfig):
    """A :class:`~lora_jax.models.decoder.DecoderConfig` for Hugging Face's ``Phi3ForCausalLM`` (fused projections).

    >>> Phi3Config(hidden_size=64, num_attention_heads=4).fused_modules
    True
    """

    fused_modules: bool = True
    rms_norm_eps: float = 1e-5


class Phi3ForCausalLM(DecoderForCausalLM):
    """The decoder for a :class:`Phi3Config` (Hugging Face's ``Phi3ForCausalLM`` module paths).

    >>> import jax, jax.numpy as jnp
    >>> model = Phi3ForCausalLM(Phi3Config(vocab_size=32, hidden_size=16, intermediate_size=24,
    ...                                    num_hidden_layers=1, num_attention_heads=2))
    >>> ids = jnp.zeros((1, 5), jnp.int32)
    >>> layer = model.init(jax.random.key(0), ids)["params"]["model"]["layers_0"]
    >>> layer["self_attn"]["qkv_proj"]["kernel"].shape, layer["mlp"]["gate_up_proj"]["kernel"].shape
    ((16, 48), (16, 48))
    """


def _read(hf: Mapping, where: str) -> dict:
    """``sliding_window`` (null: none); dropout settings other than 0 are refused (we do not compute them)."""
    for key in ("resid_pdrop", "embd_pdrop"):
        if (hf.get(key) or 0.0) != 0.0:
            raise ConfigFieldError(f"{where}: field {key!r} is {hf[key]!r}; dropout is not supported (only 0.0)")
    return {"sliding_window": read_window(hf, where)}


HF = HfArchitecture(
    model_type="phi3", class_name="Phi3ForCausalLM", config_class=Phi3Config, module_class=Phi3ForCausalLM,
    fields=COMMON_FIELDS,
    fixed={**{k: v for k, v in PLAIN.items() if k != "partial_rotary_factor"}, "fused_modules": True,
           "attention_bias": False, "attention_output_bias": None, "mlp_bias": False, "qk_norm": False},
    defaults={"vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
              "num_attention_heads": 32, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096},
    read=_read, write=write_window,
    rope=(functools.partial(read_rope, partial=True), functools.partial(write_rope, partial=True)))

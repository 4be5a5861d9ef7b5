"""How one Hugging Face architecture maps onto the shared decoder: the record each architecture file fills in.

:mod:`lora_jax.models.hf` reads and writes ``config.json`` through these
records; the architecture files (``llama.py``, ``mistral.py``, ``qwen.py``)
hold one each, so a Hugging Face field name lives beside the architecture
that has it and nowhere in the decoder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class HfArchitecture:
    """A Hugging Face ``model_type`` and what it means for :class:`~lora_jax.models.decoder.DecoderConfig`.

    Attributes:
      model_type: ``config.json``'s ``model_type`` (``"llama"``, ``"qwen3"``).
      class_name: the transformers class written under ``architectures``.
      config_class, module_class: our config and module classes for it.
      fields: ``config.json`` keys that are the config field of the same name.
      fixed: config fields the architecture hard-wires (no ``config.json``
        key): set when reading, checked when writing.
      defaults: transformers' values for ``fields`` a ``config.json`` may omit,
        where they differ from ours.
      read: the architecture's other keys, ``read(hf, where) -> {field: value}``;
        it raises for values we do not implement, naming the key.
      write: the inverse, ``write(config) -> {key: value}``.

    >>> HfArchitecture("toy", "ToyForCausalLM", dict, dict, ("vocab_size",), {}).model_type
    'toy'
    """

    model_type: str
    class_name: str
    config_class: type
    module_class: type
    fields: tuple[str, ...]
    fixed: Mapping[str, Any]
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    read: Callable[[Mapping, str], dict] | None = None
    write: Callable[[Any], dict] | None = None


#: ``config.json`` keys every Llama-family architecture shares (also our field names).
COMMON_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings")

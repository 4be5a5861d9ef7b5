"""How one Hugging Face architecture maps onto our models: the record each architecture file fills in.

:mod:`lora_jax.models.hf` reads and writes ``config.json`` and the weights
through these records; the architecture files (``llama.py``, ``mistral.py``,
``qwen.py`` on the shared decoder, ``gpt2.py`` with its own module) hold one
each, so a Hugging Face field name lives beside the architecture that has it
and nowhere in the models.
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
      family: ``"llama"``: :mod:`~lora_jax.models.hf` also reads and writes
        the keys the Llama family shares (``hidden_act``, ``attention_dropout``,
        the rope settings); any other family's ``read``/``write`` cover all
        its keys beyond ``fields``.
      transposed: the modules whose kernels the file stores as PyTorch
        ``Linear`` weights ``[out, in]`` (transposed at the boundary); ``None``
        means every kernel. The others are ``Conv1D`` ``[in, out]``, Flax's layout.
      ignored_suffixes: tensors a checkpoint may carry that are not
        parameters (buffers recomputed from the config).
      base_prefix: files saved from the bare model (GPT-2's ``GPT2Model``)
        lack this prefix of the ``*LMHeadModel``'s names; it is added when the
        file holds ``embedding`` without it.
      embedding: the token embedding tensor, which a tied head's copy
        (``lm_head.weight``, written by some exporters) must equal.

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
    family: str = "llama"
    transposed: tuple[str, ...] | None = None
    ignored_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)
    base_prefix: str | None = None
    embedding: str = "model.embed_tokens.weight"

    def is_transposed(self, path: tuple[str, ...]) -> bool:
        """Whether the file stores the kernel at ``path`` (a Flax param path) transposed.

        >>> HfArchitecture("toy", "Toy", dict, dict, (), {}, transposed=("lm_head",)).is_transposed(("h", "kernel"))
        False
        """
        return path[-1] == "kernel" and (self.transposed is None or path[-2] in self.transposed)


#: ``config.json`` keys every Llama-family architecture shares (also our field names).
COMMON_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings")

"""How one Hugging Face architecture maps onto our models: the record each architecture file fills in.

:mod:`lora_jax.models.hf` reads and writes ``config.json`` and the weights
through these records; the architecture files (``llama.py``, ``mistral.py``,
``qwen.py``, ``gemma.py``, ``phi3.py`` on the shared decoder, ``gpt2.py``
with its own module) hold one each, so a Hugging Face field name lives beside the architecture that has it
and nowhere in the models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from lora_jax.io.fields import ConfigFieldError
from lora_jax.models.decoder_config import ROPE_TYPES, RopeScaling

#: transformers' ``rope_theta`` when a config names none.
DEFAULT_ROPE_THETA = 10000.0
_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_entry(source: Mapping, where: str, default_theta: float = DEFAULT_ROPE_THETA) -> tuple[Any, RopeScaling]:
    """``(theta, scaling)`` of one rope settings object (``{"rope_type", "rope_theta", "factor", ...}``).

    >>> rope_entry({"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}, "config.json")
    (1000000.0, RopeScaling(rope_type='linear', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, \
original_max_position_embeddings=8192))
    """
    if not isinstance(source, Mapping):
        raise ConfigFieldError(f"{where}: rope settings must be an object, got {source!r}")
    rope_type = source.get("rope_type", source.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigFieldError(f"{where}: rope type {rope_type!r} is not supported (supported: {ROPE_TYPES})")
    fields = {k: source[k] for k in _SCALING_KEYS if k in source}
    return source.get("rope_theta", default_theta), RopeScaling(rope_type, **fields)


def read_rope(hf: Mapping, where: str, *, partial: bool = False) -> dict:
    """The rotary fields of a Llama-family ``config.json``: transformers 5's ``rope_parameters``, or 4's keys.

    ``partial``: the architecture rotates part of each head when
    ``partial_rotary_factor`` says so (Phi-3); elsewhere a factor other than
    1 is refused, naming the field.
    """
    sources = {}
    for key in ("rope_parameters", "rope_scaling"):
        value = hf.get(key) or {}
        if not isinstance(value, Mapping):
            raise ConfigFieldError(f"{where}: field {key!r} must be an object, got {value!r}")
        sources[key] = value
    source = sources["rope_parameters"] or sources["rope_scaling"]
    theta, scaling = rope_entry(source, where, hf.get("rope_theta", DEFAULT_ROPE_THETA))
    factor = source.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if factor != 1.0 and not partial:
        raise ConfigFieldError(f"{where}: field 'partial_rotary_factor' is {factor!r}; rotating only part of each "
                               f"head is not supported by this architecture (only 1.0)")
    return {"rope_theta": theta, "rope_scaling": scaling, **({"partial_rotary_factor": factor} if partial else {})}


def read_window(hf: Mapping, where: str, default: int | None = None) -> int | None:
    """``sliding_window``: a positive int, or null (no window); ``default`` when the key is absent.

    >>> read_window({"sliding_window": None}, "config.json", 4096), read_window({}, "config.json", 4096)
    (None, 4096)
    """
    window = hf.get("sliding_window", default)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ConfigFieldError(f"{where}: field 'sliding_window' must be a positive int or null, got {window!r}")
    return window


def write_window(config) -> dict:
    """The ``config.json`` key of :func:`read_window`'s field."""
    return {"sliding_window": config.sliding_window}


def rope_parameters(theta, scaling: RopeScaling) -> dict:
    """transformers 5's ``rope_parameters`` object for one rotary setting."""
    rope: dict[str, Any] = {"rope_type": scaling.rope_type, "rope_theta": theta}
    keys = {"default": (), "linear": ("factor",)}.get(scaling.rope_type, _SCALING_KEYS)   # llama3: all four
    return {**rope, **{k: getattr(scaling, k) for k in keys}}


def write_rope(config, *, partial: bool = False) -> dict:
    """The ``config.json`` keys of :func:`read_rope`'s fields (``rope_parameters``, in transformers 5's layout).

    ``partial``: write ``partial_rotary_factor`` too (transformers writes it for the architectures that have it).
    """
    rope = rope_parameters(config.rope_theta, config.rope_scaling)
    return {"rope_parameters": {**rope, "partial_rotary_factor": config.partial_rotary_factor} if partial else rope}


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
        the keys the Llama family shares (``attention_dropout``, and the rope
        settings through ``rope``); any other family's ``read``/``write``
        cover all its keys beyond ``fields``.
      rope: ``(read, write)`` of the rotary settings (Llama family):
        :func:`read_rope` / :func:`write_rope` unless the architecture keeps
        them its own way (Gemma 3: per layer type).
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
    rope: tuple[Callable[[Mapping, str], dict], Callable[[Any], dict]] = (read_rope, write_rope)

    def is_transposed(self, path: tuple[str, ...]) -> bool:
        """Whether the file stores the kernel at ``path`` (a Flax param path) transposed.

        >>> HfArchitecture("toy", "Toy", dict, dict, (), {}, transposed=("lm_head",)).is_transposed(("h", "kernel"))
        False
        """
        return path[-1] == "kernel" and (self.transposed is None or path[-2] in self.transposed)


#: ``config.json`` keys every Llama-family architecture shares (also our field names).
COMMON_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
                 "hidden_act")

#: The decoder's Gemma and Phi-3 features, off: what every other Llama-family architecture fixes (so that,
#: say, a ``LlamaConfig`` with ``sandwich_norms=True`` is not written as a ``llama`` folder).
PLAIN = {"layer_types": None, "sliding_rope_theta": None, "norm_unit_offset": False, "sandwich_norms": False,
         "scale_embeddings": False, "query_pre_attn_scalar": None, "attn_logit_softcapping": None,
         "final_logit_softcapping": None, "fused_modules": False, "partial_rotary_factor": 1.0}

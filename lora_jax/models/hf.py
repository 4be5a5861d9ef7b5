"""Hugging Face model folders: ``from_pretrained`` and ``save_pretrained``.

``config.json``'s ``model_type`` picks the architecture (:data:`ARCHITECTURES`:
``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``gemma2``, ``gemma3_text``, ``phi3`` on the one decoder of
:mod:`lora_jax.models.decoder`, and ``gpt2`` with its own module,
:mod:`lora_jax.models.gpt2`) through the record in its own file. A field
that changes the computation is either honoured or refused with an error
naming it. A folder holds ``config.json`` and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``). Linear weights are stored by PyTorch as
``[out, in]`` and transposed to Flax's ``[in, out]`` kernels here, at the file
boundary; GPT-2's ``Conv1D`` weights are already ``[in, out]``, and embeddings
and norm weights keep their layout. Every tensor of the
file must map to a parameter and every parameter must be found: anything else
is an error naming the tensors.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.io import tensors as st
from lora_jax.io.fields import ConfigFieldError, read_json
from lora_jax.io.names import stack_layers, to_torch, unstack_layers
from lora_jax.models import gemma, gpt2, llama, mistral, phi3, qwen
from lora_jax.models.architecture import HfArchitecture
from lora_jax.models.decoder import DecoderConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
#: The architectures ``from_pretrained`` reads and ``save_pretrained`` writes, by ``model_type``.
ARCHITECTURES: dict[str, HfArchitecture] = {a.model_type: a for a in (
    llama.HF, mistral.HF, qwen.QWEN2_HF, qwen.QWEN3_HF, gemma.GEMMA2_HF, gemma.GEMMA3_HF, phi3.HF, gpt2.HF)}


def _architecture(hf: Mapping, where: str) -> HfArchitecture:
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        names = ", ".join(repr(t) for t in ARCHITECTURES)
        raise ConfigFieldError(f"{where}: model_type {model_type!r} is not supported; only {names} "
                               f"checkpoints can be loaded")
    return ARCHITECTURES[model_type]


def _check_common(hf: Mapping, where: str):
    """Refuses the shared fields whose other values we do not compute."""
    dropout = hf.get("attention_dropout") or 0.0
    if dropout != 0.0:
        raise ConfigFieldError(f"{where}: field 'attention_dropout' is {dropout!r}; dropout on the attention "
                               f"weights is not supported (only 0.0)")


def config_from_hf(hf: Mapping, *, where: str = "config.json", **overrides):
    """The config (a :class:`LlamaConfig`, ``MistralConfig``, ...) of a Hugging Face ``config.json`` dict.

    ``model_type`` picks the architecture; others are refused. Every field
    read is checked for its type and range (``num_key_value_heads: 0``, a
    negative ``hidden_size``, ``rope_theta: 0``, a bool where an int belongs),
    and a field whose value we do not implement (``use_sliding_window: true``
    for Qwen, a ``hidden_act`` other than silu) is refused: a
    :class:`~lora_jax.io.fields.ConfigFieldError` names ``where``, the field
    and the value.

    >>> config_from_hf({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}).head_dim
    16
    >>> config_from_hf({"model_type": "llama", "vocab_size": 0})
    Traceback (most recent call last):
    ...
    lora_jax.io.fields.ConfigFieldError: config.json: LlamaConfig.vocab_size must be a positive int, got 0
    >>> type(config_from_hf({"model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 4})).__name__
    'Qwen3Config'
    >>> config_from_hf({"model_type": "gpt2", "n_embd": 64, "n_head": 4}).mlp_size
    256
    """
    arch = _architecture(hf, where)
    if arch.family == "llama":
        _check_common(hf, where)
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if name not in DTYPES and not {"dtype", "param_dtype"} <= set(overrides):
        raise ConfigFieldError(f"{where}: field 'dtype' {name!r} is not supported (supported: {sorted(DTYPES)}); "
                               f"pass dtype= and param_dtype= to choose the dtypes")
    try:
        kwargs: dict[str, Any] = {k: hf.get(k, arch.defaults.get(k)) for k in arch.fields}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        kwargs.update(arch.fixed)
        if arch.family == "llama":
            kwargs.update(arch.rope[0](hf, where))
        if arch.read is not None:
            kwargs.update(arch.read(hf, where))
        kwargs.update(dtype=DTYPES.get(name), param_dtype=DTYPES.get(name))
        kwargs.update(overrides)
        return arch.config_class(**kwargs)
    except ConfigFieldError:
        raise
    except ValueError as err:
        raise ConfigFieldError(f"{where}: {err}") from None


def architecture_of(config) -> HfArchitecture:
    """The Hugging Face architecture ``config``'s class stands for (a plain ``DecoderConfig`` is refused).

    >>> architecture_of(llama.LlamaConfig()).class_name
    'LlamaForCausalLM'
    """
    for arch in ARCHITECTURES.values():
        if type(config) is arch.config_class:
            return arch
    raise ValueError(f"{type(config).__name__} names no Hugging Face architecture; use one of "
                     f"{[a.config_class.__name__ for a in ARCHITECTURES.values()]}")


def _effective(config: DecoderConfig, fields) -> dict:
    """``config``'s ``fields``, with ``attention_output_bias`` resolved (``None`` follows ``attention_bias``)."""
    return {f: config.o_proj_bias if f == "attention_output_bias" else getattr(config, f) for f in fields}


def config_to_hf(config) -> dict:
    """The ``config.json`` dict (transformers 5 layout) for ``config``.

    Refuses a config its architecture cannot express (a ``LlamaConfig`` with
    ``qk_norm=True``, a ``Qwen2Config`` with a bias on ``o_proj``), naming the field.
    """
    arch = architecture_of(config)
    have, want = _effective(config, arch.fixed), _effective(dataclasses.replace(config, **arch.fixed), arch.fixed)
    for field in arch.fixed:
        if have[field] != want[field]:
            raise ValueError(f"{type(config).__name__}.{field}={have[field]!r} cannot be written as a Hugging Face "
                             f"{arch.model_type!r} config (that architecture has {field}={want[field]!r})")
    return {"architectures": [arch.class_name], "model_type": arch.model_type,
            **{k: getattr(config, k) for k in arch.fields}, **(arch.rope[1](config) if arch.family == "llama" else {}),
            **(arch.write(config) if arch.write else {}), "dtype": jnp.dtype(config.param_dtype).name}


def _unscanned(config):
    """``config`` with the training-only layout options off (those its class has)."""
    off = {"scan_layers": False, "remat": False, "activation_sharding": None}
    return dataclasses.replace(config, **{k: v for k, v in off.items() if hasattr(config, k)})


def _expected(config) -> dict:
    """Param shapes of the unscanned model, ``{path tuple: ShapeDtypeStruct}``."""
    module = architecture_of(config).module_class(_unscanned(config))
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    return {tuple(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}


def tensor_name(path: tuple[str, ...]) -> str:
    """The PyTorch state-dict name of the Flax param at ``path``.

    >>> tensor_name(("model", "layers_0", "self_attn", "q_proj", "kernel"))
    'model.layers.0.self_attn.q_proj.weight'
    """
    leaf = "weight" if path[-1] in ("kernel", "embedding") else path[-1]
    return f"{to_torch('/'.join(path[:-1]))}.{leaf}"


def _with_base_prefix(tensors: Mapping[str, np.ndarray], arch: HfArchitecture) -> Mapping[str, np.ndarray]:
    """The state dict with ``arch.base_prefix`` added when it was saved from the bare model (its embedding lacks it)."""
    prefix = arch.base_prefix
    if prefix is None or not arch.embedding.startswith(prefix) or arch.embedding[len(prefix):] not in tensors:
        return tensors
    return {n if n.startswith("lm_head.") else prefix + n: v for n, v in tensors.items()}


def params_from_hf(tensors: Mapping[str, np.ndarray], config) -> dict:
    """Flax params (unscanned layout, NumPy) from a PyTorch state dict; ``Linear`` kernels are transposed."""
    arch = architecture_of(config)
    tensors = _with_base_prefix(tensors, arch)
    expected = _expected(config)
    names = {tensor_name(path): path for path in expected}
    missing = sorted(set(names) - set(tensors))
    unexpected = sorted(n for n in set(tensors) - set(names) if not n.endswith(arch.ignored_suffixes))
    if config.tie_word_embeddings and "lm_head.weight" in unexpected:
        if np.array_equal(tensors["lm_head.weight"], tensors.get(arch.embedding)):
            unexpected.remove("lm_head.weight")   # a tied copy, written by some exporters
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the config: missing tensors {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected tensors {unexpected[:8]}")
    params: dict = {}
    for name, path in names.items():
        value = tensors[name]
        transposed = arch.is_transposed(path)
        if transposed:
            value = value.T
        if tuple(value.shape) != tuple(expected[path].shape):
            want = expected[path].shape[::-1] if transposed else expected[path].shape
            raise ValueError(f"tensor {name!r}: shape {list(tensors[name].shape)} does not match the config "
                             f"(expected {list(want)})")
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value.astype(expected[path].dtype)
    return params


def params_to_hf(params: Mapping, config) -> dict[str, np.ndarray]:
    """The PyTorch state dict for Flax ``params`` (either layout); ``Linear`` kernels are transposed."""
    arch = architecture_of(config)
    if getattr(config, "scan_layers", False):
        params = unstack_layers(params)
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(str(k.key) for k in path)
        value = np.asarray(leaf)
        out[tensor_name(keys)] = value.T if arch.is_transposed(keys) else value
    return out


def from_pretrained(path: str | os.PathLike, *, dtype=None, param_dtype=None, scan_layers: bool = False,
                    remat: bool = False, show_progress: bool = True,
                    check_finite: bool = True) -> tuple[Any, dict]:
    """Reads a Hugging Face model folder; returns ``(module, params)``.

    The module is the architecture's class (``LlamaForCausalLM``,
    ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``,
    ``GPT2LMHeadModel``, as ``config.json``'s ``model_type`` says).

    Args:
      path: a folder with ``config.json`` and ``model.safetensors`` (or a
        sharded ``model.safetensors.index.json``).
      dtype, param_dtype: compute and storage dtypes (default: the
        checkpoint's ``dtype``, float32 if it names none).
      scan_layers, remat: build the scanned (and rematerialised) variant; the
        params are stacked to match. GPT-2 is not scanned (``scan_layers``
        raises for it); ``remat`` applies to it.
      show_progress: a progress bar while reading tensors.
      check_finite: refuse weights holding NaN or Inf (one ``np.isfinite``
        pass per tensor, on the host). ``False`` is for experts inspecting a
        broken checkpoint; weights must still be floating point.

    Raises:
      lora_jax.io.fields.ConfigFieldError: ``config.json`` is not a JSON
        object or a field has the wrong type or range (names file and field).
      lora_jax.io.tensors.BadTensorError: a weight that is not floating point
        (int8, bool, a header relabelled ``I32``) or holds NaN/Inf.
      lora_jax.io.tensors.SafetensorsFileError: an unreadable file, or a shard
        index pointing outside the folder or listing a tensor in two shards.

    >>> import tempfile
    >>> cfg = llama.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
    ...                   num_attention_heads=2)
    >>> ids = jnp.zeros((1, 3), jnp.int32)
    >>> params = llama.LlamaForCausalLM(cfg).init(jax.random.key(0), ids)["params"]
    >>> with tempfile.TemporaryDirectory() as d:
    ...     files = save_pretrained(d, cfg, params)
    ...     module, loaded = from_pretrained(d, show_progress=False)
    >>> bool(jnp.all(loaded["lm_head"]["kernel"] == params["lm_head"]["kernel"]))
    True
    """
    path = os.fspath(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {path!r}")
    hf = read_json(config_path)
    overrides: dict[str, Any] = {"scan_layers": scan_layers, "remat": remat}
    arch = _architecture(hf, config_path)
    for option in ("scan_layers", "remat"):
        if option not in {f.name for f in dataclasses.fields(arch.config_class)}:
            if overrides.pop(option):
                raise ValueError(f"from_pretrained: {option}=True is not supported for {arch.model_type!r} models")
    if dtype is not None:
        overrides["dtype"] = dtype
    if param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    config = config_from_hf(hf, where=config_path, **overrides)
    tensors = st.read_folder(path, show_progress=show_progress, require_float=True, check_finite=check_finite)
    params = params_from_hf(tensors, config)
    if scan_layers:
        params = stack_layers(params)
    return architecture_of(config).module_class(config), jax.tree.map(jnp.asarray, params)


def save_pretrained(path: str | os.PathLike, config, params: Mapping, *,
                    max_shard_bytes: int | None = None, extra_config: Mapping[str, Any] | None = None) -> list[str]:
    """Writes ``params`` as a Hugging Face folder that ``transformers`` loads (``LlamaForCausalLM``, ...).

    Args:
      path: the output folder (created).
      config: the model's config (:class:`LlamaConfig`, ``MistralConfig``, ``Qwen2Config``,
        ``Qwen3Config``, ``GPT2Config``; its class picks the architecture) or the module.
      params: its params (scanned or not, as ``config`` says).
      max_shard_bytes: split the weights into shards of at most this size,
        with a ``model.safetensors.index.json``.
      extra_config: more ``config.json`` keys (token ids, a tokenizer note);
        they may not override the keys the config itself defines.

    Returns:
      the file names written.
    """
    if isinstance(config, nn.Module):
        config = config.config
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    hf = config_to_hf(config)
    clash = sorted(set(extra_config or ()) & set(hf))
    if clash:
        raise ValueError(f"save_pretrained: extra_config may not override {clash}")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**hf, **(extra_config or {})}, f, indent=2, sort_keys=True)
    return ["config.json"] + st.write_folder(path, params_to_hf(params, config), max_shard_bytes=max_shard_bytes)

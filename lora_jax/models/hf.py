"""Hugging Face model folders for the Llama model: ``from_pretrained`` and ``save_pretrained``.

A folder holds ``config.json`` and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``). Linear weights are stored by PyTorch as
``[out, in]`` and transposed to Flax's ``[in, out]`` kernels here, at the file
boundary; embeddings and norm weights keep their layout. Every tensor of the
file must map to a parameter and every parameter must be found: anything else
is an error naming the tensors.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.io import tensors as st
from lora_jax.io.fields import ConfigFieldError, read_json
from lora_jax.io.names import stack_layers, to_torch, unstack_layers
from lora_jax.models.llama import ROPE_TYPES, LlamaConfig, LlamaForCausalLM, RopeScaling

# Tensors some checkpoints carry that are not parameters (recomputed from the config).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_PASSTHROUGH = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "attention_bias",
                "mlp_bias", "tie_word_embeddings")


def _rope_from_hf(hf: Mapping, where: str) -> tuple[Any, RopeScaling]:
    """``(theta, scaling)`` from transformers 5's ``rope_parameters`` or 4's ``rope_theta``/``rope_scaling``."""
    sources = {}
    for key in ("rope_parameters", "rope_scaling"):
        value = hf.get(key) or {}
        if not isinstance(value, Mapping):
            raise ConfigFieldError(f"{where}: field {key!r} must be an object, got {value!r}")
        sources[key] = value
    params, legacy = sources["rope_parameters"], sources["rope_scaling"]
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    source = params or legacy
    rope_type = source.get("rope_type", source.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigFieldError(f"{where}: rope type {rope_type!r} is not supported (supported: {ROPE_TYPES})")
    fields = {k: source[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                     "original_max_position_embeddings") if k in source}
    return theta, RopeScaling(rope_type, **fields)


def config_from_hf(hf: Mapping, *, where: str = "config.json", **overrides) -> LlamaConfig:
    """A :class:`LlamaConfig` from a Hugging Face ``config.json`` dict; refuses other architectures.

    Every field read is checked for its type and range (``num_key_value_heads: 0``,
    a negative ``hidden_size``, ``rope_theta: 0``, a bool where an int belongs):
    a :class:`~lora_jax.io.fields.ConfigFieldError` names ``where``, the field and the value.

    >>> config_from_hf({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}).head_dim
    16
    >>> config_from_hf({"model_type": "llama", "vocab_size": 0})
    Traceback (most recent call last):
    ...
    lora_jax.io.fields.ConfigFieldError: config.json: LlamaConfig.vocab_size must be a positive int, got 0
    """
    if hf.get("model_type") != "llama":
        raise ConfigFieldError(f"{where}: model_type {hf.get('model_type')!r} is not supported; only 'llama' "
                               f"(LlamaForCausalLM) checkpoints can be loaded")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigFieldError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported; Llama uses 'silu'")
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if name not in DTYPES and not {"dtype", "param_dtype"} <= set(overrides):
        raise ConfigFieldError(f"{where}: field 'dtype' {name!r} is not supported (supported: {sorted(DTYPES)}); "
                               f"pass dtype= and param_dtype= to choose the dtypes")
    try:
        kwargs: dict[str, Any] = {k: hf[k] for k in _PASSTHROUGH if hf.get(k) is not None}
        kwargs["rope_theta"], kwargs["rope_scaling"] = _rope_from_hf(hf, where)
        kwargs.update(dtype=DTYPES.get(name), param_dtype=DTYPES.get(name))
        kwargs.update(overrides)
        return LlamaConfig(**kwargs)
    except ConfigFieldError:
        raise
    except ValueError as err:
        raise ConfigFieldError(f"{where}: {err}") from None


def config_to_hf(config: LlamaConfig) -> dict:
    """The ``config.json`` dict (transformers 5 layout) for ``config``."""
    rope: dict[str, Any] = {"rope_type": config.rope_scaling.rope_type, "rope_theta": config.rope_theta}
    if config.rope_scaling.rope_type != "default":
        rope.update({k: v for k, v in vars(config.rope_scaling).items() if k != "rope_type"})
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            **{k: getattr(config, k) for k in _PASSTHROUGH}, "rope_parameters": rope,
            "dtype": jnp.dtype(config.param_dtype).name}


def _expected(config: LlamaConfig) -> dict:
    """Param shapes of the unscanned model, ``{path tuple: ShapeDtypeStruct}``."""
    module = LlamaForCausalLM(dataclasses.replace(config, scan_layers=False, remat=False, activation_sharding=None))
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


def params_from_hf(tensors: Mapping[str, np.ndarray], config: LlamaConfig) -> dict:
    """Flax params (unscanned layout, NumPy) from a PyTorch state dict; kernels are transposed."""
    expected = _expected(config)
    names = {tensor_name(path): path for path in expected}
    missing = sorted(set(names) - set(tensors))
    unexpected = sorted(n for n in set(tensors) - set(names) if not n.endswith(IGNORED_SUFFIXES))
    if config.tie_word_embeddings and "lm_head.weight" in unexpected:
        if np.array_equal(tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight")):
            unexpected.remove("lm_head.weight")   # a tied copy, written by some exporters
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the config: missing tensors {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected tensors {unexpected[:8]}")
    params: dict = {}
    for name, path in names.items():
        value = tensors[name]
        if path[-1] == "kernel":
            value = value.T
        if tuple(value.shape) != tuple(expected[path].shape):
            want = expected[path].shape[::-1] if path[-1] == "kernel" else expected[path].shape
            raise ValueError(f"tensor {name!r}: shape {list(tensors[name].shape)} does not match the config "
                             f"(expected {list(want)})")
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value.astype(expected[path].dtype)
    return params


def params_to_hf(params: Mapping, config: LlamaConfig) -> dict[str, np.ndarray]:
    """The PyTorch state dict for Flax ``params`` (either layout); kernels are transposed."""
    if config.scan_layers:
        params = unstack_layers(params)
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(str(k.key) for k in path)
        value = np.asarray(leaf)
        out[tensor_name(keys)] = value.T if keys[-1] == "kernel" else value
    return out


def from_pretrained(path: str | os.PathLike, *, dtype=None, param_dtype=None, scan_layers: bool = False,
                    remat: bool = False, show_progress: bool = True,
                    check_finite: bool = True) -> tuple[LlamaForCausalLM, dict]:
    """Reads a Hugging Face Llama folder; returns ``(module, params)``.

    Args:
      path: a folder with ``config.json`` and ``model.safetensors`` (or a
        sharded ``model.safetensors.index.json``).
      dtype, param_dtype: compute and storage dtypes (default: the
        checkpoint's ``dtype``, float32 if it names none).
      scan_layers, remat: build the scanned (and rematerialised) variant; the
        params are stacked to match.
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
    >>> cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
    ...                   num_attention_heads=2)
    >>> ids = jnp.zeros((1, 3), jnp.int32)
    >>> params = LlamaForCausalLM(cfg).init(jax.random.key(0), ids)["params"]
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
    if dtype is not None:
        overrides["dtype"] = dtype
    if param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    config = config_from_hf(hf, where=config_path, **overrides)
    tensors = st.read_folder(path, show_progress=show_progress, require_float=True, check_finite=check_finite)
    params = params_from_hf(tensors, config)
    if scan_layers:
        params = stack_layers(params)
    return LlamaForCausalLM(config), jax.tree.map(jnp.asarray, params)


def save_pretrained(path: str | os.PathLike, config: LlamaConfig | LlamaForCausalLM, params: Mapping, *,
                    max_shard_bytes: int | None = None, extra_config: Mapping[str, Any] | None = None) -> list[str]:
    """Writes ``params`` as a Hugging Face folder that ``transformers`` loads as ``LlamaForCausalLM``.

    Args:
      path: the output folder (created).
      config: the model's :class:`LlamaConfig` (or the module).
      params: its params (scanned or not, as ``config`` says).
      max_shard_bytes: split the weights into shards of at most this size,
        with a ``model.safetensors.index.json``.
      extra_config: more ``config.json`` keys (token ids, a tokenizer note);
        they may not override the keys the config itself defines.

    Returns:
      the file names written.
    """
    if isinstance(config, LlamaForCausalLM):
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

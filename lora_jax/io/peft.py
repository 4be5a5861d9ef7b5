"""Hugging Face PEFT adapter folders: ``load_peft`` and ``save_peft``.

A PEFT LoRA folder holds ``adapter_config.json`` and
``adapter_model.safetensors``. Tensor keys are
``base_model.model.<module>.lora_A.weight`` (``[r, in]``) and ``.lora_B.weight``
(``[out, r]``), or ``.lora_embedding_A`` (``[r, vocab]``) and
``.lora_embedding_B`` (``[dim, r]``) for embeddings: the transposes of our
``a`` (``[in, r]``) and ``b`` (``[r, out]``) in both cases, so the conversion is
one transpose per matrix. The scale ``alpha / r`` is never stored in the
tensors. Module names map as ``model.layers.0.q_proj`` <->
``model/layers_0/q_proj`` (:mod:`lora_jax.io.names`).

``fan_in_fan_out: true`` says the base stores the adapted weights ``[in, out]``
(transformers' ``Conv1D``, GPT-2's blocks). ``lora_A``/``lora_B`` keep the
same shapes; only PEFT's merged delta ``B @ A`` is transposed to the weight's
layout, which our ``[in, out]`` kernels have anyway, so the tensors convert as
for any Linear layer. ``save_peft`` writes the flag true when an adapted
module is a ``Conv1D`` layer (:func:`lora_jax.io.names.is_conv1d`), and
``load_peft`` refuses it for an adapter none of whose layers is one.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from lora_jax import deprecation
from lora_jax.config import FLOAT32_MAX, Adapter, LoraConfig
from lora_jax.io import tensors as st
from lora_jax.io.fields import ConfigFieldError, check_regex, get_bool, get_int, get_number, read_json
from lora_jax.io.names import is_conv1d, stack_layers, to_flax, to_torch, unstack_layers
from lora_jax.tree import adapter_nodes, check_dora, get_path, set_path, weight_name

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# adapter_config.json keys of PEFT 0.21's LoraConfig that we read or that carry no meaning for us.
KNOWN_KEYS = frozenset((
    "alora_invocation_tokens alpha_pattern arrow_config auto_mapping base_model_name_or_path bias corda_config "
    "ensure_weight_tying eva_config exclude_modules fan_in_fan_out inference_mode init_lora_weights kasa_config "
    "layer_replication layers_pattern layers_to_transform loftq_config lora_alpha lora_bias lora_dropout "
    "lora_ga_config megatron_config megatron_core modules_to_save monteclora_config peft_type peft_version "
    "qalora_group_size r rank_pattern revision runtime_config target_modules target_parameters task_type "
    "trainable_token_indices use_bdlora use_dora use_qalora use_rslora velora_config").split())

# Features whose files we cannot represent faithfully: (key, "is active" test, why).
UNSUPPORTED = (
    ("lora_bias", bool, "lora_bias (a trained bias on lora_B) is not supported"),
    ("bias", lambda v: v not in (None, "none"), "trained base biases (bias != 'none') are not supported"),
    ("modules_to_save", bool, "modules_to_save (fully trained extra modules) are not supported"),
    ("layer_replication", bool, "layer_replication is not supported"),
    ("alora_invocation_tokens", bool, "activated LoRA (aLoRA) is not supported"),
    ("use_qalora", bool, "QA-LoRA is not supported"),
    ("target_parameters", bool, "target_parameters (LoRA on raw parameters) is not supported"),
    ("trainable_token_indices", bool, "trainable_token_indices is not supported"),
    ("megatron_config", bool, "Megatron layers are not supported"),
    ("use_bdlora", bool, "block-diagonal LoRA is not supported"),
    ("arrow_config", bool, "Arrow routing is not supported"),
    ("kasa_config", bool, "KaSA is not supported"),
    ("velora_config", bool, "VeLoRA is not supported"),
    ("monteclora_config", bool, "MonteCLoRA is not supported"),
)
# Initialisations that change the base weights: the adapter only fits the modified base.
MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "kasa")

_TENSOR_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A|"
                         r"lora_embedding_B|lora_magnitude_vector|base_layer\.weight)$")
_SIDE = {"lora_A.weight": ("linear", "a"), "lora_B.weight": ("linear", "b"),
         "lora_embedding_A": ("embedding", "a"), "lora_embedding_B": ("embedding", "b")}


class UnsupportedAdapterError(ValueError):
    """The adapter uses a PEFT feature that lora_jax cannot represent."""


class TargetMismatchError(ValueError):
    """``target_modules`` (or ``exclude_modules``, ``layers_to_transform``) and the file's tensors disagree."""


@dataclasses.dataclass(frozen=True)
class PeftAdapter:
    """An adapter read from (or to be written as) a PEFT folder.

    Attributes:
      config: the :class:`LoraConfig` (per-layer ranks and alphas resolved
        into ``rank_pattern``/``alpha_pattern`` entries).
      lora_params: the adapter tree in our layout (``{path: {"a": [in, r], "b": [r, out]}}``, plus
        ``"m": [out]`` for DoRA, PEFT's ``lora_magnitude_vector``).
      peft_config: the ``adapter_config.json`` dict as read.
      base_weights: full base-layer tensors PEFT saved beside the adapter (it
        does so for targeted embeddings and heads), by PyTorch name; they are
        copies of the base model's weights, not part of the adapter.
    """

    config: LoraConfig
    lora_params: dict
    peft_config: dict
    base_weights: dict = dataclasses.field(default_factory=dict)

    lora = deprecation.renamed_attribute("PeftAdapter", "lora", "lora_params")


def peft_pattern_lookup(patterns: Mapping[str, Any], module: str, default):
    """PEFT's ``rank_pattern``/``alpha_pattern`` rule: the first key with ``(.*\\.)?(key)$`` matching wins.

    >>> peft_pattern_lookup({"layers.0.self_attn.q_proj": 2, "down_proj": 6}, "model.layers.0.mlp.down_proj", 4)
    6
    >>> peft_pattern_lookup({"q_proj": 2}, "model.layers.0.self_attn.k_proj", 4)
    4
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_supported(cfg: Mapping, where: str):
    if cfg.get("peft_type") != "LORA":
        raise UnsupportedAdapterError(f"{where}: peft_type {cfg.get('peft_type')!r} is not a LoRA adapter "
                                      f"(only peft_type 'LORA' is read)")
    for key, active, why in UNSUPPORTED:
        if key in cfg and cfg[key] is not None and active(cfg[key]):
            raise UnsupportedAdapterError(f"{where}: {why} ({key} = {cfg[key]!r})")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(MUTATING_INITS):
        raise UnsupportedAdapterError(
            f"{where}: init_lora_weights {init!r} modifies the base weights, so this adapter only fits that "
            f"modified base; save it from PEFT with path_initial_model_for_weight_conversion to get a plain LoRA")
    unknown = sorted(set(cfg) - KNOWN_KEYS)
    if unknown:
        warnings.warn(f"{where}: ignoring adapter_config.json keys unknown to lora_jax: {unknown}", stacklevel=3)


def _group_tensors(raw: Mapping[str, np.ndarray], where: str):
    """``({module: {"kind", "a", "b"}}, base_weights)`` from the file's keys; refuses anything else."""
    modules: dict[str, dict] = collections.defaultdict(dict)
    base_weights = {}
    for key, value in raw.items():
        match = _TENSOR_KEY.match(key[len(PREFIX):]) if key.startswith(PREFIX) else None
        if match is None:
            raise UnsupportedAdapterError(
                f"{where}: tensor {key!r} is not a LoRA tensor of the form '{PREFIX}<module>.lora_A.weight' "
                f"(or lora_B / lora_embedding_A / lora_embedding_B)")
        module, kind = match.group("module"), match.group("kind")
        if kind == "base_layer.weight":
            base_weights[f"{module}.weight"] = value
            continue
        if kind == "lora_magnitude_vector":
            modules[module]["m"] = value
            continue
        layer_kind, side = _SIDE[kind]
        entry = modules[module]
        if entry.setdefault("kind", layer_kind) != layer_kind:
            raise ValueError(f"{where}: module {module!r} mixes lora_A/B and lora_embedding_A/B tensors")
        entry[side] = value
    for module, entry in modules.items():
        if "a" not in entry or "b" not in entry:
            raise ValueError(f"{where}: module {module!r} has only its {'A' if 'a' in entry else 'B'} matrix")
        if entry["a"].ndim != 2 or entry["b"].ndim != 2 or entry["a"].shape[0] != entry["b"].shape[1]:
            raise UnsupportedAdapterError(
                f"{where}: module {module!r}: A {list(entry['a'].shape)} and B {list(entry['b'].shape)} are not "
                f"a [r, in] / [out, r] pair (only Linear and Embedding adapters are read)")
        if "m" in entry and (entry["kind"] != "linear" or entry["m"].shape != entry["b"].shape[:1]):
            raise UnsupportedAdapterError(
                f"{where}: module {module!r}: DoRA magnitude {list(entry['m'].shape)} is not the [out] vector of "
                f"a Linear layer with B {list(entry['b'].shape)} (DoRA is read for Linear layers only)")
    return dict(modules), base_weights


def _targets(cfg: Mapping, paths: list[str]) -> dict[str, Any]:
    """Our ``targets``/``exclude``: PEFT's name lists translated, else the exact layers in the file."""
    target, exclude = cfg.get("target_modules"), cfg.get("exclude_modules")
    if _is_all_linear(target) and not exclude:
        return {"targets": ("all-linear",)}
    if isinstance(target, list) and isinstance(exclude, (list, type(None))) and \
            not cfg.get("layers_to_transform"):
        return {"targets": tuple(sorted(to_flax(t) for t in target)),
                "exclude": tuple(sorted(to_flax(e) for e in exclude or ()))}
    return {"targets": tuple(paths)}


def _is_all_linear(target) -> bool:
    return isinstance(target, str) and target.lower() == "all-linear"


def _module_list(cfg: Mapping, key: str, where: str):
    """``target_modules``/``exclude_modules``: null, a regex string, or a list of non-empty names."""
    value = cfg.get(key)
    if value is None or _is_all_linear(value) and key == "target_modules":
        return value
    if isinstance(value, str):
        return check_regex(value, where, key)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigFieldError(f"{where}: field {key!r} must be a regex string or a list of module names, "
                               f"got {value!r}")
    return value


def _pattern_field(cfg: Mapping, key: str, where: str, check) -> dict:
    """``rank_pattern``/``alpha_pattern``: ``{regex: value}`` with valid regexes and values."""
    table = cfg.get(key) or {}
    if not isinstance(table, dict):
        raise ConfigFieldError(f"{where}: field {key!r} must be an object {{pattern: value}}, got {table!r}")
    for pattern, value in table.items():
        name = f"{key}[{pattern!r}]"
        check_regex(rf"(.*\.)?({pattern})$", where, name)
        check({name: value}, name, where)
    return table


def _layer_indices(cfg: Mapping, where: str):
    """``layers_to_transform`` as a set of ints, or None."""
    value = cfg.get("layers_to_transform")
    if value is None or value == []:   # PEFT treats an empty list as "every layer"
        return None
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ConfigFieldError(f"{where}: field 'layers_to_transform' must be an int or a list of ints >= 0, "
                               f"got {value!r}")
    return set(values)


def _read_fields(cfg: Mapping, where: str) -> dict[str, Any]:
    """The fields of ``adapter_config.json`` that we use, each checked for its type and range."""
    init = cfg.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)):
        raise ConfigFieldError(f"{where}: field 'init_lora_weights' must be true, false or a method name, "
                               f"got {init!r}")
    layers_pattern = cfg.get("layers_pattern")
    if layers_pattern is not None and not (isinstance(layers_pattern, str) or isinstance(layers_pattern, list)
                                           and all(isinstance(p, str) for p in layers_pattern)):
        raise ConfigFieldError(f"{where}: field 'layers_pattern' must be a string or a list of strings, "
                               f"got {layers_pattern!r}")
    return {
        "r": get_int(cfg, "r", where, 8),
        "lora_alpha": get_number(cfg, "lora_alpha", where, 8.0, high=FLOAT32_MAX),
        "lora_dropout": get_number(cfg, "lora_dropout", where, 0.0, low_inclusive=True, high=1.0),
        "use_rslora": get_bool(cfg, "use_rslora", where), "use_dora": get_bool(cfg, "use_dora", where),
        "fan_in_fan_out": get_bool(cfg, "fan_in_fan_out", where),
        "init_lora_weights": init,
        "rank_pattern": _pattern_field(cfg, "rank_pattern", where, lambda t, k, w: get_int(t, k, w)),
        "alpha_pattern": _pattern_field(cfg, "alpha_pattern", where,
                                        lambda t, k, w: get_number(t, k, w, high=FLOAT32_MAX)),
        "target_modules": _module_list(cfg, "target_modules", where),
        "exclude_modules": _module_list(cfg, "exclude_modules", where),
        "layers_to_transform": _layer_indices(cfg, where),
        "layers_pattern": [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern,
    }


def _selects(entries, module: str) -> bool:
    """PEFT's rule: a string is a full-match regex, a list entry matches the name or a ``.``-suffix of it."""
    if isinstance(entries, str):
        return re.fullmatch(entries, module) is not None
    return any(module == e or module.endswith("." + e) for e in entries)


def _layer_index(module: str, layers_pattern) -> int | None:
    """The layer number PEFT's ``layers_to_transform`` reads from a module name (its regexes)."""
    patterns = [rf".*\.{re.escape(p)}\.(\d+)\." for p in layers_pattern] if layers_pattern else [r".*\.[^.]*\.(\d+)\."]
    for pattern in patterns:
        match = re.match(pattern, module)
        if match:
            return int(match.group(1))
    return None


def _unselected(fields: Mapping, module: str, kind: str) -> str | None:
    """Why the config does not select ``module`` (a layer of ``kind``), or None if it does."""
    target, exclude, layers = fields["target_modules"], fields["exclude_modules"], fields["layers_to_transform"]
    if _is_all_linear(target):
        if kind != "linear":
            return f"target_modules {target!r} selects Linear layers only, not the embedding {module!r}"
    elif target is not None and not _selects(target, module):
        return f"target_modules {target!r} does not select module {module!r}"
    if exclude is not None and _selects(exclude, module):
        return f"exclude_modules {exclude!r} excludes module {module!r}"
    if layers is not None and _layer_index(module, fields["layers_pattern"]) not in layers:
        return f"layers_to_transform {sorted(layers)} does not include the layer of module {module!r}"
    return None


def _check_targets(fields: Mapping, modules: Mapping[str, dict], where: str):
    """Refuses tensors for modules the config does not select, and list targets with no tensors."""
    for module in sorted(modules):
        why = _unselected(fields, module, modules[module]["kind"])
        if why:
            raise TargetMismatchError(f"{where}: {WEIGHTS_FILE} holds tensors for a module the config does not select: "
                             f"{why}")
    target = fields["target_modules"]
    unused = [t for t in target if not any(_selects([t], m) for m in modules)] if isinstance(target, list) else []
    if unused:
        raise TargetMismatchError(f"{where}: target_modules entries {unused} match no module with tensors in "
                                  f"{WEIGHTS_FILE} (its modules: {sorted(modules)[:8]}"
                                  f"{' ...' if len(modules) > 8 else ''})")


def _check_layout(fields: Mapping, modules: Mapping[str, dict], where: str):
    """Refuses ``fan_in_fan_out: true`` when no adapted layer is a ``Conv1D`` (the flag would describe another base).

    PEFT corrects the flag per layer; a file mixing ``Conv1D`` layers with
    others (GPT-2's blocks and its ``Linear`` head) is read as it would.
    """
    linear = sorted(m for m, entry in modules.items() if entry["kind"] == "linear")
    if fields["fan_in_fan_out"] and linear and not any(is_conv1d(m) for m in linear):
        raise UnsupportedAdapterError(
            f"{where}: fan_in_fan_out is true (base weights stored [in, out], as transformers' Conv1D layers), but "
            f"none of its modules is a Conv1D layer of a known architecture (GPT-2's h.<i>.attn.c_attn, "
            f"attn.c_proj, mlp.c_fc, mlp.c_proj): {linear[:4]}{' ...' if len(linear) > 4 else ''}")


def _pattern_table(values: dict[str, Any], default) -> tuple:
    return tuple((path, value) for path, value in values.items() if value != default)


def _adapter_tree(modules: Mapping[str, dict], fields: Mapping, folder: str, dtype) -> tuple[dict, dict, dict]:
    """``(lora tree, {layer: rank}, {layer: alpha})``; each module's rank checked against the config."""
    ranks, alphas, lora = {}, {}, {}
    for module in sorted(modules):
        entry, layer = modules[module], to_flax(module)
        expected_rank = peft_pattern_lookup(fields["rank_pattern"], module, fields["r"])
        if entry["a"].shape[0] != expected_rank:
            raise ValueError(f"{folder}: module {module!r} has rank {entry['a'].shape[0]} but the config's "
                             f"r/rank_pattern give {expected_rank}")
        ranks[layer] = expected_rank
        alphas[layer] = float(peft_pattern_lookup(fields["alpha_pattern"], module, fields["lora_alpha"]))
        if ("m" in entry) != fields["use_dora"]:
            raise ValueError(f"{folder}: module {module!r} {'has' if 'm' in entry else 'lacks'} a "
                             f"lora_magnitude_vector but the config's use_dora is {fields['use_dora']}")
        node = {"a": entry["a"].T, "b": entry["b"].T, **({"m": entry["m"]} if "m" in entry else {})}
        if dtype is not None:
            node = {k: v.astype(dtype) for k, v in node.items()}
        lora = set_path(lora, tuple(layer.split("/")), node)
    return lora, ranks, alphas


def load_peft(path: str | os.PathLike, *, adapter_name: str | None = None, dtype=np.float32,
              scan_layers: bool = False, check_finite: bool = True) -> PeftAdapter:
    """Reads a PEFT LoRA adapter folder into our layout.

    Args:
      path: the folder holding ``adapter_config.json`` and ``adapter_model.safetensors``.
      adapter_name: PEFT saves adapters other than ``"default"`` in a
        sub-folder named after them; pass the name to read that one.
      dtype: the dtype of the returned matrices (float32 by default, as PEFT's
        ``autocast_adapter_dtype``); ``None`` keeps the file's.
      scan_layers: stack ``model/layers_<i>`` adapters along a leading axis for
        a model built with ``scan_layers=True``.
      check_finite: refuse tensors holding NaN or Inf (one ``np.isfinite``
        pass per tensor). ``False`` is for experts inspecting a broken
        adapter; tensors must still be floating point.

    Returns:
      a :class:`PeftAdapter`. Unknown config keys are ignored with a warning;
      features we cannot represent (lora_bias, modules_to_save, other
      PEFT methods, ...) raise :class:`UnsupportedAdapterError`.

    Raises:
      ConfigFieldError: ``adapter_config.json`` is not a JSON object, or a
        field read has the wrong type or range (``r: 4.9``, ``use_rslora:
        "false"``, an invalid ``rank_pattern`` regex), naming file and field.
      TargetMismatchError: the file holds tensors for a module that
        ``target_modules`` (PEFT's suffix / full-match regex rules),
        ``exclude_modules`` or ``layers_to_transform`` do not select, or a
        ``target_modules`` entry matches no module in the file.
      lora_jax.io.tensors.BadTensorError: a tensor that is not floating point,
        or (with ``check_finite``) holds NaN/Inf, naming file and tensor.
      lora_jax.io.tensors.SafetensorsFileError: an unreadable weights file.

    >>> import tempfile
    >>> cfg = LoraConfig(rank=2, alpha=4.0, targets=("q_proj",))
    >>> lora = {"model": {"layers_0": {"q_proj": {"a": np.ones((8, 2)), "b": np.ones((2, 8))}}}}
    >>> base = {"model": {"layers_0": {"q_proj": {"kernel": np.zeros((8, 8))}}}}
    >>> with tempfile.TemporaryDirectory() as d:
    ...     files = save_peft(d, base, lora, cfg)
    ...     loaded = load_peft(d)
    >>> loaded.config.scaling("model/layers_0/q_proj"), loaded.lora_params["model"]["layers_0"]["q_proj"]["a"].shape
    (2.0, (8, 2))
    """
    folder = os.path.join(os.fspath(path), adapter_name) if adapter_name else os.fspath(path)
    config_path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {folder!r}")
    cfg = read_json(config_path)
    _check_supported(cfg, config_path)
    fields = _read_fields(cfg, config_path)
    weights_path = os.path.join(folder, WEIGHTS_FILE)
    raw = st.read(weights_path, require_float=True, check_finite=check_finite)
    modules, base_weights = _group_tensors(raw, weights_path)
    if not modules:
        raise ValueError(f"{folder}: {WEIGHTS_FILE} holds no LoRA tensors")
    _check_targets(fields, modules, config_path)
    _check_layout(fields, modules, config_path)
    lora, ranks, alphas = _adapter_tree(modules, fields, folder, dtype)
    r, alpha, use_dora = fields["r"], fields["lora_alpha"], fields["use_dora"]
    try:
        config = LoraConfig(rank=r, alpha=alpha, **_targets(cfg, sorted(ranks)), dropout=fields["lora_dropout"],
                            use_rslora=fields["use_rslora"], use_dora=use_dora,
                            init="gaussian" if fields["init_lora_weights"] == "gaussian" else "default",
                            rank_pattern=_pattern_table(ranks, r), alpha_pattern=_pattern_table(alphas, alpha))
    except ValueError as err:
        raise ConfigFieldError(f"{config_path}: {err}") from None
    if scan_layers:
        lora = stack_layers(lora)
        config = dataclasses.replace(config, rank_pattern=_stacked(config.rank_pattern),
                                     alpha_pattern=_stacked(config.alpha_pattern))
    return PeftAdapter(config, lora, cfg, base_weights)


def _stacked(table: tuple) -> tuple:
    """Per-layer pattern entries for the stacked layout, which must agree across layers."""
    merged: dict[str, Any] = {}
    for path, value in table:
        key = re.sub(r"/layers_\d+/", "/layers/", path)
        if merged.setdefault(key, value) != value:
            raise ValueError(f"scan_layers: layers disagree on the rank/alpha of {key!r}; load unstacked instead")
    return tuple(merged.items())


def _most_common(values: list):
    return collections.Counter(values).most_common(1)[0][0]


def _pattern_key(module: str) -> str:
    """A ``rank_pattern`` key that PEFT matches to ``module`` alone (the first segment dropped when possible)."""
    parts = module.split(".")
    return re.escape(".".join(parts[1:]) if len(parts) > 1 else module)


def _arguments(base_params, lora_params, config, by_name: dict) -> tuple[Mapping, Any, LoraConfig | None]:
    """``(base_params, lora_params, config)`` of a :func:`save_peft` call, also from the order of 0.1."""
    old_order = "base_params" in by_name and base_params is not None and (
        (isinstance(lora_params, LoraConfig) and config is None) or (lora_params is None and config is not None))
    if old_order:   # save_peft(path, lora, config, base_params=base), config perhaps by keyword
        deprecation.warn("save_peft(path, lora, config, base_params=base_params)",
                         "save_peft(path, base_params, lora_params, config)", stacklevel=4)
        config = lora_params if config is None else config
        base_params, lora_params = by_name.pop("base_params"), base_params
    for name, value in (("base_params", base_params), ("lora_params", lora_params)):
        if name in by_name and value is not None:
            raise TypeError(f"save_peft() got multiple values for argument {name!r}")
    base_params = by_name.pop("base_params", base_params)
    lora_params = by_name.pop("lora_params", lora_params)
    if by_name:
        raise TypeError(f"save_peft() got an unexpected keyword argument {sorted(by_name)[0]!r}")
    if base_params is None or lora_params is None:
        raise TypeError("save_peft() needs base_params and lora_params: save_peft(path, base_params, lora_params, "
                        "config)")
    return base_params, lora_params, config


def save_peft(path: str | os.PathLike, base_params: Mapping | None = None, lora_params: Any = None, /,
              config: LoraConfig | None = None, *, base_model_name_or_path: str | None = None,
              task_type: str | None = None, target_modules: list[str] | str | None = None,
              **by_name) -> list[str]:
    """Writes ``lora_params`` as a PEFT LoRA folder that ``PeftModel.from_pretrained`` loads.

    Args:
      path: the output folder (created).
      base_params: the base model's params, laid out like ``lora_params``: they
        tell embeddings from linear layers and check that every adapter fits.
      lora_params: the adapter tree (unscanned, or scanned with ``model/layers``
        stacked), or one :class:`~lora_jax.config.Adapter` value with ``config`` omitted.
      config: its :class:`LoraConfig`; each layer's alpha comes from
        ``config.alpha_for`` and its rank from the matrices.
        ``fan_in_fan_out`` is written true when an adapted layer is a
        transformers ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``).
      base_model_name_or_path, task_type: written to ``adapter_config.json``
        (``task_type="CAUSAL_LM"`` makes PEFT build a ``PeftModelForCausalLM``).
      target_modules: defaults to the full names of the adapted modules.
      by_name: ``base_params=`` and ``lora_params=`` given by keyword. The
        order of 0.1, ``save_peft(path, lora, config, base_params=base)``,
        still works for one release and warns.

    Returns:
      the file names written.
    """
    base_params, lora_params, config = _arguments(base_params, lora_params, config, by_name)
    lora, config = Adapter.unpack(lora_params, config, where="save_peft")
    if "layers" in (lora.get("model") or {}):
        lora, base_params = unstack_layers(lora), unstack_layers(base_params)
    tensors, ranks, alphas, conv1d = {}, {}, {}, False
    for path_tuple, node in adapter_nodes(lora).items():
        layer = "/".join(path_tuple)
        try:
            base_node = get_path(base_params, path_tuple)
        except KeyError:
            raise ValueError(f"adapter {layer!r} has no layer in base_params") from None
        weight = weight_name(base_node, path_tuple)
        a, b, w = np.asarray(node["a"]), np.asarray(node["b"]), base_node[weight]
        if a.ndim != 2 or b.ndim != 2 or np.ndim(w) != 2 or (a.shape[0], b.shape[1]) != tuple(np.shape(w)):
            raise ValueError(f"layer {layer!r}: only 2-D Dense and Embed adapters fit PEFT's format; got a "
                             f"{list(a.shape)}, b {list(b.shape)} for weight {list(np.shape(w))}")
        module = to_torch(layer)
        names = ("lora_embedding_A", "lora_embedding_B") if weight == "embedding" else ("lora_A.weight",
                                                                                        "lora_B.weight")
        tensors[f"{PREFIX}{module}.{names[0]}"] = a.T
        tensors[f"{PREFIX}{module}.{names[1]}"] = b.T
        check_dora(layer, node, config)
        if "m" in node:
            # PEFT keeps the absolute magnitude ||W + s*B@A|| per output row, shape [out], like ours.
            tensors[f"{PREFIX}{module}.lora_magnitude_vector"] = np.asarray(node["m"])
        ranks[module], alphas[module] = a.shape[1], config.alpha_for(layer)
        conv1d = conv1d or (weight != "embedding" and is_conv1d(module))
    if not tensors:
        raise ValueError("save_peft: the lora tree holds no adapters")
    r, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
    peft_config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": int(r), "lora_alpha": alpha,
        "lora_dropout": config.dropout, "target_modules": target_modules or sorted(ranks), "bias": "none",
        "fan_in_fan_out": conv1d, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True, "use_rslora": config.use_rslora,
        "rank_pattern": {_pattern_key(m): int(v) for m, v in ranks.items() if v != r},
        "alpha_pattern": {_pattern_key(m): v for m, v in alphas.items() if v != alpha},
        # Written only when set: PEFT before v0.9 does not know the key.
        **({"use_dora": True} if config.use_dora else {}),
    }
    folder = os.fspath(path)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        f.write(json.dumps(peft_config, indent=2, sort_keys=True))
    st.write(os.path.join(folder, WEIGHTS_FILE), jax.tree.map(np.asarray, tensors))
    return [CONFIG_FILE, WEIGHTS_FILE]

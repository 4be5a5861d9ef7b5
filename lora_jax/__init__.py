"""lora_jax: LoRA fine-tuning for JAX and Flax.

The frozen base params and the adapters are two separate pytrees. ``init_lora``
creates the adapters for the layers a :class:`LoraConfig` targets,
``lora_apply`` runs a linen module with them, ``make_train_step`` trains them
alone, and ``merge``/``unmerge`` fold them into (and out of) the base weights.
Several adapters for one base live in an ``AdapterSet`` (switch, mix per row,
hot-swap); ``combine`` adds them into one. ``lora_apply_fn`` adapts any JAX
function of a params pytree (plain dicts, haiku, equinox); ``lora_jax.nnx``
attaches adapters to Flax NNX models; ``lora_jax.sharding`` lays base and
adapters out over a device mesh for sharded training and merging, and
``lora_jax.distributed`` runs that over several processes (hosts).
"""

import importlib

from lora_jax import deprecation

__version__ = "0.2.0"

# Every public name is loaded on first use (PEP 562), so that ``import lora_jax`` loads no JAX, Flax or
# optax (``lora-jax --help`` imports this package and must start fast); the first access imports the
# module that defines the name, and binds the name here so that later look-ups are plain attributes.
_NAMES = {
    "AdapterSet": "adapter_set",
    "Adapter": "config", "LoraConfig": "config",
    "init_lora_fn": "functional", "lora_apply_fn": "functional", "merge_fn": "functional", "unmerge_fn": "functional",
    "find_layers": "linen", "init_lora": "linen", "lora_apply": "linen",
    "Combined": "multi", "Stacked": "multi", "combine": "multi", "stack": "multi",
    "Summary": "report", "summary": "report",
    "Layer": "targets", "select": "targets",
    "make_full_train_step": "train", "make_train_step": "train",
    "adapter_paths": "tree", "adapter_nodes": "tree", "count_params": "tree", "merge": "tree", "unmerge": "tree",
}
# Submodules loaded on first use: those in ``__all__`` (``io`` brings orbax and safetensors, ``nnx`` brings
# flax.nnx, ``sharding``/``analysis``/``inits``/``quant`` are not needed to train an adapter), then the
# internal ones that importing the names above used to bind as attributes (still served, and in ``dir()``).
_SUBMODULES = ("analysis", "backend", "core", "distributed", "factors", "functional", "inits", "io", "kinds",
               "models", "multi", "nnx", "optim", "quant", "reference", "sharding",
               "adapter_set", "config", "contract", "linen", "mixed", "report", "targets", "train", "tree")
# Names renamed in 0.2, served for one release with a DeprecationWarning (not in __all__ or dir()).
_DEPRECATED = deprecation.module_getattr(__name__, {"adapters": (lambda: __getattr__("adapter_nodes"),
                                                                 "lora_jax.adapter_nodes")})


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(f"lora_jax.{_NAMES[name]}"), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"lora_jax.{name}")   # also binds it as an attribute of the package
    return _DEPRECATED(name)


def __dir__() -> list[str]:   # what the eager imports of 0.2 listed, whether loaded yet or not
    return sorted((set(globals()) - {"_NAMES"}) | set(__all__) | set(_SUBMODULES))


__all__ = [
    "Adapter",
    "AdapterSet",
    "Combined",
    "LoraConfig",
    "Layer",
    "Stacked",
    "Summary",
    "adapter_nodes",
    "adapter_paths",
    "analysis",
    "backend",
    "combine",
    "core",
    "count_params",
    "distributed",
    "factors",
    "find_layers",
    "functional",
    "init_lora",
    "init_lora_fn",
    "inits",
    "io",
    "kinds",
    "lora_apply",
    "lora_apply_fn",
    "make_full_train_step",
    "make_train_step",
    "merge",
    "merge_fn",
    "models",
    "multi",
    "nnx",
    "optim",
    "quant",
    "reference",
    "select",
    "sharding",
    "stack",
    "summary",
    "unmerge",
    "unmerge_fn",
]

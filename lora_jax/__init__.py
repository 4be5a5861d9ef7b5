"""lora_jax: LoRA fine-tuning for JAX and Flax.

The frozen base params and the adapters are two separate pytrees. ``init_lora``
creates the adapters for the layers a :class:`LoraConfig` targets,
``lora_apply`` runs a linen module with them, ``make_train_step`` trains them
alone, and ``merge``/``unmerge`` fold them into (and out of) the base weights.
Several adapters for one base live in an ``AdapterSet`` (switch, mix per row,
hot-swap); ``combine`` adds them into one. ``lora_apply_fn`` adapts any JAX
function of a params pytree (plain dicts, haiku, equinox); ``lora_jax.nnx``
attaches adapters to Flax NNX models; ``lora_jax.sharding`` lays base and
adapters out over a device mesh for sharded training and merging.
"""

import importlib

from lora_jax import deprecation
from lora_jax.adapter_set import AdapterSet
from lora_jax.config import Adapter, LoraConfig
from lora_jax.functional import init_lora_fn, lora_apply_fn, merge_fn, unmerge_fn
from lora_jax.linen import find_layers, init_lora, lora_apply
from lora_jax.multi import Combined, Stacked, combine, stack
from lora_jax.report import Summary, summary
from lora_jax.targets import Layer, select
from lora_jax.train import make_full_train_step, make_train_step
from lora_jax.tree import adapter_paths, adapter_nodes, count_params, merge, unmerge

__version__ = "0.2.0"

# Submodules loaded on first use (PEP 562), so that ``import lora_jax`` costs little more than
# ``import jax, flax, optax`` and loads no optional dependency: ``io`` brings orbax and safetensors,
# ``nnx`` brings flax.nnx, ``sharding``/``analysis``/``inits``/``quant`` are not needed to train an adapter.
_SUBMODULES = ("analysis", "backend", "core", "factors", "functional", "inits", "io", "kinds", "models", "multi",
               "nnx", "optim", "quant", "reference", "sharding")
# Names renamed in 0.2, served for one release with a DeprecationWarning (not in __all__ or dir()).
_DEPRECATED = deprecation.module_getattr(__name__, {"adapters": (lambda: adapter_nodes, "lora_jax.adapter_nodes")})


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"lora_jax.{name}")   # also binds it as an attribute of the package
    return _DEPRECATED(name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


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

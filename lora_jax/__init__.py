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

from lora_jax import analysis, backend, core, functional, inits, io, models, multi, nnx, optim, reference, sharding
from lora_jax.adapter_set import AdapterSet
from lora_jax.config import LoraConfig
from lora_jax.functional import init_lora_fn, lora_apply_fn, merge_fn, unmerge_fn
from lora_jax.linen import find_layers, init_lora, lora_apply
from lora_jax.multi import Adapter, Combined, Stacked, combine, stack
from lora_jax.report import Summary, summary
from lora_jax.targets import Layer, select
from lora_jax.train import make_full_train_step, make_train_step
from lora_jax.tree import adapter_paths, adapters, count_params, merge, unmerge

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterSet",
    "Combined",
    "LoraConfig",
    "Layer",
    "Stacked",
    "Summary",
    "adapter_paths",
    "adapters",
    "analysis",
    "backend",
    "combine",
    "core",
    "count_params",
    "find_layers",
    "functional",
    "init_lora",
    "init_lora_fn",
    "inits",
    "io",
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
    "reference",
    "select",
    "sharding",
    "stack",
    "summary",
    "unmerge",
    "unmerge_fn",
]

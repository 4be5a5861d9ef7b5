"""lora_jax: LoRA fine-tuning for JAX and Flax.

The frozen base params and the adapters are two separate pytrees. ``init_lora``
creates the adapters for the layers a :class:`LoraConfig` targets,
``lora_apply`` runs a linen module with them, ``make_train_step`` trains them
alone, and ``merge``/``unmerge`` fold them into (and out of) the base weights.
"""

from lora_jax import backend, core, io, models, optim, reference
from lora_jax.config import LoraConfig
from lora_jax.linen import find_layers, init_lora, lora_apply
from lora_jax.report import Summary, summary
from lora_jax.targets import Layer, select
from lora_jax.train import make_full_train_step, make_train_step
from lora_jax.tree import adapter_paths, adapters, count_params, merge, unmerge

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "Layer",
    "Summary",
    "adapter_paths",
    "adapters",
    "backend",
    "core",
    "count_params",
    "find_layers",
    "init_lora",
    "io",
    "lora_apply",
    "make_full_train_step",
    "make_train_step",
    "merge",
    "models",
    "optim",
    "reference",
    "select",
    "summary",
    "unmerge",
]

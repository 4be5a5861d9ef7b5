"""Access to the committed fixtures written by transformers/PEFT (see tests/fixtures/README.md)."""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import lora_apply, merge
from lora_jax.io import load_peft
from lora_jax.models import from_pretrained

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
ADAPTERS = os.path.join(FIXTURES, "adapters")

# adapter fixture -> (base model folder, sub-folder of a non-default adapter name)
ADAPTER_BASES = {"plain": ("llama_tiny", None), "patterns": ("llama_tiny", None), "rslora": ("llama_tiny", None),
                 "embedding": ("llama_tiny", None), "dora": ("llama_tiny", None), "tied_attn": ("llama_tiny_tied", None),
                 "named": ("llama_tiny", "second")}

#: the issue's bar for agreement with PyTorch float32 logits
MAX_ABS = 1e-4


@functools.lru_cache(maxsize=None)
def reference() -> dict[str, np.ndarray]:
    with np.load(os.path.join(FIXTURES, "reference.npz")) as z:
        return {k: z[k] for k in z.files}


@functools.lru_cache(maxsize=None)
def model(name: str, scan_layers: bool = False):
    """``(module, params)`` of a fixture model folder, read once per session."""
    return from_pretrained(os.path.join(FIXTURES, name), scan_layers=scan_layers, show_progress=False)


@functools.lru_cache(maxsize=None)
def _jitted(module, config):
    from lora_jax import lora_apply

    return jax.jit(module.apply if config is None else lora_apply(module, config))


def forward(module, params, ids, lora=None, config=None):
    """Logits of ``module`` (with the adapter ``lora`` under ``config`` when given), compiled once per pair."""
    if lora is None:
        return _jitted(module, None)({"params": params}, ids)
    return _jitted(module, config)(params, lora, ids)


def assert_logits_match(actual, expected, what: str):
    """Float32 agreement with PyTorch: max abs <= MAX_ABS and relative <= float32 tolerance."""
    from tests.tolerances import assert_close

    actual = np.asarray(actual)
    err = float(np.max(np.abs(actual - expected)))
    assert err <= MAX_ABS, f"{what}: max abs logit difference {err:.3g} > {MAX_ABS}"
    assert_close(actual, expected, np.float32, what=what)


def read_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, loaded (the file is closed)."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@dataclasses.dataclass
class Loaded:
    """A Hugging Face model folder, a PEFT adapter on it, and their logits on ``ids``: computed once per module."""

    module: object
    params: dict
    adapter: object
    merged: dict
    logits: np.ndarray
    unmerged: np.ndarray
    merged_logits: np.ndarray

    @classmethod
    def of(cls, model_dir: str, adapter_dir: str, ids) -> "Loaded":
        """Reads both folders; the logits are the base's, the adapter's unmerged and the merged model's."""
        module, params = from_pretrained(model_dir, show_progress=False)
        adapter = load_peft(adapter_dir)
        ids = jnp.asarray(ids)
        base = jax.jit(lambda p, ids: module.apply({"params": p}, ids))
        adapted = jax.jit(lora_apply(module, adapter.config))
        merged = merge(params, adapter.lora_params, adapter.config)
        return cls(module, params, adapter, merged, np.asarray(base(params, ids)),
                   np.asarray(adapted(params, adapter.lora_params, ids)), np.asarray(base(merged, ids)))

"""The public surface, the backend switch and the summary."""

import importlib
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

import lora_jax
from lora_jax import backend


def test_all_matches_what_is_importable():
    public = {name for name in dir(lora_jax) if not name.startswith("_")}
    non_modules = {name for name in public if not isinstance(getattr(lora_jax, name), types.ModuleType)}
    assert non_modules <= set(lora_jax.__all__), non_modules - set(lora_jax.__all__)
    assert set(lora_jax.__all__) <= public, set(lora_jax.__all__) - public
    assert len(lora_jax.__all__) == len(set(lora_jax.__all__))


@pytest.mark.parametrize("module", ["config", "core", "linen", "optim", "reference", "report", "targets",
                                    "train", "tree", "backend", "models.llama", "models.hf", "models.generate",
                                    "io.peft", "io.tensors", "io.names", "io.progress",
                                    "io.checkpoint", "sharding", "hlo", "inits", "optim", "quant"])
def test_every_public_function_has_a_docstring(module):
    mod = importlib.import_module(f"lora_jax.{module}")
    for name in dir(mod):
        obj = getattr(mod, name)
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if callable(obj):
            assert obj.__doc__ and obj.__doc__.strip(), f"lora_jax.{module}.{name} has no docstring"


@pytest.mark.parametrize("package", ["lora_jax.io", "lora_jax.models"])
def test_subpackage_all_is_importable(package):
    mod = importlib.import_module(package)
    assert all(hasattr(mod, name) for name in mod.__all__) and len(mod.__all__) == len(set(mod.__all__))


OPTIONAL = ("orbax", "safetensors", "rich", "tokenizers", "matplotlib", "flax.nnx")


def _loaded_after(statement: str) -> set[str]:
    """The modules of ``OPTIONAL`` (and lora_jax's own) loaded by ``statement`` in a fresh interpreter."""
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}).stdout.split()
    return {m for m in out if m.startswith("lora_jax") or any(m == o or m.startswith(o + ".") for o in OPTIONAL)}


def test_import_loads_no_optional_dependency():
    frameworks = {m for m in _loaded_after("import jax, flax, optax") if not m.startswith("lora_jax")}
    loaded = _loaded_after("import lora_jax")
    heavy = {m.split(".")[0] if not m.startswith("flax.nnx") else "flax.nnx" for m in loaded - frameworks
             if not m.startswith("lora_jax")}
    assert heavy == set(), heavy
    for name in ("orbax", "safetensors", "tokenizers", "matplotlib", "flax.nnx"):   # flax itself loads rich
        assert name not in loaded, name
    lazy = {"lora_jax.io", "lora_jax.io.checkpoint", "lora_jax.nnx", "lora_jax.sharding", "lora_jax.models",
            "lora_jax.quant", "lora_jax.analysis", "lora_jax.inits", "lora_jax.app"}
    assert loaded & lazy == set(), loaded & lazy


def test_io_loads_orbax_only_for_checkpoints():
    loaded = _loaded_after("from lora_jax.io import load_peft, save_peft")
    assert not any(m.startswith("orbax") for m in loaded)
    assert "lora_jax.io.checkpoint" in _loaded_after("from lora_jax.io import Checkpointer")


def test_submodules_load_on_first_use():
    assert lora_jax.quant is sys.modules["lora_jax.quant"] is importlib.import_module("lora_jax.quant")
    assert {"io", "nnx", "quant", "sharding"} <= set(dir(lora_jax))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lora_jax.nope


def test_backend_cpu_and_auto():
    assert backend.use("cpu").platform == "cpu"
    assert backend.current().platform == "cpu"
    assert backend.describe().startswith("cpu: ")
    assert backend.use("auto") == jax.devices()[0]
    backend.use("cpu")


def test_backend_rejects_unknown_names(monkeypatch):
    with pytest.raises(ValueError, match=r"backend \(argument\) must be one of .*got 'cuda'"):
        backend.use("cuda")
    monkeypatch.setenv("LORA_JAX_BACKEND", "metal")
    with pytest.raises(ValueError, match=r"environment variable LORA_JAX_BACKEND.*got 'metal'"):
        backend.use()
    monkeypatch.setenv("LORA_JAX_BACKEND", "CPU")
    assert backend.use().platform == "cpu"


@pytest.mark.skipif(any(d.platform == "gpu" for d in jax.devices()), reason="a GPU is present")
def test_backend_gpu_missing_says_how_to_install():
    with pytest.raises(backend.BackendUnavailableError, match=r"pip install 'lora-jax\[cuda12\]'"):
        backend.use("gpu")


def test_backend_env_var_in_a_fresh_process():
    code = "import lora_jax; print(lora_jax.backend.use().platform)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"LORA_JAX_BACKEND": "cpu", "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
                         check=True)
    assert out.stdout.strip() == "cpu"


def test_summary_prints_and_returns_data(capsys):
    base = {"blk": {"q": {"kernel": np.zeros((16, 8)), "bias": np.zeros(8)},
                    "norm": {"scale": np.zeros(16)}}}
    lora = {"blk": {"q": {"a": np.zeros((16, 4)), "b": np.zeros((4, 8))}}}
    s = lora_jax.summary(base, lora, lora_jax.LoraConfig(rank=4, alpha=8))
    assert s.trainable == 16 * 4 + 4 * 8 == 96
    assert s.base == 16 * 8 + 8 + 16 == 152
    assert s.total == 248
    assert s.headline() == "trainable 38.71% (96 / 248)"
    row = s.rows[0]
    assert (row.path, row.weight_shape, row.a_shape, row.b_shape, row.rank, row.scale, row.params) == (
        "blk/q", (16, 8), (16, 4), (4, 8), 4, 2.0, 96)
    printed = capsys.readouterr().out
    assert "blk/q" in printed and "trainable 38.71% (96 / 248)" in printed

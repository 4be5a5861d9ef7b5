"""Shared test settings: hypothesis profiles, JAX strictness, tolerances.

Profiles: ``default`` (sized for a 2-core CI run), ``thorough`` (for a long
local run: ``pytest --hypothesis-profile=thorough``).
"""

import shutil
import tempfile

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# One XLA compilation cache for the whole test run, shared with the xdist workers: many tests
# compile the same programs (the same small Llama, the demo's steps), and compiling is most of
# the suite's time. It is made fresh per run and removed after it, so nothing carries over.
_XLA_CACHE_KEY = "lora_jax_xla_cache"


def _use_xla_cache(path: str):
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
    worker = getattr(config, "workerinput", None)
    if worker is not None:
        _use_xla_cache(worker[_XLA_CACHE_KEY])
    else:
        config._lora_jax_xla_cache = tempfile.mkdtemp(prefix="lora_jax_test_xla_cache_")
        _use_xla_cache(config._lora_jax_xla_cache)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist: hand the controller's cache folder to each worker."""
    node.workerinput[_XLA_CACHE_KEY] = node.config._lora_jax_xla_cache


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):
        shutil.rmtree(config._lora_jax_xla_cache, ignore_errors=True)


jax.config.update("jax_numpy_rank_promotion", "raise")
# Float32 matmuls at full float32 precision on every backend. A GPU's default for float32 operands is
# TF32 (10 mantissa bits), a TPU's is bfloat16 passes; the tolerances in tests/tolerances.py are those
# of float32 itself, so the suite asks for it explicitly. Library code that must be exact whatever
# the setting (merge, unmerge, the factor maths) passes precision=HIGHEST itself.
jax.config.update("jax_default_matmul_precision", "highest")
# The "rbg" PRNG compiles far faster on CPU than the default threefry, and the
# suite draws random arrays of many shapes; no test depends on threefry's bits.
jax.config.update("jax_default_prng_impl", "rbg")

settings.register_profile("default", max_examples=10, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")


@pytest.fixture
def rng():
    return np.random.default_rng(0)

# The fixture scripts run by hand under PyTorch (tests/fixtures/README.md); CI never imports them.
collect_ignore_glob = ["fixtures/*"]


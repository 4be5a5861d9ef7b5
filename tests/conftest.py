"""Shared test settings: hypothesis profiles, JAX strictness, tolerances.

Profiles: ``default`` (sized for a 2-core CI run), ``thorough`` (for a long
local run: ``pytest --hypothesis-profile=thorough``).
"""

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_numpy_rank_promotion", "raise")
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

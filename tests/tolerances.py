"""The one place where test tolerances are set, derived from each dtype's epsilon.

Results are compared with the float64 NumPy reference computed from the very
same (already rounded) inputs, so the only error left is the rounding of the
computation itself. Each product in these tests chains at most three matmuls of
contraction length <= 64; the worst-case relative error of such a chain is a
few tens of unit roundoffs in float32 (eps 1.19e-7), and a few ulps in
bfloat16 (eps 7.8e-3), whose results are also stored rounded. Errors are
measured relative to the largest magnitude of the expected result, since
individual entries may cancel to near zero.
"""

import jax.numpy as jnp
import numpy as np

#: max |actual - expected| / max |expected| allowed, per dtype.
REL_TOL = {
    np.dtype(jnp.float32): 1e-5,   # ~84 ulp of float32
    np.dtype(jnp.bfloat16): 3e-2,  # ~4 ulp of bfloat16
}


def tol(dtype) -> float:
    return REL_TOL[np.dtype(dtype)]


def assert_close(actual, expected, dtype=jnp.float32, *, what: str = ""):
    """``max|actual - expected| <= tol(dtype) * max(|expected|)``, reporting the measured ratio."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(float(np.max(np.abs(expected), initial=0.0)), np.finfo(np.float32).tiny)
    err = float(np.max(np.abs(actual - expected), initial=0.0)) / scale
    assert err <= tol(dtype), f"{what}: relative error {err:.3g} > {tol(dtype):.3g} ({np.dtype(dtype).name})"

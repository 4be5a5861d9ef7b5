"""The one place where test tolerances are set, derived from each dtype's epsilon.

Results are compared with the float64 NumPy reference computed from the very
same (already rounded) inputs, so the only error left is the rounding of the
computation itself. Each product in these tests chains at most three matmuls of
contraction length <= 64; the worst-case relative error of such a chain is a
few tens of unit roundoffs in float32 (eps 1.19e-7), and a few ulps in
bfloat16 (eps 7.8e-3), whose results are also stored rounded.

Errors are measured relative to a magnitude: the largest entry of the expected
result, or, where entries may cancel, the same computation carried out on the
absolute values of the inputs (pass it as ``magnitude``). The latter is the
classic forward-error bound of a dot product, ``|fl(x.y) - x.y| <= k u sum |x_i y_i|``:
a rank-1 product over a few tokens can cancel to nearly zero while each
term, and so each rounding error, stays large.

The same tolerances hold on every backend because ``tests/conftest.py`` sets
float32 matmuls to full precision (``jax_default_matmul_precision="highest"``):
without it a GPU computes float32 matmuls in TF32 and a TPU in bfloat16
passes, whose rounding these float32 bounds do not cover. Elementwise
functions (exp, rsqrt) may differ between backends by a few ulps, well inside
the bounds.
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


def assert_close(actual, expected, dtype=jnp.float32, *, what: str = "", magnitude=None):
    """``max|actual - expected| <= tol(dtype) * max(|expected|, |magnitude|)``, reporting the measured ratio."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(float(np.max(np.abs(expected), initial=0.0)), np.finfo(np.float32).tiny)
    if magnitude is not None:
        scale = max(scale, float(np.max(np.abs(np.asarray(magnitude, np.float64)), initial=0.0)))
    err = float(np.max(np.abs(actual - expected), initial=0.0)) / scale
    assert err <= tol(dtype), f"{what}: relative error {err:.3g} > {tol(dtype):.3g} ({np.dtype(dtype).name})"

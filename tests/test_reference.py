"""The oracle checked on its own: finite differences, XLA's convolution, algebraic identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import reference
from tests.tolerances import assert_close


def test_closed_form_gradients_match_finite_differences(rng):
    x, a, b, g = rng.normal(size=(2, 3, 5)), rng.normal(size=(5, 2)), rng.normal(size=(2, 4)), rng.normal(size=(2, 3, 4))
    scale, eps = 1.5, 1e-6
    f = lambda x, a, b: np.sum(g * (scale * ((x @ a) @ b)))
    dx, da, db = reference.lowrank_grads(x, a, b, scale, g)
    for arg, grad in ((0, dx), (1, da), (2, db)):
        args = [x, a, b]
        numeric = np.zeros_like(args[arg])
        for idx in np.ndindex(*args[arg].shape):
            plus, minus = [v.copy() for v in args], [v.copy() for v in args]
            plus[arg][idx] += eps
            minus[arg][idx] -= eps
            numeric[idx] = (f(*plus) - f(*minus)) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("strides, padding", [((1, 1), "VALID"), ((2, 1), "SAME"), ((2, 2), "SAME"),
                                              ((1, 1), [(1, 2), (0, 1)])])
def test_conv_matches_xla(rng, strides, padding):
    x = rng.normal(size=(2, 7, 6, 3)).astype(np.float32)
    w = rng.normal(size=(3, 2, 3, 4)).astype(np.float32)
    a = rng.normal(size=(3, 2, 3, 2)).astype(np.float32)
    b = rng.normal(size=(2, 4)).astype(np.float32)
    expected = reference.conv(x, w, a, b, 0.5, strides=strides, padding=padding)
    merged = jnp.asarray(reference.merge(w, a, b, 0.5), jnp.float32)
    actual = jax.lax.conv_general_dilated(x, merged, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                          precision=jax.lax.Precision.HIGHEST)
    assert_close(actual, expected, jnp.float32)


def test_identities(rng):
    table, a, b = rng.normal(size=(10, 4)), rng.normal(size=(10, 2)), rng.normal(size=(2, 4))
    q, ids = rng.normal(size=(3, 4)), np.array([[1, 7], [9, 0]])
    np.testing.assert_allclose(reference.attend(q, table, a, b, 2.0),
                               q @ reference.embed(np.arange(10), table, a, b, 2.0).T)
    np.testing.assert_allclose(reference.embed(ids, table, a, b, 2.0), (table + 2.0 * a @ b)[ids])
    np.testing.assert_allclose(reference.unmerge(reference.merge(table, a, b, 3.0), a, b, 3.0), table,
                               rtol=1e-14, atol=1e-14)
    x, w = rng.normal(size=(2, 3, 4)), rng.normal(size=(3, 4, 5))
    wa, wb = rng.normal(size=(3, 4, 2)), rng.normal(size=(2, 5))
    np.testing.assert_allclose(reference.dense_general(x, w, wa, wb, 1.0, axis=(-2, -1)),
                               x.reshape(2, 12) @ (w + np.tensordot(wa, wb, 1)).reshape(12, 5))
    np.testing.assert_allclose(reference.einsum("bd,dk->bk", x[:, 0], w[0], wa[0], wb, 1.0),
                               reference.dense(x[:, 0], w[0], wa[0], wb, 1.0))
    assert reference.scaling(16, 4) == 4.0 and reference.scaling(16, 4, use_rslora=True) == 8.0

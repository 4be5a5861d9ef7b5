"""The array math in lora_jax.core against the float64 NumPy reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_jax import core, reference
from tests.tolerances import assert_close

DTYPES = [jnp.float32, jnp.bfloat16]


def _abs(x):
    return np.abs(np.asarray(x, np.float64))


@st.composite
def factored(draw, max_lead=2):
    """Random ``x [*batch, in]``, ``a [in, r]``, ``b [r, out]``, scale and dtype."""
    n_in, n_out = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    rank = draw(st.integers(1, min(n_in, n_out)))
    batch = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=max_lead)))
    scale = draw(st.sampled_from([0.5, 1.0, 2.0, 16 / 3]))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    cast = lambda arr: jnp.asarray(arr, dtype)
    return (cast(rng.normal(size=batch + (n_in,))), cast(rng.normal(size=(n_in, rank))),
            cast(rng.normal(size=(rank, n_out))), scale, dtype, cast(rng.normal(size=batch + (n_out,))))


@given(factored())
def test_lowrank_forward_matches_reference(case):
    x, a, b, scale, dtype, _ = case
    zero = np.zeros((a.shape[0], b.shape[1]))
    expected = reference.dense(x, zero, a, b, scale)
    magnitude = reference.dense(_abs(x), zero, _abs(a), _abs(b), scale)
    for impl in core.IMPLS:
        y = core.lowrank(x, a, b, scale, impl=impl)
        assert y.dtype == dtype
        assert_close(y, expected, dtype, what=impl, magnitude=magnitude)


@given(factored())
def test_lowrank_gradients_match_closed_form(case):
    x, a, b, scale, dtype, g = case
    expected = reference.lowrank_grads(x, a, b, scale, g)
    magnitudes = reference.lowrank_grads(_abs(x), _abs(a), _abs(b), scale, _abs(g))
    for impl in core.IMPLS:
        _, vjp = jax.vjp(lambda x, a, b: core.lowrank(x, a, b, scale, impl=impl), x, a, b)
        grads = vjp(g)
        for name, grad, ref, mag in zip(("dx", "dA", "dB"), grads, expected, magnitudes):
            assert grad.dtype == dtype
            assert_close(grad, ref, dtype, what=f"{impl} {name}", magnitude=mag)


def test_fast_and_plain_gradients_agree_under_jit_and_second_order_inputs(rng):
    x = jnp.asarray(rng.normal(size=(3, 7, 16)), jnp.float32)
    a = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(4, 12)), jnp.float32)
    loss = lambda impl: jax.jit(jax.grad(
        lambda a, b, x: jnp.sum(jnp.tanh(core.lowrank(x, a, b, 0.25, impl=impl))), argnums=(0, 1, 2)))
    for fast, plain in zip(loss("fast")(a, b, x), loss("plain")(a, b, x)):
        assert_close(fast, plain, jnp.float32)


@st.composite
def stacked_weight(draw):
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    in_shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    out_shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=2)))
    rank = draw(st.integers(1, min(math.prod(in_shape), math.prod(out_shape))))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    cast = lambda shape: jnp.asarray(rng.normal(size=shape), dtype)
    return (cast(lead + in_shape + out_shape), cast(lead + in_shape + (rank,)), cast(lead + (rank,) + out_shape),
            draw(st.sampled_from([0.5, 2.0, 3.0])), dtype, lead)


def _reference_merge(w, a, b, scale, lead):
    out = np.empty(w.shape, np.float64)
    for idx in np.ndindex(*lead):
        out[idx] = reference.merge(w[idx], a[idx], b[idx], scale)
    return out


@given(stacked_weight())
def test_merge_and_unmerge_match_reference_and_round_trip(case):
    w, a, b, scale, dtype, lead = case
    merged = core.merge_weight(w, a, b, scale)
    assert merged.dtype == w.dtype and merged.shape == w.shape
    expected = _reference_merge(w, a, b, scale, lead)
    delta_magnitude = _reference_merge(np.zeros(w.shape), _abs(a), _abs(b), scale, lead)
    magnitude = _abs(w) + delta_magnitude
    # one rounding of the float32 result to the weight's dtype is all that is allowed; it is
    # relative to |W + delta|, which |W| + |delta| bounds
    assert_close(merged, expected, dtype, what="merge", magnitude=magnitude)
    assert_close(core.unmerge_weight(merged, a, b, scale), w, dtype, what="unmerge(merge)", magnitude=magnitude)
    d = core.delta(a, b, scale, w.shape)
    assert d.dtype == jnp.float32
    assert_close(d, expected - np.asarray(w, np.float64), jnp.float32, what="delta", magnitude=delta_magnitude)


def test_merge_is_exact_in_float32_for_exactly_representable_values():
    w = jnp.arange(12.0).reshape(3, 4)
    a = jnp.ones((3, 2))
    b = jnp.full((2, 4), 0.25)
    merged = core.merge_weight(w, a, b, 2.0)
    np.testing.assert_array_equal(np.asarray(merged), np.arange(12.0).reshape(3, 4) + 1.0)
    np.testing.assert_array_equal(np.asarray(core.unmerge_weight(merged, a, b, 2.0)), np.asarray(w))


@pytest.mark.parametrize("w, a, b", [
    ((4, 6), (5, 2), (2, 6)),
    ((4, 6), (4, 2), (3, 6)),
    ((4, 6), (4, 2), (2, 5)),
    ((3, 4, 6), (2, 4, 2), (2, 2, 6)),
    ((4, 6), (4,), (6,)),
])
def test_split_shape_rejects_mismatched_adapters(w, a, b):
    with pytest.raises(ValueError, match=r"do not fit a weight of shape"):
        core.split_shape(w, a, b)


def test_split_shape_finds_lead_in_and_out():
    assert core.split_shape((3, 8, 2, 4), (3, 8, 5), (3, 5, 2, 4)) == ((3,), (8,), (2, 4))
    assert core.split_shape((2, 4, 6), (2, 4, 3), (3, 6)) == ((), (2, 4), (6,))


def test_init_factors_follow_peft_conventions():
    key = jax.random.key(0)
    a, b = core.init_factors(key, "default", "dense", (3,), (64,), (32,), 8, jnp.float32)
    assert a.shape == (3, 64, 8) and b.shape == (3, 8, 32)
    assert not np.any(np.asarray(b))
    bound = 1 / np.sqrt(64)
    assert np.all(np.abs(np.asarray(a)) <= bound)
    assert np.max(np.abs(np.asarray(a))) > 0.9 * bound  # spans the interval, not a narrower one
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))  # stacked layers differ

    a, b = core.init_factors(key, "default", "embed", (), (100,), (16,), 4, jnp.float32)
    assert not np.any(np.asarray(a))
    assert abs(float(jnp.std(b)) - 1.0) < 0.2

    a, b = core.init_factors(key, "gaussian", "dense", (), (256,), (64,), 16, jnp.float32)
    assert not np.any(np.asarray(b))
    assert abs(float(jnp.std(a)) * 16 - 1.0) < 0.05


def test_lowrank_rejects_unknown_impl():
    with pytest.raises(ValueError, match=r"impl must be one of \('fast', 'plain'\), got 'fused'"):
        core.lowrank(jnp.ones((2, 3)), jnp.ones((3, 1)), jnp.ones((1, 2)), 1.0, impl="fused")

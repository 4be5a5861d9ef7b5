"""lora_jax.factors against NumPy's dense SVD of the formed product, on small random float64 factors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_jax import Adapter, Combined, LoraConfig, factors
from lora_jax.config import compile_pattern

# float64 (eps 2.2e-16): the QR route and the dense SVD each lose a few ulps per
# matmul of contraction length <= 9; 1e-10 of the largest singular value is far
# above that and far below any real disagreement.
F64_REL = 1e-10


@st.composite
def factor_pairs(draw):
    """``(a, b, scale, k)``: ``a`` ``lead + [in, r]``, ``b`` ``lead + [r, out]`` with ``a @ b`` of rank ``k <= r``."""
    lead = draw(st.sampled_from([(), (3,), (2, 2)]))
    n_in, n_out = draw(st.integers(2, 9)), draw(st.integers(2, 9))
    rank = draw(st.integers(1, 6))
    k = draw(st.integers(1, min(rank, n_in, n_out)))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    a = rng.normal(size=lead + (n_in, k)) @ rng.normal(size=lead + (k, rank))   # rank k < r when k < r
    b = rng.normal(size=lead + (rank, n_out))
    return a, b, draw(st.sampled_from([1.0, 0.5, -2.0])), k


def _dense_svd(a, b, scale):
    return np.linalg.svd(scale * a @ b, full_matrices=False)


@given(factor_pairs())
def test_svd_matches_the_dense_svd_of_the_product(case):
    a, b, scale, k = case
    u, s, vt = factors.svd(a, b, scale)
    u_np, s_np, vt_np = _dense_svd(a, b, scale)
    top = s_np[..., :1]
    n = s.shape[-1]
    assert n == min(a.shape[-1], a.shape[-2], b.shape[-1])
    assert u.shape == a.shape[:-1] + (n,) and vt.shape == b.shape[:-2] + (n, b.shape[-1])
    assert np.all(np.abs(s - s_np[..., :n]) <= F64_REL * top)
    assert np.all(s_np[..., n:] <= F64_REL * top)                        # nothing beyond min(r, in, out)
    assert np.all(np.abs((u * s[..., None, :]) @ vt - scale * a @ b) <= F64_REL * top[..., None])
    # the top-k singular subspaces are the dense SVD's: equal projectors (signs and bases may differ)
    proj = lambda x: x[..., :, :k] @ np.swapaxes(x[..., :, :k], -1, -2)
    assert np.all(np.abs(proj(u) - proj(u_np)) <= 1e-8)
    assert np.all(np.abs(proj(np.swapaxes(vt, -1, -2)) - proj(np.swapaxes(vt_np, -1, -2))) <= 1e-8)
    eye = np.eye(n)
    assert np.all(np.abs(np.swapaxes(u[..., :k], -1, -2) @ u[..., :k] - eye[:k, :k]) <= 1e-12)


@given(factor_pairs())
def test_rank_deficient_product_has_k_nonzero_singular_values_and_truncates_exactly(case):
    a, b, scale, k = case
    _, s, _ = factors.svd(a, b, scale)
    top = s[..., :1]
    assert np.all(s[..., :k] > 1e-8 * top) and np.all(s[..., k:] <= F64_REL * top)
    a_k, b_k = factors.truncated(scale * a, b, k)
    assert a_k.shape == a.shape[:-1] + (k,) and b_k.shape == b.shape[:-2] + (k, b.shape[-1])
    assert np.all(np.abs(a_k @ b_k - scale * a @ b) <= F64_REL * top[..., None])


@given(factor_pairs(), st.integers(1, 8))
def test_truncated_is_the_best_rank_k_approximation(case, rank):
    a, b, scale, _ = case
    a_k, b_k = factors.truncated(scale * a, b, rank)
    u, s, vt = _dense_svd(a, b, scale)
    kk = min(rank, s.shape[-1])
    best = (u[..., :kk] * s[..., None, :kk]) @ vt[..., :kk, :]
    assert a_k.shape[-1] == b_k.shape[-2] == rank            # zero-padded beyond min(r, in, out)
    assert np.all(np.abs(a_k @ b_k - best) <= F64_REL * s[..., :1, None])
    # the split is even: A^T A == B B^T == diag(s)
    gram_a, gram_b = np.swapaxes(a_k, -1, -2) @ a_k, b_k @ np.swapaxes(b_k, -1, -2)
    assert np.all(np.abs(gram_a - gram_b) <= F64_REL * s[..., :1, None])


@given(factor_pairs())
def test_singular_values_flatten_to_two_dims(case):
    a, b, scale, _ = case
    # the flattened reading: a [..., in, r] as [prod(...) * in, r], b [r, ...] as [r, prod(...)]
    a2, b2 = a.reshape(-1, a.shape[-1]), np.moveaxis(b, -2, 0).reshape(b.shape[-2], -1)
    expected = np.linalg.svd(scale * a2 @ b2, compute_uv=False)
    got = factors.singular_values(a, np.moveaxis(b, -2, 0), scale)
    n = got.shape[0]
    assert n == min(a2.shape[0], a.shape[-1], b2.shape[1]) and np.all(np.diff(got) <= 0)
    assert np.all(np.abs(got - expected[:n]) <= F64_REL * expected[0])


def test_qr_core_rebuilds_the_product_with_orthonormal_q():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 7, 4)), rng.normal(size=(3, 4, 5))
    q_a, core, q_b = factors.qr(a, b)
    assert (q_a.shape, core.shape, q_b.shape) == ((3, 7, 4), (3, 4, 4), (3, 5, 4))
    np.testing.assert_allclose(q_a @ core @ np.swapaxes(q_b, -1, -2), a @ b, rtol=0, atol=1e-12)
    for q in (q_a, q_b):
        np.testing.assert_allclose(np.swapaxes(q, -1, -2) @ q, np.broadcast_to(np.eye(4), (3, 4, 4)), atol=1e-14)


def test_relative_error_and_frobenius_norms():
    rng = np.random.default_rng(1)
    terms = [(c, rng.normal(size=(2, 6, r)), rng.normal(size=(2, r, 5))) for c, r in ((0.5, 2), (-1.5, 3))]
    exact = sum(c * a @ b for c, a, b in terms)
    a_out, b_out = rng.normal(size=(2, 6, 4)), rng.normal(size=(2, 4, 5))
    np.testing.assert_allclose(factors.frobenius2(a_out, b_out), np.sum((a_out @ b_out) ** 2, axis=(1, 2)),
                               rtol=1e-12)
    expected = np.linalg.norm(a_out @ b_out - exact) / np.linalg.norm(exact)
    assert factors.relative_error(a_out, b_out, terms) == pytest.approx(expected, rel=1e-10)
    a_cat, b_cat = factors.concat(terms)
    assert a_cat.shape == (2, 6, 5) and factors.relative_error(a_cat, b_cat, terms) <= 1e-7   # sqrt of cancellation
    zero = [(1.0, np.zeros((1, 3, 1)), np.zeros((1, 1, 2)))]
    assert factors.relative_error(np.zeros((1, 3, 1)), np.zeros((1, 1, 2)), zero) == 0.0
    assert factors.relative_error(np.ones((1, 3, 1)), np.ones((1, 1, 2)), zero) == float("inf")


# ---- adapters <-> per-layer factors

BASE = {"q": {"kernel": jnp.zeros((6, 5))}, "blk": {"k": {"kernel": jnp.zeros((3, 4, 2, 3))}},
        "emb": {"embedding": jnp.zeros((7, 4))}}


def _adapter(rng, dtype=jnp.float32):
    lora = {"q": {"a": rng.normal(size=(6, 2)), "b": rng.normal(size=(2, 5))},
            "blk": {"k": {"a": rng.normal(size=(3, 4, 3)), "b": rng.normal(size=(3, 3, 2, 3))}},   # out (2, 3)
            "emb": {"a": rng.normal(size=(7, 2)), "b": rng.normal(size=(2, 4))}}
    lora = {k: _cast(v, dtype) for k, v in lora.items()}
    config = LoraConfig(rank=2, alpha=4.0, targets=("re:.*",), rank_pattern={"re:blk/k": 3})
    return Adapter(config, lora)


def _cast(node, dtype):
    return {k: _cast(v, dtype) if isinstance(v, dict) else jnp.asarray(v, dtype) for k, v in node.items()}


def test_layers_read_each_layer_as_flat_float64_factors_and_to_tree_writes_them_back():
    adapter = _adapter(np.random.default_rng(2))
    layers = factors.layers(BASE, adapter)
    assert list(layers) == ["q", "blk/k", "emb"]
    k = layers["blk/k"]
    assert (k.path, k.lead, k.in_shape, k.out_shape) == (("blk", "k"), (3,), (4,), (2, 3))
    assert k.a.shape == (3, 4, 3) and k.b.shape == (3, 3, 6) and k.a.dtype == np.float64
    assert (k.scale, layers["q"].scale, k.dtype) == (4.0 / 3, 2.0, np.dtype(np.float32))
    back = factors.to_tree({name: (t.a, t.b) for name, t in layers.items()}, layers, np.float32)
    for path in (("q",), ("blk", "k"), ("emb",)):
        node, orig = back, adapter.lora_params
        for key in path:
            node, orig = node[key], orig[key]
        assert all(np.array_equal(node[x], orig[x]) and node[x].dtype == orig[x].dtype for x in "ab")
    slotted = factors.to_tree({"blk/k": (k.a[:, None].repeat(2, 1), k.b[:, None].repeat(2, 1))}, layers,
                              np.float32, slots=2)
    assert slotted["blk"]["k"]["a"].shape == (3, 2, 4, 3) and slotted["blk"]["k"]["b"].shape == (3, 2, 3, 2, 3)


def test_measured_errors_are_those_of_the_rounded_factors():
    adapter = _adapter(np.random.default_rng(3), jnp.bfloat16)
    layers = factors.layers(BASE, adapter)
    terms = {name: [(1.0, t.a, t.b)] for name, t in layers.items()}
    assert factors.measured_errors(adapter.lora_params, layers, terms) == {name: 0.0 for name in layers}
    halved = {name: [(0.5, t.a, t.b)] for name, t in layers.items()}
    assert factors.measured_errors(adapter.lora_params, layers, halved) == pytest.approx(
        {name: 1.0 for name in layers}, rel=1e-12)


def test_geometry_names_what_does_not_fit():
    adapter = _adapter(np.random.default_rng(4))
    with pytest.raises(ValueError, match="the LoRA tree holds no adapters"):
        list(factors.geometry(BASE, Adapter(adapter.config, {}), "spectrum"))
    dora = {"q": {**adapter.lora_params["q"], "m": jnp.ones(5)}}
    with pytest.raises(ValueError, match="spectrum: layer 'q' is a DoRA adapter"):
        list(factors.geometry(BASE, Adapter(adapter.config, dora), "spectrum"))
    with pytest.raises(ValueError, match=r"x: layer 'v' is not in the base params \(missing 'v'\)"):
        list(factors.geometry(BASE, Adapter(adapter.config, {"v": adapter.lora_params["q"]}), "x"))
    wrong = {"q": {"a": jnp.zeros((5, 2)), "b": jnp.zeros((2, 5))}}
    with pytest.raises(ValueError, match=r"adapter: layer 'q': adapter shapes a\[5, 2\]"):
        factors.layers(BASE, Adapter(adapter.config, wrong))


def test_as_adapter_takes_adapter_values_and_pairs():
    adapter = _adapter(np.random.default_rng(5))
    assert factors.as_adapter(adapter) is adapter
    assert factors.as_adapter((adapter.config, adapter.lora_params)) == adapter
    assert factors.as_adapter(Combined(adapter.config, adapter.lora_params, {})) == adapter
    with pytest.raises(TypeError, match=r"combine: adapters\[0\]: expected an Adapter\(config, lora_params\)"):
        factors.as_adapter(adapter.lora_params, "combine: adapters[0]")
    with pytest.raises(TypeError, match="got tuple"):
        factors.as_adapter((adapter.lora_params, adapter.config))


def test_scale_one_config_has_scale_one_everywhere_whatever_the_key_order():
    ranks = {"b/q": 4, "a/v": 2, "c/o": 4, "a/up": 8}
    config = factors.scale_one_config(ranks)
    assert config == factors.scale_one_config(dict(reversed(ranks.items())))
    assert config.rank == 4
    assert {name: (config.rank_for(name), config.scaling(name)) for name in ranks} == {
        name: (r, 1.0) for name, r in ranks.items()}
    # it targets exactly those layers
    targeted = lambda name: any(compile_pattern(t).fullmatch(name) for t in config.targets)
    assert [name for name in [*ranks, "a/other", "b/q2", "x/b/q"] if targeted(name)] == list(ranks)

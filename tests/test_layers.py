"""Every linen layer kind with an adapter, against the float64 NumPy oracle ``lora_jax.reference``.

Base weights, inputs and adapters are random normals (never the zero-B init,
under which a missing adapter term would go unnoticed); each comparison also
checks that the adapter moves the expected output well away from the base one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_jax import LoraConfig, core, init_lora, lora_apply, merge, reference, unmerge
from tests.tolerances import assert_close

KEY = jax.random.key(0)


def _normal_like(tree, rng, dtype=None):
    """A tree of standard normals shaped like ``tree`` (arrays or ``ShapeDtypeStruct``)."""
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), dtype or s.dtype), tree)


def _f64(x):
    return np.asarray(x, np.float64)


@dataclasses.dataclass(frozen=True)
class Case:
    """One layer kind: the module, its input, and the oracle on the merged weight."""

    module: nn.Module
    make_input: Callable[[np.random.Generator], Any]
    oracle: Callable  # (x, params, a, b, scale) -> float64 expected output
    method: str | None = None
    weight: str = "kernel"


def _floats(*shape):
    return lambda rng: jnp.asarray(rng.normal(size=shape), jnp.float32)


def _ids(vocab, *shape):
    return lambda rng: jnp.asarray(rng.integers(0, vocab, size=shape), jnp.int32)


CASES = {
    "dense": Case(nn.Dense(5), _floats(2, 3, 4),
                  lambda x, p, a, b, s: reference.dense(x, p["kernel"], a, b, s, bias=p["bias"])),
    # kernel [3, 4, 2, 4]: two contracted input axes, tuple features
    "dense_general": Case(nn.DenseGeneral((2, 4), axis=(-2, -1)), _floats(2, 3, 4),
                          lambda x, p, a, b, s: reference.dense_general(x, p["kernel"], a, b, s,
                                                                        axis=(-2, -1), bias=p["bias"])),
    # contracted axes (1, 3) interleave with the free axes (0, 2): the term must transpose x
    "dense_general_interleaved": Case(
        nn.DenseGeneral((2, 3), axis=(1, 3)), _floats(2, 3, 2, 4),
        lambda x, p, a, b, s: reference.dense_general(x, p["kernel"], a, b, s, axis=(1, 3), bias=p["bias"])),
    # a pure projection: the fast 2-D route
    "einsum_projection": Case(nn.Einsum((4, 2, 3), "btd,dhk->bthk", use_bias=False), _floats(2, 3, 4),
                              lambda x, p, a, b, s: reference.einsum("btd,dhk->bthk", x, p["kernel"], a, b, s)),
    # a projection whose output puts the kernel's dim between the input's: fast route + transpose
    "einsum_reordered": Case(nn.Einsum((4, 3), "btd,dk->bkt", use_bias=False), _floats(2, 5, 4),
                             lambda x, p, a, b, s: reference.einsum("btd,dk->bkt", x, p["kernel"], a, b, s)),
    # the input label t is summed away: the general einsum fallback
    "einsum_fallback": Case(nn.Einsum((4, 3), "btd,dk->bk", use_bias=False), _floats(2, 5, 4),
                            lambda x, p, a, b, s: reference.einsum("btd,dk->bk", x, p["kernel"], a, b, s)),
    "conv1d_same_strided": Case(
        nn.Conv(3, (3,), strides=(2,), padding="SAME"), _floats(2, 7, 4),
        lambda x, p, a, b, s: reference.conv(x, p["kernel"], a, b, s, strides=(2,), padding="SAME",
                                             bias=p["bias"])),
    "conv2d_valid_strided": Case(
        nn.Conv(3, (2, 3), strides=(1, 2), padding="VALID"), _floats(2, 5, 6, 2),
        lambda x, p, a, b, s: reference.conv(x, p["kernel"], a, b, s, strides=(1, 2), padding="VALID",
                                             bias=p["bias"])),
    # even kernel, stride 2: SAME pads asymmetrically
    "conv2d_same_strided": Case(
        nn.Conv(4, (2, 2), strides=(2, 2), padding="SAME"), _floats(1, 5, 5, 3),
        lambda x, p, a, b, s: reference.conv(x, p["kernel"], a, b, s, strides=(2, 2), padding="SAME",
                                             bias=p["bias"])),
    "embed": Case(nn.Embed(10, 6), _ids(10, 2, 3),
                  lambda x, p, a, b, s: reference.embed(x, p["embedding"], a, b, s), weight="embedding"),
    "embed_attend": Case(nn.Embed(10, 6), _floats(2, 3, 6),
                         lambda x, p, a, b, s: reference.attend(x, p["embedding"], a, b, s),
                         method="attend", weight="embedding"),
}
CFG = LoraConfig(rank=2, alpha=3.0, targets="re:.*")
SCALE = reference.scaling(3.0, 2)


@functools.lru_cache(maxsize=None)
def _setup(name, seed=0):
    """(case, x, random base params, random adapters) for one layer kind (jax arrays: safe to share)."""
    case, rng = CASES[name], np.random.default_rng(seed)
    x = case.make_input(rng)
    params = _normal_like(jax.eval_shape(lambda: case.module.init(KEY, x, method=case.method))["params"], rng)
    shapes = jax.eval_shape(lambda: init_lora(case.module, params, CFG, x, rng=KEY, method=case.method))
    return case, x, params, _normal_like(shapes, rng)


def _expected(case, x, params, lora):
    return case.oracle(x, params, lora["a"], lora["b"], SCALE)


def _assert_adapter_matters(case, x, params, lora, expected):
    """The adapter term is a sizeable part of the expected output (so dropping it would fail)."""
    zero = jax.tree.map(jnp.zeros_like, lora)
    base = _expected(case, x, params, zero)
    assert np.max(np.abs(expected - base)) > 0.1 * np.max(np.abs(expected))


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("impl", core.IMPLS)
def test_adapter_forward_matches_reference(name, impl):
    case, x, params, lora = _setup(name)
    y = lora_apply(case.module, CFG, impl=impl)(params, lora, x, method=case.method)
    expected = _expected(case, x, params, lora)
    _assert_adapter_matters(case, x, params, lora, expected)
    assert y.dtype == jnp.float32
    assert_close(y, expected, jnp.float32, what=f"{name} {impl}")


@pytest.mark.parametrize("name", CASES)
def test_merged_forward_equals_unmerged(name):
    case, x, params, lora = _setup(name)
    unmerged = lora_apply(case.module, CFG)(params, lora, x, method=case.method)
    merged_params = merge(params, lora, CFG)
    merged = case.module.apply({"params": merged_params}, x, method=case.method)
    _assert_adapter_matters(case, x, params, lora, _expected(case, x, params, lora))
    assert_close(merged, unmerged, jnp.float32, what=name)
    # and the merged weight itself is W + scale * A @ B
    w = params[case.weight]
    assert_close(merged_params[case.weight], reference.merge(w, lora["a"], lora["b"], SCALE), jnp.float32)


@pytest.mark.parametrize("name", CASES)
def test_unmerge_inverts_merge(name):
    case, _, params, lora = _setup(name)
    merged = merge(params, lora, CFG)
    w = params[case.weight]
    assert np.max(np.abs(_f64(merged[case.weight]) - _f64(w))) > 0.1 * np.max(np.abs(_f64(w)))
    back = unmerge(merged, lora, CFG)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for key in params:
        assert back[key].dtype == params[key].dtype
        assert_close(back[key], params[key], jnp.float32, what=f"{name}/{key}")


@pytest.mark.parametrize("name", CASES)
def test_fresh_adapter_leaves_output_unchanged(name):
    case, x, params, _ = _setup(name)
    # an "rbg" key: its bits compile much faster on CPU than threefry's, one compile per shape
    lora = init_lora(case.module, params, CFG, x, rng=jax.random.key(1, impl="rbg"), method=case.method)
    a, b = np.asarray(lora["a"]), np.asarray(lora["b"])
    if case.weight == "embedding":   # PEFT: embeddings get A zero, B normal
        assert not np.any(a) and np.all(b != 0)
    else:                            # everything else B zero, A kaiming-uniform
        assert not np.any(b) and np.all(a != 0)
    base = case.module.apply({"params": params}, x, method=case.method)
    for impl in core.IMPLS:
        y = lora_apply(case.module, CFG, impl=impl)(params, lora, x, method=case.method)
        assert np.array_equal(np.asarray(y), np.asarray(base)), f"{name} {impl}"


@pytest.mark.parametrize("name", ["dense", "dense_general_interleaved", "einsum_projection", "einsum_fallback",
                                  "conv2d_same_strided", "embed", "embed_attend"])  # one per term handler/route
def test_vmap_over_adapters_equals_each_alone(name):
    case, x, params, lora0 = _setup(name, seed=0)
    lora1 = _normal_like(lora0, np.random.default_rng(1))
    stacked = jax.tree.map(lambda u, v: jnp.stack([u, v]), lora0, lora1)
    apply = lora_apply(case.module, CFG)
    ys = jax.vmap(lambda lora: apply(params, lora, x, method=case.method))(stacked)
    for i, lora in enumerate((lora0, lora1)):
        alone = apply(params, lora, x, method=case.method)
        assert_close(ys[i], alone, jnp.float32, what=f"{name} adapter {i}")
        assert_close(ys[i], _expected(case, x, params, lora), jnp.float32, what=f"{name} adapter {i} vs reference")
    assert np.max(np.abs(_f64(ys[0]) - _f64(ys[1]))) > 0.1 * np.max(np.abs(_f64(ys[0])))


@pytest.mark.parametrize("name, fast_route", [
    ("einsum_projection", True), ("einsum_reordered", True), ("einsum_fallback", False),
    ("dense_general_interleaved", True)])
def test_routes_through_factored_path(name, fast_route, monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return lowrank(*args, **kwargs)

    lowrank = core.lowrank
    monkeypatch.setattr(core, "lowrank", counting)
    case, x, params, lora = _setup(name)
    y = lora_apply(case.module, CFG)(params, lora, x)
    assert len(calls) == (1 if fast_route else 0)
    if fast_route:  # called on the [free..., prod(contracted)] view of x
        assert calls[0][-1] == math.prod(lora["a"].shape[:-1])
        assert math.prod(calls[0]) == x.size
    assert_close(y, _expected(case, x, params, lora), jnp.float32, what=name)


# ---- hypothesis: a Dense layer over shapes, ranks, alphas, rsLoRA and dtypes

DTYPES = [jnp.float32, jnp.bfloat16]


@st.composite
def dense_cases(draw):
    # The tolerances are relative to the largest entry of the expected result, which presumes a
    # result of several entries: with one token, or a 1x1 gradient, a single cancelling sum (e.g.
    # dB = sum_t (x_t @ a) g_t over two tokens) leaves nothing larger to measure against and its
    # rounding error is unbounded relative to it. So every input and output dim is >= 3 and there
    # are >= 2 tokens (checked on 400 bfloat16 examples: worst error 0.45 of the tolerance).
    n_in, n_out = draw(st.integers(3, 8)), draw(st.integers(3, 8))
    rank = draw(st.integers(1, min(n_in, n_out)))
    batch = (draw(st.integers(2, 4)),) + tuple(draw(st.lists(st.integers(1, 3), max_size=1)))
    alpha = draw(st.sampled_from([1.0, 4.0, 7.5, 16.0]))
    use_rslora = draw(st.booleans())
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    cast = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
    module = nn.Dense(n_out, dtype=dtype, param_dtype=dtype)
    params = {"kernel": cast(n_in, n_out), "bias": cast(n_out)}
    lora = {"a": cast(n_in, rank), "b": cast(rank, n_out)}
    cfg = LoraConfig(rank=rank, alpha=alpha, targets="re:.*", use_rslora=use_rslora)
    return module, cfg, params, lora, cast(*batch, n_in), cast(*batch, n_out), dtype


def _scale(cfg):
    scale = reference.scaling(cfg.alpha, cfg.rank, cfg.use_rslora)
    assert cfg.scaling("", cfg.rank) == scale
    return scale


@given(dense_cases())
def test_dense_property_forward_gradients_and_merge_match_reference(case):
    # one property for the three checks: each new shape costs eager compilations, paid once here
    module, cfg, params, lora, x, g, dtype = case
    scale = _scale(cfg)
    expected = reference.dense(x, params["kernel"], lora["a"], lora["b"], scale, bias=params["bias"])
    _, da_ref, db_ref = reference.lowrank_grads(x, lora["a"], lora["b"], scale, g)
    for impl in core.IMPLS:
        apply = lora_apply(module, cfg, impl=impl)
        y, vjp = jax.vjp(lambda lora: apply(params, lora, x), lora)
        assert y.dtype == dtype and y.shape == expected.shape
        assert_close(y, expected, dtype, what=f"forward {impl}")
        grads, = vjp(g)
        assert grads["a"].dtype == dtype and grads["b"].dtype == dtype
        assert_close(grads["a"], da_ref, dtype, what=f"{impl} dA")
        assert_close(grads["b"], db_ref, dtype, what=f"{impl} dB")

    merged_params = merge(params, lora, cfg)
    w = merged_params["kernel"]
    assert w.dtype == dtype
    assert_close(w, reference.merge(params["kernel"], lora["a"], lora["b"], scale), dtype, what="merged W")
    merged = module.apply({"params": merged_params}, x)
    assert merged.dtype == dtype
    assert_close(merged, y, dtype, what="merged vs unmerged")
    # unmerge is exact up to the one rounding of W + delta, so it is compared with the oracle's
    # unmerge of that rounded weight (against W itself the error scales with |delta|, not |W|)
    assert_close(unmerge(merged_params, lora, cfg)["kernel"], reference.unmerge(w, lora["a"], lora["b"], scale),
                 dtype, what="unmerge")


# ---- errors, each naming what is wrong


class TwoProj(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="value")(nn.Dense(6, name="query")(x))


def _random_params(model, x, seed=0):
    return _normal_like(jax.eval_shape(model.init, KEY, x)["params"], np.random.default_rng(seed))


def _two_proj():
    model, x = TwoProj(), jnp.ones((2, 4))
    return model, x, _random_params(model, x)


def test_target_matching_nothing_lists_available_layers():
    model, x, params = _two_proj()
    cfg = LoraConfig(rank=2, targets=("query", "key_proj"))
    with pytest.raises(ValueError, match=r"(?s)LoraConfig.targets entry 'key_proj' matches no layer; "
                                         r"available layers:\n  query \(dense, in \[4\], out \[6\]\)"
                                         r"\n  value \(dense, in \[6\], out \[3\]\)"):
        init_lora(model, params, cfg, x, rng=KEY)


def test_rank_larger_than_layer_names_the_layer():
    model, x, params = _two_proj()
    fine = jax.eval_shape(lambda: init_lora(model, params, LoraConfig(rank=3, targets="re:.*"), x, rng=KEY))
    assert fine["value"]["a"].shape == (6, 3)  # rank 3 == min(6, 3) is allowed
    with pytest.raises(ValueError, match=r"rank 4 is larger than min\(in, out\) = 3 of layer 'value' "
                                         r"\(in \[6\], out \[3\]\)"):
        init_lora(model, params, LoraConfig(rank=4, targets="re:.*"), x, rng=KEY)


def test_rank_pattern_sets_per_layer_rank_and_scale():
    model, x, params = _two_proj()
    cfg = LoraConfig(rank=2, alpha=6.0, targets="re:.*", rank_pattern={"query": 3}, alpha_pattern={"value": 1.0})
    lora = init_lora(model, params, cfg, x, rng=KEY)
    assert lora["query"]["a"].shape == (4, 3) and lora["value"]["b"].shape == (2, 3)
    lora = jax.tree.map(lambda leaf: leaf + 0.5, lora)
    merged = merge(params, lora, cfg)
    for name, scale in (("query", 6.0 / 3), ("value", 1.0 / 2)):
        expected = reference.merge(params[name]["kernel"], lora[name]["a"], lora[name]["b"], scale)
        assert_close(merged[name]["kernel"], expected, jnp.float32, what=name)


def test_rank_pattern_matching_no_adapted_layer_is_an_error():
    model, x, params = _two_proj()
    cfg = LoraConfig(rank=2, targets="query", rank_pattern={"value": 3})
    with pytest.raises(ValueError, match=r"(?s)LoraConfig.rank_pattern entry 'value' matches no adapted layer; "
                                         r"adapted layers:\n  query"):
        init_lora(model, params, cfg, x, rng=KEY)


def test_adapter_that_does_not_fit_its_layer():
    model, x, params = _two_proj()
    cfg = LoraConfig(rank=2, targets="query")
    lora = {"query": {"a": jnp.ones((5, 2)), "b": jnp.ones((2, 6))}}
    with pytest.raises(ValueError, match=r"layer 'query': adapter a\[5, 2\], b\[2, 6\] does not fit its kernel "
                                         r"\[4, 6\]; expected a \[4, 2\], b \[2, 6\]"):
        lora_apply(model, cfg)(params, lora, x)
    with pytest.raises(ValueError, match=r"layer 'query': adapter shapes a\[5, 2\], b\[2, 6\] do not fit a "
                                         r"weight of shape \[4, 6\]"):
        merge(params, lora, cfg)


def test_adapter_at_a_path_without_layer():
    model, x, params = _two_proj()
    cfg = LoraConfig(rank=2, targets="query")
    lora = {"query": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 6))},
            "qeury": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 6))}}
    with pytest.raises(ValueError, match=r"adapters never applied: 'qeury'\. The module did not call"):
        lora_apply(model, cfg)(params, lora, x)
    with pytest.raises(ValueError, match=r"adapter 'qeury' has no layer in base params \(missing 'qeury'\)"):
        merge(params, lora, cfg)
    # opting out of the check runs the adapters that do exist
    y = lora_apply(model, cfg, check_unused=False)(params, lora, x)
    expected = lora_apply(model, cfg)(params, {"query": lora["query"]}, x)
    assert np.array_equal(np.asarray(y), np.asarray(expected))


class _TwoMethods(nn.Module):
    def setup(self):
        self.query, self.value = nn.Dense(6), nn.Dense(3)

    def __call__(self, x):
        return self.value(self.query(x))

    def encode(self, x):
        return self.query(x)


def test_adapter_of_a_layer_the_call_does_not_use():
    model, x = _TwoMethods(), jnp.ones((2, 4))
    params = _random_params(model, x)
    cfg = LoraConfig(rank=2, targets="re:.*")
    lora = _normal_like(jax.eval_shape(lambda: init_lora(model, params, cfg, x, rng=KEY)), np.random.default_rng(1))
    assert sorted(lora) == ["query", "value"]
    lora_apply(model, cfg)(params, lora, x)  # both used by __call__
    with pytest.raises(ValueError, match=r"adapters never applied: 'value'\. The module did not call these layers"):
        lora_apply(model, cfg)(params, lora, x, method="encode")
    y = lora_apply(model, cfg, check_unused=False)(params, lora, x, method="encode")
    expected = reference.dense(x, params["query"]["kernel"], lora["query"]["a"], lora["query"]["b"],
                               reference.scaling(cfg.alpha, cfg.rank), bias=params["query"]["bias"])
    assert_close(y, expected, jnp.float32)


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="proj")(x), None


class _Stack(nn.Module):
    variable_axes: tuple

    @nn.compact
    def __call__(self, x):
        layers = nn.scan(_Block, variable_axes=dict(self.variable_axes), split_rngs={"params": True}, length=3)
        return layers(name="layers")(x)[0]


def test_scan_that_does_not_map_the_lora_collection():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4)), jnp.float32)
    good, bad = _Stack((("params", 0), ("lora", 0))), _Stack((("params", 0),))
    params = _random_params(good, x)
    cfg = LoraConfig(rank=2, targets="proj")
    shapes = jax.eval_shape(lambda: init_lora(good, params, cfg, x, rng=KEY))
    assert jax.tree.map(jnp.shape, shapes) == {"layers": {"proj": {"a": (3, 4, 2), "b": (3, 2, 4)}}}
    lora = _normal_like(shapes, np.random.default_rng(1))
    # mapped: every stacked layer uses its own adapter slice
    y = lora_apply(good, cfg)(params, lora, x)
    base = good.apply({"params": params}, x)
    assert np.max(np.abs(_f64(y) - _f64(base))) > 0.1 * np.max(np.abs(_f64(base)))
    assert_close(y, good.apply({"params": merge(params, lora, cfg)}, x))
    with pytest.raises(ValueError, match=r"adapters never applied: 'layers/proj'\..*variable_axes="
                                         r"\{'params': 0, 'lora': 0\}"):
        lora_apply(bad, cfg)(params, lora, x)


class _GroupedConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(4, (3,), feature_group_count=2, name="conv")(x)


def test_grouped_conv_cannot_be_targeted():
    model, x = _GroupedConv(), jnp.ones((1, 5, 4))
    params = _random_params(model, x)
    with pytest.raises(ValueError, match=r"layer 'conv' \(conv\) cannot take an adapter: "
                                         r"Conv with feature_group_count=2 is not supported"):
        init_lora(model, params, LoraConfig(rank=2, targets="conv"), x, rng=KEY)


class _InterleavedEinsum(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Einsum((2, 4, 3), "bd,hdk->bhk", name="proj")(x)


def test_einsum_with_interleaved_kernel_cannot_be_targeted():
    model, x = _InterleavedEinsum(), jnp.ones((2, 4))
    params = _random_params(model, x)
    with pytest.raises(ValueError, match=r"layer 'proj' \(einsum\) cannot take an adapter: Einsum bd,hdk->bhk: "
                                         r"the kernel's contracted dims must come before its output dims "
                                         r"\(kernel 'hdk', expected 'dhk'\)"):
        init_lora(model, params, LoraConfig(rank=2, targets="proj"), x, rng=KEY)

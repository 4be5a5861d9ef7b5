"""The NNX front end (``lora_jax.nnx``) against the float64 oracle and the linen front end.

Every layer kind is built twice, as an NNX layer and as the equivalent linen
module holding the very same weights; base weights, inputs and adapters are
random normals (never the zero-B init, under which a missing term would go
unnoticed), and each comparison checks that the adapter moves the output.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from lora_jax import LoraConfig, core, init_lora, lora_apply, reference
from lora_jax.nnx import DROPOUT_RNG, LoraParam, attach, find_layers, merge, unmerge
from tests.test_layers import _f64, _floats, _ids
from tests.tolerances import assert_close

CFG = LoraConfig(rank=2, alpha=3.0, targets="re:.*")
SCALE = reference.scaling(3.0, 2)


def _pure(model, filt):
    return nnx.to_pure_dict(nnx.state(model, filt))


def _randomize(model, filt, rng):
    """Overwrites every ``filt`` Variable of ``model`` with standard normals."""
    state = nnx.state(model, filt)
    nnx.update(model, jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), v.dtype), state))


@dataclasses.dataclass(frozen=True)
class Case:
    make: Callable[[], nnx.Module]        # the NNX layer
    linen: nn.Module                      # the same layer in linen (same param names and layouts)
    make_input: Callable[[np.random.Generator], Any]
    oracle: Callable                      # (x, params, a, b, scale) -> float64 expected output
    method: str | None = None
    weight: str = "kernel"


R0 = nnx.Rngs(0)
CASES = {
    "linear": Case(lambda: nnx.Linear(4, 5, rngs=R0), nn.Dense(5), _floats(2, 3, 4),
                   lambda x, p, a, b, s: reference.dense(x, p["kernel"], a, b, s, bias=p["bias"])),
    "linear_general": Case(
        lambda: nnx.LinearGeneral((3, 4), (2, 4), axis=(-2, -1), rngs=R0),
        nn.DenseGeneral((2, 4), axis=(-2, -1)), _floats(2, 3, 4),
        lambda x, p, a, b, s: reference.dense_general(x, p["kernel"], a, b, s, axis=(-2, -1), bias=p["bias"])),
    # contracted axes (1, 3) interleave with the free axes: the term must transpose x
    "linear_general_interleaved": Case(
        lambda: nnx.LinearGeneral((3, 4), (2, 3), axis=(1, 3), rngs=R0),
        nn.DenseGeneral((2, 3), axis=(1, 3)), _floats(2, 3, 2, 4),
        lambda x, p, a, b, s: reference.dense_general(x, p["kernel"], a, b, s, axis=(1, 3), bias=p["bias"])),
    "einsum_projection": Case(
        lambda: nnx.Einsum("btd,dhk->bthk", (4, 2, 3), rngs=R0),
        nn.Einsum((4, 2, 3), "btd,dhk->bthk", use_bias=False), _floats(2, 3, 4),
        lambda x, p, a, b, s: reference.einsum("btd,dhk->bthk", x, p["kernel"], a, b, s)),
    # the input label t is summed away: the general einsum route
    "einsum_fallback": Case(
        lambda: nnx.Einsum("btd,dk->bk", (4, 3), rngs=R0),
        nn.Einsum((4, 3), "btd,dk->bk", use_bias=False), _floats(2, 5, 4),
        lambda x, p, a, b, s: reference.einsum("btd,dk->bk", x, p["kernel"], a, b, s)),
    "conv1d_same_strided": Case(
        lambda: nnx.Conv(4, 3, (3,), strides=(2,), padding="SAME", rngs=R0),
        nn.Conv(3, (3,), strides=(2,), padding="SAME"), _floats(2, 7, 4),
        lambda x, p, a, b, s: reference.conv(x, p["kernel"], a, b, s, strides=(2,), padding="SAME",
                                             bias=p["bias"])),
    # even kernel, stride 2: SAME pads asymmetrically
    "conv2d_same_strided": Case(
        lambda: nnx.Conv(3, 4, (2, 2), strides=(2, 2), padding="SAME", rngs=R0),
        nn.Conv(4, (2, 2), strides=(2, 2), padding="SAME"), _floats(1, 5, 5, 3),
        lambda x, p, a, b, s: reference.conv(x, p["kernel"], a, b, s, strides=(2, 2), padding="SAME",
                                             bias=p["bias"])),
    "embed": Case(lambda: nnx.Embed(10, 6, rngs=R0), nn.Embed(10, 6), _ids(10, 2, 3),
                  lambda x, p, a, b, s: reference.embed(x, p["embedding"], a, b, s), weight="embedding"),
    "embed_attend": Case(lambda: nnx.Embed(10, 6, rngs=R0), nn.Embed(10, 6), _floats(2, 3, 6),
                         lambda x, p, a, b, s: reference.attend(x, p["embedding"], a, b, s),
                         method="attend", weight="embedding"),
}


def _setup(name, seed=0):
    """(case, x, base layer with random weights, adapted copy with random adapters)."""
    case, rng = CASES[name], np.random.default_rng(seed)
    base = case.make()
    _randomize(base, nnx.Param, rng)
    adapted = attach(base, CFG, rngs=jax.random.key(1))
    _randomize(adapted, LoraParam, rng)
    return case, case.make_input(rng), base, adapted


def _call(model, case, x):
    return getattr(model, case.method or "__call__")(x)


def _expected(case, x, base, adapted):
    lora = _pure(adapted, LoraParam)
    return case.oracle(x, _pure(base, nnx.Param), lora["a"], lora["b"], SCALE)


def _assert_moves(expected, base_out):
    assert np.max(np.abs(expected - _f64(base_out))) > 0.1 * np.max(np.abs(expected))


@pytest.mark.parametrize("name", CASES)
def test_forward_matches_reference_and_linen(name):
    case, x, base, adapted = _setup(name)
    y = _call(adapted, case, x)
    expected = _expected(case, x, base, adapted)
    _assert_moves(expected, _call(base, case, x))
    assert y.dtype == jnp.float32
    assert_close(y, expected, what=f"{name} vs reference")
    linen = lora_apply(case.linen, CFG)(_pure(base, nnx.Param), _pure(adapted, LoraParam), x, method=case.method)
    assert_close(y, linen, what=f"{name} vs linen")


@pytest.mark.parametrize("name", CASES)
def test_fresh_adapters_leave_output_unchanged_and_init_as_linen(name):
    case, x, base, _ = _setup(name)
    key = jax.random.key(7)
    adapted = attach(base, CFG, rngs=key)
    lora = _pure(adapted, LoraParam)
    a, b = np.asarray(lora["a"]), np.asarray(lora["b"])
    if case.weight == "embedding":   # PEFT: embeddings get A zero, B normal
        assert not np.any(a) and np.all(b != 0)
    else:                            # everything else B zero, A kaiming-uniform
        assert not np.any(b) and np.all(a != 0)
    assert np.array_equal(np.asarray(_call(adapted, case, x)), np.asarray(_call(base, case, x)))
    # the same key and path give linen's adapters, bit for bit
    linen = init_lora(case.linen, _pure(base, nnx.Param), CFG, x, rng=key, method=case.method)
    assert jax.tree.map(lambda u, v: bool(np.array_equal(u, v)), lora, linen) == {"a": True, "b": True}


@pytest.mark.parametrize("name", CASES)
def test_merge_matches_unmerged_and_unmerge_inverts(name):
    case, x, base, adapted = _setup(name)
    merged = merge(adapted)
    assert type(merged) is type(base) and not _pure(merged, LoraParam)
    assert sorted(_pure(merged, ...)) == sorted(_pure(base, ...))
    assert_close(_call(merged, case, x), _call(adapted, case, x), what=f"{name} merged forward")
    lora = _pure(adapted, LoraParam)
    w = getattr(base, case.weight)[...]
    w_merged = getattr(merged, case.weight)[...]
    assert_close(w_merged, reference.merge(w, lora["a"], lora["b"], SCALE), what=f"{name} merged W")
    # merge leaves its input alone
    assert np.array_equal(np.asarray(getattr(adapted, case.weight)[...]), np.asarray(w))

    back = unmerge(merged, nnx.state(adapted, LoraParam), CFG)
    assert type(back) is type(adapted)
    assert jax.tree.map(lambda u, v: bool(np.array_equal(u, v)), _pure(back, LoraParam), lora) == \
        {"a": True, "b": True}
    # exact up to the one rounding of W + delta: compared with the oracle's unmerge of that weight
    assert_close(getattr(back, case.weight)[...], reference.unmerge(w_merged, lora["a"], lora["b"], SCALE),
                 what=f"{name} unmerged W")
    assert_close(getattr(back, case.weight)[...], w, what=f"{name} unmerged W vs base", magnitude=w_merged)


@pytest.mark.parametrize("name", CASES)
def test_adapter_gradients_match_linen(name):
    case, x, base, adapted = _setup(name)
    y = _call(adapted, case, x)
    g = jnp.asarray(np.random.default_rng(3).normal(size=y.shape), jnp.float32)
    grads = nnx.grad(lambda m: jnp.sum(_call(m, case, x) * g), argnums=nnx.DiffState(0, LoraParam))(adapted)
    grads = nnx.to_pure_dict(grads)
    assert sorted(grads) == ["a", "b"]  # adapters only: no gradient for the base weights
    apply = lora_apply(case.linen, CFG)
    _, vjp = jax.vjp(lambda lora: apply(_pure(base, nnx.Param), lora, x, method=case.method),
                     _pure(adapted, LoraParam))
    expected, = vjp(g)
    for leaf in ("a", "b"):
        assert np.max(np.abs(_f64(expected[leaf]))) > 0
        assert_close(grads[leaf], expected[leaf], what=f"{name} d{leaf}")


@pytest.mark.parametrize("impl", core.IMPLS)
def test_linear_gradients_match_closed_form(impl):
    case, x, base, randomized = _setup("linear", seed=1)
    adapted = attach(base, CFG, rngs=jax.random.key(0), impl=impl)
    nnx.update(adapted, nnx.state(randomized, LoraParam))
    g = jnp.asarray(np.random.default_rng(4).normal(size=(2, 3, 5)), jnp.float32)
    grads = nnx.grad(lambda m: jnp.sum(m(x) * g), argnums=nnx.DiffState(0, LoraParam))(adapted)
    lora = _pure(adapted, LoraParam)
    _, da, db = reference.lowrank_grads(x, lora["a"], lora["b"], SCALE, g)
    assert_close(grads["a"][...], da, what=f"{impl} dA")
    assert_close(grads["b"][...], db, what=f"{impl} dB")


@pytest.mark.parametrize("name, calls", [("linear", 1), ("linear_general_interleaved", 1), ("einsum_projection", 1),
                                         ("einsum_fallback", 0), ("embed_attend", 1)])
def test_forward_routes_through_factored_path(name, calls, monkeypatch):
    seen = []

    def counting(x, a, b, *args, **kwargs):
        seen.append((x.shape, a.shape, b.shape))
        return lowrank(x, a, b, *args, **kwargs)

    lowrank = core.lowrank
    monkeypatch.setattr(core, "lowrank", counting)
    case, x, base, adapted = _setup(name)
    y = _call(adapted, case, x)
    assert len(seen) == calls
    if calls:  # on the [..., prod(in)] view of x, with 2-D factors: no [in, out] delta is formed
        (xs, a_shape, b_shape), = seen
        assert len(a_shape) == len(b_shape) == 2 and a_shape[-1] == b_shape[0] == CFG.rank
        assert math.prod(xs) == x.size and xs[-1] == a_shape[0]
    assert_close(y, _expected(case, x, base, adapted), what=name)


# ---- training and Variable filters


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs)])
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return self.head(x)


def test_training_updates_adapters_only():
    model = attach(MLP(nnx.Rngs(0)), LoraConfig(rank=2, alpha=4.0, targets="re:.*"), rngs=nnx.Rngs(1))
    # the filters split the model cleanly into base and adapters
    _, lora, rest = nnx.split(model, LoraParam, ...)
    adapter_leaves = jax.tree.leaves(nnx.to_pure_dict(lora))
    assert len(adapter_leaves) == 6 and all(isinstance(v, LoraParam) for _, v in nnx.to_flat_state(lora))
    assert not any(isinstance(v, LoraParam) for _, v in nnx.to_flat_state(rest))
    params = nnx.state(model, nnx.Param)
    assert {path[-1] for path, _ in nnx.to_flat_state(params)} == {"kernel", "bias"}
    assert not any(isinstance(v, LoraParam) for _, v in nnx.to_flat_state(params))

    base_before = jax.tree.map(np.asarray, _pure(model, nnx.Param))
    lora_before = jax.tree.map(np.asarray, _pure(model, LoraParam))
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=LoraParam)
    # optimizer state only for the adapters: adam's mu has exactly their leaves
    assert sum(np.size(v) for v in jax.tree.leaves(optimizer.opt_state)) == \
        2 * sum(v.size for v in adapter_leaves) + 1
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)

    traces = []

    @nnx.jit
    def step(model, optimizer, x, y):
        traces.append(1)  # runs only when nnx.jit traces: the adapted graph must stay cache-stable

        def loss_fn(model):
            return jnp.mean((model(x) - y) ** 2)
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, LoraParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, x, y)) for _ in range(10)]
    assert losses[-1] < 0.9 * losses[0], losses
    assert len(traces) == 1
    base_after = jax.tree.map(np.asarray, _pure(model, nnx.Param))
    assert jax.tree.all(jax.tree.map(np.array_equal, base_after, base_before))
    lora_after = _pure(model, LoraParam)
    assert not np.array_equal(lora_after["head"]["b"], lora_before["head"]["b"])


# ---- target selection on a transformer-ish model


class Attention(nnx.Module):
    def __init__(self, rngs):
        self.query, self.key = nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs)
        self.value, self.out = nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs)


class FeedForward(nnx.Module):
    def __init__(self, rngs):
        self.up, self.down = nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 8, rngs=rngs)


class Block(nnx.Module):
    def __init__(self, rngs):
        self.attn = Attention(rngs)     # "attention" by its name and its class
        self.ffn = FeedForward(rngs)    # "mlp" by its name


@functools.cache
def _tiny():
    """One shared Tiny model: attach and unmerge never modify their input (test_exclude_and_rank_pattern)."""
    return Tiny(nnx.Rngs(0))


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(12, 8, rngs=rngs)
        self.layers = nnx.List([Block(rngs) for _ in range(2)])
        self.q_proj = nnx.Linear(8, 8, rngs=rngs)   # attention by its own name
        self.mixer = nnx.Linear(8, 8, rngs=rngs)    # no role
        self.lm_head = nnx.Linear(8, 12, rngs=rngs)


ATTN = [f"layers/{i}/attn/{p}" for i in range(2) for p in ("key", "out", "query", "value")] + ["q_proj"]
MLP_LAYERS = [f"layers/{i}/ffn/{p}" for i in range(2) for p in ("down", "up")]


def _adapted_names(model):
    """The paths of the layers holding an adapter, from the model's LoraParam state."""
    return sorted({"/".join(map(str, path[:-1])) for path, _ in nnx.to_flat_state(nnx.state(model, LoraParam))})


@pytest.mark.parametrize("targets, expected", [
    ("attention", ATTN),
    ("mlp", MLP_LAYERS),
    ("embedding", ["embed"]),
    ("all-linear", sorted(ATTN + MLP_LAYERS + ["mixer"])),
    ("query", ["layers/0/attn/query", "layers/1/attn/query"]),
    ("ffn/*", MLP_LAYERS),
    ("re:layers/1/attn/(key|value)", ["layers/1/attn/key", "layers/1/attn/value"]),
    (("lm_head", "embedding"), ["embed", "lm_head"]),
])
def test_targets_pick_the_expected_layers(targets, expected):
    model = _tiny()
    adapted = attach(model, LoraConfig(rank=2, targets=targets), rngs=jax.random.key(0))
    assert _adapted_names(adapted) == sorted(expected)
    heads = [layer.name for layer in find_layers(model) if layer.is_head]
    assert heads == ["lm_head"]


def test_exclude_and_rank_pattern():
    model = _tiny()
    cfg = LoraConfig(rank=2, alpha=4.0, targets="attention", exclude="layers/0/**",
                     rank_pattern={"query": 4}, alpha_pattern={"q_proj": 1.0})
    adapted = attach(model, cfg, rngs=jax.random.key(0))
    assert _adapted_names(adapted) == sorted(p for p in ATTN if not p.startswith("layers/0"))
    assert adapted.layers[1].attn.query.a.shape == (8, 4) and adapted.layers[1].attn.key.a.shape == (8, 2)
    assert adapted.layers[1].attn.query.lora_scale == 1.0 and adapted.q_proj.lora_scale == 0.5
    # the input model is untouched and its base Variables are not the adapted model's
    assert not _pure(model, LoraParam) and type(model.q_proj) is nnx.Linear
    assert model.q_proj.kernel is not adapted.q_proj.kernel
    assert adapted.q_proj.kernel.get_value() is model.q_proj.kernel.get_value()  # same array, no copy


# ---- errors, each naming what is wrong


def test_target_matching_nothing_lists_available_layers():
    with pytest.raises(ValueError, match=r"(?s)LoraConfig.targets entry 'key_proj' matches no layer; "
                                         r"available layers:\n  embed \(embed, in \[12\], out \[8\]\)"):
        attach(_tiny(), LoraConfig(rank=2, targets=("query", "key_proj")), rngs=jax.random.key(0))


class _Odd(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(4, 4, (3,), feature_group_count=2, rngs=rngs)
        self.batched = nnx.LinearGeneral(4, 3, batch_axis={0: 2}, rngs=rngs)
        self.fine = nnx.Linear(4, 3, rngs=rngs)


@pytest.mark.parametrize("target, message", [
    ("conv", r"layer 'conv' \(conv\) cannot take an adapter: Conv with feature_group_count=2 is not supported"),
    ("batched", r"layer 'batched' \(dense_general\) cannot take an adapter: LinearGeneral with "
                r"batch_axis=\{0: 2\} is not supported"),
])
def test_unsupported_layers_are_named(target, message):
    model = _Odd(nnx.Rngs(0))
    assert _adapted_names(attach(model, LoraConfig(rank=2, targets="fine"), rngs=jax.random.key(0))) == ["fine"]
    with pytest.raises(ValueError, match=message):
        attach(model, LoraConfig(rank=2, targets=target), rngs=jax.random.key(0))


def test_attach_twice_and_mismatched_unmerge_are_errors():
    model = _tiny()
    cfg = LoraConfig(rank=2, targets="q_proj")
    adapted = attach(model, cfg, rngs=jax.random.key(0))
    with pytest.raises(ValueError, match=r"layer 'q_proj' \(dense\) cannot take an adapter: it already has an "
                                         r"adapter"):
        attach(adapted, cfg, rngs=jax.random.key(0))
    lora = nnx.state(adapted, LoraParam)
    with pytest.raises(ValueError, match=r"layer 'mixer' is targeted by config but lora_params has no mixer/a"):
        unmerge(model, lora, LoraConfig(rank=2, targets=("q_proj", "mixer")))
    with pytest.raises(ValueError, match=r"lora_params at paths that config does not target: \['mixer/a', "
                                         r"'mixer/b'\]"):
        unmerge(model, {"q_proj": nnx.to_pure_dict(lora)["q_proj"], "mixer": {"a": 0, "b": 0}}, cfg)
    with pytest.raises(ValueError, match=r"layer 'q_proj': adapter a\[5, 2\], b\[2, 8\] does not fit its kernel "
                                         r"\[8, 8\]; expected a \[8, 2\], b \[2, 8\]$"):
        unmerge(model, {"q_proj": {"a": jnp.ones((5, 2)), "b": jnp.ones((2, 8))}}, cfg)
    with pytest.raises(TypeError, match="rngs must be an nnx.Rngs or a jax.random key"):
        attach(model, cfg, rngs=0)


# ---- dropout


def test_adapter_dropout():
    rate = 0.5
    cfg = LoraConfig(rank=2, alpha=3.0, targets="re:.*", dropout=rate)
    base = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)), jnp.float32)
    no_drop = attach(base, cfg, rngs=jax.random.key(1))   # no "lora_dropout" stream: deterministic, as linen
    _randomize(no_drop, LoraParam, np.random.default_rng(1))
    lora = nnx.state(no_drop, LoraParam)
    with_drop = attach(base, cfg, rngs=nnx.Rngs(params=1, lora_dropout=5))
    nnx.update(with_drop, lora)
    # the same stream, forked as attach forks it, gives the expected mask
    mask_source = nnx.Dropout(rate, rng_collection=DROPOUT_RNG, rngs=nnx.Rngs(params=1, lora_dropout=5)[DROPOUT_RNG])
    dropped = np.asarray(mask_source(x))
    assert 0 < np.count_nonzero(dropped == 0) < dropped.size
    p, a = _pure(base, nnx.Param), nnx.to_pure_dict(lora)
    expected = reference.dense(x, p["kernel"], 0 * a["a"], a["b"], SCALE, bias=p["bias"]) + \
        SCALE * _f64(dropped) @ _f64(a["a"]) @ _f64(a["b"])
    y = with_drop(x)
    assert_close(y, expected, what="dropout")
    assert not np.allclose(np.asarray(with_drop(x)), np.asarray(y))  # a fresh mask on each call
    with_drop.eval()
    assert np.array_equal(np.asarray(with_drop(x)), np.asarray(no_drop(x)))


# ---- stacked layers: nnx.vmap-built, nnx.scan-run


class _ScanBlock(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.proj(x))


class _Scanned(nnx.Module):
    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return _ScanBlock(rngs)
        self.blocks = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)
        return body(x, self.blocks)


def test_stacked_layers_get_stacked_adapters():
    model = _Scanned(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4)), jnp.float32)
    cfg = LoraConfig(rank=2, alpha=3.0, targets="proj")
    adapted = attach(model, cfg, rngs=jax.random.key(1))
    assert jax.tree.map(jnp.shape, _pure(adapted, LoraParam)) == {"blocks": {"proj": {"a": (3, 4, 2),
                                                                                      "b": (3, 2, 4)}}}
    # each stacked slot has its own fan-in-scaled A, B zero: unchanged output
    assert np.array_equal(np.asarray(adapted(x)), np.asarray(model(x)))
    _randomize(adapted, LoraParam, np.random.default_rng(1))
    lora = _pure(adapted, LoraParam)["blocks"]["proj"]
    p = _pure(model, nnx.Param)["blocks"]["proj"]
    expected = _f64(x)
    for i in range(3):
        expected = np.tanh(reference.dense(expected, p["kernel"][i], lora["a"][i], lora["b"][i], SCALE,
                                           bias=p["bias"][i]))
    y = adapted(x)
    _assert_moves(expected, model(x))
    assert_close(y, expected, what="scanned")
    assert_close(merge(adapted)(x), y, what="scanned merged")
    back = unmerge(merge(adapted), nnx.state(adapted, LoraParam), cfg)
    assert_close(back.blocks.proj.kernel[...], p["kernel"], magnitude=merge(adapted).blocks.proj.kernel[...])


def test_init_key_is_folded_with_the_path():
    model = _tiny()
    key = jax.random.key(3)
    adapted = attach(model, LoraConfig(rank=2, targets=("mixer", "q_proj")), rngs=key)
    alone = attach(model, LoraConfig(rank=2, targets="mixer"), rngs=key)
    expected, _ = core.init_factors(jax.random.fold_in(key, zlib.crc32(b"mixer")), "default", "dense", (), (8,),
                                    (8,), 2, jnp.float32)
    assert np.array_equal(adapted.mixer.a[...], expected) and np.array_equal(alone.mixer.a[...], expected)


@st.composite
def linear_cases(draw):
    """An nnx.Linear of random size with random weights, input, rank, alpha and rsLoRA."""
    n_in, n_out = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    rank = draw(st.integers(1, min(n_in, n_out)))
    config = LoraConfig(rank=rank, alpha=draw(st.sampled_from([1.0, 4.0, 16 / 3])), use_rslora=draw(st.booleans()),
                        targets="re:.*")
    batch = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    return n_in, n_out, config, batch, draw(st.integers(0, 2**31 - 1))


@given(linear_cases())
def test_linear_property_nnx_equals_linen_equals_reference(case):
    n_in, n_out, config, batch, seed = case
    rng = np.random.default_rng(seed)
    layer = nnx.Linear(n_in, n_out, rngs=nnx.Rngs(0))
    _randomize(layer, nnx.Param, rng)
    x = jnp.asarray(rng.normal(size=batch + (n_in,)), jnp.float32)
    fresh = attach(layer, config, rngs=nnx.Rngs(1))
    assert np.array_equal(np.asarray(fresh(x)), np.asarray(layer(x)))          # init == base, bitwise
    _randomize(fresh, LoraParam, rng)
    params, lora = _pure(fresh, nnx.Param), _pure(fresh, LoraParam)
    scale = reference.scaling(config.alpha, config.rank, config.use_rslora)
    expected = reference.dense(x, params["kernel"], lora["a"], lora["b"], scale, bias=params["bias"])
    magnitude = reference.dense(np.abs(_f64(x)), np.abs(_f64(params["kernel"])), np.abs(_f64(lora["a"])),
                                np.abs(_f64(lora["b"])), scale, bias=np.abs(_f64(params["bias"])))
    assert_close(fresh(x), expected, what="nnx vs reference", magnitude=magnitude)
    linen_out = lora_apply(nn.Dense(n_out), config)(params, lora, x)
    assert_close(fresh(x), linen_out, what="nnx vs linen", magnitude=magnitude)
    assert_close(merge(fresh)(x), fresh(x), what="merged vs unmerged", magnitude=magnitude)

"""lora_apply_fn: LoRA on any function of a params pytree, against the oracle and the linen front end."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_jax import LoraConfig, init_lora, lora_apply, reference
from lora_jax.functional import find_weights, init_lora_fn, lora_apply_fn, merge_fn, unmerge_fn
from tests.tolerances import assert_close


def _mlp(params, x):
    """A plain-dict MLP, ``x @ W`` layout, with a stacked block applied by ``lax.scan``."""
    h = jnp.tanh(x @ params["up"]["kernel"] + params["up"]["bias"][None])
    h = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, params["blocks"]["w"])[0]
    return h @ params["head"]["kernel"]


def _mlp_reference(params, lora, x, scales):
    """The same MLP in float64 on ``W + scale * A @ B`` (per stacked block for ``blocks``)."""
    def merged(name, leaf):
        w = np.asarray(params[name][leaf], np.float64)
        if name not in lora:
            return w
        a, b = lora[name]["a"], lora[name]["b"]
        if w.ndim == 3:
            return np.stack([reference.merge(w[i], a[i], b[i], scales[name]) for i in range(w.shape[0])])
        return reference.merge(w, a, b, scales[name])

    h = np.tanh(np.asarray(x, np.float64) @ merged("up", "kernel") + np.asarray(params["up"]["bias"], np.float64))
    for w in merged("blocks", "w"):
        h = np.tanh(h @ w)
    return h @ merged("head", "kernel")


@st.composite
def mlp_cases(draw):
    # Fixed shapes (only the rank varies): examples reuse compiled functions instead of compiling anew.
    n_in, hidden, n_out, n_blocks = 5, 6, 3, 2
    rank = draw(st.integers(1, 3))
    alpha, rslora = draw(st.sampled_from([1.0, 3.0, 16.0])), draw(st.booleans())
    targets = draw(st.sampled_from([("re:.*",), ("up", "blocks"), ("head",)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    f32 = lambda *shape: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[-2] if len(shape) > 1 else 1),
                                     jnp.float32)
    params = {"up": {"kernel": f32(n_in, hidden), "bias": f32(hidden)}, "blocks": {"w": f32(n_blocks, hidden, hidden)},
              "head": {"kernel": f32(hidden, n_out)}}
    config = LoraConfig(rank=rank, alpha=alpha, use_rslora=rslora, targets=targets)
    lora = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype),
                        jax.eval_shape(lambda: init_lora_fn(params, config, rng=jax.random.key(0))))
    return params, config, lora, f32(3, n_in)


@given(mlp_cases())
def test_forward_gradient_and_merge_match_reference(case):
    params, config, lora, x = case
    scales = {name: reference.scaling(config.alpha, config.rank, config.use_rslora) for name in lora}
    apply = lora_apply_fn(_mlp, config)
    expected = _mlp_reference(params, lora, x, scales)
    assert_close(jax.jit(apply)(params, lora, x), expected, what="forward")
    assert_close(_mlp(merge_fn(params, lora, config), x), expected, what="merged")
    back = unmerge_fn(merge_fn(params, lora, config), lora, config)
    jax.tree.map(lambda u, v: assert_close(u, v, what="unmerge(merge)"), back, params)
    # the gradient of a linear readout w.r.t. B, by the chain rule on the merged weight:
    # d/dB sum(g * f(W + s A B)) = s * A^T (dL/dW), with dL/dW from autodiff of the plain function
    name = next(iter(lora))
    g = jnp.asarray(np.random.default_rng(1).normal(size=expected.shape), jnp.float32)
    loss = lambda p: jnp.sum(g * _mlp(p, x))
    dw = jax.grad(loss)(merge_fn(params, lora, config))[name]
    dw = dw["kernel"] if "kernel" in dw else dw["w"]
    db = jax.grad(lambda l: jnp.sum(g * apply(params, l, x)))(lora)[name]["b"]
    a = np.asarray(lora[name]["a"], np.float64)
    assert_close(db, scales[name] * np.swapaxes(a, -1, -2) @ np.asarray(dw, np.float64), what=f"dB {name}")


def test_fresh_adapters_leave_the_function_unchanged():
    params = {"up": {"kernel": jnp.ones((4, 6))}, "head": {"kernel": jnp.ones((6, 2))},
              "emb": {"embedding": jnp.ones((9, 4))}}
    config = LoraConfig(rank=2, targets=("all-linear", "embedding"))
    lora = init_lora_fn(params, config, rng=jax.random.key(0))
    assert sorted(lora) == ["emb", "up"]                     # "head" is the output head: not all-linear
    assert not np.any(np.asarray(lora["up"]["b"])) and np.all(np.asarray(lora["up"]["a"]) != 0)
    assert not np.any(np.asarray(lora["emb"]["a"])) and np.all(np.asarray(lora["emb"]["b"]) != 0)   # PEFT
    fn = lambda p, ids: p["emb"]["embedding"][ids] @ p["up"]["kernel"] @ p["head"]["kernel"]
    ids = jnp.array([[1, 2, 8]])
    assert np.array_equal(np.asarray(lora_apply_fn(fn, config)(params, lora, ids)), np.asarray(fn(params, ids)))


class _Linen(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(8, name="up_proj")(x))
        return nn.Dense(5, name="down_proj")(h)


def test_same_adapters_and_outputs_as_the_linen_front_end():
    module, x = _Linen(), jax.random.normal(jax.random.key(0), (2, 3, 4))
    params = module.init(jax.random.key(1), x)["params"]
    # by name: the linen front end also knows that down_proj's output is the model's (the head), this one cannot
    config = LoraConfig(rank=2, alpha=5.0, targets=("up_proj", "down_proj"))
    lora = init_lora(module, params, config, x, rng=jax.random.key(2))
    assert jax.tree.all(jax.tree.map(np.array_equal, init_lora_fn(params, config, rng=jax.random.key(2)), lora))
    rng = np.random.default_rng(0)
    lora = jax.tree.map(lambda t: jnp.asarray(rng.normal(size=t.shape), t.dtype), lora)
    fn = lambda p, x: module.apply({"params": p}, x)
    assert_close(lora_apply_fn(fn, config)(params, lora, x), lora_apply(module, config)(params, lora, x),
                 what="forward")


def test_gradients_match_the_linen_front_end_and_the_closed_form():
    # One Dense layer and a linear readout, so that the closed form (and its rounding bound) is exact.
    module, rng = nn.Dense(6, use_bias=False), np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(3, 4, 6)), jnp.float32)
    params = module.init(jax.random.key(1), x)["params"]
    config = LoraConfig(rank=2, alpha=5.0, targets="re:.*")
    lora = {"a": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32), "b": jnp.asarray(rng.normal(size=(2, 6)),
                                                                                      jnp.float32)}
    fn = lambda p, x: module.apply({"params": p}, x)
    expected = reference.lowrank_grads(x, lora["a"], lora["b"], 2.5, g)[1:]
    magnitude = reference.lowrank_grads(*(np.abs(np.asarray(v)) for v in (x, lora["a"], lora["b"])), 2.5,
                                        np.abs(np.asarray(g)))[1:]
    for name, apply in (("lora_apply_fn", lora_apply_fn(fn, config)), ("lora_apply", lora_apply(module, config))):
        grads = jax.grad(lambda l: jnp.sum(g * apply(params, l, x)))(lora)
        for leaf, want, mag in zip(("a", "b"), expected, magnitude):
            assert_close(grads[leaf], want, what=f"{name} d{leaf}", magnitude=mag)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _TorchLinear:
    """An equinox-style layer: a pytree with ``weight`` ``[out, in]`` used as ``W @ x``."""

    weight: jax.Array
    bias: jax.Array


def test_out_in_layout_on_a_non_dict_pytree():
    rng = np.random.default_rng(0)
    layers = [_TorchLinear(jnp.asarray(rng.normal(size=(5, 4)), jnp.float32), jnp.zeros(5)),
              _TorchLinear(jnp.asarray(rng.normal(size=(3, 5)), jnp.float32), jnp.zeros(3))]
    fn = lambda ls, x: ls[1].weight @ jnp.tanh(ls[0].weight @ x + ls[0].bias) + ls[1].bias
    config = LoraConfig(rank=2, alpha=4.0, targets="re:.*")
    found = find_weights(layers, layout="out_in")
    assert [(l.name, l.in_shape, l.out_shape) for l in found] == [("0", (4,), (5,)), ("1", (5,), (3,))]
    lora = init_lora_fn(layers, config, rng=jax.random.key(0), layout="out_in")
    lora = jax.tree.map(lambda t: jnp.asarray(rng.normal(size=t.shape), t.dtype), lora)
    assert lora["0"]["a"].shape == (4, 2) and lora["0"]["b"].shape == (2, 5)
    x = jnp.asarray(rng.normal(size=4), jnp.float32)
    y = lora_apply_fn(fn, config, layout="out_in")(layers, lora, x)
    # W [out, in] used as W @ x: the merged weight is W + scale * (A @ B)^T
    w0 = reference.merge(np.asarray(layers[0].weight).T, lora["0"]["a"], lora["0"]["b"], 2.0).T
    w1 = reference.merge(np.asarray(layers[1].weight).T, lora["1"]["a"], lora["1"]["b"], 2.0).T
    assert_close(y, w1 @ np.tanh(w0 @ np.asarray(x, np.float64)), what="out_in forward")
    merged = merge_fn(layers, lora, config, layout="out_in")
    assert isinstance(merged[0], _TorchLinear)
    assert_close(merged[0].weight, w0, what="merged weight")


def test_errors_name_the_layer():
    params = {"up": {"kernel": jnp.ones((4, 6))}}
    config = LoraConfig(rank=2, targets="re:.*")
    with pytest.raises(ValueError, match=r"adapters with no weight leaf in params: \['down'\]"):
        merge_fn(params, {"down": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 6))}}, config)
    with pytest.raises(ValueError, match=r"layer 'up': adapter shapes a\[6, 2\]"):
        merge_fn(params, {"up": {"a": jnp.ones((6, 2)), "b": jnp.ones((2, 4))}}, config)
    with pytest.raises(ValueError, match="layout for 'up' must be one of"):
        init_lora_fn(params, config, rng=jax.random.key(0), layout="io")
    with pytest.raises(ValueError, match="two weight leaves map to the layer name 'up'"):
        find_weights({"up": {"kernel": jnp.ones((4, 6)), "weight": jnp.ones((4, 6))}})
    with pytest.raises(ValueError, match="matches no layer"):
        init_lora_fn(params, LoraConfig(targets="attention"), rng=jax.random.key(0))

"""DoRA (``LoraConfig(use_dora=True)``) against the float64 NumPy oracle and exact identities.

Weights, inputs, factors and magnitudes are random (never the init, under
which ``m / ||W + s A B|| == 1`` and a wrong magnitude term would go
unnoticed). PEFT's own DoRA logits are checked in tests/test_peft_io.py.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_jax import LoraConfig, core, init_lora, lora_apply, merge, reference
from lora_jax.functional import lora_apply_fn
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM
from lora_jax.optim import lora_plus
from lora_jax.train import make_train_step
from tests.tolerances import assert_close

CFG = LoraConfig(rank=3, alpha=6.0, targets="re:.*", use_dora=True)   # scale 2


def _dense_case(seed=0, in_=6, out=5, impl="fast"):
    rng = np.random.default_rng(seed)
    model = nn.Dense(out)
    x = jnp.asarray(rng.normal(size=(2, 4, in_)), jnp.float32)
    params = {"kernel": jnp.asarray(rng.normal(size=(in_, out)), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=(out,)), jnp.float32)}
    lora = {"a": jnp.asarray(0.5 * rng.normal(size=(in_, 3)), jnp.float32),
            "b": jnp.asarray(0.5 * rng.normal(size=(3, out)), jnp.float32),
            "m": jnp.asarray(rng.uniform(0.5, 3.0, size=(out,)), jnp.float32)}
    return model, x, params, lora, lora_apply(model, CFG, impl=impl)


@pytest.mark.parametrize("impl", ["fast", "plain"])
def test_dense_forward_matches_reference(impl):
    model, x, params, lora, apply = _dense_case(impl=impl)
    expected = reference.dora_dense(x, params["kernel"], lora["a"], lora["b"], lora["m"], 2.0, params["bias"])
    assert_close(apply(params, lora, x), expected, what=f"DoRA dense ({impl})")
    plain_lora = reference.dense(x, params["kernel"], lora["a"], lora["b"], 2.0, params["bias"])
    assert np.max(np.abs(expected - plain_lora)) > 0.1 * np.max(np.abs(expected))   # the magnitude matters


@pytest.mark.parametrize("impl", ["fast", "plain"])
def test_dense_gradients_match_reference_with_the_norm_held_constant(impl):
    model, x, params, lora, apply = _dense_case(seed=1, impl=impl)
    g = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 5)), jnp.float32)
    grads = jax.grad(lambda lora, x: jnp.sum(g * apply(params, lora, x)), argnums=(0, 1))(lora, x)
    dx, da, db, dm = reference.dora_grads(x, params["kernel"], lora["a"], lora["b"], lora["m"], 2.0, g)
    for name, actual, expected in (("dA", grads[0]["a"], da), ("dB", grads[0]["b"], db),
                                   ("dm", grads[0]["m"], dm), ("dx", grads[1], dx)):
        assert_close(actual, expected, what=f"{name} ({impl})")


def test_dense_general_with_tuple_features():
    # kernel [3, 4, 2, 4]: the magnitude has the layer's (2, 4) output shape; the norm runs over (3, 4)
    rng = np.random.default_rng(3)
    model = nn.DenseGeneral((2, 4), axis=(-2, -1))
    x = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32),
                          jax.eval_shape(model.init, jax.random.key(0), x)["params"])
    fresh = init_lora(model, params, CFG, x, rng=jax.random.key(1))
    assert fresh["m"].shape == (2, 4)
    lora = {k: jnp.asarray(rng.uniform(0.5, 2.0, size=v.shape) if k == "m" else 0.5 * rng.normal(size=v.shape),
                           jnp.float32) for k, v in fresh.items()}
    flat = lambda v, *shape: np.asarray(v, np.float64).reshape(*shape)
    expected = reference.dora_dense(flat(x, 2, 12), flat(params["kernel"], 12, 8), flat(lora["a"], 12, 3),
                                    flat(lora["b"], 3, 8), flat(lora["m"], 8), 2.0, flat(params["bias"], 8))
    for impl in ("fast", "plain"):
        assert_close(lora_apply(model, CFG, impl=impl)(params, lora, x).reshape(2, 8), expected,
                     what=f"DoRA DenseGeneral ({impl})")
    merged = merge(params, lora, CFG)
    assert_close(model.apply({"params": merged}, x).reshape(2, 8), expected, what="merged DenseGeneral")


def test_fresh_adapter_leaves_the_output_bitwise_unchanged():
    model, x, params, _, apply = _dense_case(seed=4)
    fresh = init_lora(model, params, CFG, x, rng=jax.random.key(0))
    np.testing.assert_array_equal(fresh["m"], np.linalg.norm(np.asarray(params["kernel"]), axis=0).astype(np.float32))
    np.testing.assert_array_equal(apply(params, fresh, x), model.apply({"params": params}, x))


def test_norm_fast_equals_plain_and_reference_on_stacked_weights():
    rng = np.random.default_rng(5)
    w, a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((3, 8, 6), (3, 8, 2), (3, 2, 6)))
    expected = np.stack([np.linalg.norm(reference.merge(w[i], a[i], b[i], 1.5), axis=0) for i in range(3)])
    for impl in ("fast", "plain"):
        assert_close(core.dora_norm(w, a, b, 1.5, impl=impl), expected, what=f"norm ({impl})")


def test_merge_equals_reference_weight_and_unmerged_output():
    model, x, params, lora, apply = _dense_case(seed=6)
    merged = merge(params, lora, CFG)
    assert_close(merged["kernel"], reference.dora_weight(params["kernel"], lora["a"], lora["b"], lora["m"], 2.0),
                 what="merged kernel")
    np.testing.assert_array_equal(merged["bias"], params["bias"])
    assert_close(model.apply({"params": merged}, x), apply(params, lora, x), what="merged vs unmerged")
    # the merged kernel's column norms are the magnitudes: DoRA's defining identity
    assert_close(np.linalg.norm(np.asarray(merged["kernel"], np.float64), axis=0), lora["m"], what="norms")


def test_scanned_llama_merge_equals_unmerged():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, scan_layers=True))
    rng = np.random.default_rng(7)
    ids = jnp.asarray(rng.integers(0, 64, (2, 8)), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.normal(size=s.shape) + (s.ndim == 1), s.dtype), shapes)
    cfg = LoraConfig(rank=4, alpha=8.0, targets=("attention", "mlp"), use_dora=True)
    fresh = init_lora(model, params, cfg, ids, rng=jax.random.key(1, impl="rbg"))
    assert fresh["model"]["layers"]["self_attn"]["k_proj"]["m"].shape == (2, 16)   # stacked layers, [L, out]
    lora = jax.tree.map(lambda v: v * jnp.asarray(rng.uniform(0.5, 1.5, size=v.shape), v.dtype)
                        if v.ndim == 2 else jnp.asarray(0.2 * rng.normal(size=v.shape), v.dtype), fresh)
    apply = lora_apply(model, cfg)
    unmerged, merged, base = jax.jit(lambda p, l: (apply(p, l, ids), model.apply({"params": merge(p, l, cfg)}, ids),
                                                   model.apply({"params": p}, ids)))(params, lora)
    assert_close(merged, unmerged, what="scanned DoRA merged vs unmerged")
    assert np.max(np.abs(unmerged - base)) > 0.1



def test_a_train_step_from_init_moves_b_and_the_magnitude():
    model, x, params, _, apply = _dense_case(seed=9)
    fresh = init_lora(model, params, CFG, x, rng=jax.random.key(0))
    target = jnp.asarray(np.random.default_rng(10).normal(size=(2, 4, 5)), jnp.float32)
    step = make_train_step(apply, lambda m, batch: jnp.mean((m(batch[0]) - batch[1]) ** 2), optax.adam(1e-2),
                           donate=False)
    moved, _, metrics = step(fresh, optax.adam(1e-2).init(fresh), params, (x, target))
    # at init B = 0 and m = ||W||: the loss is the base model's; then B and the magnitude move, by adam's lr
    base_loss = jnp.mean((model.apply({"params": params}, x) - target) ** 2)
    assert_close(metrics["loss"], base_loss, what="loss at init")
    for key in ("b", "m"):
        np.testing.assert_allclose(np.max(np.abs(moved[key] - fresh[key])), 1e-2, rtol=1e-3, err_msg=key)


def test_lora_plus_gives_the_magnitude_b_rate():
    _, _, _, lora, _ = _dense_case()
    tx = lora_plus(optax.sgd, 0.5, ratio=4.0)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, lora), tx.init(lora), lora)
    assert (float(updates["a"][0, 0]), float(updates["b"][0, 0]), float(updates["m"][0])) == (-0.5, -2.0, -2.0)


def test_unsupported_uses_are_refused_with_the_layer_named():
    model, x, params, lora, apply = _dense_case()
    embed = nn.Embed(10, 4)
    table = embed.init(jax.random.key(0), jnp.zeros((1,), jnp.int32))["params"]
    with pytest.raises(ValueError, match=r"DoRA is supported on Dense and DenseGeneral layers, not 'embed'"):
        init_lora(embed, table, CFG, jnp.zeros((1,), jnp.int32), rng=jax.random.key(1))
    with pytest.raises(ValueError, match=r"adapter has a DoRA magnitude 'm', but LoraConfig.use_dora is False"):
        lora_apply(model, dataclasses.replace(CFG, use_dora=False))(params, lora, x)
    with pytest.raises(ValueError, match=r"adapter has no DoRA magnitude 'm', but LoraConfig.use_dora is True"):
        apply(params, {"a": lora["a"], "b": lora["b"]}, x)
    with pytest.raises(ValueError, match=r"mixed-adapter batches \(adapter_ids\) do not support DoRA"):
        apply(params, jax.tree.map(lambda v: v[None], lora), x, adapter_ids=jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match=r"lora_apply_fn: LoraConfig.use_dora is not supported here"):
        lora_apply_fn(lambda p, x: x @ p["w"], CFG)
    with pytest.raises(ValueError, match=r"DoRA magnitude m\[4\] does not fit the layer's output features \[5\]"):
        apply(params, {**lora, "m": lora["m"][:4]}, x)
    assert math.isfinite(float(jnp.sum(apply(params, lora, x))))

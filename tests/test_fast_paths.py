"""The Llama model's speed settings change nothing but speed and memory.

``model(ids, labels=ids)`` (the chunked loss) against ``causal_lm_loss(model(ids), ids)``,
each remat policy against no remat, and the rule that picks the attention
implementation. Values and gradients are compared in float32 (with respect to
the adapters, an adapter on the output head included, and to the base params);
the plain loss is also checked against a float64 NumPy log-softmax.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import LoraConfig, init_lora, lora_apply
from lora_jax.backend import memory_lean_options
from lora_jax.models.llama import (IGNORE_INDEX, REMAT_POLICIES, LlamaConfig, LlamaForCausalLM,
                                   attention_implementation, causal_lm_loss)
from tests.tolerances import assert_close

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
BATCH, SEQ = 2, 12     # 22 predicted tokens: chunks of 8 leave a partial last chunk


def _ids(seed=0, batch=BATCH, seq=SEQ, vocab=SMALL["vocab_size"]):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, seq)), jnp.int32)


def _setup(**overrides):
    """Model, random base params (norms away from 1), adapters with non-zero B on every linear layer and the head."""
    cfg = LlamaConfig(**{**SMALL, **overrides})
    model = LlamaForCausalLM(cfg)
    ids = _ids()
    rng = np.random.default_rng(1)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    params = jax.tree_util.tree_map_with_path(
        lambda p, s: jnp.asarray((1.0 if jax.tree_util.keystr(p).endswith("['weight']") else 0.0)
                                 + 0.2 * rng.normal(size=s.shape), s.dtype), shapes)
    head = ("embedding",) if cfg.tie_word_embeddings else ("lm_head", "embedding")
    lcfg = LoraConfig(rank=4, alpha=8.0, targets=("all-linear", *head))
    lora = init_lora(model, params, lcfg, ids, rng=jax.random.key(2))
    lora = jax.tree.map(lambda x: x + 0.05 * jnp.asarray(rng.normal(size=x.shape), x.dtype), lora)
    return model, params, lcfg, lora, ids


def _loss_and_grads(model, lcfg, chunked: bool):
    apply = lora_apply(model, lcfg)

    def loss(params, lora, ids, labels):
        if chunked:
            return apply(params, lora, ids, labels=labels)
        return causal_lm_loss(apply(params, lora, ids), labels)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _compare(got, want, what):
    (lg, (gp, gl)), (lw, (wp, wl)) = got, want
    assert_close(lg, lw, what=f"{what}: loss")
    for tree_got, tree_want, name in ((gp, wp, "base grads"), (gl, wl, "adapter grads")):
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree_got), jax.tree.leaves(tree_want)):
            assert_close(a, b, what=f"{what}: {name} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [8, 22, 1000])
def test_chunked_loss_equals_plain_loss_and_its_gradients(tied, chunk):
    model, params, lcfg, lora, ids = _setup(tie_word_embeddings=tied, loss_chunk_tokens=chunk)
    labels = ids.at[0, 3].set(IGNORE_INDEX).at[1, 7:].set(IGNORE_INDEX)
    want = _loss_and_grads(model, lcfg, chunked=False)(params, lora, ids, labels)
    got = _loss_and_grads(model, lcfg, chunked=True)(params, lora, ids, labels)
    _compare(got, want, f"chunk {chunk}, tied {tied}")


def test_chunked_loss_with_scanned_layers():
    model, params, lcfg, lora, ids = _setup(scan_layers=True, loss_chunk_tokens=8)
    want = _loss_and_grads(model, lcfg, chunked=False)(params, lora, ids, ids)
    got = _loss_and_grads(model, lcfg, chunked=True)(params, lora, ids, ids)
    _compare(got, want, "scanned layers")


def test_causal_lm_loss_against_numpy_with_ignored_targets():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
    ids = rng.integers(0, 7, (2, 5))
    ids[0, 2] = ids[1, 4] = IGNORE_INDEX
    x = logits[:, :-1].astype(np.float64)
    logz = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    targets = ids[:, 1:]
    keep = targets != IGNORE_INDEX
    picked = np.take_along_axis(x, np.where(keep, targets, 0)[..., None], -1)[..., 0]
    want = ((logz - picked) * keep).sum() / keep.sum()
    assert_close(causal_lm_loss(jnp.asarray(logits), jnp.asarray(ids)), want, what="causal_lm_loss")


def test_chunked_loss_never_holds_all_float32_logits():
    """XLA's memory analysis of the gradient: the plain loss needs the float32 [tokens, vocab] logits, the chunked one does not."""
    cfg = LlamaConfig(vocab_size=16384, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, loss_chunk_tokens=64)
    model = LlamaForCausalLM(cfg)
    ids = _ids(batch=8, seq=65, vocab=cfg.vocab_size)     # short sequences: the attention scores stay small
    params = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    logits_bytes = 8 * 64 * cfg.vocab_size * 4
    temp = {}
    for chunked in (False, True):
        loss = (lambda p: model.apply({"params": p}, ids, labels=ids)) if chunked else (
            lambda p: causal_lm_loss(model.apply({"params": p}, ids), ids))
        # The memory-aware scheduler (lora_jax.backend.memory_lean_options): CPU's default one runs
        # recomputations as early as it can, which keeps every chunk's logits alive anyway.
        compiled = jax.jit(jax.grad(loss), compiler_options=memory_lean_options()).lower(params).compile()
        temp[chunked] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[False] >= logits_bytes, temp
    assert temp[True] < logits_bytes / 2, temp      # one chunk is 1/8 of the logits


def test_labels_are_checked():
    model, params, _, _, ids = _setup()
    with pytest.raises(ValueError, match="labels"):
        model.apply({"params": params}, ids, labels=ids[:, :-1])


@pytest.mark.parametrize("policy", REMAT_POLICIES)
def test_remat_policies_change_nothing(policy):
    model, params, lcfg, lora, ids = _setup(scan_layers=True)
    remat = LlamaForCausalLM(dataclasses.replace(model.config, remat=True, remat_policy=policy))
    want = _loss_and_grads(model, lcfg, chunked=True)(params, lora, ids, ids)
    got = _loss_and_grads(remat, lcfg, chunked=True)(params, lora, ids, ids)
    _compare(got, want, f"remat {policy}")


def test_attention_implementation_rule():
    gqa = LlamaConfig(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4)
    hopper, turing = dict(backend="gpu", compute_capability="9.0"), dict(backend="gpu", compute_capability="7.5")
    assert attention_implementation(gqa, jnp.bfloat16, **hopper) == "cudnn"
    assert attention_implementation(gqa, jnp.float16, **hopper) == "cudnn"
    assert attention_implementation(gqa, jnp.float16, **turing) == "xla"
    assert attention_implementation(gqa, jnp.float32, **hopper) == "xla"
    assert attention_implementation(gqa, jnp.bfloat16, backend="cpu") == "xla"
    assert attention_implementation(gqa, jnp.bfloat16, backend="tpu") == "xla"
    wide = LlamaConfig(hidden_size=1024, num_attention_heads=4)          # head_dim 256
    assert attention_implementation(wide, jnp.bfloat16, **hopper) == "xla"
    xla = dataclasses.replace(gqa, attention_implementation="xla")
    assert attention_implementation(xla, jnp.bfloat16, **hopper) == "xla"
    cudnn = dataclasses.replace(gqa, attention_implementation="cudnn")
    with pytest.raises(ValueError, match="float32, not bfloat16"):
        attention_implementation(cudnn, jnp.float32, **hopper)
    with pytest.raises(ValueError, match="compute capability is 7.5"):
        attention_implementation(cudnn, jnp.bfloat16, **turing)
    with pytest.raises(ValueError, match="backend is 'cpu'"):
        attention_implementation(cudnn, jnp.bfloat16, backend="cpu")


@pytest.mark.parametrize("field, value", [("attention_implementation", "flash"), ("remat_policy", "dots"),
                                          ("loss_chunk_tokens", 0)])
def test_speed_settings_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        LlamaConfig(**{**SMALL, field: value})


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_attention_equals_xla_attention_on_gpu():
    """On a GPU: the cuDNN path's loss and adapter gradients against XLA's, in bfloat16 (causal mask, GQA)."""
    model, params, lcfg, lora, ids = _setup(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                            dtype=jnp.bfloat16)
    results = {}
    for impl in ("xla", "cudnn"):
        m = LlamaForCausalLM(dataclasses.replace(model.config, attention_implementation=impl))
        p = jax.tree.map(lambda x: x, params)
        results[impl] = _loss_and_grads(m, lcfg, chunked=True)(p, lora, ids, ids)
    (lx, (_, gx)), (lc, (_, gc)) = results["xla"], results["cudnn"]
    assert_close(lc, lx, jnp.bfloat16, what="loss")
    for a, b in zip(jax.tree.leaves(gc), jax.tree.leaves(gx)):
        assert_close(a, b, jnp.bfloat16, what="adapter gradient")


# ---- fused projections: q/k/v and gate/up as one matmul each (lora_jax.linen.fused_dense)

def _fused_pair(**overrides):
    model, params, lcfg, lora, ids = _setup(**overrides)
    fused = LlamaForCausalLM(dataclasses.replace(model.config, fused_projections=True))
    return model, fused, params, lcfg, lora, ids


@pytest.mark.parametrize("overrides", [{}, {"scan_layers": True}, {"attention_bias": True, "mlp_bias": True}],
                         ids=["plain", "scan", "biases"])
def test_fused_projections_equal_separate_ones(overrides):
    """Base logits, LoRA loss and every gradient (base and adapters) of the fused model equal the unfused model's."""
    model, fused, params, lcfg, lora, ids = _fused_pair(**overrides)
    assert_close(fused.apply({"params": params}, ids), model.apply({"params": params}, ids), what="base logits")
    want = _loss_and_grads(model, lcfg, chunked=True)(params, lora, ids, ids)
    got = _loss_and_grads(fused, lcfg, chunked=True)(params, lora, ids, ids)
    _compare(got, want, f"fused {overrides}")


def test_fused_projections_with_some_layers_adapted_and_different_ranks():
    model, fused, params, _, _, ids = _fused_pair()
    lcfg = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "up_proj"), rank_pattern={"**/v_proj": 2})
    lora = init_lora(model, params, lcfg, ids, rng=jax.random.key(3))
    lora = jax.tree.map(lambda x: x + 0.05 * jnp.asarray(np.random.default_rng(4).normal(size=x.shape), x.dtype),
                        lora)
    assert lora["model"]["layers_0"]["self_attn"]["v_proj"]["a"].shape[-1] == 2
    _compare(_loss_and_grads(fused, lcfg, chunked=True)(params, lora, ids, ids),
             _loss_and_grads(model, lcfg, chunked=True)(params, lora, ids, ids), "partial targets")


def test_fused_model_finds_the_same_layers_and_adapters():
    model, fused, params, lcfg, _, ids = _fused_pair()
    one = init_lora(model, params, lcfg, ids, rng=jax.random.key(2))
    two = init_lora(fused, params, lcfg, ids, rng=jax.random.key(2))
    assert jax.tree.structure(one) == jax.tree.structure(two)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
        np.testing.assert_array_equal(a, b)


def test_fused_projections_fall_back_to_separate_calls_for_dropout_dora_and_mixed_batches():
    """Where one matmul cannot serve every layer, the layers run one by one: the results equal the unfused model's."""
    from lora_jax import multi
    from lora_jax.config import Adapter

    model, fused, params, lcfg, lora, ids = _fused_pair()
    dropout = dataclasses.replace(lcfg, dropout=0.3)
    rngs = {"lora_dropout": jax.random.key(7)}
    assert_close(lora_apply(fused, dropout)(params, lora, ids, rngs=rngs),
                 lora_apply(model, dropout)(params, lora, ids, rngs=rngs), what="dropout")
    dora = dataclasses.replace(lcfg, use_dora=True, targets=("all-linear",))
    dora_params = init_lora(model, params, dora, ids, rng=jax.random.key(5))
    assert_close(lora_apply(fused, dora)(params, dora_params, ids), lora_apply(model, dora)(params, dora_params, ids),
                 what="DoRA")
    stacked = multi.stack(params, {"x": Adapter(lcfg, lora),
                                   "y": Adapter(lcfg, jax.tree.map(lambda t: 2 * t, lora))})
    rows = stacked.ids(["y", "x"])
    assert_close(lora_apply(fused, stacked.config)(params, stacked.lora_params, ids, adapter_ids=rows),
                 lora_apply(model, stacked.config)(params, stacked.lora_params, ids, adapter_ids=rows),
                 what="mixed batch")


def test_fused_projections_on_a_quantized_base():
    from lora_jax import quant

    model, fused, params, lcfg, lora, ids = _fused_pair()
    q = quant.quantize_base(model, params, ids, method="int8")
    assert_close(lora_apply(fused, lcfg)(q, lora, ids), lora_apply(model, lcfg)(q, lora, ids), what="int8 base")

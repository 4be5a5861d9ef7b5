"""LoRA on a small Llama (``lora_jax.models.llama``): plain, scanned, scanned+remat and tied variants.

Each variant is compiled once (one ``jax.jit`` computing every quantity the
tests below compare) and the tests assert on the cached results.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import (LoraConfig, adapter_paths, adapter_nodes, count_params, find_layers, init_lora, lora_apply,
                      merge, select, summary)
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM, causal_lm_loss
from tests.tolerances import assert_close

KEY = jax.random.key(0)
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)   # head_dim 8, k/v width 2 * 8 = 16
BATCH, SEQ, RANK, ALPHA = 2, 8, 4, 8.0

VARIANTS = {
    "plain": (dict(), ("all-linear",)),
    "scan": (dict(scan_layers=True), ("all-linear",)),
    "scan_remat": (dict(scan_layers=True, remat=True), ("all-linear",)),
    "tied": (dict(tie_word_embeddings=True), ("all-linear", "embedding")),
}

# (in, out) of each adapted projection of one decoder layer of SMALL
PROJ = {"self_attn/q_proj": (32, 32), "self_attn/k_proj": (32, 16), "self_attn/v_proj": (32, 16),
        "self_attn/o_proj": (32, 32), "mlp/gate_proj": (32, 48), "mlp/up_proj": (32, 48),
        "mlp/down_proj": (48, 32)}
ATTN, MLP = list(PROJ)[:4], list(PROJ)[4:]


def _ids(seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, SMALL["vocab_size"], (BATCH, SEQ)), jnp.int32)


def _random_params(model, ids, rng):
    """Random base params without compiling the model's initialisers: weights N(0, 0.1^2), norms 1 + N(0, 0.1^2)."""
    shapes = jax.eval_shape(model.init, KEY, ids)["params"]

    def draw(path, s):
        is_norm = jax.tree_util.keystr(path).endswith("['weight']")
        return jnp.asarray((1.0 if is_norm else 0.0) + 0.1 * rng.normal(size=s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _expected_adapter_shapes(variant):
    """The LoRA tree's shapes, written out from SMALL by hand."""
    kw, _ = VARIANTS[variant]
    n, r = SMALL["num_hidden_layers"], RANK
    shapes = {}
    for proj, (n_in, n_out) in PROJ.items():
        if kw.get("scan_layers"):   # one adapter per projection, stacked along the layer axis
            shapes[f"model/layers/{proj}"] = ((n, n_in, r), (n, r, n_out))
        else:
            for i in range(n):
                shapes[f"model/layers_{i}/{proj}"] = ((n_in, r), (r, n_out))
    if kw.get("tie_word_embeddings"):
        shapes["model/embed_tokens"] = ((64, r), (r, 32))
    return shapes


# Trainable numbers by hand: one layer's adapters hold r * (in + out) per projection,
# r * [(32+32) + (32+16) + (32+16) + (32+32) + (32+48) + (32+48) + (48+32)] = 4 * 464 = 1856;
# two layers 3712 (stacked or not); the tied variant adds embed_tokens, 4 * (64 + 32) = 384.
EXPECTED_COUNT = {"plain": 3712, "scan": 3712, "scan_remat": 3712, "tied": 3712 + 384}


@pytest.fixture(scope="module", params=list(VARIANTS))
def run(request):
    """Everything the variant's tests compare, computed in one jitted call."""
    variant = request.param
    kw, targets = VARIANTS[variant]
    model = LlamaForCausalLM(LlamaConfig(**SMALL, **kw))
    ids, rng = _ids(), np.random.default_rng(1)
    params = _random_params(model, ids, rng)
    cfg = LoraConfig(rank=RANK, alpha=ALPHA, targets=targets)
    # an "rbg" key: its bits compile much faster on CPU than threefry's (init is per-shape eager work)
    fresh = init_lora(model, params, cfg, ids, rng=jax.random.key(1, impl="rbg"))
    # N(0, 0.2^2) factors: scale * A @ B ~ 2 * 0.04 * sqrt(4) = 0.16 per entry, above the weights' 0.1
    lora = jax.tree.map(lambda leaf: jnp.asarray(0.2 * rng.normal(size=leaf.shape), leaf.dtype), fresh)
    fast, plain = lora_apply(model, cfg, impl="fast"), lora_apply(model, cfg, impl="plain")

    def loss(apply):
        def fn(lora):
            logits = apply(params, lora, ids)
            return causal_lm_loss(logits, ids), logits
        return fn

    @jax.jit
    def compute(params, fresh, lora):
        out = {"base": model.apply({"params": params}, ids), "fresh": fast(params, fresh, ids),
               "merged": model.apply({"params": merge(params, lora, cfg)}, ids)}
        (out["loss_fast"], out["unmerged"]), out["grad_fast"] = jax.value_and_grad(loss(fast), has_aux=True)(lora)
        (out["loss_plain"], _), out["grad_plain"] = jax.value_and_grad(loss(plain), has_aux=True)(lora)
        (out["loss_ckpt"], _), out["grad_ckpt"] = jax.value_and_grad(jax.checkpoint(loss(fast)),
                                                                     has_aux=True)(lora)
        return out

    return variant, fresh, lora, jax.device_get(compute(params, fresh, lora))


def _by_path(tree):
    return {"/".join(path): node for path, node in adapter_nodes(tree).items()}


def test_fresh_adapters_leave_logits_unchanged(run):
    variant, fresh, _, out = run
    for name, node in _by_path(fresh).items():
        zero, other = ("a", "b") if name.endswith("embed_tokens") else ("b", "a")
        assert not np.any(np.asarray(node[zero])) and np.all(np.asarray(node[other]) != 0), name
    assert out["base"].shape == (BATCH, SEQ, SMALL["vocab_size"])
    assert np.array_equal(out["fresh"], out["base"]), variant


def test_merged_equals_unmerged(run):
    variant, _, _, out = run
    change = np.max(np.abs(out["unmerged"] - out["base"]))
    assert change > 0.1 * np.max(np.abs(out["base"])), "the adapters barely change the logits"
    assert_close(out["merged"], out["unmerged"], jnp.float32, what=variant)


def _assert_same_grads(actual, expected, what):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, g), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
        name = f"{what} {jax.tree_util.keystr(path)}"
        assert np.max(np.abs(e)) > 0, f"{name}: zero gradient"
        assert_close(g, e, jnp.float32, what=name)


def test_fast_and_plain_gradients_agree(run):
    variant, _, lora, out = run
    assert jax.tree.structure(out["grad_fast"]) == jax.tree.structure(lora)
    assert np.isfinite(out["loss_fast"]) and out["loss_fast"] > 0
    assert_close(out["loss_fast"], out["loss_plain"], jnp.float32, what=f"{variant} loss")
    _assert_same_grads(out["grad_fast"], out["grad_plain"], f"{variant} fast vs plain")


def test_checkpoint_gives_same_loss_and_grads(run):
    variant, _, _, out = run
    assert_close(out["loss_ckpt"], out["loss_fast"], jnp.float32, what=f"{variant} loss")
    _assert_same_grads(out["grad_ckpt"], out["grad_fast"], f"{variant} checkpoint vs not")


def test_adapter_tree_holds_only_factors(run):
    variant, fresh, _, out = run
    expected = _expected_adapter_shapes(variant)
    assert {name: (node["a"].shape, node["b"].shape) for name, node in _by_path(fresh).items()} == expected
    # nothing but the factors: no copy of a base weight, per adapter or per layer
    keys = {jax.tree_util.keystr(path)[-5:] for path, _ in jax.tree_util.tree_leaves_with_path(fresh)}
    assert keys == {"['a']", "['b']"}
    assert count_params(fresh) == EXPECTED_COUNT[variant]
    assert count_params(fresh) == sum(np.prod(a) + np.prod(b) for a, b in expected.values())
    assert count_params(out["grad_fast"]) == EXPECTED_COUNT[variant]


# ---- target presets


def _layer_paths(*projs, layers=("layers_0", "layers_1")):
    return [f"model/{layer}/{proj}" for layer in layers for proj in projs]


PRESET_PATHS = {
    "plain": {
        "attention": _layer_paths(*ATTN),
        "mlp": _layer_paths(*MLP),
        "all-linear": _layer_paths(*ATTN, *MLP),
        "embedding": ["model/embed_tokens"],
    },
    "scan": {
        "attention": _layer_paths(*ATTN, layers=("layers",)),
        "mlp": _layer_paths(*MLP, layers=("layers",)),
        "all-linear": _layer_paths(*ATTN, *MLP, layers=("layers",)),
        "embedding": ["model/embed_tokens"],
    },
    "tied": {
        "attention": _layer_paths(*ATTN),
        "mlp": _layer_paths(*MLP),
        "all-linear": _layer_paths(*ATTN, *MLP),
        "embedding": ["model/embed_tokens"],
    },
}


@pytest.mark.parametrize("variant", list(PRESET_PATHS))
def test_presets_select_exact_paths(variant):
    model = LlamaForCausalLM(LlamaConfig(**SMALL, **VARIANTS[variant][0]))
    ids = _ids()
    params = jax.eval_shape(model.init, KEY, ids)["params"]
    layers = find_layers(model, params, ids)
    heads = [layer.name for layer in layers if layer.is_head]
    assert heads == ([] if variant == "tied" else ["lm_head"])
    for preset, expected in PRESET_PATHS[variant].items():
        cfg = LoraConfig(rank=RANK, targets=preset)
        assert [layer.name for layer in select(cfg, layers)] == expected, preset
        lora = jax.eval_shape(lambda: init_lora(model, params, cfg, ids, rng=KEY))
        assert sorted("/".join(p) for p in adapter_paths(lora)) == sorted(expected), preset
    assert "lm_head" not in [layer.name for layer in select(LoraConfig(targets="all-linear"), layers)]


def test_summary_counts_on_benchmark_config():
    cfg = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                      num_attention_heads=8)
    model, ids = LlamaForCausalLM(cfg), jnp.zeros((1, 8), jnp.int32)
    lora_cfg = LoraConfig(rank=8, targets=("attention", "mlp"))
    params = jax.eval_shape(model.init, KEY, ids)["params"]
    lora = jax.eval_shape(lambda: init_lora(model, params, lora_cfg, ids, rng=KEY))
    s = summary(params, lora, lora_cfg, print_fn=None)
    # trainable: kv heads = 8, so q/k/v/o are all 512 -> 512: 4 * 8 * (512 + 512) = 32,768 per layer;
    # gate/up 512 -> 1376 and down 1376 -> 512: 3 * 8 * (512 + 1376) = 45,312 per layer;
    # 4 layers * (32,768 + 45,312) = 4 * 78,080 = 312,320.
    assert s.trainable == 312_320
    # base: embed_tokens and lm_head 2 * 4096 * 512 = 4,194,304; per layer attention 4 * 512 * 512
    # = 1,048,576, mlp 3 * 512 * 1376 = 2,113,536, two norms 2 * 512 = 1,024, together 3,163,136;
    # 4 layers 12,652,544; final norm 512: 4,194,304 + 12,652,544 + 512 = 16,847,360.
    assert s.base == 16_847_360
    assert s.total == 16_847_360 + 312_320
    assert len(s.rows) == 4 * 7
    assert {row.params for row in s.rows} == {8 * (512 + 512), 8 * (512 + 1376)}
    assert all(row.rank == 8 and row.scale == 1.0 for row in s.rows)

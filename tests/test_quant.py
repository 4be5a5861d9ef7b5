"""QLoRA (``lora_jax.quant``): the quantizers against a float64 NumPy oracle, their error bounds,
``lora_apply`` on a quantized base (forward and gradient, a small linen model and a scanned Llama),
training on it, and merging into it with the rounding reported.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_jax import LoraConfig, core, init_lora, lora_apply, make_train_step, merge, quant, reference
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM, causal_lm_loss
from tests import quant_reference as ref
from tests.tolerances import assert_close

EPS32 = float(np.finfo(np.float32).eps)
# The JAX levels are derived from normal quantiles, the oracle's are the published table: they differ
# by up to 1.1e-7 (test_nf4_levels_match_the_published_table), plus one float32 rounding of the product.
NF4_DEQ_TOL = 1.2e-7 + EPS32
# A value this close to a rounding boundary (in the rounded quantity's units) may round either way in
# float32: w / scale carries ~2 ulp (about 127 * 2.4e-7 = 3e-5 near the int8 limit); w / absmax 1 ulp.
INT8_TIE, NF4_TIE = 1e-4, 1e-6


def _f64(x):
    return np.asarray(x, np.float64)


def _normal(rng, *shape, dtype=jnp.float32):
    return jnp.asarray(rng.normal(size=shape), dtype)


# ---- the levels and the quantizers against the oracle

def test_nf4_levels_match_the_published_table():
    levels = quant.nf4_levels()
    assert levels.shape == (16,) and levels[7] == 0.0 and levels[0] == -1.0 and levels[-1] == 1.0
    assert np.all(np.diff(levels) > 0)
    # The table is float32 output of the same construction on a float32 probability grid.
    assert np.max(np.abs(levels - ref.NF4_TABLE)) <= 1.2e-7


def _agree_except_ties(actual, expected, margin, tie):
    """Codes equal wherever the oracle's value is not within float32 rounding of a boundary."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    clear = margin > tie
    assert np.array_equal(actual[clear], expected[clear])
    assert np.all(np.abs(actual - expected) <= 1) and np.mean(~clear) < 0.01
    return clear & (actual == expected)


@pytest.mark.parametrize("shape, lead, n_in", [((24, 10), 0, 1), ((3, 6, 2, 5), 1, 2), ((3, 3, 4, 8), 0, 3)])
def test_int8_matches_the_oracle_and_rounds_within_half_a_step(rng, shape, lead, n_in):
    w = _normal(rng, *shape)
    w = w.at[(0,) * w.ndim].set(0.0) if lead == 0 else w
    q = quant.quantize(w, "int8", lead=lead, in_axes=n_in)
    codes, scale, deq, margin = ref.int8(w, lead, n_in)
    assert q.q.dtype == jnp.int8 and q.scale.shape == scale.shape and q.shape == shape
    assert np.all(np.abs(_f64(q.scale) - scale) <= EPS32 * scale)
    same = _agree_except_ties(q.q, codes, margin, INT8_TIE)
    absmax = np.broadcast_to(127 * scale, shape)
    err = np.abs(_f64(q.dequantize()) - deq)
    assert np.all(err[same] <= 2 * EPS32 * absmax[same])
    # Round to nearest: at most half a step from the weight, and the bound is nearly reached.
    step = np.broadcast_to(scale, shape)
    rt = np.abs(_f64(q.dequantize()) - _f64(w))
    assert np.all(rt <= step / 2 * (1 + 1e-5)) and np.max(rt / step) > 0.45


@pytest.mark.parametrize("shape, lead, block, double", [((20, 7), 0, 64, False),      # 140: a padded tail
                                                        ((2, 16, 12), 1, 16, False),  # stacked
                                                        ((2, 40, 40), 1, 4, True)])   # 400 blocks: 2 groups
def test_nf4_matches_the_oracle_and_rounds_within_half_a_gap(rng, shape, lead, block, double):
    w = _normal(rng, *shape)
    q = quant.quantize(w, "nf4", lead=lead, block_size=block, double_quant=double)
    dq = (lambda a: ref.absmax_8bit(a)[3]) if double else None
    codes, absmax, deq, margin = ref.nf4(w, lead, block, absmax_of=dq)
    n_blocks = math.ceil(math.prod(shape[lead:]) / block)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == shape[:lead] + (n_blocks, block // 2)
    assert q.shape == shape and q.block_size == block and q.double_quant == double
    if double:
        a_q, a_scale, a_mean, a_values, a_margin = ref.absmax_8bit(absmax)
        assert q.absmax.q.shape == absmax.shape and q.absmax.scale.shape == shape[:lead] + (2,)
        _agree_except_ties(q.absmax.q, a_q, a_margin, INT8_TIE)
        assert_close(q.absmax.mean, a_mean, what="absmax mean")
        assert_close(q.scales(), a_values, what="double-quantized absmax")
        used = a_values
    else:
        assert np.array_equal(_f64(q.absmax), absmax)   # a max of float32 values is exact
        used = absmax
    same = _agree_except_ties(ref.unpack_nibbles(q.codes), codes, margin, NF4_TIE)
    n = math.prod(shape[lead:])
    flat = lambda t: t.reshape(shape[:lead] + (-1,))[..., :n].reshape(shape)
    err = np.abs(_f64(q.dequantize()) - deq)
    per_block = lambda t: flat(np.broadcast_to(np.asarray(t)[..., None], codes.shape))
    # the float32 double-quantized absmaxes carry their own rounding (of the mean and the group scales)
    allowed = NF4_DEQ_TOL * per_block(np.abs(used)) + per_block(np.abs(_f64(q.scales()) - used))
    assert np.all(err[flat(same)] <= allowed[flat(same)])
    # Nearest level: within half the widest gap of the block absmax (plus the absmax's own 8-bit error).
    exact = per_block(absmax)
    slack = 0.0 if not double else np.max(np.abs(used - absmax))
    rt = np.abs(_f64(q.dequantize()) - _f64(w))
    assert np.all(rt <= exact * ref.NF4_HALF_GAP * (1 + 1e-6) + slack)
    if double:
        assert 0 < slack <= np.max(ref.absmax_8bit(absmax)[1]) / 2 * (1 + 1e-5)


def test_bfloat16_weights_dequantize_to_bfloat16(rng):
    w = _normal(rng, 16, 8, dtype=jnp.bfloat16)
    for method in quant.METHODS:
        q = quant.quantize(w, method)
        assert q.dtype == jnp.bfloat16 and q.dequantize().dtype == jnp.bfloat16
        assert q.requantize(q.dequantize().astype(jnp.float32)).dtype == jnp.bfloat16
    expected = ref.nf4(w, 0, 64)[2]
    assert_close(quant.quantize(w, "nf4").dequantize(), expected, jnp.bfloat16, what="nf4 bf16")


@pytest.mark.parametrize("method", quant.METHODS)
def test_stacked_layers_are_quantized_one_by_one_and_slice_like_nn_scan(rng, method):
    w = _normal(rng, 3, 8, 6)
    stacked = quant.quantize(w, method, lead=1, block_size=16)
    assert stacked.shape == (3, 8, 6) and stacked.n_lead == 1
    for i in range(3):
        one = quant.quantize(w[i], method, block_size=16)
        sliced = jax.tree.map(lambda leaf: leaf[i], stacked)   # what nn.scan does to every leaf
        assert sliced.shape == one.shape == (8, 6) and sliced.n_lead == 0
        assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(sliced), jax.tree.leaves(one)))
        assert np.array_equal(sliced.dequantize(), stacked.dequantize()[i])
    under_jit = jax.jit(lambda t: jax.tree.map(lambda leaf: leaf[1], t).dequantize())(stacked)
    assert np.array_equal(under_jit, stacked.dequantize()[1])


def test_nbytes_counts_codes_scales_and_constants():
    w = jnp.ones((2, 64, 40))                      # 2 layers of 2560 values: 40 blocks of 64 each
    nf4 = quant.quantize(w, "nf4", lead=1)
    dq = quant.quantize(w, "nf4", lead=1, double_quant=True)
    i8 = quant.quantize(w, "int8", lead=1)
    codes = 2 * 2560 // 2
    assert quant.nbytes(nf4) == codes + 2 * 40 * 4
    assert quant.nbytes(dq) == codes + 2 * 40 + 2 * 1 * 4 + 2 * 4     # int8 absmax, 1 group scale, mean
    assert quant.nbytes(i8) == 2 * 2560 + 2 * 40 * 4
    tree = {"kernel": dq, "bias": jnp.zeros(40), "step": jnp.zeros((), jnp.int32)}
    assert quant.nbytes(tree, as_dtype=jnp.float32) == 4 * 5120 + 4 * 40 + 4
    assert quant.nbytes(tree, as_dtype=jnp.bfloat16) == 2 * 5120 + 2 * 40 + 4


def test_bad_inputs_raise_clear_errors(rng):
    w = _normal(rng, 8, 4)
    with pytest.raises(ValueError, match=r"method must be one of \('int8', 'nf4'\), got 'int4'"):
        quant.quantize(w, "int4")
    for bad in (0, -2, 3, 2.0, True):
        with pytest.raises(ValueError, match="block_size must be a positive even int"):
            quant.quantize(w, "nf4", block_size=bad)
    with pytest.raises(ValueError, match="double_quant quantizes NF4 block absmaxes; method 'int8'"):
        quant.quantize(w, "int8", double_quant=True)
    with pytest.raises(ValueError, match="expected a float weight, got dtype int32"):
        quant.quantize(jnp.zeros((4, 4), jnp.int32))
    with pytest.raises(ValueError, match="in_axes=2 does not fit"):
        quant.quantize(w, "int8", lead=1, in_axes=2)
    model, x, params = _two_dense()
    with pytest.raises(ValueError, match="quantize_base: method must be one of"):
        quant.quantize_base(model, params, x, method="fp4")
    with pytest.raises(ValueError, match="quantize_base: targets entry 'attn/\\*' matches no layer"):
        quant.quantize_base(model, params, x, targets="attn/*")
    with pytest.raises(ValueError, match="entry 'out' matches no layer \\(the output head is left out unless"):
        quant.quantize_base(model, params, x, targets="out")
    q = quant.quantize_base(model, params, x)
    with pytest.raises(ValueError, match="layer 'hidden': its kernel is already quantized"):
        quant.quantize_base(model, q, x)
    lora = {"hidden": {"a": jnp.ones((40, 2)), "b": jnp.ones((2, 12)), "m": jnp.ones(12)}}
    with pytest.raises(ValueError, match="layer 'hidden': the adapter has a DoRA magnitude 'm', but"):
        quant.merge_quantized(q, lora, LoraConfig(rank=2))


def test_merge_quantized_folds_dora_then_requantizes():
    model, x, params = _two_dense()
    q = quant.quantize_base(model, params, x, method="int8")
    rng = np.random.default_rng(11)
    lora = {"hidden": {"a": jnp.asarray(0.1 * rng.normal(size=(40, 2)), jnp.float32),
                       "b": jnp.asarray(0.1 * rng.normal(size=(2, 12)), jnp.float32),
                       "m": jnp.asarray(rng.uniform(0.5, 2.0, size=12), jnp.float32)}}
    cfg = LoraConfig(rank=2, alpha=4.0, targets="hidden", use_dora=True)
    merged, report = quant.merge_quantized(q, lora, cfg)
    w, (a, b, m) = q["hidden"]["kernel"].dequantize(), (lora["hidden"][k] for k in "abm")
    folded = core.dora_merge_weight(w, a, b, m, 2.0)          # the float merge, before re-quantizing
    assert_close(folded, reference.dora_weight(w, a, b, m, 2.0), what="DoRA fold of the dequantized weight")
    np.testing.assert_array_equal(merged["hidden"]["kernel"].q, quant.quantize(folded, "int8").q)
    err = float(jnp.max(jnp.abs(merged["hidden"]["kernel"].dequantize() - folded)))
    assert report.layers["hidden"]["max_abs_error"] == err > 0


# ---- lora_apply on a quantized base: a two-layer linen model against the float64 oracle

class TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="out")(nn.Dense(12, name="hidden")(x))


def _two_dense(seed=3):
    """The model, an input [2, 3, 40] and N(0, 1) params (no initialiser compiled)."""
    model, rng = TwoDense(), np.random.default_rng(seed)
    x = _normal(rng, 2, 3, 40)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    return model, x, jax.tree.map(lambda s: _normal(rng, *s.shape), shapes)


METHOD_CASES = {"int8": dict(method="int8"), "nf4": dict(method="nf4"),
                "nf4_dq": dict(method="nf4", double_quant=True, block_size=8)}


def _oracle_weight(w, kw):
    """The oracle's dequantized weight, and whether any value sits within rounding of a boundary."""
    if kw["method"] == "int8":
        _, _, deq, margin = ref.int8(w, 0, 1)
        return deq, np.min(margin) > INT8_TIE
    dq = (lambda a: ref.absmax_8bit(a)[3]) if kw.get("double_quant") else None
    _, _, deq, margin = ref.nf4(w, 0, kw.get("block_size", 64), absmax_of=dq)
    return deq, np.min(margin) > NF4_TIE


@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_forward_and_gradient_on_a_quantized_base_match_the_oracle(case):
    kw = METHOD_CASES[case]
    model, x, params = _two_dense()
    rng = np.random.default_rng(4)
    qbase = quant.quantize_base(model, params, x, include_head=True, **kw)
    assert all(quant.is_quantized(qbase[k]["kernel"]) for k in ("hidden", "out"))
    cfg = LoraConfig(rank=2, alpha=3.0, targets="re:.*")
    lora = jax.tree.map(lambda s: _normal(rng, *s.shape),
                        init_lora(model, qbase, cfg, x, rng=jax.random.key(1)))
    g = _normal(rng, 2, 3, 5)
    apply = lora_apply(model, cfg)
    loss = lambda lp, base: jnp.sum(g * apply(base, lp, x))
    y, grads = jax.jit(lambda lp, base: (apply(base, lp, x), jax.grad(loss)(lp, base)))(lora, qbase)

    s = cfg.scaling("hidden", 2)
    (w1, ok1), (w2, ok2) = (_oracle_weight(params[k]["kernel"], kw) for k in ("hidden", "out"))
    assert ok1 and ok2, "pick another seed: a weight sits on a rounding boundary"
    l1, l2 = lora["hidden"], lora["out"]
    h = reference.dense(x, w1, l1["a"], l1["b"], s, bias=params["hidden"]["bias"])
    expected = reference.dense(h, w2, l2["a"], l2["b"], s, bias=params["out"]["bias"])
    assert_close(y, expected, what=f"{case} forward")
    dh = _f64(g) @ reference.merge(w2, l2["a"], l2["b"], s).T
    _, da1, db1 = reference.lowrank_grads(x, l1["a"], l1["b"], s, dh)
    _, da2, db2 = reference.lowrank_grads(h, l2["a"], l2["b"], s, g)
    for name, got, want in (("a1", grads["hidden"]["a"], da1), ("b1", grads["hidden"]["b"], db1),
                            ("a2", grads["out"]["a"], da2), ("b2", grads["out"]["b"], db2)):
        assert_close(got, want, what=f"{case} grad {name}")
    # The quantized weights are what ran: the float base gives a visibly different output.
    y_float = apply(params, lora, x)
    assert np.max(np.abs(_f64(y_float) - expected)) > 100 * 1e-5 * np.max(np.abs(expected))


# ---- a scanned Llama: quantized == its dequantized tree, forward, gradient, training

# Few distinct weight shapes ([2, 32, 32], [2, 32, 64], [2, 64, 32]): each is one quantizer compile.
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, scan_layers=True)
PROJ = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
        "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")


@pytest.fixture(scope="module")
def llama():
    model = LlamaForCausalLM(LlamaConfig(**SMALL))
    rng = np.random.default_rng(5)
    ids = jnp.asarray(rng.integers(0, SMALL["vocab_size"], (2, 8)), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    params = jax.tree_util.tree_map_with_path(
        lambda p, s: jnp.asarray((jax.tree_util.keystr(p).endswith("['weight']")) + 0.1 * rng.normal(size=s.shape),
                                 s.dtype), shapes)
    qbase = quant.quantize_base(model, params, ids, method="nf4", block_size=32, double_quant=True)
    cfg = LoraConfig(rank=4, alpha=8.0, targets=("all-linear",))
    lora = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.normal(size=s.shape), s.dtype),
                        init_lora(model, qbase, cfg, ids, rng=jax.random.key(1)))
    return model, ids, params, qbase, cfg, lora


def test_quantize_base_picks_the_projections_not_embeddings_head_or_norms(llama):
    model, ids, params, qbase, _, _ = llama
    layers = qbase["model"]["layers"]
    for proj in PROJ:
        block, name = proj.split("/")
        w = layers[block][name]["kernel"]
        assert isinstance(w, quant.NF4Weight) and w.shape == params["model"]["layers"][block][name]["kernel"].shape
        assert w.codes.shape[0] == SMALL["num_hidden_layers"]
    assert qbase["lm_head"]["kernel"] is params["lm_head"]["kernel"]
    assert qbase["model"]["embed_tokens"]["embedding"] is params["model"]["embed_tokens"]["embedding"]
    assert qbase["model"]["norm"]["weight"] is params["model"]["norm"]["weight"]
    only = quant.quantize_base(model, params, ids, method="int8", targets="*/mlp/*", include_head=True)
    kinds = {jax.tree_util.keystr(p): type(v).__name__
             for p, v in jax.tree_util.tree_leaves_with_path(only, is_leaf=quant.is_quantized)
             if quant.is_quantized(v)}
    assert sorted(kinds) == sorted(f"['model']['layers']['mlp']['{n}']['kernel']"
                                   for n in ("down_proj", "gate_proj", "up_proj"))
    head = quant.quantize_base(model, params, ids, method="int8", targets="lm_head", include_head=True)
    assert isinstance(head["lm_head"]["kernel"], quant.Int8Weight)


def test_scanned_llama_on_a_quantized_base_equals_its_dequantized_base(llama):
    model, ids, params, qbase, cfg, lora = llama
    apply = lora_apply(model, cfg)

    def loss(lp, base):
        logits = apply(base, lp, ids)
        return causal_lm_loss(logits, ids), logits

    @jax.jit
    def compute(qbase, deq, lora):
        (_, y_q), g_q = jax.value_and_grad(loss, has_aux=True)(lora, qbase)
        (_, y_d), g_d = jax.value_and_grad(loss, has_aux=True)(lora, deq)
        return y_q, y_d, g_q, g_d

    deq = quant.dequantize_tree(qbase)
    # the dequantized base is not the float one: NF4 moved every projection's weights
    for proj in PROJ:
        block, name = proj.split("/")
        w, w0 = (t["model"]["layers"][block][name]["kernel"] for t in (deq, params))
        assert 0 < np.max(np.abs(_f64(w) - _f64(w0))) <= ref.NF4_HALF_GAP * np.max(np.abs(_f64(w0))) * 1.01
    y_q, y_d, g_q, g_d = compute(qbase, deq, lora)
    assert_close(y_q, y_d, what="logits")
    assert jax.tree.structure(g_q) == jax.tree.structure(lora)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(g_q), jax.tree.leaves(g_d)):
        assert_close(got, want, what=f"grad {jax.tree_util.keystr(path)}")


def test_train_step_on_a_quantized_base_trains_only_the_adapters():
    model, x, params = _two_dense()
    qbase = quant.quantize_base(model, params, x, method="nf4", block_size=16, include_head=True)
    cfg = LoraConfig(rank=2, targets="re:.*")
    lora = init_lora(model, qbase, cfg, x, rng=jax.random.key(1))
    tx = optax.adam(1e-2)   # scale-free steps: the N(0, 1) base gives outputs of size ~20
    step = make_train_step(lora_apply(model, cfg), lambda m, batch: jnp.mean((m(batch) - 1.0) ** 2), tx,
                           donate=False)
    before = jax.tree.map(np.asarray, jax.tree.leaves(qbase))
    new, state, m1 = step(lora, tx.init(lora), qbase, x)
    compiles = []
    listener = lambda name, *_, **__: compiles.append(name)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        new, state, m2 = step(new, state, qbase, x)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert "/jax/core/compile/backend_compile_duration" not in compiles   # the second call reused the step
    assert float(m2["loss"]) < float(m1["loss"])
    # the first loss is the quantized model's (B = 0), not the float base's
    y_q = model.apply({"params": quant.dequantize_tree(qbase)}, x)
    y_f = model.apply({"params": params}, x)
    assert float(m1["loss"]) == pytest.approx(float(jnp.mean((y_q - 1.0) ** 2)), rel=1e-5)
    assert float(m1["loss"]) != pytest.approx(float(jnp.mean((y_f - 1.0) ** 2)), rel=1e-3)
    assert jax.tree.structure(new) == jax.tree.structure(lora)
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(lora)))
    assert all(np.array_equal(a, b) for a, b in zip(before, jax.tree.leaves(qbase)))


# ---- merging into a quantized base

@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_merge_quantized_reports_the_rounding_it_introduces(case):
    kw = METHOD_CASES[case]
    model, x, params = _two_dense(seed=6)
    rng = np.random.default_rng(6)
    qbase = quant.quantize_base(model, params, x, **kw)                 # "out" (the head) stays float
    cfg = LoraConfig(rank=2, alpha=2.0, targets="re:.*")
    lora = jax.tree.map(lambda s: 0.1 * _normal(rng, *s.shape), init_lora(model, qbase, cfg, x, rng=jax.random.key(1)))
    merged, report = quant.merge_quantized(qbase, lora, cfg)

    s = cfg.scaling("hidden", 2)
    float_merged = reference.merge(qbase["hidden"]["kernel"].dequantize(), lora["hidden"]["a"],
                                   lora["hidden"]["b"], s)
    new = merged["hidden"]["kernel"]
    assert type(new) is type(qbase["hidden"]["kernel"]) and new.shape == (40, 12)
    direct = np.max(np.abs(_f64(new.dequantize()) - float_merged))
    row = report.layers["hidden"]
    assert row["method"] == kw["method"] and direct > 0
    assert abs(row["max_abs_error"] - direct) <= 4 * EPS32 * np.max(np.abs(float_merged))
    assert row["rel_error"] == pytest.approx(row["max_abs_error"] / np.max(np.abs(float_merged)), rel=1e-5)
    assert report.max_abs_error == max(r["max_abs_error"] for r in report.layers.values())
    # The re-quantized weight is the oracle's quantization of the float merge.
    expected, clear = _oracle_weight(float_merged, kw)
    if clear:
        assert_close(new.dequantize(), expected, what="requantized")
    # A float weight merges as lora_jax.merge does: float32, no rounding to report.
    assert report.layers["out"] == {"method": None, "max_abs_error": 0.0,
                                    "max_abs_weight": report.layers["out"]["max_abs_weight"], "rel_error": 0.0}
    float_tree = merge(quant.dequantize_tree(qbase), lora, cfg)
    assert np.array_equal(merged["out"]["kernel"], float_tree["out"]["kernel"])
    # The merged models' hidden activations differ by at most sum|x| * max|dW| (the report's bound).
    hidden = lambda p: nn.Dense(12).apply({"params": p}, x)
    gap = np.abs(_f64(hidden({**params["hidden"], "kernel": new.dequantize()}))
                 - _f64(hidden(float_tree["hidden"])))
    bound = np.sum(np.abs(_f64(x)), axis=-1, keepdims=True) * row["max_abs_error"]
    assert np.all(gap <= bound * (1 + 1e-4) + 1e-5) and np.max(gap) > 0
    # and the whole model (no adapters: they are merged) stays close to the float merge.
    y_q = lora_apply(model, cfg)(merged, None, x)
    y_f = model.apply({"params": float_tree}, x)
    assert 0 < np.max(np.abs(_f64(y_q) - _f64(y_f))) <= np.max(bound) * np.max(np.abs(_f64(params["out"]["kernel"]))) * 12

"""One table of layer kinds and one fold, shared by the linen, NNX and functional front ends and quant."""

from __future__ import annotations

import ast
import pathlib
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lora_jax import LoraConfig, core, functional, kinds, linen, quant, tree
from lora_jax import nnx as lora_nnx

KEY = jax.random.key(7)


def test_the_front_ends_share_one_table():
    pairs = [(nn.Dense, nnx.Linear), (nn.DenseGeneral, nnx.LinearGeneral), (nn.Einsum, nnx.Einsum),
             (nn.Conv, nnx.Conv), (nn.Embed, nnx.Embed)]
    for linen_cls, nnx_cls in pairs:
        assert linen.KINDS[linen_cls] is lora_nnx.KINDS[nnx_cls] is kinds.KINDS[linen.KINDS[linen_cls].name]
    assert linen.DROPOUT_RNG == lora_nnx.DROPOUT_RNG == kinds.DROPOUT_RNG == "lora_dropout"
    assert [k for k, kind in kinds.KINDS.items() if not kind.dropout] == ["embed"]     # PEFT: no embedding dropout
    assert kinds.DORA_KINDS == linen.DORA_KINDS == ("dense", "dense_general")
    assert kinds.QUANTIZED_KINDS == ("dense", "dense_general", "einsum", "conv")
    assert sorted(kinds.KINDS["embed"].terms) == ["__call__", "attend"]


def test_one_list_of_weight_names():
    assert tree.WEIGHT_NAMES == kinds.WEIGHT_NAMES == ("kernel", "embedding")
    assert functional.GENERIC_WEIGHT_NAMES == {"kernel", "embedding", "weight", "w"}


def test_kinds_imports_no_flax_front_end():
    source = pathlib.Path(kinds.__file__).read_text()
    modules = {alias.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert not any(m and m.startswith("flax") for m in modules), modules


def test_describe_reads_stacking_axes_and_unsupported_layers():
    layer = kinds.describe(kinds.KINDS["einsum"], kinds.View((8, 2, 4), einsum="btd,dhk->bthk"), ("attn", "q"),
                           (3, 8, 2, 4))
    assert (layer.lead, layer.in_shape, layer.out_shape, layer.unsupported) == ((3,), (8,), (2, 4), "")
    grouped = kinds.describe(kinds.KINDS["conv"], kinds.View((3, 2, 4), groups=2), ("conv",), (3, 2, 4))
    assert grouped.unsupported == "Conv with feature_group_count=2 is not supported"
    odd = kinds.describe(kinds.KINDS["dense"], kinds.View((4, 3)), ("up",), (4, 3, 2))
    assert odd.unsupported.startswith("its kernel [4, 3, 2] does not end with one layer's shape [4, 3]")


def test_the_three_front_ends_initialise_bit_identically():
    cfg = LoraConfig(rank=2, targets=("up", "emb"))
    expected_a, _ = core.init_factors(jax.random.fold_in(KEY, zlib.crc32(b"up")), "default", "dense", (), (4,), (6,),
                                      2, jnp.float32)
    _, expected_emb_b = core.init_factors(jax.random.fold_in(KEY, zlib.crc32(b"emb")), "default", "embed", (),
                                          (5,), (4,), 2, jnp.float32)

    class Model(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Dense(6, name="up")(nn.Embed(5, 4, name="emb")(ids))

    ids = jnp.array([[0, 3]])
    params = Model().init(KEY, ids)["params"]
    from_linen = linen.init_lora(Model(), params, cfg, ids, rng=KEY)
    from_fn = functional.init_lora_fn({"up": {"kernel": params["up"]["kernel"]},
                                            "emb": {"embedding": params["emb"]["embedding"]}}, cfg, rng=KEY)

    class NnxModel(nnx.Module):
        def __init__(self, rngs):
            self.emb, self.up = nnx.Embed(5, 4, rngs=rngs), nnx.Linear(4, 6, rngs=rngs)

    adapted = lora_nnx.attach(NnxModel(nnx.Rngs(0)), cfg, rngs=KEY)
    for a in (from_linen["up"]["a"], from_fn["up"]["a"], adapted.up.a[...]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(expected_a))
    for b in (from_linen["emb"]["b"], from_fn["emb"]["b"], adapted.emb.b[...]):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(expected_emb_b))


def test_every_merge_is_the_same_fold():
    """tree.merge, functional.merge_fn (both layouts), nnx.merge and quant.merge_quantized agree bitwise."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(4, 6)), jnp.bfloat16)
    node = {"a": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32), "b": jnp.asarray(rng.normal(size=(2, 6)),
                                                                                      jnp.float32)}
    cfg = LoraConfig(rank=2, alpha=3.0, targets="up")
    expected = (w.astype(jnp.float32) + 1.5 * (node["a"] @ node["b"])).astype(jnp.bfloat16)
    merged = {
        "tree": tree.merge({"up": {"kernel": w}}, {"up": node}, cfg)["up"]["kernel"],
        "functional": functional.merge_fn({"up": {"kernel": w}}, {"up": node}, cfg)["up"]["kernel"],
        "functional out_in": functional.merge_fn({"up": {"weight": w.T}}, {"up": node}, cfg,
                                                 layout="out_in")["up"]["weight"].T,
        "quant (float base)": quant.merge_quantized({"up": {"kernel": w}}, {"up": node}, cfg)[0]["up"]["kernel"],
    }
    model = nnx.Dict(up=nnx.Linear(4, 6, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    model["up"].kernel[...] = w
    adapted = lora_nnx.attach(model, cfg, rngs=KEY)
    adapted["up"].a[...], adapted["up"].b[...] = node["a"], node["b"]
    merged["nnx"] = lora_nnx.merge(adapted)["up"].kernel[...]
    assert float(jnp.max(jnp.abs(expected.astype(jnp.float32) - w.astype(jnp.float32)))) > 0.1
    for where, value in merged.items():
        assert value.dtype == jnp.bfloat16, where
        np.testing.assert_array_equal(np.asarray(value, np.float32), np.asarray(expected, np.float32), err_msg=where)


def test_fold_rules():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)              # two stacked layers
    node = {"a": jnp.asarray(rng.normal(size=(2, 4, 2)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(2, 2, 3)), jnp.float32), "m": jnp.asarray(rng.uniform(1, 2, (2, 3)))}
    dora = core.fold(w, node, 0.5)
    assert dora.exact.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(dora.weight), np.asarray(core.dora_merge_weight(w, **node, scale=0.5)))
    swapped = core.fold(jnp.swapaxes(w, -1, -2), node, 0.5, out_in=True).weight
    np.testing.assert_array_equal(np.asarray(jnp.swapaxes(swapped, -1, -2)), np.asarray(dora.weight))
    with pytest.raises(ValueError, match=r"layer 'q': a DoRA merge cannot be undone from the merged weight alone"):
        core.fold(w, node, 0.5, unmerge=True, name="q")
    plain = {"a": node["a"], "b": node["b"]}
    with pytest.raises(ValueError, match=r"layer 'q': adapter shapes a\[2, 4, 2\], b\[2, 2, 3\] do not fit"):
        core.fold(w[0], plain, 0.5, name="q")


def test_fold_into_a_quantized_weight_requantizes_and_reports_only_when_asked():
    rng = np.random.default_rng(2)
    w = quant.quantize(jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), "int8")
    node = {"a": jnp.asarray(rng.normal(size=(8, 1)), jnp.float32), "b": jnp.asarray(rng.normal(size=(1, 4)),
                                                                                      jnp.float32)}
    with pytest.raises(ValueError, match=r"layer 'q': the base weight is stored quantized; unmerge into it must "
                                         r"re-quantize"):
        core.fold(w, node, 1.0, unmerge=True, name="q")
    folded = core.fold(w, node, 1.0, requantize=True)
    exact = w.dequantize() + node["a"] @ node["b"]
    np.testing.assert_allclose(np.asarray(folded.exact), np.asarray(exact), rtol=1e-6, atol=1e-6)
    assert isinstance(folded.weight, quant.Int8Weight)
    report = folded.rounding()
    err = float(jnp.max(jnp.abs(folded.weight.dequantize() - folded.exact)))
    assert report["method"] == "int8" and report["max_abs_error"] == err > 0
    assert report["max_abs_error"] <= float(jnp.max(folded.weight.scale)) / 2 * (1 + 1e-6)   # half a step

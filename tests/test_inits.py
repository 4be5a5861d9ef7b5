"""PiSSA and OLoRA initialisation and the export to a plain LoRA, against float64 NumPy decompositions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as L
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM
from tests.tolerances import assert_close

# 2 stacked layers (nn.scan), so every adapted weight has a leading layer axis
TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, scan_layers=True)
# rsLoRA and per-layer alphas: the scale differs by layer
CFG = L.LoraConfig(rank=4, alpha=8, targets=("attention", "mlp"), use_rslora=True,
                   alpha_pattern={"re:.*down_proj": 2.0})


@pytest.fixture(scope="module")
def model():
    module = LlamaForCausalLM(TINY)
    ids = jax.random.randint(jax.random.key(0), (2, 8), 0, TINY.vocab_size)
    base = module.init(jax.random.key(1), ids)["params"]
    lora = L.init_lora(module, base, CFG, ids, rng=jax.random.key(2))
    return module, ids, base, lora


def _layers(base, lora):
    """``(name, w [lead, in, out] float64, a, b, scale)`` for every adapter."""
    for path, weight, node, ad, (lead, in_shape, out_shape) in L.tree.adapted_layers(base, lora):
        name = "/".join(path)
        w = np.asarray(node[weight], np.float64).reshape(*lead, int(np.prod(in_shape)), int(np.prod(out_shape)))
        a = np.asarray(ad["a"], np.float64).reshape(*lead, w.shape[-2], -1)
        b = np.asarray(ad["b"], np.float64).reshape(*lead, -1, w.shape[-1])
        yield name, w, a, b, CFG.scaling(name, a.shape[-1])


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_residual_plus_adapter_is_the_weight_and_the_model_is_unchanged(model, method):
    module, ids, base, lora = model
    residual, init = getattr(L.inits, method)(base, lora, CFG)
    originals = {name: w for name, w, *_ in _layers(base, lora)}
    for name, w_res, a, b, scale in _layers(residual, init):
        assert_close(w_res + scale * a @ b, originals[name], what=f"{method} {name}: residual + scale*A@B")
        assert np.max(np.abs(b)) > 0, f"{name}: B is not initialised"
    expected = module.apply({"params": base}, ids)
    assert_close(L.lora_apply(module, CFG)(residual, init, ids), expected, what=f"{method}: logits at step 0")


def _with_spectral_gaps(base, lora):
    """Every adapted weight replaced by ``Q1 diag(2^-i) Q2^T``: the rank-r truncation is then well-conditioned.

    (Random weights have nearly equal singular values, and the truncated SVD's
    float32 error grows as ||W|| / (s_r - s_r+1).)
    """
    rng = np.random.default_rng(0)
    for path, weight, node, _, (lead, in_shape, out_shape) in L.tree.adapted_layers(base, lora):
        n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
        k = min(n_in, n_out)
        q1 = np.linalg.qr(rng.normal(size=(*lead, n_in, k)))[0]
        q2 = np.linalg.qr(rng.normal(size=(*lead, n_out, k)))[0]
        w = (q1 * 0.5 ** np.arange(k)) @ np.swapaxes(q2, -1, -2)
        base = L.tree.set_path(base, path + (weight,), jnp.asarray(w.reshape(node[weight].shape), jnp.float32))
    return base


def test_pissa_is_the_best_rank_r_approximation(model):
    _, _, base, lora = model
    base = _with_spectral_gaps(base, lora)
    residual, init = L.inits.pissa(base, lora, CFG)
    originals = {name: w for name, w, *_ in _layers(base, lora)}
    for name, _, a, b, scale in _layers(residual, init):
        w = originals[name]
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        r = a.shape[-1]
        best = (u[..., :r] * s[..., None, :r]) @ vt[..., :r, :]
        assert_close(scale * a @ b, best, what=f"{name}: scale*A@B vs the truncated SVD", magnitude=w)
        # A's columns and B's rows are orthogonal, each carrying sqrt(s / scale)
        assert_close(np.swapaxes(a, -1, -2) @ a, np.eye(r) * (s[..., None, :r] / scale), what=f"{name}: A^T A",
                     magnitude=s[..., :1] / scale)
        assert_close(b @ np.swapaxes(b, -1, -2), np.eye(r) * (s[..., None, :r] / scale), what=f"{name}: B B^T",
                     magnitude=s[..., :1] / scale)


def test_olora_b_is_orthonormal_and_a_b_is_the_leading_qr_block(model):
    _, _, base, lora = model
    residual, init = L.inits.olora(base, lora, CFG)
    originals = {name: w for name, w, *_ in _layers(base, lora)}
    for name, _, a, b, _ in _layers(residual, init):
        r = a.shape[-1]
        assert_close(b @ np.swapaxes(b, -1, -2), np.broadcast_to(np.eye(r), b.shape[:-2] + (r, r)),
                     what=f"{name}: B B^T")
        q, rr = np.linalg.qr(np.swapaxes(originals[name], -1, -2))
        # A @ B = (Q_r R_r)^T: independent of the signs each QR routine picks
        leading = np.swapaxes(q[..., :, :r] @ rr[..., :r, :], -1, -2)
        assert_close(a @ b, leading, what=f"{name}: A@B vs numpy's QR", magnitude=originals[name])


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_trained_adapter_exports_to_a_rank_2r_plain_lora_on_the_original_base(model, method):
    module, ids, base, lora = model
    residual, init = getattr(L.inits, method)(base, lora, CFG)
    noise = jax.tree.map(lambda x, k: 0.05 * jax.random.normal(k, x.shape, x.dtype), init,
                         jax.tree.unflatten(jax.tree.structure(init),
                                            list(jax.random.split(jax.random.key(3), len(jax.tree.leaves(init))))))
    trained = jax.tree.map(jnp.add, init, noise)                  # stands in for training
    plain = L.inits.to_plain_lora(base, init, trained, CFG)
    for path, node in L.adapter_nodes(plain.lora_params).items():
        assert node["a"].shape[-1] == 2 * CFG.rank, path
    on_residual = L.lora_apply(module, CFG)(residual, trained, ids)
    on_original = L.lora_apply(module, plain.config)(base, plain.lora_params, ids)
    assert_close(on_original, on_residual, what=f"{method}: exported adapter on the original base")
    assert not np.allclose(np.asarray(on_residual), np.asarray(module.apply({"params": base}, ids)), atol=1e-3)


def test_errors_name_the_layer():
    base = {"embed": {"embedding": jnp.ones((8, 4))}}
    lora = {"embed": {"a": jnp.zeros((8, 2)), "b": jnp.zeros((2, 4))}}
    with pytest.raises(ValueError, match="'embed': PiSSA/OLoRA initialise dense-like layers only"):
        L.inits.pissa(base, lora, L.LoraConfig(rank=2))
    with pytest.raises(ValueError, match="adapter 'q' has no layer in base params"):
        L.inits.olora(base, {"q": {"a": jnp.zeros((8, 2)), "b": jnp.zeros((2, 4))}}, L.LoraConfig(rank=2))


# ---- the 0.1 order (config first): each warns and gives what the 0.2 order gives


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_decompositions_in_the_old_order_warn_and_agree(model, method):
    _, _, base, lora = model
    fn = getattr(L.inits, method)
    with pytest.warns(DeprecationWarning, match=rf"inits.{method}\(config, base_params, lora_params\) is deprecated"):
        old = fn(CFG, base, lora)
    new = fn(base, L.Adapter(CFG, lora))            # an adapter value in the lora_params slot
    assert jax.tree.all(jax.tree.map(np.array_equal, old, new))


def test_to_plain_lora_in_the_old_order_warns_and_agrees(model):
    _, _, base, lora = model
    _, init = L.inits.olora(base, lora, CFG)
    trained = jax.tree.map(lambda x: 1.5 * x, init)
    new_order = r"use inits.to_plain_lora\(base_params, initial_lora, trained_lora, config\)"
    with pytest.warns(DeprecationWarning, match=new_order):
        old = L.inits.to_plain_lora(CFG, init, trained, base_params=base)
    new = L.inits.to_plain_lora(base, init, trained, CFG)
    assert old.config == new.config and old.errors == new.errors
    assert jax.tree.all(jax.tree.map(np.array_equal, old.lora_params, new.lora_params))

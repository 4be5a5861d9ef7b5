"""The training path: what the step computes, what it never computes, and that it compiles once."""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as L
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM, causal_lm_loss
from tests.tolerances import assert_close

# Shapes chosen so that no activation (batch 2 x seq 5 = 10 tokens) has the
# shape of any weight: a weight-shaped value in the step can only be a weight,
# a weight gradient or a materialised delta.
SMALL = LlamaConfig(vocab_size=56, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
CFG = L.LoraConfig(rank=3, alpha=6, targets=("attention", "mlp"))


def _setup(config=SMALL, lora_config=CFG, seed=0):
    model = LlamaForCausalLM(config)
    ids = jax.random.randint(jax.random.key(seed), (2, 5), 0, config.vocab_size)
    params = model.init(jax.random.key(seed), ids)["params"]
    lora = L.init_lora(model, params, lora_config, ids, rng=jax.random.key(seed + 1))
    # nonzero B, so that every gradient path is exercised
    lora = jax.tree.map(lambda t: t + 0.05 * jax.random.normal(jax.random.key(7), t.shape), lora)
    return model, params, lora, ids


def _loss(model_fn, ids):
    return causal_lm_loss(model_fn(ids), ids)


def _eqn_shapes(jaxpr):
    """Shapes of every value an equation produces, sub-jaxprs (pjit, scan, custom_vjp, remat) included."""
    shapes = set()
    for eqn in jaxpr.eqns:
        shapes |= {tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")}
        for value in eqn.params.values():
            for inner in (value if isinstance(value, (tuple, list)) else [value]):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    shapes |= _eqn_shapes(inner)
    return shapes


def _step_shapes(fn, *args):
    return _eqn_shapes(jax.make_jaxpr(fn)(*args).jaxpr)


def _weight_shapes(params):
    return {tuple(leaf.shape) for leaf in jax.tree.leaves(params) if leaf.ndim == 2}


@pytest.mark.parametrize("impl", ["fast", "plain"])
def test_lora_step_forms_no_weight_shaped_value(impl):
    model, params, lora, ids = _setup()
    apply = L.lora_apply(model, CFG, impl=impl)
    grad_fn = jax.value_and_grad(lambda lp: _loss(lambda x: apply(params, lp, x), ids))
    weight_shapes = _weight_shapes(params)
    # q/o [24, 24], k/v [24, 12], gate/up [24, 40], down [40, 24], embed [56, 24], lm_head [24, 56]
    assert len(weight_shapes) == 6
    produced = _step_shapes(grad_fn, lora)
    assert not produced & weight_shapes, f"weight-shaped values in the LoRA step: {produced & weight_shapes}"

    # Positive control: the full fine-tune gradient does produce them, so the check can fail.
    full = jax.value_and_grad(lambda p: _loss(lambda x: model.apply({"params": p}, x), ids))
    assert weight_shapes <= _step_shapes(full, params)
    # ...and so does a merge-then-apply forward (it materialises each delta).
    merged_fwd = lambda lp: _loss(lambda x: model.apply({"params": L.merge(params, lp, CFG)}, x), ids)
    assert {(24, 24), (24, 12), (24, 40), (40, 24)} <= _step_shapes(merged_fwd, lora)


@contextlib.contextmanager
def _count_compiles():
    names = []
    listener = lambda name, *_, **__: names.append(name)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield lambda: names.count("/jax/core/compile/backend_compile_duration")
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_train_step_compiles_once_and_trains_the_adapters_only():
    model, params, lora, ids = _setup()
    # A head with weights of std 0.02 bounds the logits to about +-0.1, so no
    # adapter could fit the batch; give the frozen head a usable range.
    params = {**params, "lm_head": {"kernel": params["lm_head"]["kernel"] * 50}}
    params_before = jax.tree.map(np.asarray, params)
    tx = optax.adamw(3e-2)
    step = L.make_train_step(L.lora_apply(model, CFG), _loss, tx)
    opt_state = tx.init(lora)
    losses = []
    with _count_compiles() as compiles:
        for i in range(30):
            lora, opt_state, metrics = step(lora, opt_state, params, ids)
            losses.append(float(metrics["loss"]))
            if i == 0:
                first = compiles()
        assert first >= 1 and compiles() == first, f"recompiled: {compiles()} compiles after {first}"
    # base params are bitwise untouched
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, params_before)
    # the adapters learn: 30 Adam steps on one batch cut the loss tenfold (measured: 12.2 -> 0.07)
    assert losses[-1] < 0.1 * losses[0], losses
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0


def test_fast_and_plain_steps_make_the_same_update():
    model, params, lora, ids = _setup()
    tx = optax.sgd(0.1)
    outs = []
    for impl in ("fast", "plain"):
        step = L.make_train_step(L.lora_apply(model, CFG, impl=impl), _loss, tx, donate=False)
        outs.append(step(lora, tx.init(lora), params, ids))
    assert_close(outs[0][2]["loss"], outs[1][2]["loss"])
    for path, node in L.adapter_nodes(outs[0][0]).items():
        other = L.adapter_nodes(outs[1][0])[path]
        for leaf in ("a", "b"):
            assert_close(node[leaf], other[leaf], what=f"{'/'.join(path)}/{leaf}")


def test_has_aux_and_grad_norm():
    model, params, lora, ids = _setup()
    tx = optax.sgd(0.0)

    def loss_fn(model_fn, batch):
        logits = model_fn(batch)
        return causal_lm_loss(logits, batch), {"mean_logit": logits.mean()}

    step = L.make_train_step(L.lora_apply(model, CFG), loss_fn, tx, has_aux=True, donate=False)
    new_lora, _, metrics = step(lora, tx.init(lora), params, ids)
    apply = L.lora_apply(model, CFG)
    # jitted: op-by-op dispatch of a whole transformer is far slower than one compile
    assert_close(metrics["aux"]["mean_logit"], jax.jit(apply)(params, lora, ids).mean())
    grads = jax.jit(jax.grad(lambda lp: _loss(lambda x: apply(params, lp, x), ids)))(lora)
    expected_norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
    assert_close(metrics["grad_norm"], expected_norm)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), new_lora, lora)


def test_dropout_is_active_only_with_an_rng():
    rate, scale = 0.25, 2.0
    model, x = nn.Dense(64, use_bias=False), jax.random.normal(jax.random.key(0), (32, 64))
    params = model.init(jax.random.key(1), x)["params"]
    cfg = L.LoraConfig(rank=64, alpha=64 * scale, targets="re:.*", dropout=rate)
    # A = I, B = I: the adapter term is scale * dropout(x), each entry 0 or scale * x / (1 - rate)
    lora = {"a": jnp.eye(64), "b": jnp.eye(64)}
    apply = L.lora_apply(model, cfg)
    base = model.apply({"params": params}, x)
    no_rng = apply(params, lora, x) - base
    assert_close(no_rng, scale * x, what="no rng: no dropout")
    term = np.asarray(apply(params, lora, x, rngs={"lora_dropout": jax.random.key(2)}) - base)
    kept = np.abs(term) > 1e-3 * np.abs(np.asarray(x))
    assert_close(np.where(kept, term, 0), np.where(kept, scale * np.asarray(x) / (1 - rate), 0), what="kept")
    n = kept.size
    dropped = 1 - kept.mean()
    # binomial(n=2048, p=0.25): std 0.0096; five standard deviations
    assert abs(dropped - rate) < 5 * np.sqrt(rate * (1 - rate) / n), dropped
    other = np.asarray(apply(params, lora, x, rngs={"lora_dropout": jax.random.key(3)}) - base)
    assert not np.array_equal(other, term)


def test_adapters_only_on_a_combined_tree_freezes_the_base():
    model, params, lora, ids = _setup()
    combined = {"params": params, "lora": lora}
    tx = L.optim.adapters_only(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)))
    state = tx.init(combined)
    apply = L.lora_apply(model, CFG)
    grads = jax.jit(jax.grad(lambda t: _loss(lambda x: apply(t["params"], t["lora"], x), ids)))(combined)
    updates, state = tx.update(grads, state, combined)
    for leaf in jax.tree.leaves(updates["params"]):
        assert not np.any(np.asarray(leaf))
    assert all(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(updates["lora"]))
    # Adam keeps two moments for the adapters and nothing for the frozen base
    assert L.count_params(state) < 2 * L.count_params(lora) + 16
    mask = L.optim.adapter_mask(combined)
    assert sum(jax.tree.leaves(mask)) == len(jax.tree.leaves(lora))


def test_memory_lean_options_let_remat_save_memory_on_cpu():
    # XLA:CPU's default scheduler starts the recomputation of remat'ed layers
    # early, so their activations stay alive anyway; the memory-optimised
    # scheduler honours the checkpoints. Compiled only (XLA's memory analysis).
    if jax.default_backend() != "cpu":
        pytest.skip("the option is CPU-only")
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4)
    ids = jax.random.randint(jax.random.key(0), (4, 64), 0, 256)
    model = LlamaForCausalLM(LlamaConfig(**kw, remat=True))
    params = model.init(jax.random.key(1), ids)["params"]
    cfg = L.LoraConfig(rank=4, targets=("attention", "mlp"))
    lora = L.init_lora(model, params, cfg, ids, rng=jax.random.key(2))
    tx = optax.sgd(0.1)
    temp = {}
    for lean in (False, True):
        options = L.backend.memory_lean_options("cpu") if lean else None
        step = L.make_train_step(L.lora_apply(model, cfg), lambda m, b: causal_lm_loss(m(b), b), tx,
                                 compiler_options=options)
        temp[lean] = step.lower(lora, tx.init(lora), params, ids).compile().memory_analysis().temp_size_in_bytes
    # measured: 8.8 MB without, 3.4 MB with (jax 0.10.2)
    assert temp[True] < 0.6 * temp[False], temp


def test_lora_plus_gives_b_ratio_times_the_rate_of_a_with_schedules_and_in_a_step():
    lora = {"layer": {"q": {"a": jnp.full((4, 2), 0.5), "b": jnp.full((2, 3), -0.25)}}}
    grads = {"layer": {"q": {"a": jnp.arange(8.0).reshape(4, 2), "b": jnp.arange(6.0).reshape(2, 3) - 2.0}}}
    schedule = optax.linear_schedule(0.1, 0.0, transition_steps=4)
    tx = L.optim.lora_plus(optax.sgd, schedule, ratio=16.0)
    state = tx.init(lora)
    for count in range(3):
        updates, state = tx.update(grads, state, lora)
        lr = 0.1 * (1 - count / 4)
        np.testing.assert_allclose(updates["layer"]["q"]["a"], -lr * grads["layer"]["q"]["a"], rtol=1e-6)
        np.testing.assert_allclose(updates["layer"]["q"]["b"], -16.0 * lr * grads["layer"]["q"]["b"], rtol=1e-6)
    # adamw's first step is lr * g / (|g| + eps) per entry: B's entries move 16 times as far as A's
    adam = L.optim.lora_plus(lambda lr: optax.adamw(lr, weight_decay=0.0), 1e-3, ratio=16.0)
    updates, _ = adam.update(grads, adam.init(lora), lora)
    moved = lambda x: float(jnp.max(jnp.abs(x)))
    assert moved(updates["layer"]["q"]["b"]) == pytest.approx(16 * moved(updates["layer"]["q"]["a"]), rel=1e-5)
    for bad in (0, -1.0, True, "16"):
        with pytest.raises(ValueError, match="ratio must be a positive number"):
            L.optim.lora_plus(optax.sgd, 0.1, ratio=bad)


def test_lora_plus_trains_through_make_train_step():
    model, x = nn.Dense(3), jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)["params"]
    cfg = L.LoraConfig(rank=2, targets="re:.*")
    lora = L.init_lora(model, params, cfg, x, rng=jax.random.key(1))
    lora = {**lora, "b": jnp.full_like(lora["b"], 0.3)}    # B = 0 would give A no gradient
    tx = L.optim.lora_plus(optax.sgd, 0.1, ratio=8.0)
    step = L.make_train_step(L.lora_apply(model, cfg), lambda m, b: (m(b) ** 2).mean(), tx)
    grad = jax.grad(lambda lp: (L.lora_apply(model, cfg)(params, lp, x) ** 2).mean())(lora)
    new, _, _ = step(jax.tree.map(jnp.copy, lora), tx.init(lora), params, x)
    assert float(jnp.max(jnp.abs(grad["a"]))) > 1e-3
    np.testing.assert_allclose(new["b"] - lora["b"], -0.8 * grad["b"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new["a"] - lora["a"], -0.1 * grad["a"], rtol=1e-5, atol=1e-7)

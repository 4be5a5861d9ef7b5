"""The 0.1 spellings still work in 0.2, warn with the new spelling, and give what the new one gives."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_jax as L
from lora_jax import deprecation
from lora_jax import nnx as lnnx
from lora_jax.io.checkpoint import TrainState
from lora_jax.io.peft import PeftAdapter

CFG = L.LoraConfig(rank=2, alpha=4, targets="re:.*")
X = jnp.arange(8.0).reshape(2, 4) / 8


def _model():
    model = nn.Dense(3)
    return model, model.init(jax.random.key(0), X)["params"]


def _trained(lora):
    return jax.tree.map(lambda v: v + 0.25, lora)


def _equal(x, y):
    return jax.tree.all(jax.tree.map(np.array_equal, x, y))


def test_init_lora_in_the_old_order_warns_and_agrees():
    model, params = _model()
    new = L.init_lora(model, params, CFG, X, rng=jax.random.key(1))
    with pytest.warns(DeprecationWarning, match=r"init_lora\(config, module, base_params, \.\.\.\) is deprecated "
                                                r".* use init_lora\(module, base_params, config, \.\.\.\)"):
        old = L.init_lora(CFG, model, params, X, rng=jax.random.key(1))
    assert _equal(old, new)


def test_init_lora_fn_in_the_old_order_warns_and_agrees():
    params = {"up": {"w": jnp.ones((4, 6))}}
    new = L.init_lora_fn(params, CFG, rng=jax.random.key(0))
    with pytest.warns(DeprecationWarning, match=r"init_lora_fn\(base_params, config, \.\.\.\)"):
        old = L.init_lora_fn(CFG, params, rng=jax.random.key(0))
    assert _equal(old, new)


def test_merge_takes_an_adapter_value_in_place_of_the_pair():
    model, params = _model()
    lora = _trained(L.init_lora(model, params, CFG, X, rng=jax.random.key(1)))
    adapter = L.Adapter(CFG, lora)
    assert _equal(L.merge(params, adapter), L.merge(params, lora, CFG))
    assert _equal(L.unmerge(L.merge(params, adapter), adapter), L.unmerge(L.merge(params, lora, CFG), lora, CFG))
    assert _equal(L.merge_fn(params, adapter), L.merge_fn(params, lora, CFG))
    with pytest.raises(TypeError, match=r"merge: expected lora_params and its LoraConfig, or one Adapter"):
        L.merge(params, lora)
    with pytest.raises(ValueError, match=r"merge: got an adapter value and a different config"):
        L.merge(params, adapter, L.LoraConfig(rank=2, alpha=8, targets="re:.*"))


def test_adapter_nodes_old_name_warns_and_is_the_same_function():
    with pytest.warns(DeprecationWarning, match=r"lora_jax\.adapters is deprecated .* use lora_jax\.adapter_nodes"):
        assert L.adapters is L.adapter_nodes
    with pytest.warns(DeprecationWarning, match=r"lora_jax\.tree\.adapters is deprecated"):
        assert L.tree.adapters is L.tree.adapter_nodes
    assert "adapters" not in dir(L) and "adapters" not in L.__all__
    with pytest.raises(AttributeError, match="has no attribute 'adaptors'"):
        L.adaptors  # noqa: B018


@pytest.mark.parametrize("value", [
    L.Adapter(CFG, {"q": 1}),
    PeftAdapter(CFG, {"q": 1}, {}),
    TrainState({"q": 1}, None),
])
def test_lora_attribute_of_the_values_warns_and_is_lora_params(value):
    with pytest.warns(DeprecationWarning, match=rf"{type(value).__name__}\.lora is deprecated .* "
                                                rf"use {type(value).__name__}\.lora_params"):
        assert value.lora is value.lora_params


def test_nnx_unmerge_old_keyword_warns_and_agrees():
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    adapted = lnnx.attach(model, CFG, rngs=jax.random.key(1))
    adapted.b[...] = jnp.ones((2, 3))
    merged, state = lnnx.merge(adapted), nnx.state(adapted, lnnx.LoraParam)
    new = lnnx.unmerge(merged, state, CFG)
    with pytest.warns(DeprecationWarning, match=r"nnx\.unmerge\(adapters=\.\.\.\) is deprecated"):
        old = lnnx.unmerge(merged, adapters=state, config=CFG)
    assert np.array_equal(old.kernel[...], new.kernel[...])


def test_renamed_wrapper_warns_and_forwards():
    alias = deprecation.renamed(max, "biggest", "max")
    with pytest.warns(DeprecationWarning, match="biggest is deprecated and will be removed in lora_jax 0.3; use max"):
        assert alias(2, 7) == 7
    assert alias.__name__ == "biggest"

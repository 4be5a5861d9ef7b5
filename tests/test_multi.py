"""Several adapters on one base: combine (cat/svd/linear), AdapterSet, switching, mixed batches, hot swap.

Every combination is checked against the exact weighted sum of deltas computed
by the float64 NumPy oracle; mixed batches against each row run alone with its
own adapter (and against the oracle, per layer kind).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lora_jax
from lora_jax import Adapter, AdapterSet, LoraConfig, combine, lora_apply, merge, reference, stack
from lora_jax.io import load_peft, save_peft
from tests.fixtures_data import model as fixture_model
from tests.test_layers import _setup
from tests.tolerances import assert_close

# Layer name -> (weight name, weight shape); "blk/k" is a stacked (nn.scan-like) layer with 3 copies.
LAYERS = {"q": ("kernel", (6, 5)), "v": ("kernel", (6, 4)), "blk/k": ("kernel", (3, 4, 6)),
          "emb": ("embedding", (7, 3))}


def _base(rng):
    tree = {}
    for name, (weight, shape) in LAYERS.items():
        tree = lora_jax.tree.set_path(tree, tuple(name.split("/")) + (weight,),
                                      jnp.asarray(rng.normal(size=shape), jnp.float32))
    return tree


def _factors(name, rank, rng):
    shape = LAYERS[name][1]
    lead, n_in, n_out = shape[:-2], shape[-2], shape[-1]
    return (jnp.asarray(rng.normal(size=lead + (n_in, rank)), jnp.float32),
            jnp.asarray(rng.normal(size=lead + (rank, n_out)), jnp.float32))


@st.composite
def adapter_specs(draw, same_rank=False):
    """1-3 adapters on random subsets of LAYERS with their own rank, alpha, rsLoRA, rank pattern; weights."""
    n = draw(st.integers(1, 3))
    shared_rank = draw(st.integers(1, 3))
    specs = []
    for _ in range(n):
        layers = draw(st.lists(st.sampled_from(sorted(LAYERS)), min_size=1, max_size=4, unique=True))
        rank = shared_rank if same_rank else draw(st.integers(1, 3))
        override = None if same_rank else draw(st.sampled_from([None, *layers]))
        specs.append(dict(layers=sorted(layers), rank=rank, alpha=draw(st.sampled_from([1.0, 2.5, 8.0])),
                          rslora=draw(st.booleans()), override=override))
    weights = draw(st.lists(st.sampled_from([-1.5, -0.5, 0.25, 1.0, 2.0]), min_size=n, max_size=n))
    return specs, weights, draw(st.integers(0, 2**31 - 1))


def _build(specs, seed):
    """Adapters for the specs, and per adapter ``{layer: (a, b, scale)}`` with the scale from the oracle's formula."""
    rng = np.random.default_rng(seed)
    adapters, parts = [], []
    for spec in specs:
        pattern = {} if spec["override"] is None else {f"re:{spec['override']}": spec["rank"] + 1}
        config = LoraConfig(rank=spec["rank"], alpha=spec["alpha"], use_rslora=spec["rslora"],
                            targets=tuple(f"re:{n}" for n in spec["layers"]), rank_pattern=pattern)
        lora, layer_parts = {}, {}
        for name in spec["layers"]:
            rank = spec["rank"] + 1 if name == spec["override"] else spec["rank"]
            a, b = _factors(name, rank, rng)
            lora = lora_jax.tree.set_path(lora, tuple(name.split("/")), {"a": a, "b": b})
            layer_parts[name] = (a, b, reference.scaling(spec["alpha"], rank, spec["rslora"]))
        adapters.append(Adapter(config, lora))
        parts.append(layer_parts)
    return adapters, parts


def _slices(a, b):
    """Per stacked-layer slice ``[in, r]``/``[r, out]`` views (a single slice when not stacked)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.reshape(-1, a.shape[-2], a.shape[-1]), b.reshape(-1, b.shape[-2], b.shape[-1])


def _exact(parts, weights, name):
    """``sum_i w_i * scale_i * A_i @ B_i`` per slice, and the same on absolute values (the rounding scale)."""
    shape = LAYERS[name][1]
    total, magnitude = np.zeros(shape, np.float64), np.zeros(shape, np.float64)
    for w, layer_parts in zip(weights, parts):
        if name in layer_parts:
            a, b, scale = layer_parts[name]
            total += w * np.matmul(*_slices(a, b)).reshape(shape) * scale
            magnitude += abs(w) * np.matmul(*(np.abs(x) for x in _slices(a, b))).reshape(shape) * scale
    return total, magnitude


def _merged_delta(base, combined, name):
    weight = LAYERS[name][0]
    path = tuple(name.split("/")) + (weight,)
    merged = lora_jax.tree.get_path(merge(base, combined.lora_params, combined.config), path)
    return np.asarray(merged, np.float64) - np.asarray(lora_jax.tree.get_path(base, path), np.float64)


def _targeted(parts):
    return sorted({name for layer_parts in parts for name in layer_parts})


@given(adapter_specs())
def test_cat_is_the_exact_weighted_sum(case):
    specs, weights, seed = case
    adapters, parts = _build(specs, seed)
    base = _base(np.random.default_rng(seed + 1))
    out = combine(base, adapters, weights, method="cat")
    assert sorted(out.errors) == _targeted(parts)
    for name in _targeted(parts):
        expected, magnitude = _exact(parts, weights, name)
        assert_close(_merged_delta(base, out, name), expected, jnp.float32, what=name, magnitude=magnitude)
        assert out.errors[name] <= 1e-6, (name, out.errors[name])
        # rank: every adapter's rank at this layer, absent ones zero-padded with their configured rank
        node = lora_jax.tree.get_path(out.lora_params, tuple(name.split("/")))
        assert node["a"].shape[-1] == sum(a.config.rank_for(name) for a in adapters)
        assert out.config.scaling(name, node["a"].shape[-1]) == 1.0


def _best_rank_k(delta, k):
    """Truncated SVD of each stacked slice of a dense delta; and the relative error it leaves."""
    slices = delta.reshape(-1, delta.shape[-2], delta.shape[-1])
    best, tail2 = np.zeros_like(slices), 0.0
    for i, d in enumerate(slices):
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        best[i] = (u[:, :k] * s[:k]) @ vt[:k]
        tail2 += float(np.sum(s[k:] ** 2))
    norm = float(np.linalg.norm(slices))
    return best.reshape(delta.shape), (np.sqrt(tail2) / norm if norm else 0.0)


@given(adapter_specs(), st.sampled_from([None, 1, 2, 9]))
def test_svd_is_the_best_rank_k_approximation(case, rank):
    specs, weights, seed = case
    adapters, parts = _build(specs, seed)
    base = _base(np.random.default_rng(seed + 1))
    out = combine(base, adapters, weights, method="svd", rank=rank)
    for name in _targeted(parts):
        k = rank or max(layer_parts[name][0].shape[-1] for layer_parts in parts if name in layer_parts)
        expected, magnitude = _exact(parts, weights, name)
        best, error = _best_rank_k(expected, k)
        node = lora_jax.tree.get_path(out.lora_params, tuple(name.split("/")))
        assert node["a"].shape[-1] == k
        assert_close(_merged_delta(base, out, name), best, jnp.float32, what=name, magnitude=magnitude)
        assert abs(out.errors[name] - error) <= 1e-5, (name, out.errors[name], error)


@given(adapter_specs(same_rank=True))
def test_linear_is_the_documented_mix_and_reports_its_error(case):
    specs, weights, seed = case
    adapters, parts = _build(specs, seed)
    base = _base(np.random.default_rng(seed + 1))
    out = combine(base, adapters, weights, method="linear")
    for name in _targeted(parts):
        a_mix, b_mix = 0.0, 0.0
        for w, layer_parts in zip(weights, parts):
            if name in layer_parts:
                a, b, scale = layer_parts[name]
                root = np.sqrt(abs(w) * scale)
                a_mix = a_mix + np.sign(w) * root * np.asarray(a, np.float64)
                b_mix = b_mix + root * np.asarray(b, np.float64)
        mixed = np.matmul(*_slices(a_mix, b_mix)).reshape(LAYERS[name][1])
        magnitude = np.matmul(*_slices(np.abs(a_mix), np.abs(b_mix))).reshape(LAYERS[name][1])
        assert_close(_merged_delta(base, out, name), mixed, jnp.float32, what=name, magnitude=magnitude)
        expected, _ = _exact(parts, weights, name)
        error = np.linalg.norm(mixed - expected) / np.linalg.norm(expected)
        assert abs(out.errors[name] - error) <= 1e-5 * max(1.0, error), (name, out.errors[name], error)
        if sum(name in p for p in parts) == 1:   # one adapter alone: linear is exact
            assert out.errors[name] <= 1e-6


def test_linear_is_not_the_sum_of_deltas():
    adapters, parts = _build([dict(layers=["q"], rank=2, alpha=2.0, rslora=False, override=None)] * 2, seed=3)
    base = _base(np.random.default_rng(0))
    out = combine(base, adapters, [1.0, 1.0], method="linear")
    expected, _ = _exact(parts, [1.0, 1.0], "q")
    measured = np.linalg.norm(_merged_delta(base, out, "q") - expected) / np.linalg.norm(expected)
    assert measured > 0.1 and abs(out.errors["q"] - measured) <= 1e-5


def test_combine_rejects_bad_input():
    base = _base(np.random.default_rng(0))
    adapters, _ = _build([dict(layers=["q"], rank=2, alpha=2.0, rslora=False, override=None),
                          dict(layers=["q"], rank=3, alpha=2.0, rslora=False, override=None)], seed=0)
    with pytest.raises(ValueError, match="method must be one of"):
        combine(base, adapters, method="ties")
    with pytest.raises(ValueError, match="rank= applies to method='svd' only"):
        combine(base, adapters, rank=2)
    with pytest.raises(ValueError, match="2 adapters"):
        combine(base, adapters, [1.0])
    with pytest.raises(ValueError, match=r"weights\[1\] must be a finite number"):
        combine(base, adapters, [1.0, float("nan")])
    with pytest.raises(ValueError, match="layer 'q' has adapters of different ranks"):
        combine(base, adapters, method="linear")
    with pytest.raises(ValueError, match="no adapters given"):
        combine(base, [])
    wrong = Adapter(adapters[0].config, {"q": {"a": jnp.zeros((5, 2)), "b": jnp.zeros((2, 5))}})
    with pytest.raises(ValueError, match=r"adapters\[1\]: layer 'q': adapter shapes a\[5, 2\]"):
        combine(base, [adapters[0], wrong])
    missing = Adapter(adapters[0].config, {"nope": {"a": jnp.zeros((6, 2)), "b": jnp.zeros((2, 5))}})
    with pytest.raises(ValueError, match="layer 'nope' is not in the base params"):
        combine(base, [missing])


# ---- AdapterSet on a small linen model


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(11, 8, name="emb")(ids)
        h = nn.gelu(nn.Dense(12, name="up")(h))
        return nn.Dense(8, name="down")(h)


@pytest.fixture(scope="module")
def mlp():
    module, rng = _MLP(), np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 11, size=(5, 4)), jnp.int32)
    params = module.init(jax.random.key(0), ids)["params"]

    def adapter(seed, alpha, rank=2, targets=("re:.*",)):
        config = LoraConfig(rank=rank, alpha=alpha, targets=targets)
        shapes = jax.eval_shape(lambda: lora_jax.init_lora(module, params, config, ids, rng=jax.random.key(0)))
        r = np.random.default_rng(seed)
        return Adapter(config, jax.tree.map(lambda s: jnp.asarray(r.normal(size=s.shape), s.dtype), shapes))

    return module, params, ids, adapter


def _merged_reference(module, params, ids, weighted):
    """The module on ``W + sum_i w_i scale_i A_i B_i`` with the deltas from the float64 oracle."""
    merged = dict(params)
    for layer in params:
        weight = "embedding" if layer == "emb" else "kernel"
        w = np.asarray(params[layer][weight], np.float64)
        for w_i, adapter in weighted:
            if layer in adapter.lora_params:
                node = adapter.lora_params[layer]
                w = w + w_i * reference.delta(node["a"], node["b"], adapter.config.scaling(layer))
        merged[layer] = {**params[layer], weight: jnp.asarray(w, jnp.float32)}
    return module.apply({"params": merged}, ids)


def test_adapter_set_is_an_immutable_value(mlp):
    module, params, ids, adapter = mlp
    one, two = adapter(1, 2.0), adapter(2, 4.0)
    empty = AdapterSet(params)
    s = empty.add("one", one).add("two", two)
    assert (empty.names, s.names, len(s), "one" in s) == ((), ("one", "two"), 2, True)
    active = s.activate("two")
    assert (s.active, active.active) == ((), (("two", 1.0),))
    assert active.disable().active == () and active.active == (("two", 1.0),)
    assert active.remove("two").active == () and active.remove("two").names == ("one",)
    assert s.activate({"one": 1.0, "two": -0.5}).active == (("one", 1.0), ("two", -0.5))
    assert s["one"].config is one.config and s["one"].lora_params is one.lora_params
    with pytest.raises(ValueError, match="'one' is already in the set"):
        s.add("one", two)
    with pytest.raises(KeyError, match="no adapter 'three'"):
        s.activate("three")
    with pytest.raises(ValueError, match="weight of 'one' must be a finite number"):
        s.activate("one", weights=[float("inf")])
    with pytest.raises(ValueError, match="named twice"):
        s.activate("one", "one")
    bad = {"up": {"a": jnp.zeros((8, 2)), "b": jnp.zeros((2, 13))}}
    with pytest.raises(ValueError, match=r"adapter 'bad': layer 'up': adapter shapes"):
        s.add("bad", bad, one.config)


def test_switching_adapters_does_not_recompile(mlp):
    module, params, ids, adapter = mlp
    s = AdapterSet(params)
    adapters = {name: adapter(seed, alpha) for seed, (name, alpha) in enumerate(
        [("a", 1.0), ("b", 4.0), ("c", 16.0)])}
    for name, item in adapters.items():
        s = s.add(name, item)
    configs = {s.activate(name).resolve().config for name in adapters}
    assert len(configs) == 1, "the resolved config must depend on structure only"
    fwd = jax.jit(lora_apply(module, configs.pop()))
    for name, item in adapters.items():
        y = fwd(params, s.activate(name).resolve().lora_params, ids)
        alone = lora_apply(module, item.config)(params, item.lora_params, ids)
        assert_close(y, alone, jnp.float32, what=name)
        assert_close(y, _merged_reference(module, params, ids, [(1.0, item)]), jnp.float32, what=name)
    assert fwd._cache_size() == 1
    assert s.disable().resolve() is None


def test_several_active_adapters_add_their_deltas(mlp):
    module, params, ids, adapter = mlp
    one, two = adapter(1, 2.0), adapter(2, 8.0, rank=3, targets=("up", "emb"))
    s = AdapterSet(params, {"one": one, "two": two}).activate({"one": 0.5, "two": -1.0})
    config, lora = s.resolve()
    y = lora_apply(module, config)(params, lora, ids)
    assert_close(y, _merged_reference(module, params, ids, [(0.5, one), (-1.0, two)]), jnp.float32)


def test_hot_swap_keeps_the_compiled_function(mlp):
    module, params, ids, adapter = mlp
    s = AdapterSet(params, {"one": adapter(1, 2.0), "two": adapter(2, 2.0)})
    stacked = s.stack()
    fwd = jax.jit(lora_apply(module, stacked.config))
    rows = ["one", "two", None, "two", "one"]
    fwd(params, stacked.lora_params, ids, adapter_ids=stacked.ids(rows))
    new = adapter(7, 32.0)   # same shapes, other values and alpha
    swapped = s.replace("two", new).stack()
    y = fwd(params, swapped.lora_params, ids, adapter_ids=swapped.ids(rows))
    assert fwd._cache_size() == 1
    assert_close(y[1:2], lora_apply(module, new.config)(params, new.lora_params, ids[1:2]), jnp.float32)
    with pytest.raises(ValueError, match=r"cannot swap adapter 'two'.*up: a \[8, 2\] b \[2, 12\] float32 -> a \[8, 3\] b \[3, 12\]"):
        s.replace("two", adapter(3, 2.0, rank=3))


# ---- mixed-adapter batches


def _rows(case, rng, n_rows):
    """An input batch of at least ``n_rows`` rows for a layer-kind case."""
    parts, total = [], 0
    while total < n_rows:
        parts.append(case.make_input(rng))
        total += parts[-1].shape[0]
    return jnp.concatenate(parts)[:n_rows]


@pytest.mark.parametrize("name", ["dense", "dense_general_interleaved", "einsum_projection", "einsum_fallback",
                                  "conv2d_same_strided", "embed", "embed_attend"])  # one per term handler/route
def test_mixed_batch_rows_match_reference(name):
    case, _, params, lora0 = _setup(name)
    x = _rows(case, np.random.default_rng(5), 5)
    alphas = (3.0, 1.0, 6.0)
    adapters = {f"ad{i}": Adapter(LoraConfig(rank=2, alpha=alpha, targets="re:.*"),
                                  jax.tree.map(lambda t: jnp.asarray(np.random.default_rng(i).normal(size=t.shape),
                                                                     t.dtype), lora0))
                for i, alpha in enumerate(alphas)}
    stacked = stack(params, adapters)
    rows = ["ad0", "ad2", None, "ad1", "ad0"]
    y = lora_apply(case.module, stacked.config)(params, stacked.lora_params, x, method=case.method,
                                                adapter_ids=stacked.ids(rows))
    expected = []
    for i, row in enumerate(rows):
        lora = adapters[row].lora_params if row else jax.tree.map(jnp.zeros_like, lora0)
        scale = reference.scaling(alphas[int(row[-1])], 2) if row else 0.0
        expected.append(case.oracle(x[i:i + 1], params, lora["a"], lora["b"], scale))
    assert_close(y, np.concatenate(expected), jnp.float32, what=name)
    assert np.max(np.abs(np.asarray(y[0]) - np.asarray(y[1]))) > 1e-3   # the rows really differ


def test_mixed_batch_on_a_scanned_llama_with_gradients():
    module, params = fixture_model("llama_tiny", True)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(4, 6)), jnp.int32)
    config = LoraConfig(rank=2, alpha=4.0, targets=("attention", "mlp"))
    shapes = jax.eval_shape(lambda: lora_jax.init_lora(module, params, config, ids, rng=jax.random.key(0)))
    adapters = {f"ad{i}": Adapter(dataclasses.replace(config, alpha=2.0 ** i), jax.tree.map(
        lambda s: jnp.asarray(0.1 * np.random.default_rng(i).normal(size=s.shape), s.dtype), shapes))
        for i in range(3)}
    stacked = stack(params, adapters)
    rows = ["ad1", None, "ad0", "ad2"]
    apply = jax.jit(lora_apply(module, stacked.config))
    y = apply(params, stacked.lora_params, ids, adapter_ids=stacked.ids(rows))
    base_fwd = jax.jit(lambda p, x: module.apply({"params": p}, x))   # one compile serves every row
    for i, row in enumerate(rows):
        weights = params if row is None else merge(params, adapters[row].lora_params, adapters[row].config)
        assert_close(y[i:i + 1], base_fwd(weights, ids[i:i + 1]), jnp.float32, what=f"row {i} ({row})")
    # training through a mixed batch: slot k's gradient is the sum over the rows that use it,
    # so one row per slot gives each adapter exactly its own gradient (dB; a carries the scale)
    loss = lambda lora, ids, slots: jnp.sum(apply(params, lora, ids, adapter_ids=slots) ** 2)
    grads = jax.jit(jax.grad(loss))(stacked.lora_params, ids[:1].repeat(3, 0), jnp.arange(3))
    ad1 = adapters["ad1"]
    own_loss = lambda lora: jnp.sum(lora_apply(module, ad1.config)(params, lora, ids[:1]) ** 2)
    own = jax.jit(jax.grad(own_loss))(ad1.lora_params)
    got = grads["model"]["layers"]["mlp"]["down_proj"]["b"][:, 1]
    assert_close(got, own["model"]["layers"]["mlp"]["down_proj"]["b"], jnp.float32, what="dB of slot 1")


def test_mixed_batch_rejects_bad_ids(mlp):
    module, params, ids, adapter = mlp
    stacked = AdapterSet(params, {"one": adapter(1, 2.0), "two": adapter(2, 2.0)}).stack()
    apply = lora_apply(module, stacked.config)
    with pytest.raises(ValueError, match=r"adapter_ids \[2\] are out of range; the stacked adapter has 2 slots"):
        apply(params, stacked.lora_params, ids, adapter_ids=jnp.array([0, 1, 2, -1, 0]))
    with pytest.raises(ValueError, match="5 adapter_ids|4 adapter_ids"):
        apply(params, stacked.lora_params, ids, adapter_ids=jnp.array([0, 1, 1, 0]))
    with pytest.raises(ValueError, match="1-D integer array"):
        apply(params, stacked.lora_params, ids, adapter_ids=jnp.zeros(5))
    with pytest.raises(KeyError, match=r"\['three'\] are not in this stack"):
        stacked.ids(["one", "three"])
    # under jit the ids are traced: an out-of-range row turns to NaN, the others are untouched
    y = jax.jit(apply)(params, stacked.lora_params, ids, adapter_ids=jnp.array([0, 7, -1, -3, 1]))
    finite = np.isfinite(np.asarray(y)).all(axis=(1, 2))
    assert finite.tolist() == [True, False, True, False, True]


def test_hot_swap_from_a_peft_folder(tmp_path):
    module, params = fixture_model("llama_tiny")
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, size=(2, 5)), jnp.int32)

    def trained(seed, alpha, rank=2):
        config = LoraConfig(rank=rank, alpha=alpha, targets=("attention",))
        shapes = jax.eval_shape(lambda: lora_jax.init_lora(module, params, config, ids, rng=jax.random.key(0)))
        r = np.random.default_rng(seed)
        return Adapter(config, jax.tree.map(lambda s: jnp.asarray(0.1 * r.normal(size=s.shape), s.dtype), shapes))

    s = AdapterSet(params, {"live": trained(0, 4.0), "other": trained(1, 4.0)})
    stacked = s.stack()
    fwd = jax.jit(lora_apply(module, stacked.config))
    slots = stacked.ids(["live", "other"])
    fwd(params, stacked.lora_params, ids, adapter_ids=slots)
    new = trained(2, 16.0)
    save_peft(tmp_path / "new", params, new.lora_params, new.config)
    s = s.load_peft("live", tmp_path / "new", replace=True)
    y = fwd(params, s.stack().lora_params, ids, adapter_ids=slots)
    assert fwd._cache_size() == 1
    assert_close(y[:1], lora_apply(module, new.config)(params, new.lora_params, ids[:1]), jnp.float32)
    wider = trained(3, 4.0, rank=4)
    save_peft(tmp_path / "wider", params, wider.lora_params, wider.config)
    with pytest.raises(ValueError, match=r"cannot swap adapter 'live' without recompiling.*q_proj"):
        s.load_peft("live", tmp_path / "wider", replace=True)
    assert load_peft(tmp_path / "wider").config.rank == 4


def test_resolved_config_does_not_depend_on_key_order(mlp):
    module, params, ids, adapter = mlp
    one = adapter(1, 2.0)
    reordered = Adapter(one.config, {k: one.lora_params[k] for k in reversed(list(one.lora_params))})
    assert list(reordered.lora_params) != list(one.lora_params)
    first = AdapterSet(params, {"x": one}).activate("x").resolve().config
    second = AdapterSet(params, {"x": reordered}).activate("x").resolve().config
    assert first == second


# ---- the 0.1 spellings: each warns and gives what the 0.2 spelling gives


def _same_trees(x, y):
    assert jax.tree.structure(x) == jax.tree.structure(y)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))


def _two_adapters():
    adapters, _ = _build([dict(layers=["q", "blk/k"], rank=2, alpha=2.0, rslora=False, override=None),
                          dict(layers=["q", "v"], rank=3, alpha=4.0, rslora=True, override=None)], seed=4)
    return adapters, _base(np.random.default_rng(4))


def test_combine_in_the_old_order_warns_and_agrees():
    adapters, base = _two_adapters()
    new = combine(base, adapters, [0.5, -1.0], method="svd", rank=2)
    with pytest.warns(DeprecationWarning, match=r"combine\(adapters, weights, base_params=...\) is deprecated"):
        old = combine(adapters, [0.5, -1.0], base_params=base, method="svd", rank=2)
    assert old.config == new.config and old.errors == new.errors
    _same_trees(old.lora_params, new.lora_params)


def test_stack_in_the_old_order_warns_and_agrees():
    adapters, base = _two_adapters()
    named = dict(zip("xy", adapters))
    new = stack(base, named)
    with pytest.warns(DeprecationWarning, match=r"use stack\(base_params, adapters\)"):
        old = stack(named, base_params=base)
    assert (old.config, old.names) == (new.config, new.names)
    _same_trees(old.lora_params, new.lora_params)


def test_combined_and_stacked_lora_warn_and_return_lora_params():
    adapters, base = _two_adapters()
    combined, stacked = combine(base, adapters), stack(base, dict(zip("xy", adapters)))
    with pytest.warns(DeprecationWarning, match=r"Combined.lora is deprecated .* use Combined.lora_params"):
        assert combined.lora is combined.lora_params
    with pytest.warns(DeprecationWarning, match=r"Stacked.lora is deprecated .* use Stacked.lora_params"):
        assert stacked.lora is stacked.lora_params


def test_adapter_set_add_in_the_old_order_warns_and_agrees():
    (one, two), base = _two_adapters()
    new = AdapterSet(base).add("one", one.lora_params, one.config).add("two", two)
    with pytest.warns(DeprecationWarning, match=r"AdapterSet.add\(name, config, lora\) is deprecated"):
        old = AdapterSet(base).add("one", one.config, one.lora_params)
    with pytest.warns(DeprecationWarning, match=r"use AdapterSet.add\(name, lora_params, config\)"):
        old = old.add("two", config=two.config, lora=two.lora_params)
    assert old.names == new.names and all(old[n] == new[n] for n in new.names)


def test_adapter_set_replace_in_the_old_order_warns_and_agrees():
    (one, _), base = _two_adapters()
    other = Adapter(dataclasses.replace(one.config, alpha=8.0), jax.tree.map(lambda x: 2 * x, one.lora_params))
    s = AdapterSet(base, {"one": one})
    new = s.replace("one", other.lora_params, other.config)
    with pytest.warns(DeprecationWarning, match=r"AdapterSet.replace\(name, config, lora\) is deprecated"):
        old = s.replace("one", other.config, other.lora_params)
    assert old["one"] == new["one"] == other


def test_bad_id_under_jit_keeps_its_row_out_of_every_gradient(mlp):
    module, params, ids, adapter = mlp
    stacked = AdapterSet(params, {"one": adapter(1, 2.0), "two": adapter(2, 2.0)}).stack()
    apply = jax.jit(lora_apply(module, stacked.config))
    slots, valid = jnp.array([0, 7, -1, -3, 1]), np.array([0, 2, 4])
    y = apply(params, stacked.lora_params, ids, adapter_ids=slots)
    assert np.isnan(np.asarray(y[1])).all() and np.isnan(np.asarray(y[3])).all()
    alone = apply(params, stacked.lora_params, ids[valid], adapter_ids=slots[valid])
    np.testing.assert_array_equal(np.asarray(y[valid]), np.asarray(alone))
    loss = lambda lora, x, s: jnp.nansum(apply(params, lora, x, adapter_ids=s))
    grads = jax.jit(jax.grad(loss))(stacked.lora_params, ids, slots)
    want = jax.jit(jax.grad(loss))(stacked.lora_params, ids[valid], slots[valid])
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.isfinite(np.asarray(g)).all(), f"{jax.tree_util.keystr(path)}: non-finite gradient"
    jax.tree.map(lambda g, w: assert_close(g, w, jnp.float32, what="gradient"), grads, want)
    assert float(jnp.max(jnp.abs(grads["up"]["a"][0]))) > 1e-3   # slot 0 really has a gradient

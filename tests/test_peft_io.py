"""PEFT adapter folders: read PEFT's own files, compare with PEFT's logits, write files PEFT's way.

The adapters and logits under tests/fixtures were written by PEFT 0.21.2 on
torch 2.13 (tests/fixtures/make_peft_fixtures.py); no torch is needed here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import LoraConfig, merge, unmerge
from lora_jax.config import Adapter
from lora_jax.io import tensors as st
from lora_jax.io.peft import UnsupportedAdapterError, load_peft, peft_pattern_lookup, save_peft
from tests.fixtures_data import ADAPTER_BASES, ADAPTERS, assert_logits_match, forward, model, reference


def _load(name, **kwargs):
    return load_peft(os.path.join(ADAPTERS, name), adapter_name=ADAPTER_BASES[name][1], **kwargs)


def _folder(name):
    sub = ADAPTER_BASES[name][1]
    return os.path.join(ADAPTERS, name, *([sub] if sub else []))


@pytest.mark.parametrize("name", list(ADAPTER_BASES))
def test_unmerged_and_merged_logits_match_peft(name):
    module, params = model(ADAPTER_BASES[name][0])
    adapter = _load(name)
    ids = jnp.asarray(reference()["input_ids"])
    assert_logits_match(forward(module, params, ids, adapter.lora_params, adapter.config), reference()[f"{name}/unmerged"],
                        f"{name} unmerged")
    merged = merge(params, adapter.lora_params, adapter.config)
    assert_logits_match(forward(module, merged, ids), reference()[f"{name}/merged"], f"{name} merged")
    # the adapter really changes the model, so agreeing with PEFT is not agreeing with the base
    base = reference()[f"{ADAPTER_BASES[name][0]}/logits"]
    assert np.max(np.abs(reference()[f"{name}/unmerged"] - base)) > 100 * 1e-4


def test_disabled_adapter_is_the_base_model():
    module, params = model("llama_tiny")
    assert_logits_match(forward(module, params, jnp.asarray(reference()["input_ids"])),
                        reference()["plain/disabled"], "adapter disabled")


def test_rank_and_alpha_patterns_resolve_per_layer_as_peft():
    adapter = _load("patterns")
    cfg = adapter.config
    # rank_pattern {"layers.0.self_attn.q_proj": 2, "down_proj": 6}, alpha_pattern {"o_proj": 3}, r 4, alpha 8
    expected = {"model/layers_0/self_attn/q_proj": (2, 8.0), "model/layers_1/self_attn/q_proj": (4, 8.0),
                "model/layers_0/mlp/down_proj": (6, 8.0), "model/layers_1/mlp/down_proj": (6, 8.0),
                "model/layers_1/self_attn/o_proj": (4, 3.0), "model/layers_0/self_attn/k_proj": (4, 8.0),
                "model/layers_1/mlp/gate_proj": (4, 8.0)}
    for path, (rank, alpha) in expected.items():
        assert (cfg.rank_for(path), cfg.alpha_for(path), cfg.scaling(path)) == (rank, alpha, alpha / rank), path
        node = adapter.lora_params
        for key in path.split("/"):
            node = node[key]
        assert node["a"].shape[1] == rank and node["b"].shape[0] == rank
    # a regex target_modules becomes the exact layers in the file: 5 projections x 2 layers
    assert len(cfg.targets) == 10 and "model/layers_0/mlp/up_proj" not in cfg.targets


def test_rslora_scale_and_all_linear_targets():
    adapter = _load("rslora")
    assert adapter.config.use_rslora and adapter.config.scaling("model/layers_0/mlp/up_proj") == 4 / np.sqrt(8)
    assert len(adapter.config.targets) == 14   # PEFT expands all-linear into the module list it saves


def test_embedding_adapter_layout_and_saved_base_weights():
    adapter = _load("embedding")
    raw = st.read(os.path.join(ADAPTERS, "embedding", "adapter_model.safetensors"))
    emb = adapter.lora_params["model"]["embed_tokens"]
    np.testing.assert_array_equal(emb["a"], raw["base_model.model.model.embed_tokens.lora_embedding_A"].T)
    np.testing.assert_array_equal(emb["b"], raw["base_model.model.model.embed_tokens.lora_embedding_B"].T)
    assert emb["a"].shape == (128, 4) and emb["b"].shape == (4, 64)
    # PEFT stored full copies of the targeted embedding and head: equal to the base weights
    _, params = model("llama_tiny")
    np.testing.assert_array_equal(adapter.base_weights["model.embed_tokens.weight"],
                                  params["model"]["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(adapter.base_weights["lm_head.weight"], np.asarray(params["lm_head"]["kernel"]).T)


def test_scanned_model_reads_the_same_adapter():
    module, params = model("llama_tiny", True)
    adapter = _load("patterns", scan_layers=False)
    with pytest.raises(ValueError, match=r"scanned layers need equal ranks|disagree on the rank"):
        _load("patterns", scan_layers=True)   # layer 0's q_proj has rank 2, layer 1's rank 4
    adapter = _load("rslora", scan_layers=True)
    assert adapter.lora_params["model"]["layers"]["mlp"]["up_proj"]["a"].shape == (2, 64, 8)
    logits = forward(module, params, jnp.asarray(reference()["input_ids"]), adapter.lora_params, adapter.config)
    assert_logits_match(logits, reference()["rslora/unmerged"], "rslora scanned")


@pytest.mark.parametrize("name", list(ADAPTER_BASES))
def test_save_peft_writes_the_tensors_peft_wrote(name, tmp_path):
    adapter = _load(name)
    save_peft(tmp_path, model(ADAPTER_BASES[name][0])[1], adapter.lora_params, adapter.config)
    ours = st.read(tmp_path / "adapter_model.safetensors")
    theirs = {k: v for k, v in st.read(os.path.join(_folder(name), "adapter_model.safetensors")).items()
              if ".base_layer." not in k}
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    with open(tmp_path / "adapter_config.json") as f:
        written = json.load(f)
    with open(os.path.join(_folder(name), "adapter_config.json")) as f:
        original = json.load(f)
    modules = [k[len("base_model.model."):].rsplit(".lora_", 1)[0] for k in theirs if ".lora_A" in k or "_A" in k]
    for module in modules:   # PEFT's own pattern rule gives every module the same rank and alpha in both
        for field, default in (("rank_pattern", "r"), ("alpha_pattern", "lora_alpha")):
            assert (peft_pattern_lookup(written[field], module, written[default])
                    == peft_pattern_lookup(original[field] or {}, module, original[default])), (module, field)
    assert written["use_rslora"] == original["use_rslora"] and written["peft_type"] == "LORA"
    back = load_peft(tmp_path)
    assert jax.tree.all(jax.tree.map(np.array_equal, back.lora_params, adapter.lora_params))
    assert all(back.config.scaling(p) == adapter.config.scaling(p) for p in back.config.targets if "/" in p)


def test_save_peft_from_a_scanned_model(tmp_path):
    adapter = _load("rslora", scan_layers=True)
    save_peft(tmp_path, model("llama_tiny", True)[1], adapter.lora_params, adapter.config)
    flat = _load("rslora")
    assert jax.tree.all(jax.tree.map(np.array_equal, load_peft(tmp_path).lora_params, flat.lora_params))


def test_dora_magnitude_layout_and_unmerge_refusal():
    adapter = _load("dora")
    raw = st.read(os.path.join(ADAPTERS, "dora", "adapter_model.safetensors"))
    q = adapter.lora_params["model"]["layers_1"]["self_attn"]["q_proj"]
    np.testing.assert_array_equal(q["m"], raw["base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"])
    assert adapter.config.use_dora and q["m"].shape == (64,)
    _, params = model("llama_tiny")
    with pytest.raises(ValueError, match=r"'model/layers_0/self_attn/q_proj': a DoRA merge cannot be undone"):
        unmerge(merge(params, adapter.lora_params, adapter.config), adapter.lora_params, adapter.config)
    plain = dataclasses.replace(adapter.config, use_dora=False)
    with pytest.raises(ValueError, match=r"has a DoRA magnitude 'm', but LoraConfig.use_dora is False"):
        merge(params, adapter.lora_params, plain)


def _copy_adapter(tmp_path, name="plain"):
    target = tmp_path / name
    shutil.copytree(_folder(name), target)
    return target


def _edit(folder, **changes):
    with open(folder / "adapter_config.json") as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(folder / "adapter_config.json", "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("changes, message", [
    (dict(peft_type="IA3"), r"peft_type 'IA3' is not a LoRA adapter"),
    (dict(lora_bias=True), r"lora_bias .* is not supported \(lora_bias = True\)"),
    (dict(bias="all"), r"trained base biases \(bias != 'none'\) are not supported \(bias = 'all'\)"),
    (dict(modules_to_save=["score"]), r"modules_to_save .* are not supported"),
    (dict(init_lora_weights="pissa_niter_4"), r"init_lora_weights 'pissa_niter_4' modifies the base weights"),
])
def test_unsupported_features_are_refused(tmp_path, changes, message):
    folder = _copy_adapter(tmp_path)
    _edit(folder, **changes)
    with pytest.raises(UnsupportedAdapterError, match=message):
        load_peft(folder)


def test_unknown_config_keys_warn_and_are_ignored(tmp_path):
    folder = _copy_adapter(tmp_path)
    _edit(folder, some_future_option=3)
    with pytest.warns(UserWarning, match=r"ignoring adapter_config.json keys unknown to lora_jax: "
                                         r"\['some_future_option'\]"):
        adapter = load_peft(folder)
    assert jax.tree.all(jax.tree.map(np.array_equal, adapter.lora_params, _load("plain").lora_params))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _load("plain")   # PEFT's own keys do not warn


def test_bad_tensors_are_named(tmp_path):
    folder = _copy_adapter(tmp_path)
    path = folder / "adapter_model.safetensors"
    raw = st.read(path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    st.write(path, {k: v for k, v in raw.items() if k != key})
    with pytest.raises(ValueError, match=r"module 'model.layers.0.self_attn.q_proj' has only its A matrix"):
        load_peft(folder)
    st.write(path, {k.replace("base_model.model.", ""): v for k, v in raw.items()})
    with pytest.raises(UnsupportedAdapterError, match=r"tensor 'model.layers.0.self_attn.q_proj.lora_A.weight' is "
                                                      r"not a LoRA tensor of the form 'base_model.model.<module>"):
        load_peft(folder)
    st.write(path, raw)
    _edit(folder, r=8)
    with pytest.raises(ValueError, match=r"module 'model.layers.0.self_attn.q_proj' has rank 4 but the config's "
                                         r"r/rank_pattern give 8"):
        load_peft(folder)


def test_save_peft_refuses_what_peft_cannot_hold(tmp_path):
    cfg = LoraConfig(rank=2, targets=("q",))
    base = {"q": {"kernel": np.zeros((4, 3, 5))}}
    lora = {"q": {"a": np.zeros((12, 2)), "b": np.zeros((2, 5))}}
    with pytest.raises(ValueError, match=r"layer 'q': only 2-D Dense and Embed adapters fit PEFT's format"):
        save_peft(tmp_path, base, lora, cfg)
    with pytest.raises(ValueError, match=r"adapter 'k' has no layer in base_params"):
        save_peft(tmp_path, base, {"k": lora["q"]}, cfg)


def _written(folder) -> tuple[dict, dict]:
    with open(os.path.join(folder, "adapter_config.json")) as f:
        return json.load(f), st.read(os.path.join(folder, "adapter_model.safetensors"))


def _same_files(first, second) -> bool:
    (c1, t1), (c2, t2) = _written(first), _written(second)
    return c1 == c2 and sorted(t1) == sorted(t2) and all(np.array_equal(t1[k], t2[k]) for k in t1)


def test_save_peft_takes_an_adapter_value_and_keywords(tmp_path):
    adapter = _load("plain")
    base = model(ADAPTER_BASES["plain"][0])[1]
    save_peft(tmp_path / "new", base, adapter.lora_params, adapter.config, task_type="CAUSAL_LM")
    save_peft(tmp_path / "value", base, Adapter(adapter.config, adapter.lora_params), task_type="CAUSAL_LM")
    save_peft(tmp_path / "named", base_params=base, lora_params=adapter.lora_params, config=adapter.config,
              task_type="CAUSAL_LM")
    assert _same_files(tmp_path / "new", tmp_path / "value") and _same_files(tmp_path / "new", tmp_path / "named")
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'lora'"):
        save_peft(tmp_path / "bad", base, lora=adapter.lora_params, config=adapter.config)


def test_save_peft_in_the_old_argument_order_warns_and_writes_the_same(tmp_path):
    adapter = _load("plain")
    base = model(ADAPTER_BASES["plain"][0])[1]
    save_peft(tmp_path / "new", base, adapter.lora_params, adapter.config, task_type="CAUSAL_LM")
    with pytest.warns(DeprecationWarning, match=r"save_peft\(path, lora, config, base_params=base_params\) is "
                                                r"deprecated .* use save_peft\(path, base_params, lora_params, config\)"):
        save_peft(tmp_path / "old", adapter.lora_params, adapter.config, base_params=base, task_type="CAUSAL_LM")
    assert _same_files(tmp_path / "new", tmp_path / "old")


OURS = ("patterns", "rslora_embed", "tied")


def _ours_builder():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_jax_adapters",
                                                  os.path.join(ADAPTERS, "..", "make_jax_adapters.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", OURS)
def test_peft_loads_our_files_and_computes_our_logits(name, tmp_path):
    """tests/fixtures/ours/<name> was written by save_peft and loaded by PEFT 0.21.2, which stored its logits."""
    builder = _ours_builder()
    module, base, lora, config = builder.build(name)
    folder = os.path.join(ADAPTERS, "..", "ours", name)
    # the committed files are exactly what save_peft writes today
    save_peft(tmp_path, base, lora, config, task_type="CAUSAL_LM",
              base_model_name_or_path=f"tests/fixtures/{builder.SPECS[name][0]}")
    committed, fresh = st.read(os.path.join(folder, "adapter_model.safetensors")), st.read(tmp_path / "adapter_model.safetensors")
    assert sorted(committed) == sorted(fresh) and all(np.array_equal(committed[k], fresh[k]) for k in committed)
    with open(os.path.join(folder, "adapter_config.json")) as f, open(tmp_path / "adapter_config.json") as g:
        assert json.load(f) == json.load(g)
    with np.load(os.path.join(folder, "peft_logits.npz")) as z:
        peft = {k: z[k] for k in z.files}
    ids = jnp.asarray(peft["input_ids"])
    assert_logits_match(forward(module, base, ids, lora, config), peft["unmerged"], f"ours/{name} unmerged")
    assert_logits_match(forward(module, merge(base, lora, config), ids), peft["merged"], f"ours/{name} merged")
    assert np.max(np.abs(peft["unmerged"] - peft["disabled"])) > 0.01   # the adapter matters in PEFT too


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    """safetensors 0.8 creates owner-only files; ours get what any new file gets, so others can read a model."""
    old = os.umask(umask)
    try:
        st.write(tmp_path / "w.safetensors", {"w": np.ones(2, np.float32)})
    finally:
        os.umask(old)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == mode

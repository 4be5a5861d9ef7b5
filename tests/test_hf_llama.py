"""The Llama model against transformers: weights from safetensors folders, logits, generation, files.

The fixtures under tests/fixtures were written by transformers 5.24 / torch 2.13
(tests/fixtures/make_peft_fixtures.py); these tests need neither.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.io import load_peft
from lora_jax.io import tensors as st
from lora_jax.linen import lora_apply
from lora_jax.models import LlamaConfig, LlamaForCausalLM, from_pretrained, generate, init_cache, save_pretrained
from lora_jax.models.llama import RopeScaling, inverse_frequencies
from tests.fixtures_data import ADAPTERS, FIXTURES, assert_logits_match, forward, model, reference

MODELS = {"llama_tiny": "llama_tiny", "llama_tiny_sharded": "llama_tiny", "llama_tiny_tied": "llama_tiny_tied"}


@pytest.mark.parametrize("folder", list(MODELS))
@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scan"])
def test_logits_match_transformers(folder, scan):
    module, params = model(folder, scan)
    logits = forward(module, params, jnp.asarray(reference()["input_ids"]))
    assert_logits_match(logits, reference()[f"{MODELS[folder]}/logits"], f"{folder} scan={scan}")


def test_sharded_folder_is_read_from_its_index():
    assert os.path.isfile(os.path.join(FIXTURES, "llama_tiny_sharded", "model.safetensors.index.json"))
    assert not os.path.exists(os.path.join(FIXTURES, "llama_tiny_sharded", "model.safetensors"))
    single, sharded = model("llama_tiny")[1], model("llama_tiny_sharded")[1]
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), single, sharded))


def test_config_is_read_as_transformers_wrote_it():
    cfg = model("llama_tiny_tied")[0].config
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.attention_bias, cfg.tie_word_embeddings) == (8, 2, True, True)
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 32)
    params = model("llama_tiny_tied")[1]
    assert "lm_head" not in params and params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].shape == (64, 32)


def test_llama3_rope_frequencies_follow_the_published_rule():
    # Rule of Llama 3.1: wavelengths above old_len / low_freq_factor are divided by `factor`, below
    # old_len / high_freq_factor kept, and in between interpolated linearly in old_len / wavelength.
    theta, dim, old, factor = 10000.0, 64, 32, 8.0
    plain = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    got = inverse_frequencies(dim, theta, RopeScaling("llama3", factor, 1.0, 4.0, old))
    wavelen = 2 * np.pi / plain
    for f, g, w in zip(plain, got, wavelen):
        if w > old:
            expected = f / factor
        elif w < old / 4:
            expected = f
        else:
            t = (old / w - 1.0) / (4.0 - 1.0)
            expected = (1 - t) * f / factor + t * f
        assert g == pytest.approx(expected, rel=1e-6)
    assert np.sum(wavelen > old) > 0 and np.sum(wavelen < old / 4) > 0 and np.sum((wavelen <= old) & (wavelen >= old / 4)) > 0


@pytest.mark.parametrize("name", ["llama_tiny", "llama_tiny_tied"])
def test_greedy_generation_matches_transformers(name):
    module, params = model(name)
    prompt = jnp.asarray(reference()["input_ids"][:1, :5])
    out = generate(module, params, prompt, max_new_tokens=8)
    np.testing.assert_array_equal(np.asarray(out), reference()[f"{name}/generate"])


def _naive_greedy(module, params, ids, steps):
    """Greedy decoding by full forward passes over a fixed-length buffer (causal: later slots do not matter)."""
    start = ids.shape[1]
    buffer = jnp.concatenate([ids, jnp.zeros((ids.shape[0], steps), jnp.int32)], axis=1)
    for t in range(start, start + steps):
        nxt = jnp.argmax(forward(module, params, buffer)[:, t - 1], axis=-1).astype(jnp.int32)
        buffer = buffer.at[:, t].set(nxt)
    return buffer


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scan"])
def test_cached_decoding_equals_the_full_forward(scan):
    module, params = model("llama_tiny", scan)
    ids = jnp.asarray(reference()["input_ids"])
    full = forward(module, params, ids)
    step = jax.jit(module.apply)
    first, cache = step({"params": params}, ids[:, :5], cache=init_cache(module.config, 2, 16))
    second, cache = step({"params": params}, ids[:, 5:], cache=cache)
    assert int(cache["index"]) == 12
    assert_logits_match(jnp.concatenate([first, second], axis=1), np.asarray(full), "incremental vs full")
    out = generate(module, params, ids[:, :4], max_new_tokens=5)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(_naive_greedy(module, params, ids[:, :4], 5)))


def test_sampling_options():
    module, params = model("llama_tiny")
    prompt = jnp.asarray(reference()["input_ids"][:, :3])
    greedy = generate(module, params, prompt, max_new_tokens=6)
    top1 = generate(module, params, prompt, max_new_tokens=6, temperature=0.7, top_k=1, rng=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))   # top-1 sampling is greedy
    a = generate(module, params, prompt, max_new_tokens=6, temperature=5.0, rng=jax.random.key(1))
    b = generate(module, params, prompt, max_new_tokens=6, temperature=5.0, rng=jax.random.key(1))
    c = generate(module, params, prompt, max_new_tokens=6, temperature=5.0, rng=jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c)) and not np.array_equal(np.asarray(a), np.asarray(greedy))
    eos = int(greedy[0, 4])   # the second generated token of row 0: everything after it becomes eos
    stopped = np.asarray(generate(module, params, prompt, max_new_tokens=6, eos_token_id=eos))
    assert (stopped[0, 4:] == eos).all() and (stopped[0, :4] == np.asarray(greedy)[0, :4]).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), r"max_new_tokens must be >= 1, got 0"),
    (dict(max_new_tokens=2, temperature=1.0), r"sampling \(temperature 1.0\) needs rng="),
    (dict(max_new_tokens=2, top_k=0), r"top_k must be in \[1, vocab_size=128\], got 0"),
    (dict(max_new_tokens=4, max_length=5), r"max_length 5 < prompt length \+ max_new_tokens = 7"),
])
def test_generate_rejects_bad_arguments(kwargs, message):
    module, params = model("llama_tiny")
    with pytest.raises(ValueError, match=message):
        generate(module, params, jnp.zeros((1, 3), jnp.int32), **kwargs)


def test_generate_names_the_removed_adapter_keywords():
    module, params = model("llama_tiny")
    with pytest.raises(TypeError, match=r"lora= and config= were removed in lora_jax 0.2; bind the adapters yourself"):
        generate(module, params, jnp.zeros((1, 3), jnp.int32), max_new_tokens=2, lora={}, config=object())
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'tempreature'"):
        generate(module, params, jnp.zeros((1, 3), jnp.int32), max_new_tokens=2, tempreature=1.0)


def test_generate_with_bound_adapters_is_the_adapted_models_greedy_argmax():
    """``apply=`` with ``lora_apply`` bound: PEFT's greedy continuation, and step by step the adapted argmax."""
    module, params = model("llama_tiny")
    adapter = load_peft(os.path.join(ADAPTERS, "plain"))
    adapted = lora_apply(module, adapter.config)

    def forward(p, ids, cache):
        return adapted(p[0], p[1], ids, cache=cache)

    prompt = jnp.asarray(reference()["input_ids"][:1, :5])
    out = generate(module, (params, adapter.lora_params), prompt, max_new_tokens=8, apply=forward)
    np.testing.assert_array_equal(np.asarray(out), reference()["plain/generate"])
    buffer = jnp.concatenate([prompt, jnp.zeros((1, 8), jnp.int32)], axis=1)
    for t in range(5, 13):
        nxt = jnp.argmax(adapted(params, adapter.lora_params, buffer)[:, t - 1], axis=-1).astype(jnp.int32)
        buffer = buffer.at[:, t].set(nxt)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(buffer))
    plain = np.asarray(generate(module, params, prompt, max_new_tokens=8))
    assert not np.array_equal(plain, np.asarray(out))   # the adapter changes the continuation


@pytest.mark.parametrize("name", ["llama_tiny", "llama_tiny_tied"])
def test_save_pretrained_writes_the_file_transformers_wrote(name, tmp_path):
    module, params = model(name)
    save_pretrained(tmp_path, module, params)
    ours, theirs = st.read(tmp_path / "model.safetensors"), st.read(os.path.join(FIXTURES, name, "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    with open(tmp_path / "config.json") as f, open(os.path.join(FIXTURES, name, "config.json")) as g:
        ours_cfg, theirs_cfg = json.load(f), json.load(g)
    assert {k: v for k, v in theirs_cfg.items() if k in ours_cfg} == ours_cfg   # a subset, with equal values


def test_save_pretrained_shards_and_scanned_params(tmp_path):
    module, params = model("llama_tiny", True)
    files = save_pretrained(tmp_path, module, params, max_shard_bytes=100_000)
    assert "model.safetensors.index.json" in files and len(files) >= 4
    again, loaded = from_pretrained(tmp_path, show_progress=False)
    reference_params = model("llama_tiny")[1]
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), loaded, reference_params))


def _copy(tmp_path, name="llama_tiny"):
    target = tmp_path / name
    shutil.copytree(os.path.join(FIXTURES, name), target)
    return target


def _edit_config(folder, **changes):
    with open(folder / "config.json") as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(folder / "config.json", "w") as f:
        json.dump(cfg, f)


def test_wrong_architecture_and_rope_are_refused(tmp_path):
    folder = _copy(tmp_path)
    _edit_config(folder, model_type="gpt_neox")
    with pytest.raises(ValueError, match=r"model_type 'gpt_neox' is not supported; only 'llama'"):
        from_pretrained(folder, show_progress=False)
    _edit_config(folder, model_type="llama", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4})
    with pytest.raises(ValueError, match=r"rope type 'yarn' is not supported"):
        from_pretrained(folder, show_progress=False)


def test_tensors_that_do_not_fit_the_config_are_named(tmp_path):
    folder = _copy(tmp_path)
    tensors = st.read(folder / "model.safetensors")
    tensors["extra.weight"] = np.zeros(2, np.float32)
    del tensors["model.norm.weight"]
    st.write(folder / "model.safetensors", tensors)
    with pytest.raises(ValueError, match=r"missing tensors \['model.norm.weight'\], unexpected tensors \['extra.weight'\]"):
        from_pretrained(folder, show_progress=False)
    _edit_config(folder, intermediate_size=80)
    tensors = st.read(os.path.join(FIXTURES, "llama_tiny", "model.safetensors"))
    st.write(folder / "model.safetensors", tensors)
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.down_proj.weight': shape \[64, 96\] does not "
                                         r"match the config \(expected \[64, 80\]\)"):
        from_pretrained(folder, show_progress=False)


def test_missing_files_and_pickle_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config.json in"):
        from_pretrained(tmp_path, show_progress=False)
    folder = _copy(tmp_path)
    os.remove(folder / "model.safetensors")
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match=r"found pytorch_model.bin: pickle checkpoints are not read"):
        from_pretrained(folder, show_progress=False)


def test_bfloat16_params_on_request():
    module, params = from_pretrained(os.path.join(FIXTURES, "llama_tiny"), param_dtype=jnp.bfloat16,
                                     dtype=jnp.bfloat16, show_progress=False)
    kernel = params["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(model("llama_tiny")[1]["model"]["layers_0"]["mlp"]
                                                                 ["up_proj"]["kernel"].astype(jnp.bfloat16)))
    assert module.config.dtype == jnp.bfloat16


def test_config_round_trip_keeps_every_field():
    cfg = LlamaConfig(vocab_size=40, hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=5e5,
                      rope_scaling=RopeScaling("linear", 2.0), max_position_embeddings=64, attention_bias=True,
                      mlp_bias=True, tie_word_embeddings=True)
    from lora_jax.models.hf import config_from_hf, config_to_hf

    assert config_from_hf(json.loads(json.dumps(config_to_hf(cfg)))) == cfg
    assert LlamaForCausalLM(cfg).config.kv_heads == 2


def test_extra_config_keys_and_malformed_json(tmp_path):
    module, params = model("llama_tiny")
    save_pretrained(tmp_path, module, params, extra_config={"eos_token_id": 2, "lora_jax_tokenizer": "bytes"})
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert written["eos_token_id"] == 2 and written["lora_jax_tokenizer"] == "bytes"
    with pytest.raises(ValueError, match=r"extra_config may not override \['vocab_size'\]"):
        save_pretrained(tmp_path, module, params, extra_config={"vocab_size": 3})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        from_pretrained(tmp_path, show_progress=False)

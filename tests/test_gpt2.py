"""GPT-2 against transformers and PEFT: logits, Conv1D adapters (fan_in_fan_out), padding, generation, files.

The fixtures (tests/fixtures/zoo/gpt2/, gpt2_adapter/, gpt2_reference.npz) were written by
transformers 5.24 / PEFT 0.21.2 / torch 2.13 (tests/fixtures/make_gpt2_fixtures.py); these tests
need none of them. The model, the adapter and the compiled functions are built once per module.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import LoraConfig, init_lora, lora_apply
from lora_jax.io import load_peft, save_peft
from lora_jax.io import tensors as st
from lora_jax.io.fields import ConfigFieldError
from lora_jax.io.peft import UnsupportedAdapterError
from lora_jax.models import GPT2Config, GPT2LMHeadModel, from_pretrained, generate, save_pretrained
from lora_jax.models.hf import config_from_hf
from tests.fixtures_data import Loaded, read_npz
from tests.tolerances import assert_close

ZOO = os.path.join(os.path.dirname(__file__), "fixtures", "zoo")
MODEL, ADAPTER = os.path.join(ZOO, "gpt2"), os.path.join(ZOO, "gpt2_adapter")
PROMPT_LEN, MAX_NEW_TOKENS = 5, 8


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    return read_npz(os.path.join(ZOO, "gpt2_reference.npz"))


@pytest.fixture(scope="module")
def g(ref) -> Loaded:
    return Loaded.of(MODEL, ADAPTER, ref["input_ids"])


def max_diff(actual, expected) -> float:
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)))


def test_folder_is_read_as_gpt2(g):
    cfg, block = g.module.config, g.params["transformer"]["h_0"]
    assert type(g.module) is GPT2LMHeadModel and type(cfg) is GPT2Config
    assert (cfg.hidden_size, cfg.mlp_size, cfg.max_position_embeddings, cfg.scale_attn_by_inverse_layer_idx) == \
        (32, 48, 32, True)
    assert block["attn"]["c_attn"]["kernel"].shape == (32, 96)          # Conv1D [in, out], as stored
    assert block["mlp"]["c_proj"]["kernel"].shape == (48, 32)
    assert sorted(block["ln_1"]) == ["bias", "weight"]
    assert "lm_head" not in g.params                                     # tied to transformer/wte


def test_logits_match_transformers(g, ref):
    assert_close(g.logits, ref["logits"], np.float32, what="gpt2 base")


def test_adapter_matches_peft_unmerged_and_merged(g, ref):
    assert max_diff(ref["unmerged"], ref["logits"]) > 0.5                # the adapter matters
    assert_close(g.unmerged, ref["unmerged"], np.float32, what="gpt2 unmerged")
    assert_close(g.merged_logits, ref["merged"], np.float32, what="gpt2 merged")
    assert_close(g.merged_logits, g.unmerged, np.float32, what="gpt2: our merged vs our unmerged")


def test_conv1d_adapter_is_read_in_our_layout(g):
    assert g.adapter.peft_config["fan_in_fan_out"] is True
    node = g.adapter.lora_params["transformer"]["h_1"]["attn"]["c_attn"]
    assert (node["a"].shape, node["b"].shape) == ((32, 4), (4, 96))
    raw = st.read(os.path.join(ADAPTER, "adapter_model.safetensors"))
    np.testing.assert_array_equal(node["a"], raw["base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"].T)
    assert g.adapter.config.scaling("transformer/h_1/mlp/c_fc") == 2.0


@pytest.mark.parametrize("targets, expected", [
    ("attention", {"attn/c_attn", "attn/c_proj"}),
    ("mlp", {"mlp/c_fc", "mlp/c_proj"}),
    ("all-linear", {"attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"}),
])
def test_presets_select_gpt2_layers(g, ref, targets, expected):
    lora = init_lora(g.module, g.params, LoraConfig(rank=2, targets=targets), jnp.asarray(ref["input_ids"]),
                     rng=jax.random.key(0))
    assert sorted(lora["transformer"]) == ["h_0", "h_1"]
    for block in lora["transformer"].values():
        assert {f"{outer}/{inner}" for outer in block for inner in block[outer]} == expected


def test_embedding_preset_selects_wte_and_wpe(g, ref):
    lora = init_lora(g.module, g.params, LoraConfig(rank=2, targets="embedding"), jnp.asarray(ref["input_ids"]),
                     rng=jax.random.key(0))
    assert lora == {"transformer": {"wte": lora["transformer"]["wte"], "wpe": lora["transformer"]["wpe"]}}
    assert lora["transformer"]["wpe"]["b"].shape == (2, 32)


def test_greedy_generation_matches_transformers(g, ref):
    prompt = jnp.asarray(ref["input_ids"][:, :PROMPT_LEN])
    np.testing.assert_array_equal(np.asarray(generate(g.module, g.params, prompt, max_new_tokens=MAX_NEW_TOKENS)),
                                  ref["generate"])
    np.testing.assert_array_equal(np.asarray(generate(g.module, g.merged, prompt, max_new_tokens=MAX_NEW_TOKENS)),
                                  ref["adapter_generate"])
    adapted = lora_apply(g.module, g.adapter.config)
    unmerged = generate(g.module, (g.params, g.adapter.lora_params), prompt, max_new_tokens=MAX_NEW_TOKENS,
                        apply=lambda p, ids, cache: adapted(p[0], p[1], ids, cache=cache))
    np.testing.assert_array_equal(np.asarray(unmerged), ref["adapter_generate"])


def test_padded_forward_matches_transformers_at_real_positions(g, ref):
    mask = ref["padded_mask"]
    logits = jax.jit(lambda p, ids, m: g.module.apply({"params": p}, ids, attention_mask=m))(
        g.params, jnp.asarray(ref["padded_ids"]), jnp.asarray(mask))
    real = mask.astype(bool)
    assert_close(np.asarray(logits)[real], ref["padded_logits"][real], np.float32, what="gpt2 padded")
    # Each row's real tokens give the logits of the same prompt unpadded.
    row = 1
    alone = g.module.apply({"params": g.params}, jnp.asarray(ref["padded_ids"][row:row + 1][:, real[row]]))
    assert_close(np.asarray(alone)[0], ref["padded_logits"][row][real[row]], np.float32, what="row 1 unpadded")


def _cached_greedy(module, params, ids, mask, steps):
    """Greedy decoding by hand: the padded prompt in one cached call, then one token per call.

    Returns the sequences and each step's last logits ``[batch, steps, vocab]``.
    """
    call = jax.jit(lambda p, ids, cache, m: module.apply({"params": p}, ids, cache=cache, attention_mask=m))
    step = jax.jit(lambda p, ids, cache: module.apply({"params": p}, ids, cache=cache))
    logits, cache = call(params, jnp.asarray(ids), module.init_cache(ids.shape[0], ids.shape[1] + steps),
                         jnp.asarray(mask))
    seen = [logits[:, -1]]
    for _ in range(steps - 1):
        logits, cache = step(params, jnp.argmax(seen[-1], axis=-1)[:, None], cache)
        seen.append(logits[:, -1])
    seen = np.stack(seen, axis=1)
    return np.concatenate([ids, np.argmax(seen, axis=-1)], axis=1), seen


def test_padded_greedy_with_the_cache_matches_transformers(g, ref):
    out, logits = _cached_greedy(g.module, g.params, ref["padded_ids"], ref["padded_mask"], MAX_NEW_TOKENS)
    np.testing.assert_array_equal(out, ref["padded_generate"])
    # Every step's logits, not only its argmax: the positions continue per row across cached calls.
    assert_close(logits, ref["padded_step_logits"], np.float32, what="gpt2 padded cached steps")


@pytest.mark.skipif("attention_mask" not in inspect.signature(generate).parameters,
                    reason="generate() takes no attention_mask in this tree")
def test_padded_generate_matches_transformers(g, ref):
    out = generate(g.module, g.params, jnp.asarray(ref["padded_ids"]), attention_mask=ref["padded_mask"],
                   max_new_tokens=MAX_NEW_TOKENS)
    np.testing.assert_array_equal(np.asarray(out), ref["padded_generate"])


def test_labels_give_the_mean_next_token_loss(g, ref):
    ids = ref["input_ids"]
    labels = ids.copy()
    labels[:, :3] = -100
    loss = jax.jit(lambda p: g.module.apply({"params": p}, jnp.asarray(ids), labels=jnp.asarray(labels)))(g.params)
    logits = ref["logits"][:, 2:-1].astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, ids[:, 3:, None], -1)[..., 0]
    assert_close(loss, np.mean(logz - picked), np.float32, what="gpt2 loss")


def test_layer_index_scaling_is_honoured(g, ref):
    plain = GPT2LMHeadModel(dataclasses.replace(g.module.config, scale_attn_by_inverse_layer_idx=False))
    logits = plain.apply({"params": g.params}, jnp.asarray(ref["input_ids"]))
    assert max_diff(logits, ref["logits"]) > 0.1


def test_save_pretrained_round_trip(g, tmp_path):
    assert save_pretrained(tmp_path, g.module, g.params) == ["config.json", "model.safetensors"]
    written = json.loads((tmp_path / "config.json").read_text())
    with open(os.path.join(MODEL, "config.json")) as f:
        original = json.load(f)
    assert "rope_parameters" not in written and "hidden_act" not in written
    assert {"activation_function", "layer_norm_epsilon", "n_embd", "n_head", "n_inner", "n_layer", "n_positions",
            "reorder_and_upcast_attn", "scale_attn_by_inverse_layer_idx", "scale_attn_weights",
            "tie_word_embeddings", "vocab_size", "add_cross_attention"} <= set(written)
    for key in set(written) & set(original) - {"transformers_version"}:
        assert written[key] == original[key], key
    ours, theirs = st.read_folder(str(tmp_path), show_progress=False), st.read_folder(MODEL, show_progress=False)
    assert sorted(ours) == sorted(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in theirs)
    module, params = from_pretrained(tmp_path, show_progress=False)
    assert module == g.module
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, g.params))


def test_sharded_and_bare_model_checkpoints_are_read(g, tmp_path):
    files = save_pretrained(tmp_path / "sharded", g.module, g.params, max_shard_bytes=40_000)
    assert "model.safetensors.index.json" in files and len(files) > 3
    _, sharded = from_pretrained(tmp_path / "sharded", show_progress=False)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), sharded, g.params))
    # The Hub's original GPT-2 files were saved from the bare GPT2Model: no "transformer." prefix, and
    # the causal-mask buffers of older transformers ("h.<i>.attn.bias", "attn.masked_bias").
    tensors = {k.removeprefix("transformer."): v for k, v in st.read_folder(MODEL, show_progress=False).items()}
    tensors.update({"h.0.attn.bias": np.ones((1, 1, 32, 32), np.float32),
                    "h.0.attn.masked_bias": np.full((), -1e4, np.float32)})
    (tmp_path / "bare").mkdir()
    st.write_folder(str(tmp_path / "bare"), tensors)
    shutil.copy(os.path.join(MODEL, "config.json"), tmp_path / "bare")
    _, bare = from_pretrained(tmp_path / "bare", show_progress=False)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), bare, g.params))


def test_untied_head_is_stored_as_a_linear_weight(tmp_path):
    cfg = GPT2Config(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     max_position_embeddings=8, tie_word_embeddings=False, activation_function="gelu")
    module = GPT2LMHeadModel(cfg)
    params = module.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))["params"]
    save_pretrained(tmp_path, cfg, params)
    tensors = st.read_folder(str(tmp_path), show_progress=False)
    np.testing.assert_array_equal(tensors["lm_head.weight"], params["lm_head"]["kernel"].T)       # [out, in]
    np.testing.assert_array_equal(tensors["transformer.h.0.mlp.c_fc.weight"],
                                  params["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"])          # [in, out]
    again, loaded = from_pretrained(tmp_path, show_progress=False)
    assert again.config == cfg
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), loaded, params))


def test_save_peft_round_trip_writes_fan_in_fan_out(g, tmp_path):
    save_peft(tmp_path, g.params, g.adapter.lora_params, g.adapter.config, task_type="CAUSAL_LM")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ours = st.read(str(tmp_path / "adapter_model.safetensors"))
    theirs = st.read(os.path.join(ADAPTER, "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)
    again = load_peft(tmp_path)
    assert jax.tree.all(jax.tree.map(np.array_equal, again.lora_params, g.adapter.lora_params))


def test_fan_in_fan_out_is_refused_for_an_adapter_without_conv1d_layers(tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(os.path.join(ZOO, "adapters", "llama"), folder)
    assert json.loads((folder / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": True}))
    with pytest.raises(UnsupportedAdapterError, match="fan_in_fan_out is true.*model.layers.0.mlp.down_proj"):
        load_peft(folder)


def _config() -> dict:
    with open(os.path.join(MODEL, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("changes, field", [
    ({"add_cross_attention": True}, "add_cross_attention"),
    ({"activation_function": "gelu_10"}, "activation_function"),
    ({"n_head": 5}, "num_attention_heads"),
    ({"layer_norm_epsilon": 0}, "layer_norm_epsilon"),
    ({"n_inner": 0}, "intermediate_size"),
    ({"scale_attn_weights": "yes"}, "scale_attn_weights"),
])
def test_config_fields_we_do_not_compute_are_refused(changes, field):
    with pytest.raises(ConfigFieldError, match=field):
        config_from_hf({**_config(), **changes}, where="config.json")


def test_dropout_is_read_and_not_applied():
    cfg = config_from_hf({**_config(), "attn_pdrop": 0.5, "resid_pdrop": 0.5, "embd_pdrop": 0.5})
    assert cfg == config_from_hf(_config())


def test_scanned_layers_and_too_long_caches_are_refused(g):
    with pytest.raises(ValueError, match="scan_layers=True is not supported for 'gpt2'"):
        from_pretrained(MODEL, show_progress=False, scan_layers=True)
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        g.module.init_cache(1, 33)


def write_ours(folder: str):
    """Writes the model and adapter back with lora_jax, for ``make_gpt2_fixtures.py --check`` (by hand)."""
    module, params = from_pretrained(MODEL, show_progress=False)
    adapter = load_peft(ADAPTER)
    save_pretrained(os.path.join(folder, "gpt2"), module, params)
    save_peft(os.path.join(folder, "gpt2_adapter"), params, adapter.lora_params, adapter.config,
              task_type="CAUSAL_LM")


if __name__ == "__main__":   # python -m tests.test_gpt2 DIR
    import sys

    write_ours(sys.argv[1])

"""Llama, Mistral, Qwen2/3, Gemma 2/3 and Phi-3 against transformers and PEFT: logits, adapters, generation, files,
refusals.

The fixtures under tests/fixtures/zoo were written by transformers 5.24 / PEFT 0.21.2 / torch 2.13
(tests/fixtures/make_zoo_fixtures.py); these tests need none of them. Each architecture's model,
adapter and compiled functions are built once per module.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import lora_apply, quant
from lora_jax.io import load_peft, save_peft
from lora_jax.io import tensors as st
from lora_jax.io.fields import ConfigFieldError
from lora_jax.models import (DecoderConfig, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig,
                             LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Phi3Config,
                             Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                             from_pretrained, generate, save_pretrained)
from lora_jax.models.hf import config_from_hf, config_to_hf
from lora_jax.sharding import base_shardings, make_mesh
from tests.fixtures_data import Loaded, read_npz
from tests.tolerances import assert_close

ZOO = os.path.join(os.path.dirname(__file__), "fixtures", "zoo")
CLASSES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
           "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
           "gemma2": (Gemma2Config, Gemma2ForCausalLM), "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
           "phi3": (Phi3Config, Phi3ForCausalLM), "qwen2_window": (Qwen2Config, Qwen2ForCausalLM)}
ARCHS = list(CLASSES)
#: the model_type of the folders not named by theirs
MODEL_TYPE = {"qwen2_window": "qwen2"}
#: the architectures whose layers differ (sliding and full): not scanned (DecoderConfig refuses it)
MIXED_LAYERS = ("gemma2", "gemma3_text", "qwen2_window")
#: the architectures with four norms per layer (Gemma's sandwich norms)
SANDWICH_NORMS = ("gemma2", "gemma3_text")
#: the issue's bar for float32 agreement with PyTorch
MAX_ABS = 1e-5
PROMPT_LEN, MAX_NEW_TOKENS = 5, 8


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    return read_npz(os.path.join(ZOO, "reference.npz"))


@pytest.fixture(scope="module", params=ARCHS)
def zoo(request, ref) -> tuple[str, Loaded]:
    arch = request.param
    return arch, Loaded.of(os.path.join(ZOO, arch), os.path.join(ZOO, "adapters", arch), ref["input_ids"])


def assert_matches_torch(actual, expected, what: str):
    err = float(np.max(np.abs(np.asarray(actual) - expected)))
    assert err <= MAX_ABS, f"{what}: max abs logit difference {err:.3g} > {MAX_ABS}"
    assert_close(actual, expected, np.float32, what=what)


def test_folder_is_read_as_its_architecture(zoo):
    arch, z = zoo
    config_class, module_class = CLASSES[arch]
    assert type(z.module) is module_class and type(z.module.config) is config_class
    cfg, layer = z.module.config, z.params["model"]["layers_0"]
    attn = layer["self_attn"]
    windows = tuple(cfg.layer_attention(i)[0] for i in range(cfg.num_hidden_layers))
    expected = {"llama": (8, ["k_proj", "o_proj", "q_proj", "v_proj"], True, True, (None, None)),
                "mistral": (8, ["k_proj", "o_proj", "q_proj", "v_proj"], False, False, (4, 4)),
                "qwen2": (8, ["k_proj", "o_proj", "q_proj", "v_proj"], True, False, (None, None)),
                "qwen3": (16, ["k_norm", "k_proj", "o_proj", "q_norm", "q_proj", "v_proj"], True, True, (None, None)),
                "gemma2": (16, ["k_proj", "o_proj", "q_proj", "v_proj"], False, False, (4, None)),
                "gemma3_text": (16, ["k_norm", "k_proj", "o_proj", "q_norm", "q_proj", "v_proj"], False, False,
                                (4, None)),
                "phi3": (8, ["o_proj", "qkv_proj"], False, False, (5, 5)),
                "qwen2_window": (8, ["k_proj", "o_proj", "q_proj", "v_proj"], True, False, (None, 4, 4))}[arch]
    first = attn["qkv_proj" if "qkv_proj" in attn else "q_proj"]
    assert (cfg.head_dim, sorted(attn), "bias" in first, "bias" in attn["o_proj"], windows) == expected
    assert sorted(layer["mlp"]) == (["down_proj", "gate_up_proj"] if arch == "phi3"
                                    else ["down_proj", "gate_proj", "up_proj"])
    norms = sorted(k for k in layer if k.endswith("layernorm"))
    assert norms == (["input_layernorm", "post_attention_layernorm", "post_feedforward_layernorm",
                      "pre_feedforward_layernorm"] if arch in SANDWICH_NORMS
                     else ["input_layernorm", "post_attention_layernorm"])
    # the tied Qwen2 and Gemma have no head of their own
    assert ("lm_head" in z.params) == (arch not in ("qwen2", "gemma2", "gemma3_text"))


def test_logits_match_transformers(zoo, ref):
    arch, z = zoo
    assert_matches_torch(z.logits, ref[f"{arch}/logits"], f"{arch} base")


def test_adapter_matches_peft_unmerged_and_merged(zoo, ref):
    arch, z = zoo
    assert float(np.max(np.abs(ref[f"{arch}/unmerged"] - ref[f"{arch}/logits"]))) > 0.5   # the adapter matters
    assert_matches_torch(z.unmerged, ref[f"{arch}/unmerged"], f"{arch} unmerged")
    assert_matches_torch(z.merged_logits, ref[f"{arch}/merged"], f"{arch} merged")
    assert_close(z.merged_logits, z.unmerged, np.float32, what=f"{arch}: our merged vs our unmerged")


def test_greedy_generation_matches_transformers(zoo, ref):
    arch, z = zoo
    prompt = jnp.asarray(ref["input_ids"][:, :PROMPT_LEN])
    base = generate(z.module, z.params, prompt, max_new_tokens=MAX_NEW_TOKENS)
    np.testing.assert_array_equal(np.asarray(base), ref[f"{arch}/generate"])
    with_adapter = generate(z.module, z.merged, prompt, max_new_tokens=MAX_NEW_TOKENS)
    np.testing.assert_array_equal(np.asarray(with_adapter), ref[f"{arch}/adapter_generate"])


def test_scanned_fused_and_rematerialised_variant_agrees(zoo, ref):
    arch, z = zoo
    scan = arch not in MIXED_LAYERS
    if not scan:
        with pytest.raises(ConfigFieldError, match="scan_layers needs every layer alike"):
            from_pretrained(os.path.join(ZOO, arch), show_progress=False, scan_layers=True)
    module, params = from_pretrained(os.path.join(ZOO, arch), show_progress=False, scan_layers=scan, remat=True)
    module = type(module)(dataclasses.replace(module.config, fused_projections=True))
    ids = jnp.asarray(ref["input_ids"])
    assert_matches_torch(jax.jit(module.apply)({"params": params}, ids), ref[f"{arch}/logits"], f"{arch} scanned")
    loss = jax.jit(lambda p: module.apply({"params": p}, ids, labels=ids))(params)
    logits = ref[f"{arch}/logits"][:, :-1].astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, ref["input_ids"][:, 1:, None], -1)[..., 0]
    assert_close(loss, np.mean(logz - picked), np.float32, what=f"{arch} chunked loss")


def test_save_pretrained_round_trip(zoo, ref, tmp_path):
    arch, z = zoo
    files = save_pretrained(tmp_path, z.module, z.params)
    assert files == ["config.json", "model.safetensors"]
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    with open(os.path.join(ZOO, arch, "config.json")) as f:
        original = json.load(f)
    assert written["model_type"] == MODEL_TYPE.get(arch, arch) and written["architectures"] == original["architectures"]
    for key in set(written) & set(original) - {"transformers_version", "max_window_layers"}:
        assert written[key] == original[key], key
    assert set(st.read_folder(str(tmp_path), show_progress=False)) == \
        set(st.read_folder(os.path.join(ZOO, arch), show_progress=False))
    module, params = from_pretrained(tmp_path, show_progress=False)
    assert module == z.module
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, z.params))


def test_save_peft_round_trip_writes_peft_keys(zoo, tmp_path):
    arch, z = zoo
    save_peft(tmp_path, z.params, z.adapter.lora_params, z.adapter.config, task_type="CAUSAL_LM")
    ours = st.read(str(tmp_path / "adapter_model.safetensors"))
    theirs = st.read(os.path.join(ZOO, "adapters", arch, "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)                       # PEFT's own key set: none missing or extra
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)
    again = load_peft(tmp_path)
    assert again.config.scaling("model/layers_0/self_attn/q_proj") == 2.0
    assert jax.tree.all(jax.tree.map(np.array_equal, again.lora_params, z.adapter.lora_params))


def test_mistral_window_changes_the_logits(ref):
    module, params = from_pretrained(os.path.join(ZOO, "mistral"), show_progress=False)
    full = MistralForCausalLM(dataclasses.replace(module.config, sliding_window=None))
    logits = np.asarray(jax.jit(full.apply)({"params": params}, jnp.asarray(ref["input_ids"])))
    window = module.config.sliding_window
    # Positions within the window see the same keys either way; later ones do not.
    assert_close(logits[:, :window], ref["mistral/logits"][:, :window], np.float32, what="inside the window")
    assert float(np.max(np.abs(logits[:, window:] - ref["mistral/logits"][:, window:]))) > 0.1


@pytest.mark.parametrize("arch", ["gemma2", "phi3"])
def test_quantization_and_sharding_rules_cover_the_new_layers(arch, ref):
    """QLoRA and the tensor-parallel rules need no special case for Gemma's norms or Phi-3's fused modules."""
    module, params = from_pretrained(os.path.join(ZOO, arch), show_progress=False)
    adapter = load_peft(os.path.join(ZOO, "adapters", arch))
    ids = jnp.asarray(ref["input_ids"])
    qbase = quant.quantize_base(module, params, ids, method="int8")
    quantized = sorted(jax.tree_util.keystr(path, simple=True, separator="/")
                       for path, leaf in jax.tree_util.tree_leaves_with_path(qbase, is_leaf=quant.is_quantized)
                       if quant.is_quantized(leaf))
    projections = (["mlp/down_proj", "mlp/gate_up_proj", "self_attn/o_proj", "self_attn/qkv_proj"] if arch == "phi3"
                   else ["mlp/down_proj", "mlp/gate_proj", "mlp/up_proj", "self_attn/k_proj", "self_attn/o_proj",
                         "self_attn/q_proj", "self_attn/v_proj"])
    assert quantized == [f"model/layers_{i}/{p}/kernel" for i in range(2) for p in projections]
    apply = jax.jit(lora_apply(module, adapter.config))
    assert_close(apply(qbase, adapter.lora_params, ids), apply(quant.dequantize_tree(qbase), adapter.lora_params, ids),
                 np.float32, what=f"{arch}: quantized base vs its dequantized tree")
    specs = jax.tree.map(lambda sh: tuple(sh.spec), base_shardings(params, make_mesh((1, 1)), "tp"))
    layer = specs["model"]["layers_0"]
    column, row = (layer["self_attn"]["qkv_proj" if arch == "phi3" else "q_proj"]["kernel"],
                   layer["self_attn"]["o_proj"]["kernel"])
    assert (column, row) == ((None, "model"), ("model", None))
    assert layer["mlp"]["gate_up_proj" if arch == "phi3" else "up_proj"]["kernel"] == (None, "model")


def _config(arch: str) -> dict:
    with open(os.path.join(ZOO, arch, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("arch, changes, field", [
    ("qwen2", {"use_sliding_window": "yes"}, "use_sliding_window"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 4, "layer_types": ["full", "sliding"]},
     "layer_types"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "layer_types": None, "max_window_layers": -1},
     "max_window_layers"),
    ("mistral", {"sliding_window": 0}, "sliding_window"),
    ("mistral", {"sliding_window": 2.5}, "sliding_window"),
    ("llama", {"hidden_act": "relu"}, "hidden_act"),
    ("qwen3", {"attention_dropout": 0.1}, "attention_dropout"),
    ("mistral", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope type 'yarn'"),
    ("qwen3", {"head_dim": 0}, "head_dim"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0,
                                   "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma2", {"hidden_activation": "silu"}, "hidden_activation"),
    ("gemma2", {"layer_types": ["sliding_attention", "chunked_attention"]}, "layer_types"),
    ("gemma2", {"layer_types": ["sliding_attention"]}, "layer_types"),
    ("gemma2", {"query_pre_attn_scalar": 0}, "query_pre_attn_scalar"),
    ("gemma2", {"attn_logit_softcapping": "50"}, "attn_logit_softcapping"),
    ("gemma2", {"sliding_window": 0}, "sliding_window"),
    ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     "full_attention rope.*rope type 'yarn'"),
    ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6,
                                                            "partial_rotary_factor": 0.5}}}, "partial_rotary_factor"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4,
                                  "long_factor": [2.0] * 4}}, "rope type 'longrope'"),
    ("phi3", {"resid_pdrop": 0.1}, "resid_pdrop"),
    ("phi3", {"embd_pdrop": 0.1}, "embd_pdrop"),
    ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.1}},
     "partial_rotary_factor"),
    ("llama", {"model_type": "gemma"}, "model_type 'gemma' is not supported"),
    ("llama", {"model_type": "gemma3"}, "model_type 'gemma3' is not supported"),
])
def test_fields_we_do_not_compute_are_refused_by_name(arch, changes, field):
    hf = {**_config(arch), **changes}
    with pytest.raises(ConfigFieldError, match=field):
        config_from_hf(hf, where="config.json")


def test_config_defaults_are_transformers_defaults():
    hf = {k: v for k, v in _config("mistral").items() if k not in ("sliding_window", "num_key_value_heads")}
    cfg = config_from_hf({**hf, "num_attention_heads": 16})
    assert (cfg.sliding_window, cfg.num_key_value_heads) == (4096, 8)     # MistralConfig's defaults
    assert config_from_hf({**_config("mistral"), "sliding_window": None}).sliding_window is None
    hf = {k: v for k, v in _config("qwen3").items() if k != "head_dim"}
    assert config_from_hf(hf).head_dim == 128
    qwen2 = config_from_hf({**_config("qwen2"), "sliding_window": 4, "use_sliding_window": False})
    assert qwen2.sliding_window is None and (qwen2.attention_bias, qwen2.o_proj_bias) == (True, False)
    # Qwen's sliding layers: from max_window_layers (default 28) on, unless layer_types names them.
    hf = {k: v for k, v in _config("qwen2").items() if k not in ("layer_types", "sliding_window")}
    windowed = config_from_hf({**hf, "use_sliding_window": True, "max_window_layers": 1})
    assert (windowed.sliding_window, windowed.layer_types) == (4096, ("full_attention", "sliding_attention"))
    assert config_from_hf({**hf, "use_sliding_window": True}).layer_types == ("full_attention",) * 2
    # as in transformers, a null window leaves every layer full, whatever layer_types says
    assert not config_from_hf({**hf, "use_sliding_window": True, "sliding_window": None, "max_window_layers": 0,
                               "layer_types": ["sliding_attention"] * 2}).is_sliding(1)
    # Gemma: transformers' defaults for what a config.json may omit (caps, scalar, window, alternation).
    hf = {k: v for k, v in _config("gemma2").items() if k not in (
        "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "sliding_window", "layer_types",
        "hidden_activation")}
    gemma2 = config_from_hf(hf)
    assert (gemma2.attn_logit_softcapping, gemma2.final_logit_softcapping, gemma2.query_pre_attn_scalar,
            gemma2.sliding_window, gemma2.layer_types, gemma2.hidden_act) == (
        50.0, 30.0, 256.0, 4096, ("sliding_attention", "full_attention"), "gelu_pytorch_tanh")
    hf = {k: v for k, v in _config("gemma3_text").items() if k not in ("rope_parameters", "layer_types")}
    gemma3 = config_from_hf({**hf, "num_hidden_layers": 7, "sliding_window_pattern": 3})
    assert gemma3.layer_types == ("sliding_attention", "sliding_attention", "full_attention") * 2 + (
        "sliding_attention",)
    assert [gemma3.layer_attention(i)[1] for i in (0, 2)] == [1e4, 1e6]     # transformers' local and global bases
    # transformers 4's keys: rope_theta and rope_scaling (full layers), rope_local_base_freq (sliding layers)
    legacy = config_from_hf({**hf, "rope_theta": 5e5, "rope_local_base_freq": 50.0,
                             "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert (legacy.rope_theta, legacy.rope_scaling.factor, legacy.sliding_rope_theta,
            legacy.sliding_rope_scaling.rope_type) == (5e5, 8.0, 50.0, "default")
    hf = {k: v for k, v in _config("phi3").items() if k not in ("rms_norm_eps", "sliding_window")}
    phi3 = config_from_hf(hf)
    assert (phi3.rms_norm_eps, phi3.sliding_window, phi3.fused_modules) == (1e-5, None, True)
    partial = config_from_hf({**hf, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                        "partial_rotary_factor": 0.5}})
    assert (partial.partial_rotary_factor, partial.rotary_dim) == (0.5, 4)


@pytest.mark.parametrize("config, field", [
    (LlamaConfig(qk_norm=True), "qk_norm"),
    (LlamaConfig(sliding_window=8), "sliding_window"),
    (LlamaConfig(attention_bias=True, attention_output_bias=False), "attention_output_bias"),
    (MistralConfig(attention_bias=True), "attention_bias"),
    (Qwen2Config(attention_output_bias=True), "attention_output_bias"),
    (Qwen3Config(mlp_bias=True), "mlp_bias"),
    (LlamaConfig(sandwich_norms=True), "sandwich_norms"),
    (MistralConfig(final_logit_softcapping=30.0), "final_logit_softcapping"),
    (Qwen3Config(fused_modules=True), "fused_modules"),
    (Gemma2Config(qk_norm=True), "qk_norm"),
    (Gemma3TextConfig(scale_embeddings=False), "scale_embeddings"),
    (Phi3Config(fused_modules=False), "fused_modules"),
    (Phi3Config(attention_bias=True), "attention_bias"),
    (DecoderConfig(), "DecoderConfig names no Hugging Face architecture"),
])
def test_configs_an_architecture_cannot_express_are_not_written(config, field):
    with pytest.raises(ValueError, match=field):
        config_to_hf(config)


def write_ours(folder: str):
    """Writes every zoo model and adapter back with lora_jax, for ``make_zoo_fixtures.py --check`` (by hand)."""
    for arch in ARCHS:
        module, params = from_pretrained(os.path.join(ZOO, arch), show_progress=False)
        adapter = load_peft(os.path.join(ZOO, "adapters", arch))
        # The token ids are not the model's math, so its config does not hold them; they are carried over as a
        # user does (lora-jax merge carries every key): else transformers fills in the architecture's defaults.
        ids = {k: v for k, v in _config(arch).items() if k.endswith("_token_id")}
        save_pretrained(os.path.join(folder, arch), module, params, extra_config=ids)
        save_peft(os.path.join(folder, "adapters", arch), params, adapter.lora_params, adapter.config,
                  task_type="CAUSAL_LM")


if __name__ == "__main__":   # python -m tests.test_hf_zoo DIR
    import sys

    write_ours(sys.argv[1])

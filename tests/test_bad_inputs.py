"""Damaged inputs to the loaders: each is refused with a clear error naming the file and the field or tensor.

Every case copies a small committed fixture into ``tmp_path``, damages one
thing (a tensor's values or dtype, the safetensors bytes, one config field, a
shard index entry), loads it, and checks the exact exception type and that the
message names what is wrong. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct

import numpy as np
import pytest

from lora_jax.io import tensors as st
from lora_jax.io.fields import ConfigFieldError
from lora_jax.io.peft import TargetMismatchError, load_peft
from lora_jax.io.tensors import BadTensorError, SafetensorsFileError
from lora_jax.models.hf import from_pretrained

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
ADAPTER_FILE, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
Q0_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
V1_B = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
Q0_W = "model.layers.0.self_attn.q_proj.weight"
EMBED = "model.embed_tokens.weight"
INDEX = "model.safetensors.index.json"


# --- builders: copy a fixture, damage one thing ---------------------------------------------------------------------

def _copy(tmp_path, fixture: str) -> str:
    folder = str(tmp_path / "damaged")
    shutil.copytree(os.path.join(FIXTURES, fixture), folder)
    return folder


def _edit_json(path: str, edit):
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def _set(key, value):
    """An edit setting ``key`` (a ``/``-separated path into nested objects) to ``value``."""
    def edit(data):
        *parents, last = key.split("/")
        for parent in parents:
            data = data[parent]
        data[last] = value
    return edit


def _delete(key):
    return lambda data: data.pop(key)


def _edit_tensors(path: str, edit):
    tensors = st.read(path)
    edit(tensors)
    st.write(path, tensors)


def _poison(name, value):
    """A tensor edit writing ``value`` into the first element of ``name``."""
    def edit(tensors):
        array = tensors[name].copy()
        array.flat[0] = value
        tensors[name] = array
    return edit


def _retype(name, dtype):
    def edit(tensors):
        tensors[name] = tensors[name].astype(dtype)
    return edit


def _edit_bytes(path: str, edit):
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(edit(raw))


def _relabel(old: bytes, new: bytes):
    """A byte edit renaming dtypes in the header only (the data keeps its float bytes)."""
    def edit(raw):
        (n,) = struct.unpack("<Q", raw[:8])
        return raw[:8] + raw[8:8 + n].replace(b'"' + old + b'"', b'"' + new + b'"') + raw[8 + n:]
    return edit


def adapter(fixture="plain", *, config=None, tensors=None, raw=None, config_text=None):
    """A case loading a damaged copy of ``tests/fixtures/adapters/<fixture>`` with ``load_peft``."""
    def build(tmp_path):
        folder = _copy(tmp_path, os.path.join("adapters", fixture))
        if config is not None:
            _edit_json(os.path.join(folder, ADAPTER_CONFIG), config)
        if config_text is not None:
            with open(os.path.join(folder, ADAPTER_CONFIG), "w") as f:
                f.write(config_text)
        if tensors is not None:
            _edit_tensors(os.path.join(folder, ADAPTER_FILE), tensors)
        if raw is not None:
            _edit_bytes(os.path.join(folder, ADAPTER_FILE), raw)
        return lambda: load_peft(folder)
    return build


def model(fixture="llama_tiny", *, config=None, tensors=None, raw=None, file="model.safetensors", text=None):
    """A case loading a damaged copy of ``tests/fixtures/<fixture>`` with ``from_pretrained``.

    ``tensors``/``raw`` edit ``file``; ``text`` replaces ``file``'s content.
    """
    def build(tmp_path):
        folder = _copy(tmp_path, fixture)
        if config is not None:
            _edit_json(os.path.join(folder, "config.json" if file.endswith(".safetensors") else file), config)
        if tensors is not None:
            _edit_tensors(os.path.join(folder, file), tensors)
        if raw is not None:
            _edit_bytes(os.path.join(folder, file), raw)
        if text is not None:
            with open(os.path.join(folder, file), "w") as f:
                f.write(text)
        return lambda: from_pretrained(folder, show_progress=False)
    return build


def _duplicate_into_shard(shard: str, name: str, source: str):
    """A tensor edit for a sharded folder: copies tensor ``name`` from ``source`` into ``shard`` too."""
    def build(tmp_path):
        folder = _copy(tmp_path, "llama_tiny_sharded")
        extra = st.read(os.path.join(folder, source))[name]
        _edit_tensors(os.path.join(folder, shard), lambda t: t.__setitem__(name, extra))
        return lambda: from_pretrained(folder, show_progress=False)
    return build


SHARD1, SHARD2 = "model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors"
NESTED = "[" * 100_000 + "]" * 100_000
PLAIN_CONFIG = open(os.path.join(FIXTURES, "adapters", "plain", ADAPTER_CONFIG)).read()

# (id, build, exception type, strings the message must contain)
CASES = [
    # 1. non-finite and non-float tensors
    ("adapter-nan", adapter(tensors=_poison(Q0_A, np.nan)), BadTensorError, [ADAPTER_FILE, Q0_A, "NaN"]),
    ("adapter-inf", adapter(tensors=_poison(V1_B, np.inf)), BadTensorError, [ADAPTER_FILE, V1_B, "Inf"]),
    ("adapter-neg-inf", adapter(tensors=_poison(Q0_A, -np.inf)), BadTensorError, [ADAPTER_FILE, Q0_A, "Inf"]),
    ("adapter-int8", adapter(tensors=_retype(Q0_A, np.int8)), BadTensorError, [ADAPTER_FILE, Q0_A, "int8"]),
    ("adapter-bool", adapter(tensors=_retype(V1_B, np.bool_)), BadTensorError, [ADAPTER_FILE, V1_B, "bool"]),
    ("adapter-header-F32-as-I32", adapter(raw=_relabel(b"F32", b"I32")), BadTensorError,
     [ADAPTER_FILE, "base_model.model.", "int32"]),
    ("adapter-dora-magnitude-nan",
     adapter("dora", tensors=_poison("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
                                     np.nan)),
     BadTensorError, [ADAPTER_FILE, "lora_magnitude_vector", "NaN"]),
    ("model-nan", model(tensors=_poison(Q0_W, np.nan)), BadTensorError, ["model.safetensors", Q0_W, "NaN"]),
    ("model-inf", model(tensors=_poison(EMBED, np.inf)), BadTensorError, ["model.safetensors", EMBED, "Inf"]),
    ("model-int8", model(tensors=_retype(EMBED, np.int8)), BadTensorError, ["model.safetensors", EMBED, "int8"]),
    ("model-bool", model(tensors=_retype(Q0_W, np.bool_)), BadTensorError, ["model.safetensors", Q0_W, "bool"]),
    ("model-int64", model(tensors=_retype(Q0_W, np.int64)), BadTensorError, ["model.safetensors", Q0_W, "int64"]),
    ("model-header-F32-as-I32", model(raw=_relabel(b"F32", b"I32")), BadTensorError,
     ["model.safetensors", "model.", "int32"]),
    ("shard-nan", model("llama_tiny_sharded", file=SHARD1, tensors=_poison(EMBED, np.nan)), BadTensorError,
     [SHARD1, EMBED, "NaN"]),
    ("shard-int8", model("llama_tiny_sharded", file=SHARD2, tensors=_retype("model.layers.0.mlp.up_proj.weight",
                                                                            np.int8)),
     BadTensorError, [SHARD2, "model.layers.0.mlp.up_proj.weight", "int8"]),
    # 6. damaged safetensors bytes
    ("adapter-truncated", adapter(raw=lambda b: b[:-7]), SafetensorsFileError, [ADAPTER_FILE, "safetensors"]),
    ("adapter-empty", adapter(raw=lambda b: b""), SafetensorsFileError, [ADAPTER_FILE, "header"]),
    ("adapter-garbage", adapter(raw=lambda b: b"not a safetensors file at all"), SafetensorsFileError,
     [ADAPTER_FILE]),
    ("adapter-header-F32-as-F16", adapter(raw=_relabel(b"F32", b"F16")), SafetensorsFileError, [ADAPTER_FILE]),
    ("adapter-header-unknown-dtype", adapter(raw=_relabel(b"F32", b"X32")), SafetensorsFileError,
     [ADAPTER_FILE, "X32"]),
    ("adapter-header-length-huge", adapter(raw=lambda b: struct.pack("<Q", 2**40) + b[8:]), SafetensorsFileError,
     [ADAPTER_FILE, "header"]),
    ("model-truncated", model(raw=lambda b: b[: len(b) // 2]), SafetensorsFileError, ["model.safetensors"]),
    ("shard-truncated", model("llama_tiny_sharded", file=SHARD2, raw=lambda b: b[:-1]), SafetensorsFileError,
     [SHARD2]),
    # 3. adapter_config.json fields
    ("r-float", adapter(config=_set("r", 4.9)), ConfigFieldError, [ADAPTER_CONFIG, "'r'", "4.9"]),
    ("r-bool", adapter(config=_set("r", True)), ConfigFieldError, [ADAPTER_CONFIG, "'r'", "True"]),
    ("r-zero", adapter(config=_set("r", 0)), ConfigFieldError, [ADAPTER_CONFIG, "'r'", "0"]),
    ("r-string", adapter(config=_set("r", "4")), ConfigFieldError, [ADAPTER_CONFIG, "'r'", "'4'"]),
    ("alpha-bool", adapter(config=_set("lora_alpha", True)), ConfigFieldError,
     [ADAPTER_CONFIG, "'lora_alpha'", "True"]),
    ("alpha-negative", adapter(config=_set("lora_alpha", -8)), ConfigFieldError,
     [ADAPTER_CONFIG, "'lora_alpha'", "-8"]),
    ("alpha-overflow", adapter(config=_set("lora_alpha", 1e300)), ConfigFieldError,
     [ADAPTER_CONFIG, "'lora_alpha'", "1e+300"]),
    ("alpha-nan", adapter(config=_set("lora_alpha", float("nan"))), ConfigFieldError,
     [ADAPTER_CONFIG, "'lora_alpha'", "nan"]),
    ("rslora-string", adapter(config=_set("use_rslora", "false")), ConfigFieldError,
     [ADAPTER_CONFIG, "'use_rslora'", "'false'"]),
    ("dora-int", adapter(config=_set("use_dora", 1)), ConfigFieldError, [ADAPTER_CONFIG, "'use_dora'", "1"]),
    ("dropout-above-one", adapter(config=_set("lora_dropout", 1.5)), ConfigFieldError,
     [ADAPTER_CONFIG, "'lora_dropout'", "1.5"]),
    ("init-number", adapter(config=_set("init_lora_weights", 3)), ConfigFieldError,
     [ADAPTER_CONFIG, "'init_lora_weights'", "3"]),
    ("config-is-list", adapter(config_text="[1, 2, 3]"), ConfigFieldError, [ADAPTER_CONFIG, "list"]),
    ("config-nested-deeply", adapter(config_text=NESTED), ConfigFieldError, [ADAPTER_CONFIG, "nested"]),
    ("config-not-json", adapter(config_text="{'r': 4}"), ConfigFieldError, [ADAPTER_CONFIG, "not valid JSON"]),
    ("config-duplicate-key", adapter(config_text=PLAIN_CONFIG.replace('"r": 4,', '"r": 4, "r": 8,')),
     ConfigFieldError, [ADAPTER_CONFIG, "'r'", "twice"]),
    ("rank-pattern-bad-regex", adapter(config=_set("rank_pattern", {"q_proj(": 2})), ConfigFieldError,
     [ADAPTER_CONFIG, "rank_pattern", "q_proj("]),
    ("rank-pattern-float", adapter(config=_set("rank_pattern", {"q_proj": 2.5})), ConfigFieldError,
     [ADAPTER_CONFIG, "rank_pattern", "2.5"]),
    ("rank-pattern-list", adapter(config=_set("rank_pattern", [["q_proj", 2]])), ConfigFieldError,
     [ADAPTER_CONFIG, "rank_pattern"]),
    ("alpha-pattern-string", adapter(config=_set("alpha_pattern", {"v_proj": "16"})), ConfigFieldError,
     [ADAPTER_CONFIG, "alpha_pattern", "'16'"]),
    ("target-modules-number", adapter(config=_set("target_modules", 5)), ConfigFieldError,
     [ADAPTER_CONFIG, "'target_modules'", "5"]),
    ("target-modules-bad-regex", adapter(config=_set("target_modules", ".*(q_proj")), ConfigFieldError,
     [ADAPTER_CONFIG, "'target_modules'", ".*(q_proj"]),
    ("layers-to-transform-string", adapter(config=_set("layers_to_transform", "0")), ConfigFieldError,
     [ADAPTER_CONFIG, "'layers_to_transform'", "'0'"]),
    # 4. target_modules against the file's tensors
    ("target-without-tensors", adapter(config=_set("target_modules", ["q_proj", "v_proj", "k_proj"])),
     TargetMismatchError, [ADAPTER_CONFIG, "k_proj", "match no module"]),
    ("tensors-not-targeted", adapter(config=_set("target_modules", ["q_proj"])), TargetMismatchError,
     [ADAPTER_CONFIG, "model.layers.0.self_attn.v_proj", "['q_proj']"]),
    ("tensors-not-targeted-regex", adapter(config=_set("target_modules", r".*\.q_proj")), TargetMismatchError,
     [ADAPTER_CONFIG, "model.layers.0.self_attn.v_proj", r".*\\.q_proj"]),
    ("tensors-excluded", adapter(config=_set("exclude_modules", ["v_proj"])), TargetMismatchError,
     [ADAPTER_CONFIG, "exclude_modules", "v_proj"]),
    ("tensors-outside-layers-to-transform", adapter(config=_set("layers_to_transform", [0])), TargetMismatchError,
     [ADAPTER_CONFIG, "layers_to_transform", "model.layers.1."]),
    ("embedding-under-all-linear", adapter("embedding", config=_set("target_modules", "all-linear")),
     TargetMismatchError, [ADAPTER_CONFIG, "all-linear", "embed_tokens"]),
    ("partial-name-is-no-suffix", adapter(config=_set("target_modules", ["_proj"])), TargetMismatchError,
     [ADAPTER_CONFIG, "['_proj']"]),
    # 3. config.json fields of a model
    ("kv-heads-zero", model(config=_set("num_key_value_heads", 0)), ConfigFieldError,
     ["config.json", "num_key_value_heads", "0"]),
    ("kv-heads-not-dividing", model(config=_set("num_key_value_heads", 3)), ConfigFieldError,
     ["config.json", "num_key_value_heads", "3"]),
    ("hidden-negative", model(config=_set("hidden_size", -64)), ConfigFieldError,
     ["config.json", "hidden_size", "-64"]),
    ("heads-not-dividing-hidden", model(config=lambda d: (d.pop("head_dim"), d.update(num_attention_heads=5))),
     ConfigFieldError, ["config.json", "hidden_size", "num_attention_heads (5)"]),
    ("vocab-zero", model(config=_set("vocab_size", 0)), ConfigFieldError, ["config.json", "vocab_size", "0"]),
    ("layers-float", model(config=_set("num_hidden_layers", 2.0)), ConfigFieldError,
     ["config.json", "num_hidden_layers", "2.0"]),
    ("heads-bool", model(config=_set("num_attention_heads", True)), ConfigFieldError,
     ["config.json", "num_attention_heads", "True"]),
    ("max-positions-string", model(config=_set("max_position_embeddings", "128")), ConfigFieldError,
     ["config.json", "max_position_embeddings", "'128'"]),
    ("eps-negative", model(config=_set("rms_norm_eps", -1e-6)), ConfigFieldError,
     ["config.json", "rms_norm_eps", "-1e-06"]),
    ("eps-zero", model(config=_set("rms_norm_eps", 0.0)), ConfigFieldError, ["config.json", "rms_norm_eps", "0.0"]),
    ("rope-theta-zero", model(config=_set("rope_parameters/rope_theta", 0)), ConfigFieldError,
     ["config.json", "rope_theta", "0"]),
    ("rope-theta-inf", model(config=_set("rope_parameters/rope_theta", float("inf"))), ConfigFieldError,
     ["config.json", "rope_theta", "inf"]),
    ("rope-factor-negative", model(config=_set("rope_parameters", {"rope_type": "linear", "factor": -2.0})),
     ConfigFieldError, ["config.json", "factor", "-2.0"]),
    ("rope-llama3-equal-freq-factors", model("llama_tiny_tied", config=_set("rope_parameters/high_freq_factor", 1.0)),
     ConfigFieldError, ["config.json", "high_freq_factor", "low_freq_factor"]),
    ("rope-parameters-list", model(config=_set("rope_parameters", [10000.0])), ConfigFieldError,
     ["config.json", "rope_parameters"]),
    ("tie-string", model(config=_set("tie_word_embeddings", "false")), ConfigFieldError,
     ["config.json", "tie_word_embeddings", "'false'"]),
    ("dtype-int8", model(config=_set("dtype", "int8")), ConfigFieldError, ["config.json", "dtype", "'int8'"]),
    ("model-config-list", model(file="config.json", text="[]"), ConfigFieldError, ["config.json", "list"]),
    ("model-config-nested-deeply", model(file="config.json", text=NESTED), ConfigFieldError,
     ["config.json", "nested"]),
    # 5. sharded checkpoints
    ("index-parent-path", model("llama_tiny_sharded", file=INDEX, config=_set(f"weight_map/{EMBED}",
                                                                             "../../x.safetensors")),
     SafetensorsFileError, [INDEX, EMBED, "../../x.safetensors", "outside"]),
    ("index-absolute-path", model("llama_tiny_sharded", file=INDEX, config=_set(f"weight_map/{EMBED}",
                                                                               "/etc/x.safetensors")),
     SafetensorsFileError, [INDEX, EMBED, "/etc/x.safetensors", "outside"]),
    ("index-nested-parent-path", model("llama_tiny_sharded", file=INDEX,
                                       config=_set(f"weight_map/{EMBED}", f"sub/../../{SHARD1}")),
     SafetensorsFileError, [INDEX, EMBED, "outside"]),
    ("index-not-safetensors", model("llama_tiny_sharded", file=INDEX, config=_set(f"weight_map/{EMBED}",
                                                                                 "pytorch_model.bin")),
     SafetensorsFileError, [INDEX, EMBED, "pytorch_model.bin"]),
    ("index-no-weight-map", model("llama_tiny_sharded", file=INDEX, config=_delete("weight_map")),
     SafetensorsFileError, [INDEX, "weight_map"]),
    ("index-missing-shard", model("llama_tiny_sharded", file=INDEX, config=_set(f"weight_map/{EMBED}",
                                                                               "model-gone.safetensors")),
     FileNotFoundError, ["model-gone.safetensors"]),
    ("tensor-in-two-shards", _duplicate_into_shard(SHARD2, EMBED, SHARD1), SafetensorsFileError,
     [INDEX, EMBED, SHARD1, SHARD2]),
    ("index-duplicate-entry", model("llama_tiny_sharded", file=INDEX, text=json.dumps(
        {"weight_map": {EMBED: SHARD1}}).replace("{" + f'"{EMBED}"', "{" + f'"{EMBED}": "{SHARD2}", "{EMBED}"')),
     ConfigFieldError, [INDEX, EMBED, "twice"]),
    ("index-not-json", model("llama_tiny_sharded", file=INDEX, text="{"), ConfigFieldError, [INDEX, "JSON"]),
]


@pytest.mark.parametrize("build, error, needles", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_damaged_input_is_refused(tmp_path, build, error, needles):
    load = build(tmp_path)
    with pytest.raises(Exception) as info:
        load()
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_table_covers_each_item():
    assert len(CASES) == len({case[0] for case in CASES}) >= 70


def test_check_finite_false_loads_non_finite_values(tmp_path):
    load = adapter(tensors=_poison(Q0_A, np.nan))(tmp_path / "a")
    folder = str(tmp_path / "a" / "damaged")
    loaded = load_peft(folder, check_finite=False)
    a = loaded.lora_params["model"]["layers_0"]["self_attn"]["q_proj"]["a"]
    assert np.isnan(a).sum() == 1
    with pytest.raises(BadTensorError, match=re.escape(Q0_A)):
        load()


def test_check_finite_false_still_refuses_integers(tmp_path):
    adapter(tensors=_retype(Q0_A, np.int8))(tmp_path)
    with pytest.raises(BadTensorError, match="int8"):
        load_peft(str(tmp_path / "damaged"), check_finite=False)


def test_from_pretrained_check_finite_false(tmp_path):
    model(tensors=_poison(Q0_W, np.inf))(tmp_path)
    _, params = from_pretrained(str(tmp_path / "damaged"), show_progress=False, check_finite=False)
    kernel = np.asarray(params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"])
    assert np.isinf(kernel).sum() == 1


@pytest.mark.parametrize("fixture", sorted(os.listdir(os.path.join(FIXTURES, "adapters"))))
def test_committed_adapters_still_load(fixture):
    folder = os.path.join(FIXTURES, "adapters", fixture)
    name = None if os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)) else os.listdir(folder)[0]
    assert load_peft(folder, adapter_name=name).lora_params

"""The ``lora-jax`` commands on every architecture: train, merge, generate and inspect on the zoo folders.

Each folder of ``tests/fixtures/zoo`` (written by transformers) gets a
``tokenizer.json`` (a word-level tokenizer over its 96 ids, built here with the
``tokenizers`` library). What is checked per architecture: the adapter trains
and is written in PEFT's format for that architecture's modules, the merged
folder keeps the base's ``config.json`` and holds exactly ``merge(base,
adapter)``, ``generate`` decodes words of the vocabulary, and ``inspect``
names every adapted module.
"""

from __future__ import annotations

import json
import pathlib
import random
import shutil

import numpy as np
import pytest

from lora_jax import lora_apply, merge
from lora_jax.app.cli_args import MODEL_TYPES
from lora_jax.io import load_peft
from lora_jax.models import from_pretrained, generate
from tests.test_cli import run

ZOO = pathlib.Path(__file__).with_name("fixtures") / "zoo"
VOCAB = 96
WORDS = [f"w{i}" for i in range(VOCAB - 1)]     # id 95 is [UNK]
SHAPE = ["--seq-len", "12", "--batch-size", "2"]


def _tokenizer(path: pathlib.Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({**{w: i for i, w in enumerate(WORDS)}, "[UNK]": VOCAB - 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()      # joins the words with spaces
    tok.save(str(path))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_zoo")
    rng = random.Random(0)
    (root / "text.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(400)))
    return root


#: The modules "attention,mlp" adapts in each layer, by PEFT's (torch) names.
LAYER_MODULES = {
    "gpt2": ("transformer.h.{i}.attn.c_attn", "transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp.c_fc",
             "transformer.h.{i}.mlp.c_proj"),
    "phi3": ("model.layers.{i}.self_attn.qkv_proj", "model.layers.{i}.self_attn.o_proj",
             "model.layers.{i}.mlp.gate_up_proj", "model.layers.{i}.mlp.down_proj"),
}
DECODER_MODULES = tuple(f"model.layers.{{i}}.{part}" for part in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj"))


def _modules(arch: str) -> list[str]:
    return [m.format(i=i) for i in range(2) for m in LAYER_MODULES.get(arch, DECODER_MODULES)]


def _greedy(model, base, loaded, prompt: list[int], n: int) -> str:
    """The library's greedy continuation with the adapter unmerged, as words."""
    module, _ = from_pretrained(model)
    adapted = lora_apply(module, loaded.config)
    ids = generate(module, (base, loaded.lora_params), np.asarray([prompt], np.int32), max_new_tokens=n,
                   apply=lambda p, x, cache: adapted(p[0], p[1], x, cache=cache))
    return " ".join(WORDS[int(i)] if i < len(WORDS) else "[UNK]" for i in ids[0, len(prompt):])


def _flat(tree, path=()):
    if not isinstance(tree, dict):
        return {"/".join(path): np.asarray(tree)}
    return {k: v for key in tree for k, v in _flat(tree[key], path + (key,)).items()}


@pytest.mark.parametrize("arch", MODEL_TYPES)
def test_every_command_on_every_architecture(root, arch):
    model = root / arch
    shutil.copytree(ZOO / arch, model)
    _tokenizer(model / "tokenizer.json")
    adapter, merged = root / f"{arch}-adapter", root / f"{arch}-merged"
    code, out, err = run("train", "--model", model, "--data", root / "text.txt", "--out", adapter, *SHAPE,
                         "--steps", 2, "--targets", "attention,mlp")
    assert code == 0, err
    loaded = load_peft(adapter)
    modules = _modules(arch)
    assert json.loads((adapter / "adapter_config.json").read_text())["target_modules"] == sorted(modules)

    code, out, err = run("merge", "--model", model, "--adapter", adapter, "--out", merged)
    assert code == 0, err
    assert "within the expected rounding of float32" in out
    base_config, merged_config = (json.loads((d / "config.json").read_text()) for d in (model, merged))
    assert {k: merged_config.get(k) for k in base_config if k != "transformers_version"} == \
        {k: v for k, v in base_config.items() if k != "transformers_version"}
    # save_pretrained states head_dim even where the base left it to be derived: the same value
    added = {k: v for k, v in merged_config.items() if k not in base_config}
    derived = {"head_dim": base_config["hidden_size"] // base_config["num_attention_heads"]} \
        if "num_attention_heads" in base_config else {}
    assert added in ({}, derived), added
    _, base = from_pretrained(model)
    _, ours = from_pretrained(merged)
    expected = _flat(merge(base, loaded.lora_params, loaded.config))
    got = _flat(ours)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=f"{arch}: {name}")

    code, out, err = run("generate", "--model", model, "--adapter", adapter, "--prompt", "w1 w2 w3",
                         "--max-new-tokens", 4)
    assert code == 0, err
    assert out == _greedy(model, base, loaded, [1, 2, 3], 4) + "\n"

    code, out, err = run("inspect", adapter)
    assert code == 0, err
    for module in modules:
        assert module in out

"""The ``lora-jax`` command, run in-process on the tiny transformers-written Llama fixture.

Every run uses the same shapes (``--seq-len 16 --batch-size 2``) so the
training step compiles once for the whole file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import factors
from lora_jax.app import cli, cli_commands
from lora_jax.app.cli_data import ByteTokenizer, check_adapter_fits, fingerprint, window_batch
from lora_jax.io import Checkpointer, TrainState, load_peft
from lora_jax.io import tensors as st
from lora_jax.linen import lora_apply
from lora_jax.models import from_pretrained, generate, save_pretrained
from tests.tolerances import assert_close

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = os.path.join(FIXTURES, "llama_tiny")
PATTERNS = os.path.join(FIXTURES, "adapters", "patterns")
TEXT = ("LoRA keeps the base weights frozen and trains two small matrices beside each layer. "
        "The adapter is a few kilobytes, and the base model forgets nothing it knew before. ") * 4
SHAPE = ["--seq-len", "16", "--batch-size", "2"]
ONE_LINE_ERROR = re.compile(r"^lora-jax \w+: error: [^\n]+\n$")


def run(*argv, debug: bool = False) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``lora-jax argv`` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    args = [str(a) for a in argv] + (["--debug"] if debug else [])
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(args)
        except SystemExit as exit_:  # main returns its status; this only guards against a regression
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(autouse=True)
def _keep_default_device():
    before = jax.config.jax_default_device
    yield
    jax.config.update("jax_default_device", before)


def _tiny_copy(path, tokenizer: str | None = "bytes") -> str:
    shutil.copytree(TINY, path)
    if tokenizer:
        config_path = os.path.join(path, "config.json")
        with open(config_path) as f:
            config = json.load(f)
        config["lora_jax_tokenizer"] = tokenizer
        with open(config_path, "w") as f:
            json.dump(config, f)
    return str(path)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = root / "text.txt"
    data.write_text(TEXT)
    return {"root": root, "model": _tiny_copy(root / "model"), "data": str(data)}


@pytest.fixture(scope="module")
def trained(paths):
    """An adapter trained for 4 steps in one go, with checkpoints at steps 2 and 4."""
    out = str(paths["root"] / "adapter")
    result = run("train", "--model", paths["model"], "--data", paths["data"], "--out", out, "--steps", 4,
                 "--save-every", 2, "--backend", "cpu", *SHAPE)
    return out, result


@pytest.fixture(scope="module")
def base(paths):
    return from_pretrained(paths["model"], show_progress=False)


def test_train_writes_a_peft_adapter_that_fits_the_base(trained, paths, base):
    out, (code, stdout, stderr) = trained
    assert code == 0, stderr
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "checkpoints",
                                       "lora_jax_train.json"]
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["2", "4"]
    assert "trainable parameters: 14,848" in stdout and "adapter size:" in stdout
    assert "step 2/4: loss" in stderr and "step 4/4: loss" in stderr
    module, params = base
    adapter = load_peft(out)
    check_adapter_fits(adapter.lora_params, params, out)
    with open(os.path.join(out, "adapter_config.json")) as f:
        peft = json.load(f)
    assert (peft["task_type"], peft["base_model_name_or_path"], peft["r"], peft["lora_alpha"]) == \
        ("CAUSAL_LM", paths["model"], 8, 16.0)
    assert len(peft["target_modules"]) == 14   # 2 layers x (q, k, v, o, gate, up, down)
    assert adapter.config.scaling("model/layers_0/self_attn/q_proj") == 2.0
    b = adapter.lora_params["model"]["layers_1"]["mlp"]["down_proj"]["b"]
    assert np.abs(b).max() > 0   # B starts at zero; training moved it
    # The PEFT file holds exactly the adapters of the last checkpoint.
    like = TrainState(adapter.lora_params, cli_commands._optimizer(1e-3, 0.01, 1.0).init(adapter.lora_params), 0, jax.random.key(0))
    with Checkpointer(os.path.join(out, "checkpoints")) as ckpt:
        last = ckpt.restore(like, base=params)
    assert last.step == 4
    for x, y in zip(jax.tree.leaves(last.lora_params), jax.tree.leaves(adapter.lora_params)):
        np.testing.assert_array_equal(np.asarray(x), y)


def test_resume_gives_bitwise_the_same_adapter(trained, paths):
    out = str(paths["root"] / "resumed")
    common = ["--model", paths["model"], "--data", paths["data"], "--out", out, "--save-every", 2, *SHAPE]
    assert run("train", *common, "--steps", 2)[0] == 0
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["2"]
    code, stdout, stderr = run("train", *common, "--steps", 4, "--resume")
    assert code == 0, stderr
    assert "resumed from step 2" in stderr and "(step 3) ->" in stdout
    whole = st.read(os.path.join(trained[0], "adapter_model.safetensors"))
    resumed = st.read(os.path.join(out, "adapter_model.safetensors"))
    assert sorted(whole) == sorted(resumed)
    for name in whole:
        np.testing.assert_array_equal(resumed[name], whole[name], err_msg=name)


def test_resume_refuses_changed_settings(trained, paths):
    code, _, stderr = run("train", "--model", paths["model"], "--data", paths["data"], "--out", trained[0],
                          "--steps", 6, "--resume", "--lr", "0.01", *SHAPE)
    assert code == 2 and ONE_LINE_ERROR.match(stderr)   # the command line contradicts the run: exit code 2
    assert "--lr 0.01 (the run used 0.001)" in stderr
    assert sorted(os.listdir(os.path.join(trained[0], "checkpoints"))) == ["2", "4"]


def test_merge_writes_a_folder_with_the_unmerged_logits(trained, paths, base, tmp_path):
    out = str(tmp_path / "merged")
    code, stdout, stderr = run("merge", "--model", paths["model"], "--adapter", trained[0], "--out", out)
    assert code == 0, stderr
    diff = float(re.search(r"merged vs unmerged on a 16-token probe: (\S+)", stdout).group(1))
    assert diff < 1e-5
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["lora_jax_tokenizer"] == "bytes" and config["eos_token_id"] == 2
    module, params = base
    merged_module, merged = from_pretrained(out, show_progress=False)
    adapter = load_peft(trained[0])
    ids = jnp.asarray([list(b"LoRA keeps frozen")[:16]], jnp.int32)
    # The jitted forwards the command used for its own check: this input's shape is its probe's, so no
    # recompilation; the folder is read back here independently.
    expected = cli_commands._forward(module, adapter.config)(params, adapter.lora_params, ids)
    assert_close(cli_commands._forward(merged_module, None)(merged, None, ids), expected, what="merged vs unmerged logits")
    base_logits = cli_commands._forward(module, None)(params, None, ids)
    assert float(jnp.max(jnp.abs(expected - base_logits))) > 1e-4   # the adapter changes the logits
    # A second merge into the same (now non-empty) folder is refused.
    code, _, stderr = run("merge", "--model", paths["model"], "--adapter", trained[0], "--out", out)
    assert code == 2 and "is not empty" in stderr


def test_generate_is_greedy_by_default_and_matches_the_library(trained, paths, base):
    argv = ["generate", "--model", paths["model"], "--adapter", trained[0], "--prompt", "LoRA keeps",
            "--max-new-tokens", 8]
    code, first, stderr = run(*argv)
    assert code == 0, stderr
    assert run(*argv)[1] == first
    module, params = base
    adapter = load_peft(trained[0])
    adapted = lora_apply(module, adapter.config)
    tokens = generate(module, (params, adapter.lora_params), jnp.asarray([list(b"LoRA keeps")], jnp.int32),
                      max_new_tokens=8, eos_token_id=2,
                      apply=lambda p, ids, cache: adapted(p[0], p[1], ids, cache=cache))
    new = np.asarray(tokens)[0, len("LoRA keeps"):].tolist()
    new = new[:new.index(2)] if 2 in new else new
    assert first == ByteTokenizer().decode(new) + "\n"
    sampled = run(*argv, "--temperature", "1.5", "--seed", "3")[1]
    assert run(*argv, "--temperature", "1.5", "--seed", "3")[1] == sampled


def test_inspect_prints_per_layer_ranks_and_singular_values():
    code, stdout, stderr = run("inspect", PATTERNS)
    assert code == 0, stderr
    assert "parameters: 5,760 in 10 layers" in stdout
    rows = {line.split()[0]: line.split() for line in stdout.splitlines() if line.startswith("model.")}
    assert len(rows) == 10
    # columns: name, in, "x", out, rank, alpha, scale, top sigma, eff. rank, top-1 energy
    assert rows["model.layers.0.self_attn.q_proj"][4] == "2"
    assert rows["model.layers.1.self_attn.q_proj"][4] == "4"
    assert rows["model.layers.0.mlp.down_proj"][4] == "6" and rows["model.layers.1.mlp.down_proj"][4] == "6"
    assert rows["model.layers.0.self_attn.o_proj"][5:7] == ["3", "0.75"]
    adapter = load_peft(PATTERNS)
    for name, row in rows.items():
        path = name.replace("layers.", "layers_").replace(".", "/")
        node = adapter.lora_params
        for key in path.split("/"):
            node = node[key]
        scale = adapter.config.scaling(path, node["a"].shape[-1])
        sigma = np.linalg.svd(scale * node["a"].astype(np.float64) @ node["b"], compute_uv=False)
        assert float(row[7]) == pytest.approx(sigma[0], rel=1e-3), name
        assert float(row[9].rstrip("%")) == pytest.approx(100 * sigma[0] ** 2 / (sigma ** 2).sum(), abs=0.06)


@pytest.mark.parametrize("shape", [(12, 3, 7), (5, 5, 9), (40, 1, 4), (6, 4, 4)])
def test_inspect_singular_values_match_a_dense_svd(shape):
    d_in, r, d_out = shape
    rng = np.random.default_rng(sum(shape))
    a, b = rng.normal(size=(d_in, r)), rng.normal(size=(r, d_out))
    sigma = factors.singular_values(a, b, 0.7)   # what inspect reports
    dense = np.linalg.svd(0.7 * a @ b, compute_uv=False)[:r]
    np.testing.assert_allclose(sigma, dense, rtol=1e-10, atol=1e-12)
    rank_one = factors.singular_values(a[:, :1] @ np.ones((1, r)), b, 2.0)   # a of rank 1
    assert rank_one[0] > 0 and np.all(rank_one[1:] < 1e-12 * rank_one[0])


def test_spectrum_summary():
    assert cli_commands.spectrum_summary(np.array([2.0, 2.0, 2.0])) == pytest.approx((2.0, 3.0, 1 / 3))
    top, eff, share = cli_commands.spectrum_summary(np.array([3.0, 0.0]))
    assert (top, eff, share) == (3.0, 1.0, 1.0)
    top, eff, share = cli_commands.spectrum_summary(np.zeros(4))
    assert (top, eff) == (0.0, 0.0) and np.isnan(share)


def test_train_reads_jsonl(paths, tmp_path):
    texts = ["The first record is about frozen weights.", "The second one: two small matrices per layer.",
             "A third, so that there is enough text for a few windows of sixteen tokens."]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)) + "\n\n")
    out = tmp_path / "adapter"
    code, _, stderr = run("train", "--model", paths["model"], "--data", data, "--out", out, "--steps", 1, *SHAPE)
    assert code == 0, stderr
    with open(out / "lora_jax_train.json") as f:
        assert json.load(f)["data_tokens"] == fingerprint(np.frombuffer("".join(texts).encode(), np.uint8))
    assert sorted(os.listdir(out / "checkpoints")) == ["1"]


def test_train_and_generate_with_a_tokenizer_json(paths, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(re.findall(r"\w+|[^\w\s]", TEXT)))
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    assert tokenizer.get_vocab_size() <= 128
    model = _tiny_copy(tmp_path / "model", tokenizer=None)   # no "lora_jax_tokenizer": tokenizer.json is used
    tokenizer.save(os.path.join(model, "tokenizer.json"))
    out = tmp_path / "adapter"
    code, _, stderr = run("train", "--model", model, "--data", paths["data"], "--out", out, "--steps", 2, *SHAPE)
    assert code == 0, stderr
    with open(out / "lora_jax_train.json") as f:
        expected = np.asarray(tokenizer.encode(TEXT).ids, np.int32)
        assert json.load(f)["data_tokens"] == fingerprint(expected)
    # A prompt of 10 tokens and 8 new ones, as in the byte-level generate test: the compiled loop is reused.
    prompt = "LoRA keeps the base weights frozen and trains two small"
    assert len(tokenizer.encode(prompt).ids) == 10
    code, stdout, stderr = run("generate", "--model", model, "--adapter", out, "--prompt", prompt,
                               "--max-new-tokens", 8)
    assert code == 0, stderr
    assert set(stdout.split()) <= set(words) and len(stdout.split()) >= 1   # eos id 2 may end it early


def test_window_batches_depend_on_seed_and_step_only():
    tokens = np.arange(1000, dtype=np.int32)
    later = window_batch(tokens, seed=1, step=7, batch_size=4, seq_len=16)
    for step in range(7):
        window_batch(tokens, seed=1, step=step, batch_size=4, seq_len=16)
    np.testing.assert_array_equal(window_batch(tokens, seed=1, step=7, batch_size=4, seq_len=16), later)
    assert not np.array_equal(window_batch(tokens, seed=1, step=8, batch_size=4, seq_len=16), later)
    assert not np.array_equal(window_batch(tokens, seed=2, step=7, batch_size=4, seq_len=16), later)
    assert later.shape == (4, 17)


# ---- errors: one line on stderr and a status, or with --debug the exception itself

def _bad_jsonl(root):
    path = root / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken"\n')
    return path


def _short(root):
    path = root / "short.txt"
    path.write_text("only a few bytes")
    return path


def _non_ascii(root):
    path = root / "non_ascii.txt"
    path.write_text("naïve café " * 20)
    return path


def _elsewhere_adapter(root):
    """The fixture adapter `plain` moved to a layer index the 2-layer base lacks."""
    path = root / "elsewhere"
    path.mkdir(exist_ok=True)
    plain = os.path.join(FIXTURES, "adapters", "plain")
    shutil.copy(os.path.join(plain, "adapter_config.json"), path)
    tensors = st.read(os.path.join(plain, "adapter_model.safetensors"))
    st.write(path / "adapter_model.safetensors", {k.replace("layers.1.", "layers.5."): v for k, v in tensors.items()})
    return path


def _no_tokenizer_model(root):
    path = root / "no_tokenizer"
    return path if path.exists() else _tiny_copy(path, tokenizer=None)


ERRORS = {
    # name: (argv given the paths and the trained adapter, exit code, a fragment of the message)
    "missing model": (lambda p, a: ["train", "--model", p["root"] / "nope", "--data", p["data"], "--out",
                                    p["root"] / "o1"], 2, "no such folder"),
    "missing data": (lambda p, a: ["train", "--model", p["model"], "--data", p["root"] / "nope.txt", "--out",
                                   p["root"] / "o2"], 2, "no such file"),
    "bad jsonl line": (lambda p, a: ["train", "--model", p["model"], "--data", _bad_jsonl(p["root"]), "--out",
                                     p["root"] / "o3"], 1, "line 2: not valid JSON"),
    "data too short": (lambda p, a: ["train", "--model", p["model"], "--data", _short(p["root"]), "--out",
                                     p["root"] / "o4", *SHAPE], 1, "16 tokens, fewer than --seq-len + 1 = 17"),
    "non-ascii bytes": (lambda p, a: ["train", "--model", p["model"], "--data", _non_ascii(p["root"]), "--out",
                                      p["root"] / "o5"], 1, "vocabulary has only 128 entries"),
    "checkpoints without --resume": (lambda p, a: ["train", "--model", p["model"], "--data", p["data"], "--out", a],
                                     2, "pass --resume"),
    "checkpoints with --overwrite": (lambda p, a: ["train", "--model", p["model"], "--data", p["data"], "--out", a,
                                                   "--overwrite"], 2, "replaces adapter files, never checkpoints"),
    "--resume without checkpoints": (lambda p, a: ["train", "--model", p["model"], "--data", p["data"], "--out",
                                                   p["root"] / "o6", "--resume"], 2, "no checkpoints"),
    "--out is --model": (lambda p, a: ["train", "--model", p["model"], "--data", p["data"], "--out", p["model"],
                                       "--overwrite"], 2, "--out must not be the --model folder"),
    "--out is a file": (lambda p, a: ["train", "--model", p["model"], "--data", p["data"], "--out", p["data"]],
                        2, "is a file, expected a folder"),
    "adapter of another shape": (lambda p, a: ["merge", "--model", p["model"], "--adapter",
                                               os.path.join(FIXTURES, "adapters", "tied_attn"), "--out",
                                               p["root"] / "o7"], 1, "do not fit its weight [64, 32]"),
    "adapter of a missing layer": (lambda p, a: ["generate", "--model", p["model"], "--adapter",
                                                 _elsewhere_adapter(p["root"]), "--prompt", "hi"],
                                   1, "'model.layers.5.self_attn.q_proj' does not exist in the base model"),
    "not a PEFT folder": (lambda p, a: ["inspect", p["model"]], 2, "is not a PEFT adapter folder"),
    "not a model folder": (lambda p, a: ["generate", "--model", a, "--prompt", "hi"], 2, "no config.json"),
    "no tokenizer": (lambda p, a: ["generate", "--model", _no_tokenizer_model(p["root"]), "--prompt", "hi"],
                     1, "no tokenizer.json"),
}


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line_without_traceback(case, debug, paths, trained):
    make_argv, expected_code, fragment = ERRORS[case]
    argv = make_argv(paths, trained[0])
    if debug:
        with pytest.raises(Exception, match=re.escape(fragment)):
            run(*argv, debug=True)
        return
    code, stdout, stderr = run(*argv)
    assert code == expected_code, stderr
    assert ONE_LINE_ERROR.match(stderr), stderr
    assert fragment in stderr and "Traceback" not in stderr and stdout == ""


def _snapshot(folder) -> dict:
    """``{relative path: bytes}`` of every file under ``folder``."""
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(folder) for n in names}


def test_train_never_writes_a_non_finite_adapter(paths, tmp_path):
    out = tmp_path / "diverged"
    code, stdout, stderr = run("train", "--model", paths["model"], "--data", paths["data"], "--out", out,
                               "--steps", 1, "--lr", "1e39", *SHAPE)
    assert code == 1 and stdout == ""
    error = stderr.splitlines()[-1]
    assert error == ("lora-jax train: error: step 1: the update made 14,848 of the adapter's 14,848 values "
                     "non-finite (inf or nan); stopped without writing them; try a lower --lr than 1e+39")
    assert sorted(os.listdir(out)) == ["lora_jax_train.json"]   # no adapter, no checkpoint


def test_train_refuses_to_replace_an_adapter_or_write_into_the_model(paths, tmp_path):
    existing = tmp_path / "peft"
    shutil.copytree(os.path.join(FIXTURES, "adapters", "plain"), existing)
    before, model_before = _snapshot(existing), _snapshot(paths["model"])
    common = ["train", "--model", paths["model"], "--data", paths["data"], "--steps", 1, *SHAPE]
    code, stdout, stderr = run(*common, "--out", existing)
    assert code == 2 and ONE_LINE_ERROR.match(stderr) and stdout == ""
    assert (f"--out {str(existing)!r} already holds an adapter (adapter_config.json, adapter_model.safetensors); "
            f"pass --overwrite to replace it, or choose another --out") in stderr
    for extra in ([], ["--overwrite"]):
        code, _, stderr = run(*common, "--out", paths["model"], *extra)
        assert code == 2 and ONE_LINE_ERROR.match(stderr)
        assert "--out must not be the --model folder (not even with --overwrite)" in stderr
    assert _snapshot(existing) == before and _snapshot(paths["model"]) == model_before
    code, _, stderr = run(*common, "--out", existing, "--overwrite")
    assert code == 0, stderr
    assert _snapshot(existing)["adapter_model.safetensors"] != before["adapter_model.safetensors"]
    assert _snapshot(paths["model"]) == model_before


def test_resume_skips_a_broken_checkpoint_with_a_warning(trained, paths, tmp_path):
    out = tmp_path / "adapter"
    shutil.copytree(trained[0], out)
    (out / "checkpoints" / "9").mkdir()   # empty: a copy that never finished
    code, stdout, stderr = run("train", "--model", paths["model"], "--data", paths["data"], "--out", out,
                               "--steps", 6, "--save-every", 2, "--resume", *SHAPE)
    assert code == 0, stderr
    assert "lora-jax train: warning: " in stderr and ("skipped checkpoint step 9: its 'state' and 'meta' items "
                                                       "are missing; using step 4") in stderr
    assert "resumed from step 4" in stderr and "(step 5) -> " in stdout
    assert sorted(os.listdir(out / "checkpoints"), key=int) == ["4", "6", "9"]


def test_an_error_prints_its_whole_message(paths, tmp_path):
    code, stdout, stderr = run("train", "--model", paths["model"], "--data", paths["data"], "--out",
                               tmp_path / "o", "--targets", "attn_typo", *SHAPE)
    assert code == 2 and stdout == ""
    lines = stderr.splitlines()
    assert lines[0] == "lora-jax train: error: LoraConfig.targets entry 'attn_typo' matches no layer; " \
                       "available layers:"
    assert "  model/layers_1/mlp/down_proj (dense, in [96], out [64])" in lines and len(lines) == 17
    assert not os.path.exists(tmp_path / "o" / "adapter_model.safetensors")


def test_adapter_config_keeps_the_model_path_as_given(paths, tmp_path, monkeypatch):
    monkeypatch.chdir(paths["root"])
    out = tmp_path / "relative"
    code, _, stderr = run("train", "--model", "model", "--data", paths["data"], "--out", out, "--steps", 1, *SHAPE)
    assert code == 0, stderr
    with open(out / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == "model"
    code, stdout, _ = run("inspect", out)
    assert code == 0 and "base model: model  task: CAUSAL_LM" in stdout


def test_inspect_wraps_the_target_names(trained):
    code, stdout, stderr = run("inspect", trained[0])
    assert code == 0, stderr
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("targets: "))
    block = [lines[start]] + [line for line in lines[start + 1:] if line.startswith(" " * len("targets: "))]
    assert len(block) >= 2 and all(len(line) <= 100 for line in block)
    with open(os.path.join(trained[0], "adapter_config.json")) as f:
        names = json.load(f)["target_modules"]
    assert " ".join(block)[len("targets: "):].replace(",", " ").split() == names


def test_usage_errors_exit_with_2():
    code, _, stderr = run("train", "--model", "m", "--data", "d", "--out", "o", "--rank", "0")
    assert code == 2 and "--rank: must be a positive integer" in stderr
    assert run()[0] == 2
    assert run("frobnicate")[0] == 2


# ---- help, the demo hook, python -m

@pytest.mark.parametrize("command", ["train", "merge", "generate", "inspect"])
def test_every_command_has_help_with_examples(command):
    code, stdout, _ = run(command, "--help")
    assert code == 0
    assert stdout.startswith(f"usage: lora-jax {command}")
    assert f"examples:\n  lora-jax {command} " in stdout and "--backend" in stdout and "--debug" in stdout


def test_top_level_help_lists_the_commands():
    code, stdout, _ = run("--help")
    assert code == 0
    for command in ("train", "merge", "generate", "inspect", "demo"):
        assert re.search(rf"^\s+{command}\s+\S", stdout, re.M), command


def test_demo_delegates_to_lora_jax_demo_run(monkeypatch):
    seen = {}

    def fake_main(args):
        seen["args"] = args
        return 7

    monkeypatch.setattr(cli_commands.demo_run, "main", fake_main)
    code, _, stderr = run("demo", "--steps", "3", "--backend", "cpu")
    assert code == 7, stderr
    assert (seen["args"].steps, seen["args"].rank, seen["args"].backend) == (3, 8, "cpu")
    code, stdout, _ = run("demo", "--help")
    assert code == 0 and "--pretrain-steps" in stdout and "full fine-tuning vs LoRA on a new dialect" in stdout


def test_python_dash_m_runs_the_same_command(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["python -m lora_jax", "inspect", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("lora_jax", run_name="__main__", alter_sys=True)
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: lora-jax inspect")


def _tiny_bf16(path) -> str:
    """The tiny model stored in bfloat16 (its weights rounded once), with the byte tokenizer."""
    module, params = from_pretrained(TINY, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, show_progress=False)
    save_pretrained(path, module, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params),
                    extra_config={"lora_jax_tokenizer": "bytes", "eos_token_id": 2})
    return str(path)


def test_merge_of_a_bf16_model_says_whether_rounding_explains_the_difference(trained, paths, tmp_path):
    model = _tiny_bf16(tmp_path / "bf16")
    pattern = re.compile(r"merged vs unmerged on a 16-token probe: (\S+) \(logits up to (\S+)\): within the "
                         r"expected rounding of (\w+) \(bound (\S+) = 4 x sqrt\(4 x 2 layers \+ 1\) x eps (\S+) x")
    found = {}
    for dtype in ("bfloat16", "float32"):
        extra = [] if dtype == "bfloat16" else ["--dtype", "float32"]
        code, stdout, stderr = run("merge", "--model", model, "--adapter", trained[0], "--out",
                                   tmp_path / dtype, *extra)
        assert code == 0, stderr
        match = pattern.search(stdout)
        assert match and match.group(3) == dtype, stdout
        diff, scale, bound, eps = (float(match.group(i)) for i in (1, 2, 4, 5))
        assert eps == pytest.approx(float(jnp.finfo(dtype).eps), rel=1e-2)
        assert bound == pytest.approx(4 * 3 * eps * scale, rel=1e-2)   # sqrt(4 L + 1) = 3 for the 2 layers
        found[dtype] = diff
    weights = st.read(os.path.join(tmp_path / "float32", "model.safetensors"))
    assert {str(w.dtype) for w in weights.values()} == {"float32"}
    with open(os.path.join(tmp_path / "float32", "config.json")) as f:
        assert json.load(f)["dtype"] == "float32"
    # float32 is at float32 level (cli_checks.rounding_bound with float32's eps); bfloat16 is not
    f32_bound = 4 * 3 * float(jnp.finfo(jnp.float32).eps) * scale
    assert found["float32"] <= f32_bound < found["bfloat16"]


def test_a_normal_run_prints_no_warning(trained):
    assert "warning" not in trained[1][2]


def _short_positions(path, positions: int) -> str:
    model = _tiny_copy(path)
    with open(os.path.join(model, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump({**config, "max_position_embeddings": positions}, f)
    return model


def test_train_and_generate_warn_past_max_position_embeddings(paths, tmp_path):
    model = _short_positions(tmp_path / "model", 12)
    code, _, stderr = run("train", "--model", model, "--data", paths["data"], "--out", tmp_path / "a",
                          "--steps", 1, *SHAPE)
    assert code == 0, stderr
    assert ("lora-jax train: warning: --seq-len 16 needs 16 positions, beyond the model's "
            "max_position_embeddings 12; quality degrades past it\n") in stderr
    code, _, stderr = run("generate", "--model", model, "--prompt", "LoRA", "--max-new-tokens", 9)
    assert code == 0, stderr
    assert ("lora-jax generate: warning: a 4-token --prompt and --max-new-tokens 9 needs 13 positions, beyond "
            "the model's max_position_embeddings 12") in stderr
    code, _, stderr = run("generate", "--model", model, "--prompt", "LoRA", "--max-new-tokens", 8)
    assert code == 0 and "warning" not in stderr


def test_train_warns_on_repeated_data_and_reports_the_held_out_loss(paths, base, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("LoRA adapters are small. " * 2)          # 50 bytes
    out = tmp_path / "adapter"
    code, stdout, stderr = run("train", "--model", paths["model"], "--data", small, "--out", out, "--steps", 16,
                               "--eval-data", paths["data"], "--eval-every", 8, "--save-every", 16, *SHAPE)
    assert code == 0, stderr
    # 16 steps x 2 windows x 16 tokens = 512 tokens read from 50: 10.24 passes
    assert ("lora-jax train: warning: 16 steps x 2 windows x 16 tokens read the 50 tokens of --data 10.2 times "
            "over") in stderr
    with open(out / "lora_jax_train.json") as f:
        run_json = json.load(f)
    steps = [step for step, _ in run_json["held_out_losses"]]
    assert steps == [8, 16] and run_json["eval_data"] == os.path.abspath(paths["data"])
    final = run_json["held_out_losses"][-1][1]
    assert f"step 16/16: held-out loss {final:.4f} (16 windows of --eval-data)" in stderr
    assert f"held-out loss: {final:.4f} (step 16," in stdout
    # the same number, computed directly: the first 16 windows of 17 bytes of the held-out text
    module, params = base
    tokens = np.frombuffer(TEXT.encode(), np.uint8).astype(np.int32)
    windows = jnp.asarray(tokens[:16 * 17].reshape(16, 17))
    adapter = load_peft(str(out))
    logits = np.asarray(lora_apply(module, adapter.config)(params, adapter.lora_params, windows[:, :-1]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    direct = -np.take_along_axis(logp, np.asarray(windows[:, 1:, None]), -1).mean()
    assert_close(final, direct, jnp.float32, what="held-out loss")
    assert abs(run_json["held_out_losses"][0][1] - final) > 1e-4   # training moved it


INTERRUPTED = re.compile(r"^lora-jax train: interrupted at step (\d+); the last complete checkpoint is step (\d+)$")


def _interrupt_training(paths, out: str, after_step: int | None, delay: float) -> tuple[int, str]:
    """Runs ``lora-jax train --save-every 1`` in a subprocess and sends SIGINT once ``checkpoints/`` has an
    entry (``after_step`` None: the first save's directory, usually while it is written) or the directory of
    ``after_step``, plus ``delay`` seconds; returns ``(exit code, stderr)``."""
    cmd = [sys.executable, "-m", "lora_jax", "train", "--model", paths["model"], "--data", paths["data"],
           "--out", out, "--steps", "100000", "--save-every", "1", "--backend", "cpu", *SHAPE]
    ckpt_dir = os.path.join(out, "checkpoints")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        deadline = time.monotonic() + 180
        while not (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []) if after_step is None \
                else not os.path.isdir(os.path.join(ckpt_dir, str(after_step))):
            assert proc.poll() is None, f"train ended before it was interrupted:\n{proc.stderr.read()}"
            assert time.monotonic() < deadline, "train wrote no checkpoint in 180 s"
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)   # a bounded wait: a hang (orbax waiting out a timeout) fails
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, stderr


@pytest.mark.parametrize("after_step, delay", [(None, 0.0), (2, 0.0), (3, 0.05)],
                         ids=["during-first-save", "after-step-2", "between-saves"])
def test_ctrl_c_stops_at_once_with_one_line_and_whole_checkpoints(paths, trained, tmp_path, after_step, delay):
    out = str(tmp_path / "adapter")
    code, stderr = _interrupt_training(paths, out, after_step, delay)
    assert code == 130, stderr
    assert "Traceback" not in stderr and "ERROR" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and stderr.endswith(lines[0] + "\n"), stderr
    step, last = map(int, INTERRUPTED.match(lines[0]).groups())
    assert 1 <= last <= step and (after_step is None or last >= after_step)
    # Every entry is a whole step (nothing half-written is left), and each restores.
    steps = sorted(os.listdir(os.path.join(out, "checkpoints")), key=int)
    assert steps == [str(s) for s in range(max(1, last - 2), last + 1)]   # train keeps the newest 3
    adapter = load_peft(trained[0])
    with Checkpointer(os.path.join(out, "checkpoints"), max_to_keep=None) as ckpt:
        assert ckpt.latest_step() == last
        rng = jax.random.key(0, impl=ckpt.metadata()["rng_impl"])   # the subprocess's default key impl
        like = TrainState(adapter.lora_params, cli_commands._optimizer(1e-3, 0.01, 1.0).init(adapter.lora_params), 0, rng)
        assert [ckpt.restore(like, step=int(s)).step for s in steps] == list(map(int, steps))



"""The examples run, and what they print holds."""

import importlib.util
import pathlib
import re

import jax.numpy as jnp

from tests.tolerances import tol

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart(capsys):
    _load("quickstart").main(["--steps", "3", "--seed", "1"])
    out = capsys.readouterr().out
    assert re.search(r"base params bitwise unchanged: (\d+)/\1 arrays", out)
    assert "adapter off == base model: bitwise equal True, max |diff| 0" in out
    before, after = map(float, re.search(r"eval loss: before ([\d.]+) -> after ([\d.]+)", out).groups())
    assert after < before
    diff, peak = map(float, re.search(r"max \|logit diff\| ([\d.e+-]+) \(max \|logit\| ([\d.e+-]+)\)", out).groups())
    assert diff <= tol(jnp.float32) * peak


def test_hf_peft(capsys):
    _load("hf_peft").main(["--steps", "5"])
    out = capsys.readouterr().out
    assert "PEFT folder written and read back: tensors bitwise equal True" in out
    before, after = map(float, re.search(r"before ([\d.]+) -> after ([\d.]+)", out).groups())
    assert after < before
    diff = float(re.search(r"max \|logit diff\| vs unmerged ([\d.e+-]+)", out).group(1))
    assert diff <= 1e-4
    adapter, base = (int(x.replace(",", "")) for x in re.search(r"adapter files ([\d,]+) bytes; base model files "
                                                                  r"([\d,]+) bytes", out).groups())
    assert adapter < base / 20


def test_resume_training(capsys):
    _load("resume_training").main(["--steps", "6", "--every", "2"])
    out = capsys.readouterr().out
    assert re.search(r"(\d+)/\1 arrays bitwise equal", out), out


def test_multi_adapter(capsys):
    # Alphas 16, 16, 32: two distinct alphas still differ in scale, and two equal configs share one
    # compiled train step (three distinct ones would cost a third compilation, ~5 s).
    _load("multi_adapter").main(["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-rows", "4",
                                 "--max-bytes", "20000", "--heldout-bytes", "20000", "--alphas", "16", "16", "32"])
    out = capsys.readouterr().out
    assert "train steps compiled: 2 (one per distinct config)" in out
    assert re.search(r"resolved configs identical for all 3 adapters .*: True", out), out
    assert "compilations of the switching forward after 3 adapters: 1\n" in out
    assert "compilations of the switching forward after combining: 1\n" in out
    assert "compilations of the mixed forward: 1\n" in out
    diff, peak = map(float, re.search(r"mixed batch of \d+ rows: max \|logit diff\| vs each row alone, merged "
                                      r"([\d.e+-]+) \(max \|logit\| ([\d.e+-]+)\)", out).groups())
    assert diff <= tol(jnp.float32) * peak
    errors = {m: float(e) for m, e in re.findall(r"combine (\w+): max relative error ([\d.e+-]+)", out)}
    assert errors["cat"] <= 1e-6
    assert errors["linear"] > 1e-3       # two different adapters: PEFT's linear mix has cross terms
    assert errors["svd"] <= errors["linear"]   # the best rank-8 approximation beats any other rank 8


def test_plain_function(capsys):
    _load("plain_function").main(["--steps", "60"])
    out = capsys.readouterr().out
    first, last, frozen = map(float, re.search(r"LoRA on task B: loss ([\d.]+) -> ([\d.]+) \(the frozen model's: "
                                               r"([\d.]+)\)", out).groups())
    assert last < 0.5 * first and first == frozen
    worst = float(re.search(r"merged weights vs W \+ scale \* A @ B \(float64\): max \|diff\| ([\d.e+-]+)", out)
                  .group(1))
    assert worst <= 1e-6
    assert re.search(r"frozen params bitwise unchanged: (\d+)/\1 arrays", out), out


def test_nnx_quickstart(capsys):
    _load("nnx_quickstart").main(["--steps", "20", "--seed", "1"])
    out = capsys.readouterr().out
    assert "fresh adapters == base model: bitwise equal True" in out
    assert re.search(r"base params bitwise unchanged: (\d+)/\1 arrays", out), out
    before, after = map(float, re.search(r"eval loss: before ([\d.]+) -> after ([\d.]+)", out).groups())
    assert after < before
    trainable, total = (int(x.replace(",", "")) for x in re.search(r"trainable params: ([\d,]+) of ([\d,]+)",
                                                                    out).groups())
    assert 0 < trainable < total
    assert "merged model: Linear head, 0 adapter params left" in out
    diff, peak = map(float, re.search(r"max \|diff\| ([\d.e+-]+) \(max \|output\| ([\d.e+-]+)\)", out).groups())
    assert diff <= tol(jnp.float32) * peak


def test_new_tokens(capsys):
    # Short runs; the time goes to four compilations (pretraining step, adapter step, two forwards).
    _load("new_tokens").main(["--pretrain-steps", "300", "--steps", "100", "--batch-size", "16", "--contexts", "4",
                              "--rank", "4"])
    out = capsys.readouterr().out
    assert re.search(r"adapted layers: model/embed_tokens \(", out), out         # the embedding, nothing else
    trainable, total = (int(x.replace(",", "")) for x in re.search(r"trainable params: ([\d,]+) of ([\d,]+)",
                                                                    out).groups())
    assert trainable == 3 * 4 + 4 * 64 and total > 100 * trainable             # 3 rows of A, and B
    # The meaning: held-out facts about the emoji, never stated with them in the fine-tuning text.
    loss0, acc0, loss1, acc1 = map(float, re.search(r"written with the new token: before ([\d.]+) / ([\d.]+) -> "
                                                    r"after ([\d.]+) / ([\d.]+)", out).groups())
    assert loss1 < 0.5 * loss0 and acc1 >= 2 * acc0, out
    word_acc = float(re.search(r"with the original word: base [\d.]+ / ([\d.]+)", out).group(1))
    assert word_acc >= 0.9                                                     # the base knows the facts
    cosines = [tuple(map(float, m)) for m in re.findall(r"cosine\(.+?\): before ([+-][\d.]+) -> after ([+-][\d.]+)",
                                                        out)]
    assert len(cosines) == 3 and all(after > before + 0.3 for before, after in cosines), cosines
    before, after = map(float, re.search(r"next token is an emoji: before ([\d.]+) -> after ([\d.]+)", out).groups())
    assert after < 0.5 * before                                                # the tied head writes them
    # Every other row of the merged table is bitwise the base's; exactly the 3 new rows moved.
    assert "max |diff| over the 61 other rows 0, bitwise equal True; rows changed: 3 (🐱 🐶 🐮)" in out
    diff, peak = map(float, re.search(r"merged vs unmerged: max \|logit diff\| ([\d.e+-]+) \(max \|logit\| "
                                      r"([\d.e+-]+)\)", out).groups())
    assert diff <= tol(jnp.float32) * peak

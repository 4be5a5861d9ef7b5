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

"""The README's code example runs and its printed headline is what it claims."""

import os
import pathlib
import re
import shutil

import jax
import numpy as np

from tests.tolerances import assert_close

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _run_section(heading: str | None) -> dict:
    """Runs the first python block after ``heading`` (the file's first if None) from the repository root."""
    text = README.read_text()
    section = text if heading is None else text[text.index(heading):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {"__code__": code}
    cwd = os.getcwd()
    os.chdir(README.parent)   # the examples use paths relative to the repository root
    try:
        exec(compile(code, str(README), "exec"), scope)
    finally:
        os.chdir(cwd)
    return scope


def test_readme_example_runs_and_merge_matches(capsys):
    scope = _run_section(None)
    claimed = re.search(r'"(trainable [\d.]+% \([\d,]+ / [\d,]+\))"', scope["__code__"]).group(1)
    assert claimed in capsys.readouterr().out
    unmerged = scope["apply"](scope["base"], scope["lora"], scope["ids"])
    assert_close(scope["logits"], unmerged, what="merged vs unmerged logits")
    jax.tree.map(lambda a, b: assert_close(a, b, what="unmerge(merge(W))"), scope["restored"], scope["base"])


def test_readme_peft_section_runs_and_round_trips():
    scope = _run_section("## Use a PEFT adapter in JAX")
    from lora_jax.io import load_peft
    from tests.fixtures_data import reference

    back = load_peft(scope["out"])
    assert jax.tree.all(jax.tree.map(np.array_equal, back.lora_params, scope["adapter"].lora_params))
    assert scope["tokens"].shape == (1, 13)
    ids = reference()["input_ids"]
    peft = scope["L"].lora_apply(scope["model"], back.config)(scope["base"], back.lora_params, ids)
    assert_close(peft, reference()["plain/unmerged"], what="README adapter vs PEFT logits")
    shutil.rmtree(scope["out"])


def test_readme_adapter_set_section_runs_and_rows_match():
    scope = _run_section("## Several adapters on one base")
    L, model, base, ids, adapters = (scope[k] for k in ("L", "model", "base", "ids", "adapters"))
    plain = adapters["plain"]
    alone = L.lora_apply(model, plain.config)(base, plain.lora_params, ids)
    assert_close(scope["logits"], alone, what="resolved 'plain' vs the adapter itself")
    assert_close(scope["rows"][0], alone[0], what="mixed row 0 (plain)")
    assert_close(scope["rows"][1], model.apply({"params": base}, ids[1:2])[0], what="mixed row 1 (base)")
    patterns = adapters["patterns"]
    assert_close(scope["rows"][2], L.lora_apply(model, patterns.config)(base, patterns.lora_params, ids[2:3])[0],
                 what="mixed row 2 (patterns)")
    assert 0.0 < scope["worst"] < 1.0   # rank 4 cannot hold plain (4) + rslora (8) where both adapt


def test_readme_any_function_section_runs():
    from lora_jax import reference

    scope = _run_section("## Any JAX function of a params pytree")
    params, lora, merged = scope["params"], scope["lora"], scope["merged"]
    assert sorted(lora) == ["down", "up"] and lora["up"]["a"].shape == (8, 4)
    for name in ("up", "down"):
        expected = reference.merge(params[name]["kernel"], lora[name]["a"], lora[name]["b"], 2.0)
        assert_close(merged[name]["kernel"], expected, what=name)
    assert np.any(np.asarray(scope["grads"]["up"]["b"]))    # B starts at zero; its gradient does not


def test_readme_nnx_section_trains_and_merges():
    from flax import nnx

    from lora_jax.nnx import LoraParam

    scope = _run_section("## Flax NNX models")
    model, merged, x = scope["model"], scope["merged"], scope["x"]
    assert scope["losses"][-1] < scope["losses"][0]
    assert_close(merged(x), model(x), what="merged vs adapted NNX model")
    assert not nnx.state(merged, LoraParam)                     # merge leaves plain layers
    assert {p[-1] for p, _ in nnx.to_flat_state(nnx.state(model, LoraParam))} == {"a", "b"}

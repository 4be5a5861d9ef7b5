"""The demo end to end on the shipped base model, at a tiny size: files written, checks hold."""

from __future__ import annotations

import argparse
import json

import numpy as np

from lora_jax.app.demo import run
from tests.tolerances import tol


def test_demo_writes_a_report_whose_checks_hold(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    args = parser.parse_args(["--steps", "4", "--eval-every", "2", "--batch-size", "2", "--seq-len", "32",
                              "--out", str(tmp_path), "--no-progress", "--sample-tokens", "8"])
    assert run.main(args) == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'report.md'}" in out
    for name in ("report.md", "loss_curves.png", "results.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "full_finetuned/model.safetensors"):
        assert (tmp_path / name).is_file(), name
    result = json.loads((tmp_path / "results.json").read_text())
    checks = result["checks"]
    assert checks["merged_vs_unmerged_max_abs"] <= tol(np.float32) * checks["max_abs_logit"]
    assert checks["adapter_off_equals_base"] and checks["adapter_on_again_equal"] and checks["base_params_unchanged"]
    assert checks["adapter_changes_logits_by"] > 0   # the adapter trained: "off == base" is not vacuous
    full, lora = result["runs"]
    assert [p[0] for p in full["curve"]] == [0, 2, 4] == [p[0] for p in lora["curve"]]
    assert full["curve"][0] == lora["curve"][0]     # both start from the same base model
    assert lora["trainable"] < full["trainable"] == result["total_params"]
    assert result["sizes"]["adapter"] < result["sizes"]["base"] == result["sizes"]["full"]
    report = (tmp_path / "report.md").read_text()
    assert "merged == unmerged" in report and "![held-out loss curves](loss_curves.png)" in report
    assert set(result["samples"]) == {"base model", "LoRA", "full fine-tune"}

"""The rank sweep and the interference study on the demo base, at a tiny size; and their CLI commands.

Every run here uses one adapter config for training (rank 2, alpha 4, padded where the rank is lower)
and one held-out shape, so the whole file compiles a train step twice and a forward once.
"""

from __future__ import annotations

import contextlib
import io
import json
import re

import jax
import numpy as np
import pytest

from lora_jax import backend
from lora_jax.app import cli
from lora_jax.config import LoraConfig
from lora_jax.app.demo import study

TINY = dict(steps=2, batch_size=2, seq_len=32, eval_rows=4, max_bytes=50_000, heldout_bytes=20_000,
            show_progress=False)
CLI_TINY = ["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-rows", "4", "--backend", "cpu"]
ONE_LINE_ERROR = re.compile(r"^lora-jax \w+: error: [^\n]+\n$")


def run(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module", autouse=True)
def _cpu_for_the_module():
    # The default device is part of jit's cache key: with the CPU set as the CLI's --backend cpu sets it,
    # the CLI runs reuse what the fixtures compiled.
    before = jax.config.jax_default_device
    backend.use("cpu")
    yield
    jax.config.update("jax_default_device", before)


@pytest.fixture(autouse=True)
def _keep_default_device():
    before = jax.config.jax_default_device
    yield
    jax.config.update("jax_default_device", before)


@pytest.fixture(scope="module")
def sweep():
    return study.rank_sweep((1, 2), **TINY)


@pytest.fixture(scope="module")
def interference():
    # rank 2, alpha 4 at lr 5e-3 / 2: the config the sweep trained in, so the step is compiled already.
    return study.interference_study(rank=2, alpha=4.0, **TINY)


def _adapted_kernel_sizes(base) -> int:
    """Sum of ``in + out`` over the kernels LoRA adapts (attention and MLP projections of every layer)."""
    leaves = jax.tree_util.tree_leaves_with_path(base)
    names = [[getattr(k, "key", None) for k in path] for path, _ in leaves]
    return sum(x.shape[0] + x.shape[1] for name, (_, x) in zip(names, leaves)
               if name[-1] == "kernel" and ("self_attn" in name or "mlp" in name))


def test_sweep_rows_count_params_exactly_and_measure_spectra(sweep):
    from lora_jax.app.demo.pretrain import load_base

    _, base = load_base()
    per_rank = _adapted_kernel_sizes(base)
    # 4 layers x (q, k, v, o: 192 + 192; gate, up: 192 + 512; down: 512 + 192)
    assert per_rank == 4 * (4 * 384 + 3 * 704) == 14592
    assert [r.rank for r in sweep.rows] == [1, 2]
    assert [r.alpha for r in sweep.rows] == [2.0, 4.0]
    assert [r.trainable for r in sweep.rows] == [per_rank, 2 * per_rank]
    assert sweep.total_params == sum(x.size for x in jax.tree.leaves(base))
    assert sweep.names == ["code", "prose"] and set(sweep.baseline) == {"code", "prose"}
    for row in sweep.rows:
        assert all(np.isfinite(v) and 0 < v < 8 for v in row.losses.values())
        assert row.losses != sweep.baseline                 # the adapter trained
        assert 0 < row.mean_effective_rank <= row.rank + 1e-9
        assert 1 <= row.energy_rank <= row.rank
    assert sweep.rows[0].mean_effective_rank == pytest.approx(1.0)   # one singular value per layer
    assert sweep.rows[0].energy_rank == 1


def test_padded_training_equals_plain_training():
    task = study.DemoTask(["code"], lr=5e-3, **{k: v for k, v in TINY.items() if k != "show_progress"})
    config = LoraConfig(rank=1, alpha=2.0, targets=study.TARGETS)
    plain = task.train(config, "code", seed=0)
    padded = task.train(config, "code", seed=0, train_rank=2)
    assert jax.tree.map(np.shape, padded) == jax.tree.map(np.shape, plain)
    # Equal up to float rounding: the padded matmuls sum in another order, and Adam's first steps move
    # each entry by about lr * g / |g| (lr = 2.5e-3 here), which a rounding-level change of a tiny g can
    # shift; measured max |diff| ~1e-5.
    for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(padded)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-3, atol=5e-5)
    losses = [task.evaluate("code", study.Adapter(config, lora)) for lora in (plain, padded)]
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)


def test_sweep_writes_table_plot_and_json(sweep, tmp_path):
    files = sweep.save(tmp_path)
    assert [f.name for f in files] == ["sweep.md", "sweep.png", "sweep.json"]
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = sweep.markdown()
    assert len([line for line in table.splitlines() if re.match(r"\| \d+ \|", line)]) == 2
    assert table in (tmp_path / "sweep.md").read_text()
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["trainable"] for r in saved["rows"]] == [r.trainable for r in sweep.rows]
    assert saved["rows"][1]["losses"] == sweep.rows[1].losses
    assert saved["settings"]["steps"] == 2 and saved["settings"]["shared_compile"] is True


def test_interference_matrices(interference, tmp_path):
    f = interference.functional
    assert interference.names == f.names == study.CORPORA
    np.testing.assert_array_equal(np.diag(f.together), f.alone)
    np.testing.assert_array_equal(np.diag(f.increase), 0.0)
    assert np.all(np.isfinite(f.together)) and not np.array_equal(f.together, np.diag(f.alone))
    overlap = interference.overlap
    np.testing.assert_allclose(np.diag(overlap), 1.0, atol=1e-9)         # an adapter with itself
    np.testing.assert_allclose(overlap, overlap.T, atol=1e-9)              # measured both ways
    assert np.all((overlap >= 0) & (overlap <= 1 + 1e-9))
    files = interference.save(tmp_path)
    assert [f.name for f in files] == ["interference.md", "interference.png", "interference.json"]
    saved = json.loads((tmp_path / "interference.json").read_text())
    assert saved["alone"] == f.alone.tolist() and saved["overlap"] == overlap.tolist()


def test_bad_study_inputs_raise():
    with pytest.raises(ValueError, match="ranks repeat"):
        study.sweep_ranks(lambda c: {}, {}, base_params={}, ranks=(2, 2))
    with pytest.raises(ValueError, match="unknown corpora"):
        study.demo_corpora(["poetry"], max_bytes=1000, heldout_bytes=1000)
    with pytest.raises(ValueError, match="at least two distinct"):
        study.interference_study(["code", "code"], **TINY)


def test_cli_sweep_and_interference_write_their_files(sweep, interference, tmp_path):
    code, out, err = run("sweep", "--ranks", 1, 2, "--out", tmp_path / "s", *CLI_TINY)
    assert code == 0, err
    assert "| 1 | 2 | 14,592 (" in out and "| 2 | 4 | 29,184 (" in out
    assert {p.name for p in (tmp_path / "s").iterdir()} == {"sweep.md", "sweep.png", "sweep.json"}
    code, out, err = run("interference", "--corpora", "prose", "code", "--rank", 2, "--alpha", 4,
                         "--out", tmp_path / "i", *CLI_TINY)
    assert code == 0, err
    saved = json.loads((tmp_path / "i" / "interference.json").read_text())
    assert saved["names"] == ["prose", "code"] and np.array(saved["together"]).shape == (2, 2)
    assert "mean subspace overlap" in out


@pytest.mark.parametrize("argv, message", [
    (["sweep", "--ranks", "2", "2"], "--ranks repeats a rank: 2 2"),
    (["interference", "--corpora", "code"], "--corpora needs at least two distinct corpora"),
])
def test_cli_bad_input_is_a_one_line_usage_error(argv, message):
    code, _, err = run(*argv)
    assert code == 2 and ONE_LINE_ERROR.match(err) and message in err


@pytest.mark.parametrize("command", ["sweep", "interference"])
def test_cli_help_has_examples(command):
    code, out, _ = run(command, "--help")
    assert code == 0 and out.startswith(f"usage: lora-jax {command}")
    assert f"examples:\n  lora-jax {command}" in out and "--backend" in out and "--debug" in out


def test_cli_defaults_are_the_studys():
    parser = cli.build_parser()
    assert parser.parse_args(["sweep"]).ranks == list(study.DEFAULT_RANKS)
    assert parser.parse_args(["interference"]).corpora == list(study.CORPORA)


def test_example_runs(capsys, tmp_path):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "rank_and_interference.py"
    spec = importlib.util.spec_from_file_location("rank_and_interference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # --rank 2 --alpha 4: every adapter trains in the config compiled for the fixtures above
    module.main(["--steps", "1", "--ranks", "1", "2", "--rank", "2", "--alpha", "4", "--truncate-rank", "2",
                 "--batch-size", "2",
                 "--seq-len", "32", "--eval-rows", "4", "--max-bytes", "50000",
                 "--heldout-bytes", "20000", "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count("| 1 | 2 | 14,592 (") == 1 and "mean subspace overlap" in out
    assert len(list(tmp_path.iterdir())) == 6
    rows = re.findall(r"\| (full|energy [\d.]+) \| ([\d,]+) \| ([\d.e+-]+) \| ([\d.]+) \| ([\d.e+-]+) \|", out)
    assert [r[0] for r in rows] == ["full", "energy 0.99", "energy 0.9", "energy 0.75", "energy 0.5"]
    full, *cuts = rows
    assert float(full[2]) == 0.0 and float(full[4]) == 0.0
    for _, params, error, _, logit_diff in cuts:    # a cut never grows the adapter; its error is measured
        assert int(params.replace(",", "")) <= int(full[1].replace(",", ""))
        assert 0.0 <= float(error) < 1.0 and float(logit_diff) >= 0.0

"""``lora-jax train --mesh``: sharded over 8 CPU devices in one process, and over 2 processes x 4 devices.

The two runs use the same mesh (8 x 1, ``fsdp``), so they compute the same
program split differently over processes: their adapters agree within float32
rounding. The 2-process run writes its adapter and json once, and its
checkpoint resumes in this test's process on one device. Bad ``--mesh``
requests are refused with messages that say what to change.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from lora_jax.app import cli_commands
from lora_jax.io import Checkpointer, TrainState, load_peft
from tests.test_cli import SHAPE, TEXT, _tiny_copy, run
from tests.tolerances import assert_close

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = ["--steps", "3"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(argv, devices: int, **env):
    """A ``lora-jax train`` subprocess on ``devices`` CPU devices with extra environment ``env``."""
    full = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **env}
    return subprocess.Popen([sys.executable, "-m", "lora_jax", "train", *map(str, argv)], cwd=REPO, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs, timeout=180):
    outs = []
    for p in procs:
        try:
            outs.append((p.wait(timeout=timeout), p.stdout.read()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"lora-jax train ran past {timeout} s")
    return outs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_mesh")
    (root / "text.txt").write_text(TEXT)
    model = _tiny_copy(root / "model")
    common = ["--model", model, "--data", root / "text.txt", *SHAPE, "--batch-size", "8", *STEPS]
    [(code, one)] = _finish([_train([*common, "--out", root / "one", "--mesh", "8x1"], 8)])
    assert code == 0, one[-3000:]
    port = _port()
    two = _finish([_train([*common, "--out", root / "two", "--mesh", "8x1"], 4,
                          LORA_JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", LORA_JAX_NUM_PROCESSES="2",
                          LORA_JAX_PROCESS_ID=str(i)) for i in (0, 1)])
    for code, out in two:
        assert code == 0, out[-3000:]
    return {"root": root, "model": model, "one": one, "two": [out for _, out in two]}


def test_two_processes_train_as_one(runs):
    root = runs["root"]
    assert "training on a 8x1 mesh {'data': 8, 'model': 1} of 8 cpu devices, 1 process(es)" in runs["one"]
    assert "training on a 8x1 mesh {'data': 8, 'model': 1} of 8 cpu devices, 2 process(es)" in runs["two"][0]
    single, double = (load_peft(root / name).lora_params for name in ("one", "two"))
    pairs = list(zip(_flat(single), _flat(double)))
    assert len(pairs) == 28 and all(a[0] == b[0] for a, b in pairs)     # 2 layers x 7 projections x (a, b)
    for (path, a), (_, b) in pairs:
        assert_close(b, a, what=f"{'/'.join(path)}: 2 processes x 4 vs 1 x 8 devices")


def test_process_0_alone_writes_the_adapter_and_the_json(runs):
    first, second = runs["two"]
    assert "wrote adapter_config.json, adapter_model.safetensors, lora_jax_train.json to" in first
    assert "wrote " not in second
    saved = json.loads((runs["root"] / "two" / "lora_jax_train.json").read_text())
    assert (saved["mesh"], saved["sharding"]) == ([8, 1], "fsdp")
    assert sorted(os.listdir(runs["root"] / "two" / "checkpoints")) == ["3"]


@pytest.fixture
def default_prng():
    """JAX's default key implementation (threefry), which the subprocesses used; tests/conftest.py sets "rbg"."""
    before = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "threefry2x32")
    yield
    jax.config.update("jax_default_prng_impl", before)


def test_the_two_process_checkpoint_resumes_on_one_device(runs, default_prng):
    """Its step-3 adapters equal process 0's PEFT file bit for bit; training goes on here, on one device."""
    root = runs["root"]
    exported = load_peft(root / "two").lora_params
    tx = cli_commands._optimizer(1e-3, 0.01, 1.0)        # train's defaults
    with Checkpointer(root / "two" / "checkpoints") as ckpt:
        restored = ckpt.restore(TrainState(exported, tx.init(exported), 0, jax.random.key(0)))
    assert restored.step == 3
    for (path, a), (_, b) in zip(_flat(restored.lora_params), _flat(exported)):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg="/".join(path))
    code, out, err = run("train", "--model", runs["model"], "--data", root / "text.txt", "--out", root / "two",
                         *SHAPE, "--batch-size", "8", "--steps", "4", "--resume")
    assert code == 0, err
    assert "resumed from step 3" in err
    assert "(step 4)" in out


def _flat(tree, path=()):
    if not isinstance(tree, dict):
        return [(path, tree)]
    return [item for key in sorted(tree) for item in _flat(tree[key], path + (key,))]


def test_a_batch_that_does_not_split_over_the_mesh_is_refused(runs):
    [(code, out)] = _finish([_train(["--model", runs["model"], "--data", runs["root"] / "text.txt", "--out",
                                     runs["root"] / "bad", *SHAPE, "--batch-size", "6", *STEPS, "--mesh", "4x2"], 8)])
    assert code == 2
    assert ("--batch-size 6 must be a multiple of the mesh's data size 4 (--mesh 4x2): each data slice takes an "
            "equal share of the batch") in out


@pytest.mark.parametrize("argv, message", [
    (["--mesh", "2x1"], "--mesh 2x1 needs 2 devices; the cpu backend has 1 (over 1 process(es))"),
    (["--mesh", "2x"], "argument --mesh: must be DATAxMODEL device counts such as 8x1 or 4x2, got '2x'"),
    (["--mesh", "0x1"], "argument --mesh: must be DATAxMODEL device counts such as 8x1 or 4x2, got '0x1'"),
])
def test_bad_meshes_are_refused(tmp_path, argv, message):
    (tmp_path / "text.txt").write_text(TEXT)
    code, _, err = run("train", "--model", _tiny_copy(tmp_path / "model"), "--data", tmp_path / "text.txt",
                       "--out", tmp_path / "out", *SHAPE, *STEPS, *argv)
    assert code == 2
    assert message in err


def test_incomplete_process_settings_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_JAX_NUM_PROCESSES", "2")
    for var in ("LORA_JAX_COORDINATOR_ADDRESS", "LORA_JAX_PROCESS_ID", "JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "text.txt").write_text(TEXT)
    code, _, err = run("train", "--model", _tiny_copy(tmp_path / "model"), "--data", tmp_path / "text.txt",
                       "--out", tmp_path / "out", *SHAPE, *STEPS)
    assert code == 2
    assert "the multi-process settings in the environment: multi-process settings are incomplete: " \
           "coordinator_address, process_id not set" in err

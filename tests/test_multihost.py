"""Two JAX processes on this machine, 4 CPU devices each, as a two-host cluster (tests/_multihost_worker.py).

Three ``fsdp`` training steps over the 8 devices of 2 processes equal the same
steps in one process with 8 devices (loss, grad norm, adapters) and the
one-device run, within float32 rounding; the checkpoint the two processes
save restores exactly in one process, on one device and on a 4 x 2 mesh; the
PEFT export and the merged Hugging Face folder are written once, by process 0,
byte-identical to what one process writes from the same adapters; a failed
export on process 0 makes every process raise, quoting its error; a process
that dies makes the other stop within a bounded time, with JAX's error naming
the dead task, instead of hanging. :func:`lora_jax.distributed.settings`
reads and checks the coordinator settings.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from lora_jax import distributed
from tests.tolerances import assert_close

WORKER = pathlib.Path(__file__).with_name("_multihost_worker.py")
REPO = WORKER.parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(prefix, mode, devices, *args):
    return _popen([str(WORKER), str(prefix), mode, *map(str, args)], devices)


def _popen(argv, devices, **settings):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PYTHONUNBUFFERED": "1"}
    for var in ("LORA_JAX_COORDINATOR_ADDRESS", "LORA_JAX_NUM_PROCESSES", "LORA_JAX_PROCESS_ID"):
        env.pop(var, None)
    env.update(settings)
    return subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait(procs, timeout):
    """Each process's (exit code, output); kills every one still running after ``timeout`` seconds."""
    deadline, results = time.monotonic() + timeout, []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, _ = p.communicate()
            pytest.fail(f"a worker ran past {timeout} s:\n{out[-3000:]}")
        results.append((p.returncode, out))
    return results


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    return tmp_path_factory.mktemp("multihost") / "run"


@pytest.fixture(scope="module")
def runs(prefix):
    port = _port()
    # the 2-process run first: the single-process run restores its checkpoint
    for start in (lambda: [_start(prefix, "multi", 4, port, pid, 2) for pid in (0, 1)],
                  lambda: [_start(prefix, "single", 8)]):
        for code, out in _wait(start(), 240):
            assert code == 0, out[-3000:]
    load = lambda mode: (json.loads(pathlib.Path(f"{prefix}.{mode}.json").read_text()),
                         dict(np.load(f"{prefix}.{mode}.npz")))
    return load("single"), load("multi")


def test_two_processes_see_one_mesh_of_eight_devices(runs):
    _, (multi, _) = runs
    assert (multi["process_count"], multi["devices"], multi["local_devices"]) == (2, 8, 4)


def test_two_processes_train_as_one_process_and_as_one_device(runs):
    (single, s_arrays), (multi, m_arrays) = runs
    assert_close(multi["losses"], single["losses"], what="losses, 2 x 4 vs 1 x 8 devices")
    assert_close(multi["grad_norms"], single["grad_norms"], what="grad norms, 2 x 4 vs 1 x 8 devices")
    assert_close(multi["losses"], single["one_device_losses"], what="losses, 2 x 4 devices vs one device")
    names = sorted(k for k in s_arrays if k.startswith("sharded/"))
    assert names == sorted(m_arrays) and len(names) == 28      # 2 layers x 7 projections x (a, b)
    for name in names:
        assert_close(m_arrays[name], s_arrays[name], what=f"{name}: 2 x 4 vs 1 x 8")
        assert_close(m_arrays[name], s_arrays["one/" + name.split("/", 1)[1]], what=f"{name}: 2 x 4 vs one device")
    assert set(multi["collectives"]["counts"]) <= {"all-gather", "all-reduce", "reduce-scatter"}


def test_a_checkpoint_saved_by_two_processes_restores_in_one(runs):
    """Orbax across processes: each writes its shards; one process on one device reads back every value exactly."""
    (single, s_arrays), (_, m_arrays) = runs
    assert single["restored_step"] == 3
    for name, value in m_arrays.items():
        np.testing.assert_array_equal(s_arrays["restored/" + name.split("/", 1)[1]], value, err_msg=name)


def test_a_checkpoint_saved_by_two_processes_restores_on_another_mesh(runs):
    """2 processes x (8 x 1) fsdp -> 1 process x (4 x 2) fsdp_tp: every value exact, on the new mesh's shardings."""
    (single, s_arrays), (_, m_arrays) = runs
    assert single["remeshed_shardings_kept"] is True
    for name, value in m_arrays.items():
        np.testing.assert_array_equal(s_arrays["remeshed/" + name.split("/", 1)[1]], value, err_msg=name)


def _files(folder: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_exports_are_written_once_and_equal_one_process_exports(runs, prefix):
    """PEFT adapter and merged HF folder: process 0 writes, process 1 writes nothing; bytes equal one process's."""
    (single, _), _ = runs
    first, second = (json.loads(pathlib.Path(f"{prefix}.multi.p{i}.json").read_text()) for i in (0, 1))
    assert first == {"peft": ["adapter_config.json", "adapter_model.safetensors"],
                     "merged": ["config.json", "model.safetensors"]}
    assert second == {"peft": None, "merged": None}
    assert single["exports_of_multi"] == first
    for kind in ("peft", "merged"):
        multi_files = _files(pathlib.Path(f"{prefix}.multi.{kind}"))
        assert sorted(multi_files) == sorted(first[kind])
        assert multi_files == _files(pathlib.Path(f"{prefix}.of_multi.{kind}")), kind


def test_exports_hold_the_trained_values(runs, prefix):
    """The PEFT file loads back to the 2-process adapters exactly; the merged folder is their merge."""
    from lora_jax.io import load_peft
    from lora_jax.models import from_pretrained

    (_, s_arrays), (_, m_arrays) = runs
    loaded = load_peft(f"{prefix}.multi.peft")
    flat = {"/".join(k): v for k, v in _flatten(loaded.lora_params)}
    for name, value in m_arrays.items():
        np.testing.assert_array_equal(flat[name.split("/", 1)[1]], value, err_msg=name)
    _, params = from_pretrained(f"{prefix}.multi.merged")
    merged = {"/".join(k): v for k, v in _flatten(params)}
    one = {k.split("/", 1)[1]: v for k, v in s_arrays.items() if k.startswith("merged_one/")}
    assert sorted(merged) == sorted(one)
    for name, value in one.items():
        assert_close(merged[name], value, what=f"{name}: merged by 2 processes vs lora_jax.merge on one device")


def _flatten(tree, path=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, path + (key,))
    else:
        yield path, np.asarray(tree)


def test_a_failed_export_on_process_0_fails_every_process(tmp_path):
    port = _port()
    procs = [_start(tmp_path / "run", "badwrite", 4, port, pid, 2) for pid in (0, 1)]
    for code, out in _wait(procs, 120):
        assert code == 0, out[-3000:]
    first, second = (json.loads((tmp_path / f"run.badwrite.p{i}.json").read_text()) for i in (0, 1))
    assert first["error"] in ("FileExistsError", "NotADirectoryError"), first
    assert second["error"] == "RuntimeError", second
    assert second["message"] == (f"process 0 could not write the PEFT adapter in "
                                 f"{str(tmp_path / 'run.badwrite.file')!r}: {first['error']}: {first['message']}")


def test_a_dead_process_stops_the_other_within_a_bounded_time(tmp_path):
    port = _port()
    start = time.monotonic()
    procs = [_start(tmp_path / "run", "die", 4, port, pid, 2, 5) for pid in (0, 1)]
    (code0, out0), (code1, _) = _wait(procs, 90)
    assert code1 == 3
    assert code0 != 0
    assert "another task died" in out0 or "unhealthy" in out0, out0[-3000:]
    assert time.monotonic() - start < 90


@pytest.mark.parametrize("env, message", [
    ({"LORA_JAX_NUM_PROCESSES": "2"}, "coordinator_address, process_id not set"),
    ({"LORA_JAX_NUM_PROCESSES": "two", "LORA_JAX_PROCESS_ID": "0", "LORA_JAX_COORDINATOR_ADDRESS": "h:1"},
     "num_processes must be an integer, got 'two'"),
    ({"LORA_JAX_NUM_PROCESSES": "2", "LORA_JAX_PROCESS_ID": "2", "LORA_JAX_COORDINATOR_ADDRESS": "h:1"},
     "process_id must be in 0 .. num_processes - 1"),
    ({"LORA_JAX_NUM_PROCESSES": "2", "LORA_JAX_PROCESS_ID": "0", "LORA_JAX_COORDINATOR_ADDRESS": "host"},
     "must be host:port"),
])
def test_settings_are_checked(monkeypatch, env, message):
    for var in ("LORA_JAX_COORDINATOR_ADDRESS", "LORA_JAX_NUM_PROCESSES", "LORA_JAX_PROCESS_ID",
                "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=message):
        distributed.settings()


def test_no_settings_means_one_process(monkeypatch):
    for var in ("LORA_JAX_COORDINATOR_ADDRESS", "LORA_JAX_NUM_PROCESSES", "LORA_JAX_PROCESS_ID",
                "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.settings() is None
    info = distributed.initialize()
    assert (info.process_id, info.num_processes, info.is_main) == (0, 1, True)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.1.2.3:99")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("LORA_JAX_PROCESS_ID", "3")
    assert distributed.settings() == {"coordinator_address": "10.1.2.3:99", "num_processes": 4, "process_id": 3}


def test_the_sharded_example_runs_unchanged_on_two_processes(tmp_path):
    """examples/sharded_training.py: one process x 8 devices, then 2 processes x 4 from the environment alone."""
    script = ["examples/sharded_training.py", "--steps", "3", "--mesh", "4x2"]
    [(code, one)] = _wait([_popen(script + ["--out", str(tmp_path / "one")], 8)], 120)
    assert code == 0, one[-3000:]
    port = _port()
    procs = [_popen(script + ["--out", str(tmp_path / "two")], 4, LORA_JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                    LORA_JAX_NUM_PROCESSES="2", LORA_JAX_PROCESS_ID=str(i)) for i in (0, 1)]
    (code0, two), (code1, quiet) = _wait(procs, 180)
    assert (code0, code1) == (0, 0), two[-3000:] + quiet[-3000:]
    assert "over 8 cpu devices; 1 process(es)" in one and "over 8 cpu devices; 2 process(es)" in two
    assert "loss:" not in quiet      # one report, from process 0
    losses = lambda out: [float(x) for x in re.findall(r"step \d+ ([\d.]+)", out.split("loss: ")[1].splitlines()[0])]
    assert len(losses(two)) == 3
    assert_close(losses(two), losses(one), what="the example's losses, 2 x 4 vs 1 x 8 devices")
    for out in (one, two):
        diff = float(re.search(r"shardings kept True, all-gathers 0, max \|diff\| vs merge on one device (\S+)",
                               out).group(1))
        assert diff <= 1e-6, out     # the merged weights are below 1: a few float32 ulps (1.2e-7 at 1)
    for kind, names in (("adapter", ["adapter_config.json", "adapter_model.safetensors"]),
                        ("merged", ["config.json", "model.safetensors"])):
        assert sorted(p.name for p in (tmp_path / "two" / kind).iterdir()) == names

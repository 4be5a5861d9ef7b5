"""Two JAX processes on this machine, 4 CPU devices each, as a two-host cluster (tests/_multihost_worker.py).

Three ``fsdp`` training steps over the 8 devices of 2 processes equal the same
steps in one process with 8 devices (loss, grad norm, adapters) and the
one-device run, within float32 rounding; the checkpoint the two processes
save restores exactly in one process on one device; a process that dies makes the
other stop within a bounded time, with JAX's error naming the dead task,
instead of hanging. :func:`lora_jax.distributed.settings` reads and checks
the coordinator settings.
"""

from __future__ import annotations

import json
import os
import pathlib
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
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PYTHONUNBUFFERED": "1"}
    for var in ("LORA_JAX_COORDINATOR_ADDRESS", "LORA_JAX_NUM_PROCESSES", "LORA_JAX_PROCESS_ID"):
        env.pop(var, None)
    return subprocess.Popen([sys.executable, str(WORKER), str(prefix), mode, *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


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
def runs(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("multihost") / "run"
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

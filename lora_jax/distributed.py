"""Several JAX processes as one program: the coordinator settings, read once, before JAX's backends start.

A multi-host run starts the same script once per host (or per process on
one machine). Each process calls :func:`initialize` first; after it,
``jax.devices()`` lists every process's devices, a mesh built from them
(:func:`lora_jax.sharding.make_mesh`) spans all hosts, and each process
feeds its own rows of the batch (:meth:`lora_jax.sharding.Plan.shard_batch`).
With no settings at all the call does nothing, so the same script runs on
one process unchanged.

The settings, from the arguments or else the environment:

=====================  =======================================================
coordinator address    ``LORA_JAX_COORDINATOR_ADDRESS`` or ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0)
process count          ``LORA_JAX_NUM_PROCESSES`` or ``JAX_NUM_PROCESSES``
this process's id      ``LORA_JAX_PROCESS_ID`` or ``JAX_PROCESS_ID`` (0 .. count - 1)
=====================  =======================================================

On a cluster JAX can read them itself (SLURM's ``SLURM_*`` variables, a TPU
pod slice's metadata, a Kubernetes JobSet): pass ``auto=True`` to let
``jax.distributed.initialize`` detect them. On CPU the processes exchange
data through gloo (``jax_cpu_collectives_implementation``), which
:func:`initialize` selects before the backend starts.
"""

from __future__ import annotations

import dataclasses
import os

import jax

_ENV = {"coordinator_address": ("LORA_JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
        "num_processes": ("LORA_JAX_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
        "process_id": ("LORA_JAX_PROCESS_ID", "JAX_PROCESS_ID")}


@dataclasses.dataclass(frozen=True)
class Processes:
    """Where this process stands: its index, how many there are, and their devices."""

    process_id: int
    num_processes: int
    local_devices: int
    devices: int

    @property
    def is_main(self) -> bool:
        """Process 0: the one that writes files meant to exist once (a PEFT export, a merged folder)."""
        return self.process_id == 0


def _setting(name: str, given):
    if given is not None:
        return given
    for var in _ENV[name]:
        if os.environ.get(var, "") != "":
            return os.environ[var]
    return None


def _as_int(name: str, value) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r} (from the argument or {' / '.join(_ENV[name])})") \
            from None
    return number


def settings(coordinator_address: str | None = None, num_processes: int | None = None,
             process_id: int | None = None) -> dict | None:
    """The coordinator settings from the arguments or the environment, checked; ``None`` when none is set.

    >>> settings("10.0.0.1:1234", 4, 2)
    {'coordinator_address': '10.0.0.1:1234', 'num_processes': 4, 'process_id': 2}
    >>> settings(num_processes=2)
    Traceback (most recent call last):
    ValueError: multi-process settings are incomplete: coordinator_address, process_id not set (arguments, or LORA_JAX_COORDINATOR_ADDRESS / JAX_COORDINATOR_ADDRESS, LORA_JAX_PROCESS_ID / JAX_PROCESS_ID)
    """
    found = {"coordinator_address": _setting("coordinator_address", coordinator_address),
             "num_processes": _as_int("num_processes", _setting("num_processes", num_processes)),
             "process_id": _as_int("process_id", _setting("process_id", process_id))}
    missing = [k for k, v in found.items() if v is None]
    if len(missing) == len(found):
        return None
    if missing:
        raise ValueError(f"multi-process settings are incomplete: {', '.join(missing)} not set (arguments, or "
                         + ", ".join(" / ".join(_ENV[k]) for k in missing) + ")")
    if found["num_processes"] < 1 or not 0 <= found["process_id"] < found["num_processes"]:
        raise ValueError(f"process_id must be in 0 .. num_processes - 1, got process_id={found['process_id']}, "
                         f"num_processes={found['num_processes']}")
    if ":" not in str(found["coordinator_address"]):
        raise ValueError(f"coordinator_address must be host:port, got {found['coordinator_address']!r}")
    return found


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False, timeout_s: int = 300,
               heartbeat_timeout_s: int = 100) -> Processes:
    """Joins this process to the others (``jax.distributed.initialize``); a no-op for a single process.

    Call it before anything else touches JAX's devices. ``timeout_s`` bounds
    the wait for the other processes at start-up: a process that never
    arrives makes the others fail with JAX's error instead of waiting forever.
    ``heartbeat_timeout_s`` bounds how long a process that dies later goes
    unnoticed: the others then stop with an error (the coordination service
    aborts them) instead of hanging in a collective.

    Returns:
      this process's :class:`Processes`.
    """
    found = settings(coordinator_address, num_processes, process_id)
    if auto or (found is not None and found["num_processes"] > 1):
        # The CPU backend needs a collectives implementation to talk across processes; GPUs and TPUs
        # bring their own. The setting only affects the CPU backend, and must precede its start.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**(found or {}), initialization_timeout=timeout_s,
                                   heartbeat_timeout_seconds=heartbeat_timeout_s)
    return current()


def current() -> Processes:
    """This process's :class:`Processes` (one process when :func:`initialize` was not needed)."""
    return Processes(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())

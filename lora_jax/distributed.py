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

Files meant to exist once (a PEFT export, a merged Hugging Face folder) are
written by :func:`write_once` and its two uses :func:`save_peft` and
:func:`save_pretrained`: every process calls them (the values are gathered
from all processes' shards), process 0 writes, and all return when the files
are complete, or all raise if process 0 could not write them. Orbax
checkpoints (:class:`lora_jax.io.Checkpointer`) are written by every process,
each its own shards, into one directory that all of them can reach.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from lora_jax import io as lora_io
from lora_jax import models

R = TypeVar("R")
#: Bytes of process 0's error message that :func:`write_once` passes to the other processes.
MESSAGE_BYTES = 2048

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


def barrier(name: str) -> None:
    """Waits until every process has reached ``barrier(name)``; nothing with one process.

    For steps that must not overlap across processes, e.g. every process
    checks an output folder before any of them writes into it.

    >>> barrier("checked")    # one process: returns at once
    """
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def gather(tree) -> Any:
    """Every leaf of ``tree`` as a host NumPy array holding its whole (global) value, on every process.

    A leaf sharded across processes is assembled from all of them
    (``process_allgather``); any other leaf is read where it is (all
    processes are assumed to hold the same value, as after :meth:`Plan.place`).
    With several processes this is a collective: every process must call it,
    with the same tree, at the same point of the program.

    >>> import jax.numpy as jnp
    >>> gather({"a": jnp.arange(3.0)})["a"]
    array([0., 1., 2.], dtype=float32)
    """
    return jax.tree.map(_host_value, tree)


def _host_value(leaf) -> np.ndarray:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf)


def _outcome(error: BaseException | None) -> tuple[bool, str]:
    """Process 0's ``(succeeded, message)``, sent to every process (which all call this together)."""
    text = "" if error is None else f"{type(error).__name__}: {error}"
    raw = np.zeros(MESSAGE_BYTES + 1, np.uint8)
    encoded = text.encode("utf-8")[:MESSAGE_BYTES]
    raw[0], raw[1:1 + len(encoded)] = error is None, np.frombuffer(encoded, np.uint8)
    sent = np.asarray(multihost_utils.broadcast_one_to_all(raw))
    return bool(sent[0]), bytes(sent[1:]).rstrip(b"\0").decode("utf-8", "replace")


def write_once(write: Callable[[Any], R], tree, *, what: str = "the files") -> R | None:
    """``write(values)`` on process 0 only, with ``tree`` gathered from every process's shards.

    Every process calls it (the gather is a collective). Process 0 receives
    ``tree`` as host NumPy arrays and writes; the others hold one gathered
    leaf at a time and drop it, so only process 0 needs host memory for the
    whole tree. All processes return once process 0 has finished, so the files
    are complete wherever the call returns. If process 0's ``write`` raises,
    process 0 re-raises its error and every other process raises a
    ``RuntimeError`` quoting it, instead of carrying on or hanging.

    With one process it is ``write(gather(tree))``.

    Args:
      write: called with the gathered tree on process 0; its result is returned there.
      tree: the values to write (sharded or not).
      what: names the files in the other processes' error.

    Returns:
      ``write``'s result on process 0; None on the others.

    >>> import jax.numpy as jnp
    >>> write_once(lambda values: float(values["w"].sum()), {"w": jnp.ones(4)})
    4.0
    """
    if jax.process_count() == 1:
        return write(gather(tree))
    main = jax.process_index() == 0
    values = jax.tree.map(lambda leaf: _host_value(leaf) if main else _host_value(leaf).shape, tree)
    result, error = None, None
    if main:
        try:
            result = write(values)
        except Exception as err:  # noqa: BLE001 -- re-raised below, after the others have been told
            error = err
    ok, message = _outcome(error)
    if error is not None:
        raise error
    if not ok:
        raise RuntimeError(f"process 0 could not write {what}: {message}")
    return result


def save_peft(path, base_params, lora_params, config, **options) -> list[str] | None:
    """:func:`lora_jax.io.save_peft` in a multi-process run: written once, by process 0 (see :func:`write_once`).

    Every process calls it with its (sharded) ``lora_params``; of
    ``base_params`` only the shapes and dtypes are read (nothing is gathered). ``options`` are
    :func:`~lora_jax.io.save_peft`'s keywords.

    Returns:
      the file names written, on process 0; None on the others.
    """
    # Zero-stride stand-ins: the base's shapes and dtypes, sliceable like arrays, holding no memory.
    shapes = jax.tree.map(lambda leaf: np.broadcast_to(np.zeros((), leaf.dtype), np.shape(leaf)), base_params)
    return write_once(lambda lora: lora_io.save_peft(path, shapes, lora, config, **options), lora_params,
                      what=f"the PEFT adapter in {os.fspath(path)!r}")


def save_pretrained(path, config, params, **options) -> list[str] | None:
    """:func:`lora_jax.models.save_pretrained` in a multi-process run: written once, by process 0.

    For a merged model: ``params`` may be the output of
    :func:`lora_jax.sharding.sharded_merge`, sharded across processes; process
    0 gathers it weight by weight and writes the Hugging Face folder (see
    :func:`write_once`). ``options`` are
    :func:`~lora_jax.models.save_pretrained`'s keywords.

    Returns:
      the file names written, on process 0; None on the others.
    """
    return write_once(lambda values: models.save_pretrained(path, config, values, **options), params,
                      what=f"the model folder {os.fspath(path)!r}")

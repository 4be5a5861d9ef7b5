"""Where ``lora-jax train`` runs: one device, or a ``--mesh`` over every device of every process.

Without ``--mesh`` everything lives on the backend's first device, as it
always has. With ``--mesh DATAxMODEL`` the base, the adapters and the
optimizer state are laid out by :func:`lora_jax.sharding.plan` with the
``--sharding`` rules, each batch is split over DATA, and the step is
:func:`lora_jax.sharding.make_sharded_train_step`.

Several processes (hosts) run the same command, each with the coordinator
settings in its environment (``LORA_JAX_COORDINATOR_ADDRESS``,
``LORA_JAX_NUM_PROCESSES``, ``LORA_JAX_PROCESS_ID``; see
:mod:`lora_jax.distributed`): the mesh then spans all their devices, each
process feeds its own rows of every batch, all write the checkpoints' shards
into the one ``--out`` folder they share, and process 0 alone writes the
adapter and the run's json.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax import backend, distributed, sharding
from lora_jax.app.cli_args import CliError
from lora_jax.config import LoraConfig
from lora_jax.linen import lora_apply

__all__ = ["Placement", "check_processes", "join_processes"]


def join_processes() -> distributed.Processes:
    """Joins the other processes when the environment names them (else nothing); before any device is used."""
    try:
        return distributed.initialize()
    except ValueError as err:       # incomplete or invalid LORA_JAX_* / JAX_* settings
        raise CliError(f"the multi-process settings in the environment: {err}", code=2) from None


class Placement:
    """The arrays' home for one training run: :attr:`plan` is None on one device, else the mesh's plan."""

    def __init__(self, args, base, lora, tx: optax.GradientTransformation):
        self.plan = None if args.mesh is None else _plan(args, base, lora, tx)

    def describe(self) -> str:
        """One line for the log: where the step runs."""
        if self.plan is None:
            return f"one device ({backend.describe(backend.current())})"
        mesh = self.plan.mesh
        return (f"a {'x'.join(map(str, mesh.devices.shape))} mesh {dict(mesh.shape)} of {mesh.devices.size} "
                f"{mesh.devices.flat[0].platform} devices, {jax.process_count()} process(es)")

    def step(self, module, config: LoraConfig, tx: optax.GradientTransformation, loss_fn, one_device_step):
        """The jitted training step: ``one_device_step`` without a mesh, else the plan's sharded step."""
        if self.plan is None:
            return one_device_step
        return sharding.make_sharded_train_step(lora_apply(module, config), loss_fn, tx, self.plan)

    def state(self, lora, opt_state, rng):
        """``(lora, opt_state, rng)`` placed: committed to the device, or on the plan's shardings."""
        if self.plan is None:
            device = backend.current()
            return jax.device_put((lora, opt_state, rng), device, may_alias=False)
        # From host values: JAX moves a one-device array onto a mesh that spans other processes' devices only
        # on TPU runtimes; every process holds the same values, so each places its own shards from the host.
        lora, opt_state = jax.device_get((lora, opt_state))
        placed = jax.device_put((lora, opt_state), (self.plan.lora_params, self.plan.opt_state))
        key = jax.device_put(jax.device_get(jax.random.key_data(rng)), self.plan.replicated)
        return (*placed, jax.random.wrap_key_data(key, impl=jax.random.key_impl(rng)))

    def base(self, base):
        """The frozen base, on the device or laid out by the plan's rules (from host values, as :meth:`state`)."""
        return base if self.plan is None else jax.device_put(jax.device_get(base), self.plan.base_params)

    def batch(self, global_batch: np.ndarray):
        """One step's batch: the whole of it on the device, or this process's rows assembled over the mesh."""
        if self.plan is None:
            return jnp.asarray(global_batch)
        return self.plan.shard_batch(self.plan.local_rows(global_batch))

    def replicated(self, array: np.ndarray):
        """An input every device reads whole (the held-out windows)."""
        return jnp.asarray(array) if self.plan is None else jax.device_put(array, self.plan.replicated)


def _plan(args, base, lora, tx) -> sharding.Plan:
    data, model = args.mesh
    platform = backend.current().platform
    devices = jax.devices(platform)
    where = f"--mesh {data}x{model}"
    if data * model > len(devices):
        raise CliError(f"{where} needs {data * model} devices; the {platform} backend has {len(devices)} "
                       f"(over {jax.process_count()} process(es))", code=2)
    if jax.process_count() > 1 and data * model != len(devices):
        raise CliError(f"{where} uses {data * model} of the {len(devices)} devices of {jax.process_count()} "
                       f"processes; with several processes the mesh must use every device", code=2)
    if args.batch_size % data:
        raise CliError(f"--batch-size {args.batch_size} must be a multiple of the mesh's data size {data} "
                       f"({where}): each data slice takes an equal share of the batch", code=2)
    try:
        return sharding.plan(sharding.make_mesh((data, model), devices=devices[:data * model]), base, lora, tx,
                             args.sharding)
    except ValueError as err:      # a layer whose dimensions do not split over the mesh
        raise CliError(f"{where} --sharding {args.sharding}: {err}", code=2) from None


def check_processes(args) -> None:
    """Several processes need a ``--mesh`` (one device cannot span them)."""
    if jax.process_count() > 1 and args.mesh is None:
        raise CliError(f"{jax.process_count()} processes joined, but training without --mesh runs on one "
                       f"device; pass --mesh DATAxMODEL covering all {jax.device_count()} devices", code=2)


"""Choosing the device JAX computes on: ``cpu``, ``gpu``, ``tpu`` or ``auto``.

The choice comes from the argument, else the ``LORA_JAX_BACKEND`` environment
variable, else ``auto`` (JAX's default backend: an accelerator when there is one).
"""

from __future__ import annotations

import os

import jax

BACKENDS = ("auto", "cpu", "gpu", "tpu")
ENV_VAR = "LORA_JAX_BACKEND"

_INSTALL_HINTS = {
    "gpu": "install JAX's CUDA build with `pip install 'lora-jax[cuda12]'` (it pulls `jax[cuda12]`) "
           "on a machine with an NVIDIA GPU and driver",
    "tpu": "install JAX's TPU build with `pip install 'jax[tpu]'` on a Cloud TPU VM",
}


class BackendUnavailableError(RuntimeError):
    """The requested backend has no device in this process."""


def _requested(name: str | None) -> str:
    value = (name if name is not None else os.environ.get(ENV_VAR, "auto")).strip().lower()
    if value not in BACKENDS:
        source = "argument" if name is not None else f"environment variable {ENV_VAR}"
        raise ValueError(f"backend ({source}) must be one of {BACKENDS}, got {value!r}")
    return value


def use(name: str | None = None) -> jax.Device:
    """Makes this process's first device of the chosen backend JAX's default device and returns it.

    Raises:
      BackendUnavailableError: the backend has no device here; for ``gpu`` and
        ``tpu`` the message says what to install.

    >>> use("cpu").platform
    'cpu'
    """
    backend = _requested(name)
    # This process's first device: with several processes, jax.devices()[0] belongs to process 0.
    if backend == "auto":
        device = jax.local_devices()[0]
    else:
        try:
            device = jax.local_devices(backend=backend)[0]
        except RuntimeError as err:
            hint = _INSTALL_HINTS.get(backend, "")
            raise BackendUnavailableError(
                f"backend {backend!r} requested but JAX has no {backend} device ({err}). "
                f"Available: {describe_all()}. To use it, {hint}.") from None
    jax.config.update("jax_default_device", device)
    return device


def current() -> jax.Device:
    """The device JAX places new arrays on."""
    default = jax.config.jax_default_device
    return default if isinstance(default, jax.Device) else jax.local_devices()[0]


def describe(device: jax.Device | None = None) -> str:
    """A one-line description, e.g. ``"cpu: TFRT_CPU_0 (1 cpu device)"``."""
    device = device or current()
    count = len(jax.devices(device.platform))
    return f"{device.platform}: {device.device_kind} (id {device.id}, {count} {device.platform} device(s))"


def describe_all() -> str:
    """The backends JAX can see, as ``"cpu x1"``-style entries."""
    seen = {}
    for device in jax.devices() + jax.devices("cpu"):
        seen.setdefault(device.platform, set()).add(device.id)
    return ", ".join(f"{platform} x{len(ids)}" for platform, ids in seen.items())


# XLA:CPU's default scheduler orders the program for parallelism and starts
# the recomputation of rematerialised (``jax.checkpoint``/``nn.remat``) blocks
# as early as it can, so remat saves almost no memory there (the reference
# Llama's LoRA step: 295.6 -> 274.1 MiB of temporaries). The memory-optimised
# scheduler honours it (97.0 MiB); GPU and TPU schedulers already do. (The
# older boolean xla_cpu_enable_concurrency_optimized_scheduler only works as an
# XLA_FLAGS flag, not as a per-function compiler option; this one does both.)
_MEMORY_LEAN = {"cpu": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}}


def memory_lean_options(platform: str | None = None) -> dict:
    """XLA compiler options that let rematerialisation save memory on ``platform`` (default: the current one).

    Pass them as ``compiler_options`` to :func:`lora_jax.make_train_step` (or
    ``jax.jit``) together with a rematerialised model. Empty where the default
    scheduler is already memory-aware (GPU, TPU).

    >>> memory_lean_options("cpu")
    {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}
    >>> memory_lean_options("gpu")
    {}
    """
    return dict(_MEMORY_LEAN.get(platform or current().platform, {}))

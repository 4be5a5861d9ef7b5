"""``python -m lora_jax ...`` runs the ``lora-jax`` command (see :mod:`lora_jax.cli`)."""

from lora_jax.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

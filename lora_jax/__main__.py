"""``python -m lora_jax ...`` runs the ``lora-jax`` command (see :mod:`lora_jax.app.cli`)."""

from lora_jax.app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

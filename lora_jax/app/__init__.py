"""The application built on the library: the ``lora-jax`` command and its demo.

Nothing in the library (``lora_jax`` outside this subpackage) imports it; its extra
dependencies (tokenizers, matplotlib) come with ``pip install 'lora-jax[app]'``.
"""

"""The lora-jax demo: a byte-level Llama that knows English prose learns a Python "dialect".

``data`` builds the corpora (the standard library's docstrings and its
comment-free source) and batches bytes; ``pretrain`` trains the small base
model shipped in ``base_model/``.
"""

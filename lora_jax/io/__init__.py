"""Files: PEFT-format adapters (safetensors) and orbax training checkpoints.

``load_peft``/``save_peft`` read and write Hugging Face PEFT LoRA folders;
``Checkpointer`` saves and restores a training run's ``TrainState`` with orbax;
``tensors`` reads and writes safetensors files; ``names`` maps module names
between PyTorch and Flax; ``fields`` reads JSON configs strictly. A damaged
file raises a ``ValueError`` subclass naming the file and what is wrong:
``SafetensorsFileError``, ``BadTensorError`` (non-float or non-finite tensor),
``ConfigFieldError`` (a field of the wrong type or range),
``TargetMismatchError`` (``target_modules`` against the stored tensors).
"""

import importlib

# Each public name and the submodule that defines it, loaded on first use (PEP 562): ``checkpoint``
# brings orbax and ``tensors`` (and so ``peft``) brings safetensors, neither needed until a file is touched.
_WHERE = {
    "Checkpointer": "checkpoint", "TrainState": "checkpoint", "base_fingerprint": "checkpoint",
    "directory_size": "checkpoint", "PeftAdapter": "peft", "UnsupportedAdapterError": "peft",
    "load_peft": "peft", "save_peft": "peft", "TargetMismatchError": "peft", "BadTensorError": "tensors",
    "SafetensorsFileError": "tensors", "ConfigFieldError": "fields", "fields": None, "names": None, "tensors": None,
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'lora_jax.io' has no attribute {name!r}")
    module = importlib.import_module(f"lora_jax.io.{_WHERE[name] or name}")
    return module if _WHERE[name] is None else getattr(module, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = ["BadTensorError", "Checkpointer", "ConfigFieldError", "PeftAdapter", "SafetensorsFileError",
           "TargetMismatchError", "TrainState", "UnsupportedAdapterError", "base_fingerprint", "directory_size",
           "fields", "load_peft", "names", "save_peft", "tensors"]

"""Files: PEFT-format adapters (safetensors) and orbax training checkpoints.

``load_peft``/``save_peft`` read and write Hugging Face PEFT LoRA folders;
``Checkpointer`` saves and restores a training run's ``TrainState`` with orbax;
``tensors`` reads and writes safetensors files; ``names`` maps module names
between PyTorch and Flax.
"""

from lora_jax.io import names, tensors
from lora_jax.io.checkpoint import Checkpointer, TrainState, base_fingerprint, directory_size
from lora_jax.io.peft import PeftAdapter, UnsupportedAdapterError, load_peft, save_peft

__all__ = ["Checkpointer", "PeftAdapter", "TrainState", "base_fingerprint", "directory_size", "UnsupportedAdapterError", "load_peft", "names", "save_peft", "tensors"]

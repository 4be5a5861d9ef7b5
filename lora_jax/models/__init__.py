"""Models with Hugging Face's module paths: a Llama-architecture causal LM, its files, and generation."""

from lora_jax.models.generate import generate
from lora_jax.models.hf import from_pretrained, save_pretrained
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM, RopeScaling, causal_lm_loss, init_cache

__all__ = ["LlamaConfig", "LlamaForCausalLM", "RopeScaling", "causal_lm_loss", "from_pretrained", "generate",
           "init_cache", "save_pretrained"]

"""Models with Hugging Face's module paths: the Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Gemma 2/3,
Phi-3), GPT-2, their files, and generation."""

from lora_jax.models.decoder import DecoderConfig, DecoderForCausalLM
from lora_jax.models.gemma import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig
from lora_jax.models.generate import generate
from lora_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from lora_jax.models.hf import from_pretrained, save_pretrained
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM, RopeScaling, causal_lm_loss, init_cache
from lora_jax.models.mistral import MistralConfig, MistralForCausalLM
from lora_jax.models.phi3 import Phi3Config, Phi3ForCausalLM
from lora_jax.models.qwen import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

__all__ = ["DecoderConfig", "DecoderForCausalLM", "GPT2Config", "GPT2LMHeadModel", "Gemma2Config", "Gemma2ForCausalLM",
           "Gemma3ForCausalLM", "Gemma3TextConfig", "LlamaConfig", "LlamaForCausalLM", "MistralConfig",
           "MistralForCausalLM", "Phi3Config", "Phi3ForCausalLM", "Qwen2Config", "Qwen2ForCausalLM", "Qwen3Config",
           "Qwen3ForCausalLM", "RopeScaling", "causal_lm_loss", "from_pretrained", "generate", "init_cache",
           "save_pretrained"]

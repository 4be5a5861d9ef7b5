"""A Llama-architecture causal LM in flax.linen, with Hugging Face's module paths.

Embeddings, RMSNorm, rotary position embeddings (Hugging Face's rotate-half
layout), grouped-query attention, a SwiGLU MLP, and an untied or tied output
head. Module paths mirror ``LlamaForCausalLM``: ``model/embed_tokens``,
``model/layers_0/self_attn/q_proj``, ``model/layers_0/mlp/down_proj``,
``model/norm``, ``lm_head`` (Flax joins with ``/`` and names list entries
``layers_N`` where PyTorch writes ``layers.N``). With ``scan_layers`` the
decoder layers are one ``nn.scan`` named ``model/layers`` whose params (and
adapters) carry a leading layer axis.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters, named as in Hugging Face's ``LlamaConfig``."""

    vocab_size: int = 4096
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads


class RMSNorm(nn.Module):
    eps: float = 1e-6
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (jnp.expand_dims(weight.astype(jnp.float32), tuple(range(y.ndim - 1))) * y).astype(x.dtype)


def rotary(x, positions, theta: float):
    """Rotary embedding in the rotate-half layout; ``x``: ``[batch, seq, heads, head_dim]``."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) / half))
    angles = positions[..., None].astype(jnp.float32) * inv_freq[None, None, :]  # [batch, seq, half]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _dense(features, name, cfg):
    return nn.Dense(features, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                    kernel_init=nn.initializers.normal(0.02))


class LlamaAttention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions):
        cfg = self.config
        batch, seq, _ = x.shape
        q = _dense(cfg.num_attention_heads * cfg.head_dim, "q_proj", cfg)(x)
        k = _dense(cfg.kv_heads * cfg.head_dim, "k_proj", cfg)(x)
        v = _dense(cfg.kv_heads * cfg.head_dim, "v_proj", cfg)(x)
        q = rotary(q.reshape(batch, seq, cfg.num_attention_heads, cfg.head_dim), positions, cfg.rope_theta)
        k = rotary(k.reshape(batch, seq, cfg.kv_heads, cfg.head_dim), positions, cfg.rope_theta)
        v = v.reshape(batch, seq, cfg.kv_heads, cfg.head_dim)
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return _dense(cfg.hidden_size, "o_proj", cfg)(out.reshape(batch, seq, -1))


class LlamaMLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = _dense(cfg.intermediate_size, "gate_proj", cfg)(x)
        up = _dense(cfg.intermediate_size, "up_proj", cfg)(x)
        return _dense(cfg.hidden_size, "down_proj", cfg)(nn.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name=name)
        x = x + LlamaAttention(cfg, name="self_attn")(norm("input_layernorm")(x), positions)
        return x + LlamaMLP(cfg, name="mlp")(norm("post_attention_layernorm")(x))


class _ScannedDecoderLayer(LlamaDecoderLayer):
    """The decoder layer with ``nn.scan``'s ``(carry, x) -> (carry, y)`` signature."""

    def __call__(self, x, positions):
        return super().__call__(x, positions), None


class LlamaModel(nn.Module):
    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                                     param_dtype=cfg.param_dtype, embedding_init=nn.initializers.normal(0.02))
        if cfg.scan_layers:
            layer = nn.remat(_ScannedDecoderLayer) if cfg.remat else _ScannedDecoderLayer
            self.layers = nn.scan(layer, variable_axes={True: 0}, split_rngs={"params": True},
                                  in_axes=nn.broadcast, length=cfg.num_hidden_layers)(cfg)
        else:
            layer = nn.remat(LlamaDecoderLayer) if cfg.remat else LlamaDecoderLayer
            self.layers = [layer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype)

    def __call__(self, input_ids, positions=None):
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        x = self.embed_tokens(input_ids)
        if self.config.scan_layers:
            x, _ = self.layers(x, positions)
        else:
            for layer in self.layers:
                x = layer(x, positions)
        return self.norm(x)

    def attend(self, x):
        return self.embed_tokens.attend(x)


class LlamaForCausalLM(nn.Module):
    """Returns next-token logits ``[batch, seq, vocab]`` for ``input_ids`` ``[batch, seq]``.

    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
    ...                   num_attention_heads=2)
    >>> model = LlamaForCausalLM(cfg)
    >>> ids = jnp.zeros((1, 5), jnp.int32)
    >>> model.apply(model.init(jax.random.key(0), ids), ids).shape
    (1, 5, 32)
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids, positions=None):
        cfg = self.config
        model = LlamaModel(cfg, name="model")
        x = model(input_ids, positions)
        if cfg.tie_word_embeddings:
            return model.attend(x)
        return _dense(cfg.vocab_size, "lm_head", cfg)(x)


def causal_lm_loss(logits, input_ids):
    """Mean next-token cross-entropy of ``logits`` against ``input_ids`` shifted by one."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = input_ids[:, 1:]
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(logz - picked)

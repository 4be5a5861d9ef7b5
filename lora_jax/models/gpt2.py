"""GPT-2 (Hugging Face's ``GPT2LMHeadModel``) in flax.linen, and its ``config.json`` name map.

Learned position embeddings (``wpe``), pre-norm blocks with LayerNorm, a fused
query/key/value projection (``c_attn``), a GELU MLP, and an output head tied to
the token embeddings (``wte``) unless ``tie_word_embeddings`` is off. Module
paths mirror transformers': ``transformer/wte``, ``transformer/h_0/attn/c_attn``,
``transformer/h_0/mlp/c_fc``, ``transformer/ln_f``. transformers stores the
blocks' weights as ``Conv1D`` ``[in, out]``, which is Flax's Dense kernel layout:
they are read and written untransposed, and a PEFT adapter on them says
``fan_in_fan_out: true`` (its ``lora_A``/``lora_B`` keep the usual shapes).

Dropout (``attn_pdrop``, ``resid_pdrop``, ``embd_pdrop``; 0.1 in the released
checkpoints) is read and not applied: transformers applies it only in training
mode, and lora_jax never drops out in the frozen base (adapters have their own
``LoraConfig.dropout``). Every other ``config.json`` field that changes the
computation is honoured or refused by name.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.io.fields import ConfigFieldError
from lora_jax.models.architecture import HfArchitecture
from lora_jax.models.decoder import causal_lm_loss

__all__ = ["ACTIVATIONS", "GPT2Config", "GPT2LMHeadModel", "LayerNorm", "init_cache"]

#: ``activation_function`` values, as transformers' ``ACT2FN`` computes them.
ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Hyper-parameters of GPT-2, named as the Llama family's where the meaning is the same.

    ``config.json`` names them ``n_embd`` (``hidden_size``), ``n_layer``
    (``num_hidden_layers``), ``n_head`` (``num_attention_heads``), ``n_inner``
    (``intermediate_size``; ``None`` means ``4 * hidden_size``) and
    ``n_positions`` (``max_position_embeddings``, the size of ``wpe``).

    * ``scale_attn_weights``: scores divided by ``sqrt(head_dim)``;
      ``scale_attn_by_inverse_layer_idx``: layer ``i``'s scores also by ``i + 1``.
    * ``reorder_and_upcast_attn``: the scores and their softmax in float32
      whatever the compute dtype (they always are in float32 compute).
    * ``remat``: rematerialise each block in the backward pass (ours).

    >>> GPT2Config(hidden_size=64, num_attention_heads=4).mlp_size, GPT2Config().head_dim
    (256, 64)
    """

    vocab_size: int = 50257
    hidden_size: int = 768
    intermediate_size: int | None = None
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 1024
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    def __post_init__(self):
        owner = type(self).__name__
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "max_position_embeddings"):
            value = getattr(self, field)
            if value is None and field == "intermediate_size":
                continue
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{owner}.{field} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{owner}.hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"{owner}.activation_function {self.activation_function!r} is not supported "
                             f"(supported: {sorted(ACTIVATIONS)})")
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"{owner}.layer_norm_epsilon must be a positive finite number, got {eps!r}")
        for field in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                      "tie_word_embeddings", "remat"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{owner}.{field} must be a bool, got {getattr(self, field)!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mlp_size(self) -> int:
        """The MLP's width: ``intermediate_size``, else ``4 * hidden_size`` (transformers' rule)."""
        return self.intermediate_size or 4 * self.hidden_size

    def attention_scale(self, layer: int) -> float:
        """The factor on layer ``layer``'s query-key scores."""
        scale = self.head_dim ** -0.5 if self.scale_attn_weights else 1.0
        return scale / (layer + 1) if self.scale_attn_by_inverse_layer_idx else scale


def init_cache(config: GPT2Config, batch: int, max_length: int, dtype=None) -> dict:
    """An empty cache for decoding up to ``max_length`` positions (at most ``max_position_embeddings``).

    ``"k"``/``"v"``: ``[layers, batch, max_length, heads, head_dim]``;
    ``"index"``: how many slots are filled; ``"valid"``: ``[batch, max_length]``,
    which filled slots are real tokens (not padding); ``"position"``: ``[batch]``,
    each row's next position (its real tokens so far).

    >>> c = init_cache(GPT2Config(hidden_size=32, num_attention_heads=4, num_hidden_layers=2), 1, 16)
    >>> c["k"].shape, c["valid"].shape, int(c["index"])
    ((2, 1, 16, 4, 8), (1, 16), 0)
    """
    if max_length > config.max_position_embeddings:
        raise ValueError(f"GPT-2 cache of {max_length} positions: the model has only max_position_embeddings="
                         f"{config.max_position_embeddings} learned positions (n_positions)")
    shape = (config.num_hidden_layers, batch, max_length, config.num_attention_heads, config.head_dim)
    zeros = jnp.zeros(shape, dtype or config.dtype)
    return {"k": zeros, "v": zeros, "index": jnp.zeros((), jnp.int32),
            "valid": jnp.zeros((batch, max_length), bool), "position": jnp.zeros((batch,), jnp.int32)}


class LayerNorm(nn.Module):
    """``weight * (x - mean) / sqrt(var + eps) + bias`` over the last axis, in float32 (torch's param names)."""

    eps: float = 1e-5
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        lead = tuple(range(y.ndim - 1))
        weight, bias = (jnp.expand_dims(p.astype(jnp.float32), lead) for p in (weight, bias))
        return (y * weight + bias).astype(x.dtype)


def _dense(features, name, cfg: GPT2Config, bias=True):
    return nn.Dense(features, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                    kernel_init=nn.initializers.normal(0.02))


def _attend(cfg: GPT2Config, q, k, v, mask, scale):
    """Softmax attention; ``mask`` ``[batch, q, k]`` is True where a query may see a key."""
    upcast = cfg.reorder_and_upcast_attn
    dtype = jnp.float32 if upcast else q.dtype
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(dtype), k.astype(dtype)) * jnp.asarray(scale, dtype)
    scores = jnp.where(mask[:, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class GPT2Attention(nn.Module):
    """Causal multi-head self-attention with one fused ``c_attn`` projection (q | k | v) and ``c_proj``."""

    config: GPT2Config
    layer: int

    @nn.compact
    def __call__(self, x, mask, layer_cache=None, index=None):
        cfg = self.config
        batch, seq, _ = x.shape
        qkv = _dense(3 * cfg.hidden_size, "c_attn", cfg)(x)
        q, k, v = (t.reshape(batch, seq, cfg.num_attention_heads, cfg.head_dim)
                   for t in jnp.split(qkv, 3, axis=-1))
        if layer_cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], k.astype(layer_cache["k"].dtype), index, 1)
            v = jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], v.astype(layer_cache["v"].dtype), index, 1)
            layer_cache = {"k": k, "v": v}
        out = _attend(cfg, q, k.astype(q.dtype), v.astype(q.dtype), mask, cfg.attention_scale(self.layer))
        return _dense(cfg.hidden_size, "c_proj", cfg)(out.reshape(batch, seq, -1)), layer_cache


class GPT2MLP(nn.Module):
    """``c_proj(act(c_fc(x)))``."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = ACTIVATIONS[cfg.activation_function](_dense(cfg.mlp_size, "c_fc", cfg)(x))
        return _dense(cfg.hidden_size, "c_proj", cfg)(h)


class GPT2Block(nn.Module):
    """``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    config: GPT2Config
    layer: int

    @nn.compact
    def __call__(self, x, mask, layer_cache=None, index=None):
        cfg = self.config
        norm = lambda name: LayerNorm(cfg.layer_norm_epsilon, cfg.param_dtype, name=name)
        h, layer_cache = GPT2Attention(cfg, self.layer, name="attn")(norm("ln_1")(x), mask, layer_cache, index)
        x = x + h
        return x + GPT2MLP(cfg, name="mlp")(norm("ln_2")(x)), layer_cache


def _positions(valid, start):
    """Each real token's position, ``start + (real tokens before it)``; padding gets 0 (as transformers)."""
    positions = start[:, None] + jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1
    return jnp.where(valid, positions, 0)


def _valid(input_ids, attention_mask):
    """``attention_mask`` as booleans (all True when None), checked against the ids' shape."""
    if attention_mask is None:
        return jnp.ones(input_ids.shape, bool)
    valid = jnp.asarray(attention_mask) != 0
    if valid.shape != input_ids.shape:
        raise ValueError(f"GPT-2: attention_mask{list(valid.shape)} must have input_ids' shape "
                         f"{list(input_ids.shape)} (with a cache: the mask of the new tokens only)")
    return valid


def _visible(keys_valid, index, seq):
    """``[batch, seq, keys]``: query ``i`` (at slot ``index + i``) sees the real keys at or before its slot."""
    causal = jnp.arange(keys_valid.shape[1])[None, :] <= (index + jnp.arange(seq))[:, None]
    return causal[None] & keys_valid[:, None, :]


class GPT2Model(nn.Module):
    """The stack (``transformer`` in the param tree): ``wte + wpe``, the blocks ``h_<i>``, ``ln_f``."""

    config: GPT2Config

    def setup(self):
        cfg = self.config
        embed = lambda n: nn.Embed(n, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                   embedding_init=nn.initializers.normal(0.02))
        self.wte, self.wpe = embed(cfg.vocab_size), embed(cfg.max_position_embeddings)
        block = nn.remat(GPT2Block) if cfg.remat else GPT2Block
        self.h = [block(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.ln_f = LayerNorm(cfg.layer_norm_epsilon, cfg.param_dtype)

    def __call__(self, input_ids, positions=None, cache=None, attention_mask=None):
        batch, seq = input_ids.shape
        if seq > self.config.max_position_embeddings:
            raise ValueError(f"GPT-2: {seq} tokens exceed max_position_embeddings="
                             f"{self.config.max_position_embeddings} (n_positions)")
        valid = _valid(input_ids, attention_mask)
        if cache is None:
            start, index, keys_valid = jnp.zeros((batch,), jnp.int32), 0, valid
        else:
            start, index = cache["position"], cache["index"]
            keys_valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], valid, index, axis=1)
        positions = _positions(valid, start) if positions is None else positions
        x, mask, updated = self.wte(input_ids) + self.wpe(positions), _visible(keys_valid, index, seq), []
        for i, block in enumerate(self.h):
            x, layer_cache = block(x, mask, None if cache is None else {"k": cache["k"][i], "v": cache["v"][i]},
                                   index)
            updated.append(layer_cache)
        if cache is not None:
            cache = {"k": jnp.stack([c["k"] for c in updated]), "v": jnp.stack([c["v"] for c in updated]),
                     "index": index + seq, "valid": keys_valid,
                     "position": start + jnp.sum(valid, axis=1, dtype=jnp.int32)}
        return self.ln_f(x), cache

    def attend(self, x):
        return self.wte.attend(x)


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with its language-model head: next-token logits ``[batch, seq, vocab]`` for ``input_ids``.

    Follows the cache protocol of :class:`~lora_jax.models.decoder.DecoderForCausalLM`:
    with ``cache`` (from :meth:`init_cache`) the call returns ``(logits, cache)``.
    ``attention_mask`` (``[batch, seq]``, 1 for a real token and 0 for padding,
    Hugging Face's convention; with a cache, the mask of the new tokens) keeps
    padded keys from being attended and numbers each row's real tokens from 0
    (``cumsum(mask) - 1``), continued across cached calls, so left-padded
    prompts decode as if unpadded. ``labels`` gives the mean next-token loss
    (:func:`~lora_jax.models.decoder.causal_lm_loss`; ``-100`` left out).

    >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=32, hidden_size=16, num_hidden_layers=1,
    ...                                    num_attention_heads=2, max_position_embeddings=8))
    >>> ids = jnp.ones((1, 5), jnp.int32)
    >>> variables = model.init(jax.random.key(0), ids)
    >>> sorted(variables["params"]["transformer"]["h_0"]["attn"])
    ['c_attn', 'c_proj']
    >>> logits, cache = model.apply(variables, ids, cache=model.init_cache(1, 8))
    >>> logits.shape, int(cache["index"])
    ((1, 5, 32), 5)
    """

    config: GPT2Config

    def setup(self):
        self.transformer = GPT2Model(self.config)
        if not self.config.tie_word_embeddings:
            self.lm_head = _dense(self.config.vocab_size, "lm_head", self.config, bias=False)

    def init_cache(self, batch: int, max_length: int, dtype=None) -> dict:
        """An empty cache (:func:`init_cache` of the config); a plain method that needs no params."""
        return init_cache(self.config, batch, max_length, dtype)

    def __call__(self, input_ids, positions=None, cache=None, labels=None, attention_mask=None):
        if labels is not None and cache is not None:
            raise ValueError(f"{type(self).__name__}: pass labels (training loss) or cache (decoding), not both")
        x, cache = self.transformer(input_ids, positions, cache, attention_mask)
        logits = self.transformer.attend(x) if self.config.tie_word_embeddings else self.lm_head(x)
        if labels is not None:
            return causal_lm_loss(logits, labels)
        return logits if cache is None else (logits, cache)


# ---- config.json

#: ``config.json`` key -> our field (transformers' ``GPT2Config.attribute_map`` in reverse). A key that is
#: absent takes our default, which is transformers' (as for every GPT-2 field).
RENAMED = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
           "n_inner": "intermediate_size", "n_positions": "max_position_embeddings"}


def _read(hf: Mapping, where: str) -> dict:
    """Our fields from GPT-2's keys; refuses cross-attention and unknown activations by name."""
    if hf.get("add_cross_attention"):
        raise ConfigFieldError(f"{where}: field 'add_cross_attention' is {hf['add_cross_attention']!r}; "
                               f"GPT-2 with cross-attention layers is not supported")
    act = hf.get("activation_function", GPT2Config.activation_function)
    if act not in ACTIVATIONS:
        raise ConfigFieldError(f"{where}: field 'activation_function' {act!r} is not supported "
                               f"(supported: {sorted(ACTIVATIONS)})")
    return {**{field: hf[key] for key, field in RENAMED.items() if key in hf}, "activation_function": act}


def _write(config: GPT2Config) -> dict:
    return {**{key: getattr(config, field) for key, field in RENAMED.items()},
            "activation_function": config.activation_function, "add_cross_attention": False}


HF = HfArchitecture(
    model_type="gpt2", class_name="GPT2LMHeadModel", config_class=GPT2Config, module_class=GPT2LMHeadModel,
    fields=("vocab_size", "layer_norm_epsilon", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
            "reorder_and_upcast_attn", "tie_word_embeddings"),
    fixed={}, read=_read, write=_write,
    family="gpt2", transposed=("lm_head",), ignored_suffixes=(".attn.bias", ".attn.masked_bias"),
    base_prefix="transformer.", embedding="transformer.wte.weight")

"""The one decoder behind every Llama-family causal LM (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3), in flax.linen.

Embeddings, RMSNorm, rotary position embeddings (Hugging Face's rotate-half
layout), grouped-query attention, a SwiGLU MLP, and an untied or tied output
head. What differs between the architectures is a field of
:class:`DecoderConfig`, not a copy of the code: which projections carry a
bias (``attention_bias``, ``attention_output_bias``, ``mlp_bias``), an
RMSNorm over each query and key head before the rotation (``qk_norm``,
Qwen3), a causal window of ``sliding_window`` positions on all or some
layers (Mistral, Qwen, Gemma), Gemma's norms, GeGLU, embedding scale and
soft-capping, Phi-3's fused projections and partial rotation. The
architecture files (``llama.py``, ``mistral.py``, ``qwen.py``,
``gemma.py``, ``phi3.py``) hold each architecture's defaults and its
Hugging Face name map; this module knows no Hugging Face field name.

Module paths mirror Hugging Face's ``*ForCausalLM``: ``model/embed_tokens``,
``model/layers_0/self_attn/q_proj``, ``model/layers_0/self_attn/q_norm``,
``model/layers_0/mlp/down_proj``, ``model/norm``, ``lm_head`` (Flax joins
with ``/`` and names list entries ``layers_N`` where PyTorch writes
``layers.N``). With ``scan_layers`` the decoder layers are one ``nn.scan``
named ``model/layers`` whose params (and adapters) carry a leading layer axis.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.kinds import DROPOUT_RNG
from lora_jax.linen import fused_dense


from lora_jax.models.decoder_config import (ACTIVATIONS, ATTENTION_IMPLEMENTATIONS, LAYER_TYPES, REMAT_POLICIES,
                                            ROPE_TYPES, DecoderConfig, RopeScaling)

# The config's names are re-exported: they lived here before the config had its own module.
__all__ = ["ACTIVATIONS", "ATTENTION_IMPLEMENTATIONS", "IGNORE_INDEX", "LAYER_TYPES", "REMAT_POLICIES", "ROPE_TYPES",
           "Attention", "Decoder", "DecoderConfig", "DecoderForCausalLM", "DecoderLayer", "MLP", "RMSNorm",
           "RopeScaling", "attention_implementation", "causal_lm_loss", "init_cache", "inverse_frequencies",
           "rotary"]


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x ** 2) + eps)`` over the last axis, computed in float32.

    With ``unit_offset`` the factor is ``1 + weight`` and the weight starts at 0 (Gemma's norm).
    """

    eps: float = 1e-6
    param_dtype: Any = jnp.float32
    unit_offset: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
        weight = self.param("weight", init, (x.shape[-1],), self.param_dtype).astype(jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        gain = 1.0 + weight if self.unit_offset else weight
        return (jnp.expand_dims(gain, tuple(range(y.ndim - 1))) * y).astype(x.dtype)


def _norm(cfg: DecoderConfig, name: str | None = None) -> RMSNorm:
    return RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, cfg.norm_unit_offset, name=name)


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling = RopeScaling()) -> np.ndarray:
    """The rotary inverse frequencies ``[head_dim // 2]`` (float32), with ``scaling`` applied.

    >>> inverse_frequencies(4, 100.0).tolist()
    [1.0, 0.10000000149011612]
    """
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling.rope_type == "linear":
        inv = inv / scaling.factor
    elif scaling.rope_type == "llama3":
        wavelen = 2 * math.pi / inv
        old = scaling.original_max_position_embeddings
        smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        blended = (1 - smooth) * inv / scaling.factor + smooth * inv
        low = wavelen > old / scaling.low_freq_factor      # long wavelengths: fully scaled
        high = wavelen < old / scaling.high_freq_factor    # short wavelengths: unchanged
        inv = np.where(low, inv / scaling.factor, np.where(high, inv, blended))
    return inv.astype(np.float32)


def rotary(x, positions, inv_freq):
    """Rotary embedding in the rotate-half layout; ``x``: ``[batch, seq, heads, head_dim]``.

    The first ``2 * len(inv_freq)`` dims of each head are turned (all of them
    unless the rotation is partial); the rest pass unchanged.
    """
    half = len(inv_freq)
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)[None, None, :]  # [batch, seq, half]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:2 * half].astype(jnp.float32)
    turned = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
    return turned if 2 * half == x.shape[-1] else jnp.concatenate([turned, x[..., 2 * half:]], axis=-1)


def _dense(features, name, cfg, bias=False):
    return nn.Dense(features, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                    kernel_init=nn.initializers.normal(0.02))


def _project(cfg: DecoderConfig, x, layers):
    """Each layer applied to ``x``: one fused matmul with ``cfg.fused_projections``, else one call each."""
    return fused_dense(layers, x) if cfg.fused_projections else [layer(x) for layer in layers]


def init_cache(config: DecoderConfig, batch: int, max_length: int, dtype=None) -> dict:
    """An empty key/value cache for incremental decoding of up to ``max_length`` positions.

    ``{"k", "v"}``: ``[layers, batch, max_length, kv_heads, head_dim]``;
    ``"index"``: how many slots are filled (where the next token is written);
    ``"mask"``: bool ``[batch, max_length]``, which filled slots hold a real
    token (the ``attention_mask`` of every call so far: padding is never
    attended to); ``"position"``: int32 ``[batch]``, each row's next rotary
    position (its count of real tokens so far, as Hugging Face's
    ``cumsum(attention_mask) - 1`` continued).

    >>> c = init_cache(DecoderConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2), 1, 16)
    >>> c["k"].shape, int(c["index"]), c["mask"].shape, c["position"].tolist()
    ((2, 1, 16, 4, 8), 0, (1, 16), [0])
    """
    shape = (config.num_hidden_layers, batch, max_length, config.kv_heads, config.head_dim)
    zeros = jnp.zeros(shape, dtype or config.dtype)
    return {"k": zeros, "v": zeros, "index": jnp.zeros((), jnp.int32), "mask": jnp.zeros((batch, max_length), bool),
            "position": jnp.zeros((batch,), jnp.int32)}


_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def attention_implementation(config: DecoderConfig, dtype, backend: str | None = None,
                             compute_capability: str | None = None, padded: bool = False) -> str:
    """The attention implementation a model with ``config`` uses for inputs of ``dtype``: ``"xla"`` or ``"cudnn"``.

    ``"auto"`` chooses cuDNN's fused (flash) attention where it applies: on a
    GPU backend of compute capability 8.0 or newer (Ampere, Hopper, ...; read
    from the first device unless ``compute_capability`` is given), for
    bfloat16 or float16 inputs, and a ``head_dim`` that is a multiple of 8 and
    at most 128, and no padding (``padded``: the call has an ``attention_mask``;
    the fused causal kernel is not given one); XLA's plain attention everywhere
    else. An explicit ``"cudnn"`` that does not apply raises instead of falling
    back. Decoding with a KV cache always uses XLA's (its mask is not causal-only).

    >>> attention_implementation(DecoderConfig(), jnp.bfloat16, backend="cpu")
    'xla'
    >>> attention_implementation(DecoderConfig(hidden_size=2048, num_attention_heads=32), jnp.bfloat16, backend="gpu",
    ...                          compute_capability="9.0")
    'cudnn'
    """
    backend = backend or jax.default_backend()
    if backend == "gpu" and compute_capability is None:
        compute_capability = getattr(jax.devices("gpu")[0], "compute_capability", None)
    major = int(str(compute_capability).split(".")[0]) if compute_capability not in (None, "") else 0
    problems = [text for bad, text in (
        (backend != "gpu", f"the backend is {backend!r}, not 'gpu'"),
        (backend == "gpu" and major < 8, f"the GPU's compute capability is {compute_capability}, below 8.0"),
        (jnp.dtype(dtype) not in _CUDNN_DTYPES, f"the inputs are {jnp.dtype(dtype).name}, not bfloat16/float16"),
        (config.head_dim % 8 or config.head_dim > 128, f"head_dim is {config.head_dim}"),
        (padded, "the inputs are padded (an attention_mask is given)"),
        (config.attn_logit_softcapping is not None, "the attention scores are soft-capped"),
    ) if bad]
    if config.attention_implementation == "xla" or (config.attention_implementation == "auto" and problems):
        return "xla"
    if problems:
        raise ValueError(f"{type(config).__name__}.attention_implementation='cudnn' cannot be used here: "
                         + "; ".join(problems) + " (cuDNN's fused attention needs a GPU of compute capability 8.0 "
                         "or newer, bfloat16/float16, head_dim a multiple of 8 up to 128, no attention_mask and no "
                         "soft-capping)")
    return "cudnn"


def _window_mask(query, key, window: int | None):
    """Causal visibility of ``key`` slots from ``query`` slots, within ``window`` (HF: ``key > query - window``)."""
    allowed = key <= query
    return allowed if window is None else allowed & (key > query - window)


def _attend(cfg: DecoderConfig, q, k, v, mask):
    """Attention of ``q`` over ``k``/``v`` under ``mask`` (``[batch or 1, 1, q, k]``), scores soft-capped if set.

    Without a cap this is ``jax.nn.dot_product_attention``. With
    ``attn_logit_softcapping`` the scores are computed here, in float32, in
    transformers' order: scale, ``cap * tanh(s / cap)``, mask, softmax.
    """
    if cfg.attn_logit_softcapping is None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=cfg.attention_scale)
    cap = cfg.attn_logit_softcapping
    batch, seq, heads, dim = q.shape
    grouped = q.reshape(batch, seq, k.shape[2], heads // k.shape[2], dim)
    scores = jnp.einsum("bskgd,btkd->bkgst", grouped, k, preferred_element_type=jnp.float32) * cfg.attention_scale
    scores = jnp.where(mask[:, :, None], cap * jnp.tanh(scores / cap), jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgst,btkd->bskgd", weights, v).reshape(batch, seq, heads, dim)


def _write_cache(k, v, layer_cache, index):
    """The layer's cache with ``k``/``v`` written at ``index`` (all slots), and the new entries alone.

    The new entries are cast to the cache's dtype: the decoder writes every layer's into the
    stacked cache at once, so that a decoding step does not copy the whole cache.
    """
    k, v = k.astype(layer_cache["k"].dtype), v.astype(layer_cache["v"].dtype)
    k_all = jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], k, index, axis=1)
    v_all = jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], v, index, axis=1)
    return k_all, v_all, {"k": k, "v": v}


def _real_tokens(input_ids, attention_mask):
    """``attention_mask`` as bool ``[batch, seq]`` (1 = a real token), or None when every token is real."""
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask{list(attention_mask.shape)} must have input_ids' shape "
                         f"{list(input_ids.shape)} (1 for a real token, 0 for padding)")
    return attention_mask.astype(bool)


def _positions_from(real, start):
    """Hugging Face's positions for a padded batch: ``start + cumsum(mask) - 1`` per row, 0 at padding."""
    return jnp.where(real, start[:, None] + jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1, 0)


def _cached_step(cache, real, positions, windows, seq: int):
    """The cache's ``mask``/``position`` after ``seq`` tokens, their positions, and an attention mask per window.

    A query at slot ``i`` sees the real keys at slots ``<= i`` (and, with a
    window ``w`` of ``windows``, ``> i - w``: the window counts slots, as
    Hugging Face's mask over its cache does, so a padded row's window may
    hold masked pads). Returns ``(state, positions, {window: mask})``.
    """
    batch, slots = cache["mask"].shape
    real = jnp.ones((batch, seq), bool) if real is None else real
    valid = jax.lax.dynamic_update_slice_in_dim(cache["mask"], real, cache["index"], axis=1)
    if positions is None:
        positions = _positions_from(real, cache["position"])
    query = (cache["index"] + jnp.arange(seq))[:, None]
    key = jnp.arange(slots)[None, :]
    masks = {w: _window_mask(query, key, w)[None, None] & valid[:, None, None, :] for w in windows}
    state = {"index": cache["index"] + seq, "mask": valid,
             "position": cache["position"] + jnp.sum(real, axis=1, dtype=jnp.int32)}
    return state, positions, masks


def _heads(cfg: DecoderConfig, x, heads: int, norm_name: str | None):
    """``x`` ``[batch, seq, heads * head_dim]`` split into heads, each RMS-normalised when ``cfg.qk_norm``."""
    x = x.reshape(*x.shape[:2], heads, cfg.head_dim)
    return _norm(cfg, norm_name)(x) if norm_name and cfg.qk_norm else x


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions; biases, norms, window and scaling come from the config.

    ``layer`` is the layer's index: it picks the window and rotary settings (``config.layer_attention``).
    """

    config: DecoderConfig
    layer: int = 0

    @nn.compact
    def __call__(self, x, positions, layer_cache=None, index=None, mask=None):
        cfg = self.config
        batch, seq, _ = x.shape
        q, k, v = self._qkv(x)
        window, theta, scaling = cfg.layer_attention(self.layer)
        inv_freq = inverse_frequencies(cfg.rotary_dim, theta, scaling)
        q = rotary(_heads(cfg, q, cfg.num_attention_heads, "q_norm"), positions, inv_freq)
        k = rotary(_heads(cfg, k, cfg.kv_heads, "k_norm"), positions, inv_freq)
        v = _heads(cfg, v, cfg.kv_heads, None)
        if layer_cache is not None:
            k_all, v_all, layer_cache = _write_cache(k, v, layer_cache, index)
            out = _attend(cfg, q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask)
        elif cfg.attn_logit_softcapping is not None:
            slots = jnp.arange(seq)
            causal = _window_mask(slots[:, None], slots[None, :], window)[None, None]
            out = _attend(cfg, q, k, v, causal if mask is None else causal & mask)
        else:
            # HF's window of W positions is the query and the W - 1 before it: jax's (left, right) = (W - 1, 0).
            # ``mask`` (padding) is ANDed with the causal and window masks.
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, scale=cfg.attention_scale,
                                               local_window_size=None if window is None else (window - 1, 0),
                                               implementation=attention_implementation(cfg, q.dtype,
                                                                                       padded=mask is not None))
        out = _dense(cfg.hidden_size, "o_proj", cfg, cfg.o_proj_bias)(out.reshape(batch, seq, -1))
        return out, layer_cache

    def _qkv(self, x):
        cfg = self.config
        sizes = (cfg.num_attention_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim)
        if cfg.fused_modules:
            qkv = _dense(sum(sizes), "qkv_proj", cfg, cfg.attention_bias)(x)
            return jnp.split(qkv, [sizes[0], sizes[0] + sizes[1]], axis=-1)
        return _project(cfg, x, [_dense(size, name, cfg, cfg.attention_bias)
                                 for size, name in zip(sizes, ("q_proj", "k_proj", "v_proj"))])


class MLP(nn.Module):
    """The gated MLP: ``down_proj(act(gate_proj(x)) * up_proj(x))`` (SwiGLU; GeGLU with a GELU ``hidden_act``)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        if cfg.fused_modules:
            gate, up = jnp.split(_dense(2 * cfg.intermediate_size, "gate_up_proj", cfg, cfg.mlp_bias)(x), 2, axis=-1)
        else:
            gate, up = _project(cfg, x, [_dense(cfg.intermediate_size, "gate_proj", cfg, cfg.mlp_bias),
                                         _dense(cfg.intermediate_size, "up_proj", cfg, cfg.mlp_bias)])
        return _dense(cfg.hidden_size, "down_proj", cfg, cfg.mlp_bias)(ACTIVATIONS[cfg.hidden_act](gate) * up)


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    With ``config.sandwich_norms`` the attention's and the MLP's outputs are
    normalised too before they are added (Gemma 2/3; the norms then carry
    Gemma's four names).
    """

    config: DecoderConfig
    layer: int = 0

    @nn.compact
    def __call__(self, x, positions, layer_cache=None, index=None, mask=None):
        cfg = self.config
        if cfg.activation_sharding is not None:
            x = jax.lax.with_sharding_constraint(x, cfg.activation_sharding)
        h, layer_cache = Attention(cfg, self.layer, name="self_attn")(_norm(cfg, "input_layernorm")(x), positions,
                                                                      layer_cache, index, mask)
        if not cfg.sandwich_norms:
            x = x + h
            return x + MLP(cfg, name="mlp")(_norm(cfg, "post_attention_layernorm")(x)), layer_cache
        x = x + _norm(cfg, "post_attention_layernorm")(h)
        h = MLP(cfg, name="mlp")(_norm(cfg, "pre_feedforward_layernorm")(x))
        return x + _norm(cfg, "post_feedforward_layernorm")(h), layer_cache


class _ScannedDecoderLayer(DecoderLayer):
    """The decoder layer with ``nn.scan``'s ``(carry, x) -> (carry, y)`` signature."""

    def __call__(self, x, layer_cache, positions, index, mask):
        return super().__call__(x, positions, layer_cache, index, mask)


def _remat(layer_class, cfg: DecoderConfig):
    """The layer class, rematerialised with ``cfg.remat_policy`` when ``cfg.remat`` is set."""
    if not cfg.remat:
        return layer_class
    # Inside nn.scan the loop boundary already keeps XLA from merging the recomputation with the
    # forward pass, so the CSE barrier (which costs speed) is only needed for unrolled layers.
    return nn.remat(layer_class, policy=getattr(jax.checkpoint_policies, cfg.remat_policy),
                    prevent_cse=not cfg.scan_layers)


class Decoder(nn.Module):
    """The decoder stack (``model`` in the param tree): embeddings, the layers and the final norm."""

    config: DecoderConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                                     param_dtype=cfg.param_dtype, embedding_init=nn.initializers.normal(0.02))
        if cfg.scan_layers:
            layer = _remat(_ScannedDecoderLayer, cfg)
            self.layers = nn.scan(layer, variable_axes={True: 0}, split_rngs={"params": True},
                                  in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                                  length=cfg.num_hidden_layers)(cfg)
        else:
            layer = _remat(DecoderLayer, cfg)
            self.layers = [layer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = _norm(cfg)

    def __call__(self, input_ids, positions=None, cache=None, attention_mask=None):
        cfg = self.config
        real = _real_tokens(input_ids, attention_mask)
        index, state = None, {}
        if cache is not None:
            index = cache["index"]
            windows = {cfg.layer_attention(i)[0] for i in range(cfg.num_hidden_layers)}
            state, positions, masks = _cached_step(cache, real, positions, windows, input_ids.shape[-1])
            mask_of = lambda layer: masks[cfg.layer_attention(layer)[0]]
        else:
            if positions is None:
                zeros = jnp.zeros(input_ids.shape[:1], jnp.int32)
                positions = (jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape) if real is None
                             else _positions_from(real, zeros))
            # Padding only: each layer adds its causal window.
            mask_of = lambda layer: None if real is None else real[:, None, None, :]
        x = self.embed_tokens(input_ids)
        if cfg.scale_embeddings:
            # As transformers: sqrt(hidden) as a float32 scalar, rounded to the embeddings' dtype.
            x = x * jnp.asarray(cfg.hidden_size ** 0.5, jnp.float32).astype(x.dtype)
        x, layers_cache = self._layers(x, positions, cache, index, mask_of)
        return self.norm(x), None if cache is None else {**layers_cache, **state}

    def _layers(self, x, positions, cache, index, mask_of):
        layers_cache = None if cache is None else {"k": cache["k"], "v": cache["v"]}
        if self.config.scan_layers:     # every layer alike (DecoderConfig checks): one mask
            x, new = self.layers(x, layers_cache, positions, index, mask_of(0))
        else:
            updated = []
            for i, layer in enumerate(self.layers):
                x, layer_new = layer(x, positions, jax.tree.map(lambda c: c[i], layers_cache), index, mask_of(i))
                updated.append(layer_new)
            new = None if cache is None else jax.tree.map(lambda *c: jnp.stack(c), *updated)
        if cache is None:
            return x, None
        # Only this call's keys and values are written: [layers, batch, seq, kv_heads, head_dim] at ``index``.
        return x, jax.tree.map(lambda c, n: jax.lax.dynamic_update_slice_in_dim(c, n, index, axis=2),
                               layers_cache, new)

    def attend(self, x):
        return self.embed_tokens.attend(x)


class DecoderForCausalLM(nn.Module):
    """Returns next-token logits ``[batch, seq, vocab]`` for ``input_ids`` ``[batch, seq]``.

    With ``cache`` (from :func:`init_cache`) the call decodes incrementally:
    ``input_ids`` are the next tokens after the ``cache["index"]`` already
    seen, and the result is ``(logits, updated_cache)``.

    ``attention_mask`` (int or bool ``[batch, seq]``, 1 for a real token and 0
    for padding; Hugging Face's convention) pads a batch of prompts of
    different lengths, on the left: padding is never attended to and
    positions count real tokens only (``cumsum(attention_mask) - 1``, so a
    row's first real token is at position 0). With a cache the mask and
    each row's next position are kept in it, and later calls continue from
    them; ``None`` means every token is real. Logits at padded positions are
    meaningless.

    With ``labels`` (``[batch, seq]`` token ids, as Hugging Face's
    ``labels=``) the call returns the mean next-token cross-entropy instead:
    position ``t``'s logits against ``labels[:, t + 1]``, positions whose
    label is ``IGNORE_INDEX`` (-100) left out. It equals
    ``causal_lm_loss(model(ids), labels)`` but never holds the float32
    ``[tokens, vocab]`` logits (or their gradient) at once: the output
    projection and the log-softmax run ``config.loss_chunk_tokens`` tokens at
    a time and are recomputed chunk by chunk in the backward pass. An adapter
    on ``lm_head`` (or a tied head) is applied inside each chunk as usual.

    >>> cfg = DecoderConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
    ...                   num_attention_heads=2)
    >>> model = DecoderForCausalLM(cfg)
    >>> ids = jnp.zeros((1, 5), jnp.int32)
    >>> variables = model.init(jax.random.key(0), ids)
    >>> model.apply(variables, ids).shape
    (1, 5, 32)
    >>> logits, cache = model.apply(variables, ids, cache=init_cache(cfg, 1, 8))
    >>> logits.shape, int(cache["index"])
    ((1, 5, 32), 5)
    >>> loss = model.apply(variables, ids, labels=ids)
    >>> bool(jnp.allclose(loss, causal_lm_loss(model.apply(variables, ids), ids), rtol=1e-6))
    True

    A left-padded row gives its real tokens the logits it has alone:

    >>> ids = jnp.array([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
    >>> padded = model.apply(variables, ids, attention_mask=jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
    >>> alone = model.apply(variables, ids[:1, 2:])
    >>> bool(jnp.allclose(padded[0, 2:], alone[0], atol=1e-5))
    True
    """

    config: DecoderConfig

    def setup(self):
        cfg = self.config
        self.model = Decoder(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = _dense(cfg.vocab_size, "lm_head", cfg)

    def init_cache(self, batch: int, max_length: int, dtype=None) -> dict:
        """An empty cache for this model (:func:`init_cache` of its config): what ``generate`` asks every model for.

        A plain method: it reads only the config, so it needs no params or ``apply``.
        """
        return init_cache(self.config, batch, max_length, dtype)

    def logits(self, hidden):
        """The output projection of final hidden states ``[..., hidden]``, soft-capped if the config says so."""
        logits = self.model.attend(hidden) if self.config.tie_word_embeddings else self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    def __call__(self, input_ids, positions=None, cache=None, labels=None, attention_mask=None):
        if labels is not None and cache is not None:
            raise ValueError(f"{type(self).__name__}: pass labels (training loss) or cache (decoding), not both")
        x, new_cache = self.model(input_ids, positions, cache, attention_mask)
        if labels is not None:
            return self._chunked_loss(x, labels)
        logits = self.logits(x)
        return logits if cache is None else (logits, new_cache)

    def _chunked_loss(self, hidden, labels):
        if labels.shape != hidden.shape[:2]:
            raise ValueError(f"{type(self).__name__}: labels{list(labels.shape)} must have input_ids' shape "
                             f"{list(hidden.shape[:2])}")
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        t = labels[:, 1:].reshape(-1)
        chunk = min(self.config.loss_chunk_tokens, t.shape[0])
        pad = -t.shape[0] % chunk
        h = jnp.pad(h, ((0, pad), (0, 0)))
        t = jnp.pad(t, (0, pad), constant_values=IGNORE_INDEX)
        # One scan step per chunk, rematerialised: each chunk's logits are recomputed in the backward
        # pass instead of kept (only two scalars per chunk are saved), and the loop keeps XLA from
        # scheduling every chunk's recomputation at once.
        scan = nn.scan(nn.remat(_chunk_nll, prevent_cse=False), variable_broadcast=True,
                       split_rngs={"params": False, DROPOUT_RNG: True}, length=t.shape[0] // chunk)
        (total, count), _ = scan(self, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
                                 (h.reshape(-1, chunk, h.shape[-1]), t.reshape(-1, chunk)))
        return total / count


#: Label value left out of :func:`causal_lm_loss` and the chunked loss (Hugging Face's ``ignore_index``).
IGNORE_INDEX = -100


def _token_nll(logits, targets):
    """Per-token ``-log softmax(logits)[target]`` in float32, and a 0/1 mask of the targets not ignored."""
    logits = logits.astype(jnp.float32)
    keep = targets != IGNORE_INDEX
    safe = jnp.where(keep, targets, 0)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return jnp.where(keep, logz - picked, 0.0), keep.astype(jnp.float32)


def _chunk_nll(model: DecoderForCausalLM, sums, chunk):
    """One loss chunk, as a scan body: adds the chunk's summed loss and token count to ``sums``."""
    hidden, targets = chunk
    nll, keep = _token_nll(model.logits(hidden), targets)
    return (sums[0] + jnp.sum(nll), sums[1] + jnp.sum(keep)), None


def causal_lm_loss(logits, input_ids):
    """Mean next-token cross-entropy of ``logits`` against ``input_ids`` shifted by one.

    Targets equal to ``IGNORE_INDEX`` (-100) are left out of the mean.

    >>> logits = jnp.zeros((1, 3, 4))
    >>> round(float(causal_lm_loss(logits, jnp.array([[0, 1, 2]]))), 4)   # uniform over 4: log 4
    1.3863
    """
    nll, keep = _token_nll(logits[:, :-1], input_ids[:, 1:])
    return jnp.sum(nll) / jnp.sum(keep)

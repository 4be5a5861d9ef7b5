"""The one decoder behind every Llama-family causal LM (Llama, Mistral, Qwen2, Qwen3), in flax.linen.

Embeddings, RMSNorm, rotary position embeddings (Hugging Face's rotate-half
layout), grouped-query attention, a SwiGLU MLP, and an untied or tied output
head. What differs between the architectures is a field of
:class:`DecoderConfig`, not a copy of the code: which projections carry a
bias (``attention_bias``, ``attention_output_bias``, ``mlp_bias``), an
RMSNorm over each query and key head before the rotation (``qk_norm``,
Qwen3), and a causal window of ``sliding_window`` positions (Mistral). The
architecture files (``llama.py``, ``mistral.py``, ``qwen.py``) hold each
architecture's defaults and its Hugging Face name map; this module knows no
Hugging Face field name.

Module paths mirror Hugging Face's ``*ForCausalLM``: ``model/embed_tokens``,
``model/layers_0/self_attn/q_proj``, ``model/layers_0/self_attn/q_norm``,
``model/layers_0/mlp/down_proj``, ``model/norm``, ``lm_head`` (Flax joins
with ``/`` and names list entries ``layers_N`` where PyTorch writes
``layers.N``). With ``scan_layers`` the decoder layers are one ``nn.scan``
named ``model/layers`` whose params (and adapters) carry a leading layer axis.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.kinds import DROPOUT_RNG
from lora_jax.linen import fused_dense


ROPE_TYPES = ("default", "linear", "llama3")
#: ``DecoderConfig.attention_implementation``: ``"auto"`` picks per backend and inputs
#: (:func:`attention_implementation`).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
#: ``DecoderConfig.remat_policy``: what a rematerialised layer keeps from its forward pass
#: (names of ``jax.checkpoint_policies``; "nothing_saveable" recomputes the whole layer).
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")


def _positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def _positive_number(value) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


_EXPECTED = {_positive_int: "a positive int", _positive_number: "a positive finite number", _is_bool: "a bool"}


def _checked(owner: str, field: str, value, check):
    """``value`` (ints as int, numbers as float) if ``check`` accepts it; else a ValueError naming the field."""
    if not check(value):
        raise ValueError(f"{owner}.{field} must be {_EXPECTED[check]}, got {value!r}")
    if check is _positive_int:
        return int(value)
    return float(value) if check is _positive_number else bool(value)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling, as Hugging Face's ``rope_scaling`` / ``rope_parameters``.

    ``rope_type`` ``"linear"`` divides every frequency by ``factor``;
    ``"llama3"`` divides only the low frequencies and interpolates between
    (Llama 3.1's scheme, which needs the remaining fields).
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope scaling type {self.rope_type!r} is not supported; supported: {ROPE_TYPES}")
        for field in ("factor", "low_freq_factor", "high_freq_factor"):
            object.__setattr__(self, field, _checked("rope_scaling", field, getattr(self, field), _positive_number))
        _checked("rope_scaling", "original_max_position_embeddings", self.original_max_position_embeddings,
                 _positive_int)
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must be larger than "
                             f"low_freq_factor ({self.low_freq_factor}) for llama3 rope scaling")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of the decoder, named as in Hugging Face's ``LlamaConfig``.

    The architectures differ only in these fields (their config classes,
    :class:`~lora_jax.models.llama.LlamaConfig`,
    :class:`~lora_jax.models.mistral.MistralConfig`,
    :class:`~lora_jax.models.qwen.Qwen2Config` and
    :class:`~lora_jax.models.qwen.Qwen3Config`, set their defaults):

    * ``attention_bias``: a bias on ``q_proj``, ``k_proj``, ``v_proj`` and
      ``o_proj``; ``attention_output_bias`` overrides it for ``o_proj``
      (``None`` follows ``attention_bias``; Qwen2 has biases on q/k/v only).
    * ``mlp_bias``: a bias on ``gate_proj``, ``up_proj`` and ``down_proj``.
    * ``qk_norm``: an RMSNorm over each query and key head (``q_norm``,
      ``k_norm``, weights ``[head_dim]``) before the rotation (Qwen3).
    * ``sliding_window``: each position attends to itself and the
      ``sliding_window - 1`` positions before it (Mistral); ``None`` means
      the whole causal prefix.

    ``head_dim`` defaults to ``hidden_size // num_attention_heads`` and
    ``num_key_value_heads`` to ``num_attention_heads`` (multi-head attention).
    ``scan_layers`` and ``remat`` are ours: one ``nn.scan`` over the decoder
    layers, and rematerialisation of each layer in the backward pass. So is
    ``activation_sharding``: a ``jax.sharding.NamedSharding`` for the residual
    stream ``[batch, seq, hidden]`` at each decoder layer's input (e.g.
    ``NamedSharding(mesh, P("data"))``), so that sharded training keeps every
    layer's activations split over the batch; XLA's propagation alone may
    replicate the batch inside the layers (see ``lora_jax.sharding``).

    Speed settings, also ours (none changes the model's function):

    * ``attention_implementation``: ``"xla"`` (the plain softmax over the
      ``[seq, seq]`` scores, any backend), ``"cudnn"`` (cuDNN's fused flash
      attention: GPU, bfloat16/float16, ``head_dim`` a multiple of 8 up to
      128), or ``"auto"`` (the default: cuDNN where those hold, else XLA);
      see :func:`attention_implementation`.
    * ``remat_policy``: with ``remat``, which values a layer keeps for its
      backward pass (one of :data:`REMAT_POLICIES`; the default keeps none).
    * ``fused_projections``: q/k/v, and gate/up, each computed as one matmul
      on their shared input, their adapters' ``A`` as one too
      (:func:`lora_jax.linen.fused_dense`); the parameters keep Hugging
      Face's separate layout.
    * ``loss_chunk_tokens``: the loss of ``model(ids, labels=ids)`` computes
      the output projection and the float32 log-softmax this many tokens at a
      time and recomputes them in the backward pass, so the ``[tokens, vocab]``
      logits never exist at once (see :meth:`DecoderForCausalLM.__call__`).
    """

    vocab_size: int = 4096
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    attention_implementation: str = "auto"
    fused_projections: bool = False
    loss_chunk_tokens: int = 2048
    activation_sharding: Any = None
    # Last, so that the fields above keep their positions from before the decoder was shared.
    attention_output_bias: bool | None = None
    qk_norm: bool = False
    sliding_window: int | None = None

    def __post_init__(self):
        owner = type(self).__name__
        for field, check in _FIELD_CHECKS.items():
            if getattr(self, field) is not None or field not in _OPTIONAL_FIELDS:
                object.__setattr__(self, field, _checked(owner, field, getattr(self, field), check))
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"{owner}.hidden_size ({self.hidden_size}) must be a multiple of "
                                 f"num_attention_heads ({self.num_attention_heads}) unless head_dim is given")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{owner}.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"{owner}.rope_scaling must be a RopeScaling, got {self.rope_scaling!r}")
        for field, allowed in (("attention_implementation", ATTENTION_IMPLEMENTATIONS),
                               ("remat_policy", REMAT_POLICIES)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{owner}.{field} must be one of {allowed}, got {getattr(self, field)!r}")

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def o_proj_bias(self) -> bool:
        """Whether ``o_proj`` has a bias: ``attention_output_bias``, else ``attention_bias``."""
        return self.attention_bias if self.attention_output_bias is None else self.attention_output_bias


# The type and range of each hyper-parameter (None is allowed for the optional ones).
_FIELD_CHECKS = {
    **dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "loss_chunk_tokens",
                     "sliding_window"), _positive_int),
    **dict.fromkeys(("rms_norm_eps", "rope_theta"), _positive_number),
    **dict.fromkeys(("attention_bias", "attention_output_bias", "mlp_bias", "qk_norm", "tie_word_embeddings",
                     "scan_layers", "remat", "fused_projections"), _is_bool),
}
_OPTIONAL_FIELDS = ("num_key_value_heads", "head_dim", "attention_output_bias", "sliding_window")


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x ** 2) + eps)`` over the last axis, computed in float32."""

    eps: float = 1e-6
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (jnp.expand_dims(weight.astype(jnp.float32), tuple(range(y.ndim - 1))) * y).astype(x.dtype)


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
    """Rotary embedding in the rotate-half layout; ``x``: ``[batch, seq, heads, head_dim]``."""
    half = x.shape[-1] // 2
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)[None, None, :]  # [batch, seq, half]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


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
    ) if bad]
    if config.attention_implementation == "xla" or (config.attention_implementation == "auto" and problems):
        return "xla"
    if problems:
        raise ValueError(f"{type(config).__name__}.attention_implementation='cudnn' cannot be used here: "
                         + "; ".join(problems) + " (cuDNN's fused attention needs a GPU of compute capability 8.0 "
                         "or newer, bfloat16/float16, head_dim a multiple of 8 up to 128 and no attention_mask)")
    return "cudnn"


def _attend_cached(q, k, v, layer_cache, index, mask):
    """Attends over the layer's cache with ``k``/``v`` written at ``index``, under ``mask`` ``[b, 1, q, slots]``.

    Returns the new keys and values only (cast to the cache's dtype): the decoder writes every
    layer's into the stacked cache at once, so that a decoding step does not copy the whole cache.
    """
    k, v = k.astype(layer_cache["k"].dtype), v.astype(layer_cache["v"].dtype)
    k_all = jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], k, index, axis=1)
    v_all = jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], v, index, axis=1)
    out = jax.nn.dot_product_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask=mask)
    return out, {"k": k, "v": v}


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


def _cached_step(cache, real, positions, window: int | None, seq: int):
    """The cache's ``mask``/``position`` after ``seq`` tokens, their positions, and their attention mask.

    A query at slot ``i`` sees the real keys at slots ``<= i`` (and, with a
    ``window``, ``> i - window``: the window counts slots, as Hugging Face's
    mask over its cache does, so a padded row's window may hold masked pads).
    """
    batch, slots = cache["mask"].shape
    real = jnp.ones((batch, seq), bool) if real is None else real
    valid = jax.lax.dynamic_update_slice_in_dim(cache["mask"], real, cache["index"], axis=1)
    if positions is None:
        positions = _positions_from(real, cache["position"])
    query = (cache["index"] + jnp.arange(seq))[:, None]
    key = jnp.arange(slots)[None, :]
    allowed = key <= query
    if window is not None:
        allowed = allowed & (key > query - window)
    mask = allowed[None, None] & valid[:, None, None, :]
    state = {"index": cache["index"] + seq, "mask": valid,
             "position": cache["position"] + jnp.sum(real, axis=1, dtype=jnp.int32)}
    return state, positions, mask


def _heads(cfg: DecoderConfig, x, heads: int, norm_name: str | None):
    """``x`` ``[batch, seq, heads * head_dim]`` split into heads, each RMS-normalised when ``cfg.qk_norm``."""
    x = x.reshape(*x.shape[:2], heads, cfg.head_dim)
    return RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name=norm_name)(x) if norm_name and cfg.qk_norm else x


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions; the biases, q/k norm and window come from the config."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x, positions, layer_cache=None, index=None, mask=None):
        cfg = self.config
        batch, seq, _ = x.shape
        q, k, v = _project(cfg, x, [_dense(cfg.num_attention_heads * cfg.head_dim, "q_proj", cfg, cfg.attention_bias),
                                    _dense(cfg.kv_heads * cfg.head_dim, "k_proj", cfg, cfg.attention_bias),
                                    _dense(cfg.kv_heads * cfg.head_dim, "v_proj", cfg, cfg.attention_bias)])
        inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        q = rotary(_heads(cfg, q, cfg.num_attention_heads, "q_norm"), positions, inv_freq)
        k = rotary(_heads(cfg, k, cfg.kv_heads, "k_norm"), positions, inv_freq)
        v = _heads(cfg, v, cfg.kv_heads, None)
        if layer_cache is None:
            # HF's window of W positions is the query and the W - 1 before it: jax's (left, right) = (W - 1, 0).
            window = None if cfg.sliding_window is None else (cfg.sliding_window - 1, 0)
            # ``mask`` (padding) is ANDed with the causal and window masks.
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, local_window_size=window,
                                               implementation=attention_implementation(cfg, q.dtype,
                                                                                       padded=mask is not None))
        else:
            out, layer_cache = _attend_cached(q, k, v, layer_cache, index, mask)
        out = _dense(cfg.hidden_size, "o_proj", cfg, cfg.o_proj_bias)(out.reshape(batch, seq, -1))
        return out, layer_cache


class MLP(nn.Module):
    """The SwiGLU MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate, up = _project(cfg, x, [_dense(cfg.intermediate_size, "gate_proj", cfg, cfg.mlp_bias),
                                     _dense(cfg.intermediate_size, "up_proj", cfg, cfg.mlp_bias)])
        return _dense(cfg.hidden_size, "down_proj", cfg, cfg.mlp_bias)(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x, positions, layer_cache=None, index=None, mask=None):
        cfg = self.config
        if cfg.activation_sharding is not None:
            x = jax.lax.with_sharding_constraint(x, cfg.activation_sharding)
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name=name)
        h, layer_cache = Attention(cfg, name="self_attn")(norm("input_layernorm")(x), positions, layer_cache, index,
                                                          mask)
        x = x + h
        return x + MLP(cfg, name="mlp")(norm("post_attention_layernorm")(x)), layer_cache


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
            self.layers = [layer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype)

    def __call__(self, input_ids, positions=None, cache=None, attention_mask=None):
        real = _real_tokens(input_ids, attention_mask)
        index, mask, state = None, None, {}
        if cache is not None:
            index = cache["index"]
            state, positions, mask = _cached_step(cache, real, positions, self.config.sliding_window,
                                                  input_ids.shape[-1])
        elif positions is None:
            zeros = jnp.zeros(input_ids.shape[:1], jnp.int32)
            positions = (jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape) if real is None
                         else _positions_from(real, zeros))
        if cache is None and real is not None:
            mask = real[:, None, None, :]
        x, layers_cache = self._layers(self.embed_tokens(input_ids), positions, cache, index, mask)
        return self.norm(x), None if cache is None else {**layers_cache, **state}

    def _layers(self, x, positions, cache, index, mask):
        layers_cache = None if cache is None else {"k": cache["k"], "v": cache["v"]}
        if self.config.scan_layers:
            x, new = self.layers(x, layers_cache, positions, index, mask)
        else:
            updated = []
            for i, layer in enumerate(self.layers):
                x, layer_new = layer(x, positions, jax.tree.map(lambda c: c[i], layers_cache), index, mask)
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
        """The output projection of final hidden states ``[..., hidden]``."""
        return self.model.attend(hidden) if self.config.tie_word_embeddings else self.lm_head(hidden)

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

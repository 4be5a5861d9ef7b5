"""Text generation with a key/value cache: greedy or sampled, batched with padding, jitted end to end.

Works with any linen causal LM that follows the cache protocol of
:class:`lora_jax.models.decoder.DecoderForCausalLM` (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3):
``module.init_cache(batch, max_length)`` returns an empty cache,
``module.apply(variables, ids, cache=cache)`` returns ``(logits, cache)``,
and ``attention_mask=`` (Hugging Face's convention: 1 for a real token, 0 for
padding) pads a batch of prompts on the left. The model knows nothing of
LoRA: to decode with adapters unmerged, pass a forward function that applies
them (``apply=``); merged params need none.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# The keywords of 0.1 that bound the adapters inside ``generate``; the model package imports no front end,
# so they cannot keep working and fail with the spelling that replaces them.
_REMOVED = ("lora", "config")
_BIND_LORA_APPLY = ("bind the adapters yourself: adapted = lora_jax.lora_apply(module, config); "
                   "generate(module, (base_params, lora_params), ids, ..., "
                   "apply=lambda p, ids, cache: adapted(p[0], p[1], ids, cache=cache))")


def nucleus(logits, top_p):
    """``logits`` ``[..., vocab]`` with every token outside the top-``top_p`` nucleus set to ``-inf``.

    The nucleus is the smallest set of most likely tokens whose probability
    reaches ``top_p`` (Hugging Face's ``TopPLogitsWarper``): a token stays if
    the tokens more likely than it hold less than ``top_p``; the most likely
    token always stays, and ``top_p >= 1`` keeps every token.

    >>> logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
    >>> jnp.isfinite(nucleus(logits, 0.75)).tolist()
    [True, True, False, False]
    """
    order = jnp.argsort(-logits, axis=-1)
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    keep_sorted = (jnp.cumsum(probs, axis=-1) - probs < top_p) | (top_p >= 1)
    keep = jnp.put_along_axis(jnp.zeros(logits.shape, bool), order, keep_sorted, axis=-1, inplace=False)
    return jnp.where(keep, logits, -jnp.inf)


def _pick(logits, key, temperature, top_k: int | None, top_p):
    """The next token from ``logits`` ``[batch, vocab]``: argmax for ``temperature`` None, else a sample.

    As Hugging Face's warpers, in order: temperature, top-k, top-p.
    ``temperature`` and ``top_p`` are traced: new values do not recompile (greedy decoding compiles apart).
    """
    if temperature is None:   # greedy: no random draw at each step
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    if top_p is not None:
        scaled = nucleus(scaled, top_p)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("module", "apply", "max_new_tokens", "top_k", "max_length"))
def _generate(module, apply, params, input_ids, attention_mask, rng, sampling, stop, pad, *, max_new_tokens,
              top_k, max_length):
    def call(ids, cache, mask=None):
        extra = {} if mask is None else {"attention_mask": mask}
        if apply is None:
            return module.apply({"params": params}, ids, cache=cache, **extra)
        return apply(params, ids, cache=cache, **extra)

    temperature, top_p = sampling
    batch = input_ids.shape[0]
    keys = jax.random.split(rng, max_new_tokens)
    logits, cache = call(input_ids, module.init_cache(batch, max_length), attention_mask)
    first = _pick(logits[:, -1], keys[0], temperature, top_k, top_p)
    out = jnp.full((batch, max_new_tokens), pad, jnp.int32).at[:, 0].set(first)
    ended = lambda token: jnp.any(token[:, None] == stop[None, :], axis=1)

    def unfinished(state):
        t, _, _, done, _ = state
        return (t < max_new_tokens) & ~jnp.all(done)

    def step(state):
        t, token, cache, done, out = state
        logits, cache = call(token[:, None], cache)
        nxt = jnp.where(done, pad, _pick(logits[:, -1], keys[t], temperature, top_k, top_p))
        out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], t, axis=1)
        return t + 1, nxt, cache, done | ended(nxt), out

    # A while loop, not a scan: it ends as soon as every row has produced an end token.
    out = jax.lax.while_loop(unfinished, step, (jnp.int32(1), first, cache, ended(first), out))[-1]
    return jnp.concatenate([input_ids, out], axis=1)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _end_tokens(eos_token_id) -> list[int]:
    """``eos_token_id`` (None, an int, or a sequence of ints, as Hugging Face allows) as a list."""
    ids = [] if eos_token_id is None else [eos_token_id] if _is_int(eos_token_id) else list(eos_token_id)
    if not all(_is_int(i) and i >= 0 for i in ids) or (eos_token_id is not None and not ids):
        raise ValueError(f"generate: eos_token_id must be None, a token id or a non-empty list of them, "
                         f"got {eos_token_id!r}")
    return [int(i) for i in ids]


def _check_mask(attention_mask, input_ids) -> np.ndarray:
    """``attention_mask`` as an int32 array, checked: the ids' shape, 0/1, left-padded, a real token per row."""
    mask = np.asarray(attention_mask)
    if mask.shape != input_ids.shape:
        raise ValueError(f"generate: attention_mask{list(mask.shape)} must have input_ids' shape "
                         f"{list(input_ids.shape)}")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("generate: attention_mask must hold only 1 (a real token) and 0 (padding)")
    empty = np.flatnonzero(mask.sum(axis=1) == 0)
    if empty.size:
        raise ValueError(f"generate: rows {empty.tolist()} of attention_mask have no real token")
    right = np.flatnonzero((np.diff(mask.astype(np.int32), axis=1) < 0).any(axis=1))
    if right.size:
        raise ValueError(f"generate: rows {right.tolist()} are not left-padded (a 0 after a 1 in attention_mask); "
                         f"pad prompts on the left, as Hugging Face's tokenizer(padding_side='left')")
    return mask.astype(np.int32)


def _check_sampling(module, temperature, rng, top_k, top_p):
    if temperature < 0 or (temperature > 0 and rng is None):
        raise ValueError(f"generate: temperature must be >= 0 and sampling (temperature {temperature}) needs rng=")
    if top_k is not None and not 1 <= top_k <= module.config.vocab_size:
        raise ValueError(f"generate: top_k must be in [1, vocab_size={module.config.vocab_size}], got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")


def generate(module, params: Any, input_ids, *, max_new_tokens: int,
             apply: Callable[..., tuple[Any, Any]] | None = None, attention_mask=None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, rng=None,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             max_length: int | None = None, **removed):
    """Continues each prompt in ``input_ids`` by up to ``max_new_tokens`` tokens.

    The prompts are processed in one call (filling the cache), then one token
    per step inside a ``lax.while_loop``; the whole loop is one compiled
    function, and it stops once every row has produced an end token.

    Args:
      module: the causal LM (e.g. ``LlamaForCausalLM``); it makes the cache.
      params: what ``apply`` takes, any pytree (traced, so new values do not
        recompile): the module's ``params`` tree by default, or, say, a
        ``(base_params, lora_params)`` pair for a forward that applies adapters.
      input_ids: int ``[batch, prompt_length]``.
      max_new_tokens: how many tokens to append (>= 1).
      apply: the forward, ``apply(params, ids, cache=cache) -> (logits, cache)``;
        defaults to ``module.apply({"params": params}, ids, cache=cache)``.
        With ``attention_mask`` the prompt's call also gets ``attention_mask=``.
        A static argument of the compiled loop: create it once and reuse it,
        as a new function object compiles the loop again.
      attention_mask: int/bool ``[batch, prompt_length]``, 1 for a real token
        and 0 for padding (Hugging Face's convention), for prompts of
        different lengths padded on the left; ``None``: no padding.
      temperature: 0 for greedy decoding; otherwise sample from
        ``softmax(logits / temperature)``, which needs ``rng``.
      top_k: with sampling, keep only the ``top_k`` most likely tokens.
      top_p: with sampling, keep only the nucleus of probability ``top_p``
        (:func:`nucleus`, after ``top_k``).
      eos_token_id: an end token id or a list of them; a row ends when it
        produces one, and is padded with ``pad_token_id`` after it.
      pad_token_id: what fills a row after its end; defaults to the (first) end token.
      max_length: cache length; defaults to prompt length + ``max_new_tokens``.

    Returns:
      int32 ``[batch, prompt_length + max_new_tokens]``: the prompts (as
      given, padding included) and their continuations.

    >>> from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
    ...                                      num_hidden_layers=1, num_attention_heads=2))
    >>> ids = jnp.ones((2, 3), jnp.int32)
    >>> params = model.init(jax.random.key(0), ids)["params"]
    >>> generate(model, params, ids, max_new_tokens=4).shape
    (2, 7)

    Prompts of lengths 1 and 3, left-padded (row 0 continues as ``[[1]]`` alone would):

    >>> mask = jnp.array([[0, 0, 1], [1, 1, 1]])
    >>> out = generate(model, params, ids * mask, attention_mask=mask, max_new_tokens=4)
    >>> bool((out[0, 2:] == generate(model, params, ids[:1, :1], max_new_tokens=4)[0]).all())
    True

    With adapters applied unmerged (``lora_jax.lora_apply`` binds them):

    >>> import lora_jax as L
    >>> cfg = L.LoraConfig(rank=2, targets="attention")
    >>> lora = L.init_lora(model, params, cfg, ids, rng=jax.random.key(1))
    >>> adapted = L.lora_apply(model, cfg)
    >>> def forward(p, ids, cache):
    ...     return adapted(p[0], p[1], ids, cache=cache)
    >>> generate(model, (params, lora), ids, max_new_tokens=4, apply=forward).shape
    (2, 7)

    A different adapter per row (:func:`lora_jax.multi.stack`): the rows'
    ``adapter_ids`` travel in ``params`` too, traced like the weights:

    >>> stacked = L.stack(params, {"a": L.Adapter(cfg, lora)})
    >>> mixed = L.lora_apply(model, stacked.config)
    >>> def per_row(p, ids, cache, attention_mask=None):
    ...     base, lora_params, rows = p
    ...     return mixed(base, lora_params, ids, cache=cache, attention_mask=attention_mask, adapter_ids=rows)
    >>> both = generate(model, (params, stacked.lora_params, stacked.ids(["a", None])), ids * mask,
    ...                 attention_mask=mask, max_new_tokens=4, apply=per_row)
    >>> bool((both[1] == generate(model, params, ids, max_new_tokens=4)[1]).all())   # row 1: no adapter
    True
    """
    if set(removed) & set(_REMOVED):
        raise TypeError("generate: the keywords lora= and config= were removed in lora_jax 0.2; " + _BIND_LORA_APPLY)
    if removed:
        raise TypeError(f"generate() got an unexpected keyword argument {sorted(removed)[0]!r}")
    if int(max_new_tokens) < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens!r}")
    _check_sampling(module, temperature, rng, top_k, top_p)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"generate: input_ids must be [batch, prompt_length], got shape {input_ids.shape}")
    mask = None if attention_mask is None else jnp.asarray(_check_mask(attention_mask, input_ids))
    needed = input_ids.shape[1] + int(max_new_tokens)
    if max_length is None:
        max_length = needed
    elif max_length < needed:
        raise ValueError(f"generate: max_length {max_length} < prompt length + max_new_tokens = {needed}")
    stop = _end_tokens(eos_token_id)
    if pad_token_id is not None and not (_is_int(pad_token_id) and pad_token_id >= 0):
        raise ValueError(f"generate: pad_token_id must be None or a token id, got {pad_token_id!r}")
    pad = pad_token_id if pad_token_id is not None else stop[0] if stop else 0
    rng = jax.random.key(0) if rng is None else rng
    sampling = (None, None) if temperature == 0 else (jnp.float32(temperature),
                                                        None if top_p is None else jnp.float32(top_p))
    return _generate(module, apply, params, input_ids, mask, rng, sampling, jnp.asarray(stop or [-1], jnp.int32),
                     jnp.int32(pad), max_new_tokens=int(max_new_tokens), top_k=top_k, max_length=int(max_length))

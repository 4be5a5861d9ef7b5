"""Text generation with a key/value cache: greedy or temperature sampling, jitted end to end.

Works with any linen causal LM that follows the cache protocol of
:class:`lora_jax.models.decoder.DecoderForCausalLM` (Llama, Mistral, Qwen2, Qwen3):
``module.init_cache(batch, max_length)`` returns an empty cache and
``module.apply(variables, ids, cache=cache)`` returns ``(logits, cache)``.
The model knows nothing of LoRA: to decode with adapters unmerged, pass a
forward function that applies them (``apply=``); merged params need none.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

# The keywords of 0.1 that bound the adapters inside ``generate``; the model package imports no front end,
# so they cannot keep working and fail with the spelling that replaces them.
_REMOVED = ("lora", "config")
_BIND_LORA_APPLY = ("bind the adapters yourself: adapted = lora_jax.lora_apply(module, config); "
                   "generate(module, (base_params, lora_params), ids, ..., "
                   "apply=lambda p, ids, cache: adapted(p[0], p[1], ids, cache=cache))")


def _pick(logits, key, temperature, top_k: int | None):
    """The next token from ``logits`` ``[batch, vocab]``: argmax at temperature 0, else a sample.

    ``temperature`` is traced, so changing it does not recompile.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
    if top_k is not None:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    sample = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sample, greedy)


@functools.partial(jax.jit, static_argnames=("module", "apply", "max_new_tokens", "top_k", "max_length"))
def _generate(module, apply, params, input_ids, rng, temperature, stop, *, max_new_tokens, top_k, max_length):
    def call(ids, cache):
        if apply is None:
            return module.apply({"params": params}, ids, cache=cache)
        return apply(params, ids, cache=cache)

    batch = input_ids.shape[0]
    keys = jax.random.split(rng, max_new_tokens)
    logits, cache = call(input_ids, module.init_cache(batch, max_length))
    first = _pick(logits[:, -1], keys[0], temperature, top_k)
    done = first == stop

    def step(carry, key):
        token, cache, done = carry
        logits, cache = call(token[:, None], cache)
        nxt = jnp.where(done, stop, _pick(logits[:, -1], key, temperature, top_k))
        return (nxt, cache, done | (nxt == stop)), nxt

    _, rest = jax.lax.scan(step, (first, cache, done), keys[1:])
    return jnp.concatenate([input_ids, first[:, None], rest.T], axis=1)


def generate(module, params: Any, input_ids, *, max_new_tokens: int,
             apply: Callable[..., tuple[Any, Any]] | None = None, temperature: float = 0.0, top_k: int | None = None,
             rng=None, eos_token_id: int | None = None, max_length: int | None = None, **removed):
    """Continues each prompt in ``input_ids`` by ``max_new_tokens`` tokens.

    The prompt is processed in one call (filling the cache), then one token
    per step inside a ``lax.scan``; the whole loop is one compiled function.
    All prompts in the batch have the same length (no padding mask).

    Args:
      module: the causal LM (e.g. ``LlamaForCausalLM``); its ``config`` sizes the cache.
      params: what ``apply`` takes, any pytree (traced, so new values do not
        recompile): the module's ``params`` tree by default, or, say, a
        ``(base_params, lora_params)`` pair for a forward that applies adapters.
      input_ids: int ``[batch, prompt_length]``.
      max_new_tokens: how many tokens to append (>= 1).
      apply: the forward, ``apply(params, ids, cache=cache) -> (logits, cache)``;
        defaults to ``module.apply({"params": params}, ids, cache=cache)``.
        A static argument of the compiled loop: create it once and reuse it,
        as a new function object compiles the loop again.
      temperature: 0 for greedy decoding; otherwise sample from
        ``softmax(logits / temperature)``, which needs ``rng``.
      top_k: with sampling, keep only the ``top_k`` most likely tokens.
      eos_token_id: once a row produces it, the row is padded with it.
      max_length: cache length; defaults to prompt length + ``max_new_tokens``.

    Returns:
      int32 ``[batch, prompt_length + max_new_tokens]``: the prompts and their continuations.

    >>> from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
    ...                                      num_hidden_layers=1, num_attention_heads=2))
    >>> ids = jnp.ones((2, 3), jnp.int32)
    >>> params = model.init(jax.random.key(0), ids)["params"]
    >>> generate(model, params, ids, max_new_tokens=4).shape
    (2, 7)

    With adapters applied unmerged (``lora_jax.lora_apply`` binds them):

    >>> import lora_jax as L
    >>> cfg = L.LoraConfig(rank=2, targets="attention")
    >>> lora = L.init_lora(model, params, cfg, ids, rng=jax.random.key(1))
    >>> adapted = L.lora_apply(model, cfg)
    >>> def forward(p, ids, cache):
    ...     return adapted(p[0], p[1], ids, cache=cache)
    >>> generate(model, (params, lora), ids, max_new_tokens=4, apply=forward).shape
    (2, 7)
    """
    if set(removed) & set(_REMOVED):
        raise TypeError("generate: the keywords lora= and config= were removed in lora_jax 0.2; " + _BIND_LORA_APPLY)
    if removed:
        raise TypeError(f"generate() got an unexpected keyword argument {sorted(removed)[0]!r}")
    if int(max_new_tokens) < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens!r}")
    if temperature < 0 or (temperature > 0 and rng is None):
        raise ValueError(f"generate: temperature must be >= 0 and sampling (temperature {temperature}) needs rng=")
    if top_k is not None and not 1 <= top_k <= module.config.vocab_size:
        raise ValueError(f"generate: top_k must be in [1, vocab_size={module.config.vocab_size}], got {top_k}")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"generate: input_ids must be [batch, prompt_length], got shape {input_ids.shape}")
    needed = input_ids.shape[1] + int(max_new_tokens)
    if max_length is None:
        max_length = needed
    elif max_length < needed:
        raise ValueError(f"generate: max_length {max_length} < prompt length + max_new_tokens = {needed}")
    rng = jax.random.key(0) if rng is None else rng
    stop = jnp.int32(-1 if eos_token_id is None else eos_token_id)
    return _generate(module, apply, params, input_ids, rng, jnp.float32(temperature), stop,
                     max_new_tokens=int(max_new_tokens), top_k=top_k, max_length=int(max_length))

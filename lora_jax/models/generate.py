"""Text generation with a key/value cache: greedy or temperature sampling, jitted end to end.

Works with any linen causal LM that follows the cache protocol of
:class:`lora_jax.models.llama.LlamaForCausalLM`: ``module.config`` is a
:class:`~lora_jax.models.llama.LlamaConfig` and
``module.apply(variables, ids, cache=cache)`` returns ``(logits, cache)``.
With ``lora`` the adapters are applied unmerged through
:func:`lora_jax.lora_apply`; merged params need no adapter at all.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lora_jax.config import LoraConfig
from lora_jax.linen import lora_apply
from lora_jax.models.llama import init_cache


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


@functools.partial(jax.jit, static_argnames=("module", "lora_config", "max_new_tokens", "top_k", "max_length"))
def _generate(module, lora_config, base, lora, input_ids, rng, temperature, stop, *, max_new_tokens, top_k,
              max_length):
    if lora_config is None:
        def call(ids, cache):
            return module.apply({"params": base}, ids, cache=cache)
    else:
        adapted = lora_apply(module, lora_config)

        def call(ids, cache):
            return adapted(base, lora, ids, cache=cache)

    batch = input_ids.shape[0]
    keys = jax.random.split(rng, max_new_tokens)
    logits, cache = call(input_ids, init_cache(module.config, batch, max_length))
    first = _pick(logits[:, -1], keys[0], temperature, top_k)
    done = first == stop

    def step(carry, key):
        token, cache, done = carry
        logits, cache = call(token[:, None], cache)
        nxt = jnp.where(done, stop, _pick(logits[:, -1], key, temperature, top_k))
        return (nxt, cache, done | (nxt == stop)), nxt

    _, rest = jax.lax.scan(step, (first, cache, done), keys[1:])
    return jnp.concatenate([input_ids, first[:, None], rest.T], axis=1)


def generate(module, base_params, input_ids, *, max_new_tokens: int, lora=None, config: LoraConfig | None = None,
             temperature: float = 0.0, top_k: int | None = None, rng=None, eos_token_id: int | None = None,
             max_length: int | None = None):
    """Continues each prompt in ``input_ids`` by ``max_new_tokens`` tokens.

    The prompt is processed in one call (filling the cache), then one token
    per step inside a ``lax.scan``; the whole loop is one compiled function.
    All prompts in the batch have the same length (no padding mask).

    Args:
      module: the causal LM (e.g. ``LlamaForCausalLM``).
      base_params: its ``params`` tree.
      input_ids: int ``[batch, prompt_length]``.
      max_new_tokens: how many tokens to append (>= 1).
      lora, config: an adapter tree and its :class:`LoraConfig`, both or neither.
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
    """
    if (lora is None) != (config is None):
        raise ValueError("generate: pass both lora= and config= (the adapter and its LoraConfig), or neither")
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
    return _generate(module, config, base_params, lora, input_ids, rng, jnp.float32(temperature), stop,
                     max_new_tokens=int(max_new_tokens), top_k=top_k, max_length=int(max_length))

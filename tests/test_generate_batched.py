"""Batched generation: left-padded prompts with an attention mask, per-row adapters and end tokens, sampling.

Against transformers 5.24 / PEFT 0.21.2 (tests/fixtures/make_zoo_fixtures.py): a batch of three prompts
of 3, 7 and 12 tokens, padded on the left, on every zoo architecture (Mistral's window is 4 slots).
transformers' greedy continuations, and the logits of every step, base and with the adapter unmerged.
Each architecture's model, adapters and compiled functions are built once per module.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import lora_apply, stack
from lora_jax.io import load_peft
from lora_jax.models import from_pretrained, generate
from lora_jax.models.decoder import attention_implementation
from lora_jax.models.generate import nucleus
from tests.test_hf_zoo import ARCHS, ZOO, assert_matches_torch
from tests.tolerances import assert_close

PAD = 0                      # the fixtures' pad id (real tokens are 1..95)
NEW = 8                      # the fixtures' max_new_tokens


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(os.path.join(ZOO, "reference.npz")) as z:
        return {k: z[k] for k in z.files}


@dataclasses.dataclass
class Arch:
    """One architecture's model, adapter and the compiled forwards that generation takes (``apply=``)."""

    name: str
    module: object
    params: dict
    adapter: object
    stacked: object
    adapted: object           # (params, lora), ids, cache=, attention_mask= -> logits
    forward: object           # generate's apply for the base model
    unmerged: object          # generate's apply with the adapter unmerged
    per_row: object           # generate's apply with a stacked adapter and adapter_ids


@functools.cache
def _build(name: str) -> Arch:
    """Built once per name: the apply functions are static arguments of generate's compiled loop."""
    module, params = from_pretrained(os.path.join(ZOO, name), show_progress=False)
    adapter = load_peft(os.path.join(ZOO, "adapters", name))
    adapted = lora_apply(module, adapter.config)
    stacked = stack(params, {"zoo": adapter})
    mixed = lora_apply(module, stacked.config)

    def forward(p, ids, cache, attention_mask=None):
        return module.apply({"params": p}, ids, cache=cache, attention_mask=attention_mask)

    def unmerged(p, ids, cache, attention_mask=None):
        return adapted(p[0], p[1], ids, cache=cache, attention_mask=attention_mask)

    def per_row(p, ids, cache, attention_mask=None):
        return mixed(p[0], p[1], ids, cache=cache, attention_mask=attention_mask, adapter_ids=p[2])

    return Arch(name, module, params, adapter, stacked, adapted, forward, unmerged, per_row)


@pytest.fixture(scope="module", params=ARCHS)
def arch(request) -> Arch:
    return _build(request.param)


def _padded(ref):
    return jnp.asarray(ref["padded_input_ids"]), jnp.asarray(ref["padded_attention_mask"])


def _real(ref) -> np.ndarray:
    return ref["padded_attention_mask"].astype(bool)


def test_padded_logits_match_transformers_at_real_positions(arch, ref):
    ids, mask = _padded(ref)
    real = _real(ref)
    forward = jax.jit(lambda p, mask: arch.module.apply({"params": p}, ids, attention_mask=mask))
    base = forward(arch.params, mask)
    assert_matches_torch(np.asarray(base)[real], ref[f"{arch.name}/padded_logits"][real], f"{arch.name} padded")
    lora = jax.jit(lambda p, lora: arch.adapted(p, lora, ids, attention_mask=mask))(arch.params,
                                                                                     arch.adapter.lora_params)
    assert_matches_torch(np.asarray(lora)[real], ref[f"{arch.name}/padded_adapter_logits"][real],
                         f"{arch.name} padded, adapter unmerged")
    # The padded rows differ from unpadded ones where the mask is ignored: the mask matters.
    unmasked = np.asarray(forward(arch.params, jnp.ones_like(mask)))
    assert np.abs(unmasked[0, -1] - ref[f"{arch.name}/padded_logits"][0, -1]).max() > 0.1


def _teacher_forced(module, apply, params, ids, mask, tokens):
    """Logits of each new token's step ``[batch, steps, vocab]``: the padded prompt, then ``tokens`` one by one."""
    logits, cache = apply(params, ids, module.init_cache(ids.shape[0], ids.shape[1] + tokens.shape[1]),
                          attention_mask=mask)

    def step(cache, token):
        out, cache = apply(params, token[:, None], cache)
        return cache, out[:, -1]

    rest = jax.lax.scan(step, cache, tokens[:, :-1].T)[1]
    return jnp.concatenate([logits[:, -1:], jnp.swapaxes(rest, 0, 1)], axis=1)


@pytest.mark.parametrize("adapter", [False, True], ids=["base", "adapter"])
def test_cached_steps_match_transformers(arch, ref, adapter):
    """Each cached decoding step's logits equal transformers' (the window and the positions per row)."""
    ids, mask = _padded(ref)
    key = f"{arch.name}/padded_adapter" if adapter else f"{arch.name}/padded"
    apply, params = ((arch.unmerged, (arch.params, arch.adapter.lora_params)) if adapter
                     else (arch.forward, arch.params))
    steps = jax.jit(_teacher_forced, static_argnums=(0, 1))(arch.module, apply, params, ids, mask,
                                                            jnp.asarray(ref[f"{key}_generate"][:, ids.shape[1]:]))
    assert_matches_torch(steps, ref[f"{key}_step_logits"], f"{key} cached steps")


def test_greedy_tokens_with_per_row_adapters_match_transformers(arch, ref):
    """One compiled loop, adapters chosen per row: each row as transformers continues it with or without."""
    ids, mask = _padded(ref)
    with_adapter, base = ref[f"{arch.name}/padded_adapter_generate"], ref[f"{arch.name}/padded_generate"]
    for names in (["zoo", None, "zoo"], [None, "zoo", None]):
        rows = arch.stacked.ids(names)
        out = np.asarray(generate(arch.module, (arch.params, arch.stacked.lora_params, rows), ids,
                                  attention_mask=mask, max_new_tokens=NEW, apply=arch.per_row))
        expected = np.stack([(base if name is None else with_adapter)[row] for row, name in enumerate(names)])
        np.testing.assert_array_equal(out, expected, err_msg=str(names))


def test_per_row_adapters_equal_each_row_alone(ref):
    """Mistral (the window): each row unpadded and alone continues as it does padded in the mixed batch."""
    a = _build("mistral")
    ids, mask = _padded(ref)
    names = ["zoo", None, "zoo"]
    params = (a.params, a.stacked.lora_params, a.stacked.ids(names))
    batch = np.asarray(generate(a.module, params, ids, attention_mask=mask, max_new_tokens=NEW, apply=a.per_row))
    assert not np.array_equal(ref["mistral/padded_generate"], ref["mistral/padded_adapter_generate"])
    for row, length in enumerate(ref["padded_attention_mask"].sum(axis=1)[:1]):     # 3 tokens, 9 pads
        alone = (a.params, a.stacked.lora_params, a.stacked.ids([names[row]]))
        out = generate(a.module, alone, ids[row:row + 1, -length:], max_new_tokens=NEW, apply=a.per_row)
        np.testing.assert_array_equal(np.asarray(out)[0], batch[row, -(length + NEW):])


def test_end_tokens_stop_rows_and_the_loop(arch, ref):
    """Per-row end tokens: rows end apart, padded after; the loop stops when all have ended (counted calls)."""
    ids, mask = _padded(ref)
    calls = []

    def counting(p, ids, cache, attention_mask=None):
        jax.debug.callback(lambda: calls.append(ids.shape[1]))
        return arch.forward(p, ids, cache, attention_mask)

    eos = ref[f"{arch.name}/padded_eos_ids"].tolist()
    out = np.asarray(generate(arch.module, arch.params, ids, attention_mask=mask, max_new_tokens=NEW, apply=counting,
                              eos_token_id=eos, pad_token_id=PAD))
    jax.effects_barrier()
    theirs = ref[f"{arch.name}/padded_eos_generate"]                  # transformers stops early: shorter
    new = theirs.shape[1] - ids.shape[1]
    assert new < NEW
    np.testing.assert_array_equal(out[:, :theirs.shape[1]], theirs)
    assert (out[:, theirs.shape[1]:] == PAD).all()
    assert calls == [ids.shape[1]] + [1] * (new - 1)                 # the prompt, then one call per new token
    ends = [int(np.flatnonzero(np.isin(row, eos))[0]) for row in out[:, ids.shape[1]:]]
    if arch.name == "mistral":                                        # Mistral's rows end apart
        assert ends == [1, 3, 1]
    for row, end in enumerate(ends):
        np.testing.assert_array_equal(out[row, :ids.shape[1] + end + 1],
                                      ref[f"{arch.name}/padded_generate"][row, :ids.shape[1] + end + 1])


def test_scanned_layers_with_padding(ref):
    """The scanned, fused, rematerialised variant with padding: transformers' logits and tokens (Mistral)."""
    module, params = from_pretrained(os.path.join(ZOO, "mistral"), show_progress=False, scan_layers=True, remat=True)
    module = type(module)(dataclasses.replace(module.config, fused_projections=True))
    ids, mask = _padded(ref)
    real = _real(ref)
    logits = jax.jit(lambda p: module.apply({"params": p}, ids, attention_mask=mask))(params)
    assert_matches_torch(np.asarray(logits)[real], ref["mistral/padded_logits"][real], "mistral scanned padded")
    out = generate(module, params, ids, attention_mask=mask, max_new_tokens=NEW)
    np.testing.assert_array_equal(np.asarray(out), ref["mistral/padded_generate"])


# ---- sampling

@pytest.fixture(scope="module")
def mistral(ref):
    """Mistral with one padded prompt repeated over many rows, and the first step's float32 logits."""
    a = _build("mistral")
    ids, mask = (jnp.repeat(x[1:2], 1024, axis=0) for x in _padded(ref))
    first = np.asarray(a.module.apply({"params": a.params}, ids[:1], attention_mask=mask[:1])[0, -1], np.float64)
    return a, ids, mask, first


def _first_tokens(mistral, **kwargs) -> np.ndarray:
    a, ids, mask, _ = mistral
    return np.asarray(generate(a.module, a.params, ids, attention_mask=mask, max_new_tokens=1, **kwargs))[:, -1]


def test_top_k_one_and_a_tiny_top_p_are_greedy(mistral, ref):
    greedy = ref["mistral/padded_generate"][1, ref["padded_input_ids"].shape[1]]
    for kwargs in (dict(top_k=1), dict(top_p=1e-6)):
        out = _first_tokens(mistral, temperature=50.0, rng=jax.random.key(3), **kwargs)
        assert (out == greedy).all(), kwargs


def _softmax(logits):
    e = np.exp(logits - logits.max())
    return e / e.sum()


def test_samples_follow_temperature_top_k_and_top_p(mistral):
    """1024 first tokens: only from the top-k set / the nucleus, in the proportions softmax(logits / T) gives."""
    _, _, _, first = mistral
    temperature = 0.5
    probs = _softmax(first / temperature)
    order = np.argsort(-probs)
    assert probs[order[0]] < 0.5 and probs[order[3]] > 0.05           # a distribution worth sampling from
    free = _first_tokens(mistral, temperature=temperature, rng=jax.random.key(0))
    counts = np.bincount(free, minlength=probs.size) / free.size
    sigma = np.sqrt(probs * (1 - probs) / free.size)
    assert (np.abs(counts - probs) <= 5 * sigma + 1e-3).all()
    top = _first_tokens(mistral, temperature=temperature, top_k=4, rng=jax.random.key(1))
    assert set(top.tolist()) == set(order[:4].tolist())
    cumulative = np.cumsum(probs[order])
    top_p = (cumulative[2] + cumulative[3]) / 2                       # the nucleus is the 4 most likely tokens
    nucleus_tokens = _first_tokens(mistral, temperature=temperature, top_p=float(top_p), rng=jax.random.key(2))
    assert set(nucleus_tokens.tolist()) == set(order[:4].tolist())
    share = probs[order[:4]] / probs[order[:4]].sum()                 # renormalised within the nucleus
    counts = np.bincount(nucleus_tokens, minlength=probs.size)[order[:4]] / nucleus_tokens.size
    assert (np.abs(counts - share) <= 5 * np.sqrt(share * (1 - share) / nucleus_tokens.size)).all()


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    for top_p, kept in ((0.4, {1}), (0.79, {1, 3}), (0.81, {1, 3, 2}), (0.96, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})):
        out = np.asarray(nucleus(logits, top_p))
        assert set(np.flatnonzero(np.isfinite(out)).tolist()) == kept, top_p
        assert_close(out[np.isfinite(out)], np.log(probs[sorted(kept)]), np.float32, what=f"top_p {top_p}")


# ---- refusals

@pytest.mark.parametrize("mask, kwargs, message", [
    ([[1, 1]], {}, r"attention_mask\[1, 2\] must have input_ids' shape \[1, 3\]"),
    ([[0, 0, 0]], {}, r"rows \[0\] of attention_mask have no real token"),
    ([[1, 1, 0]], {}, r"rows \[0\] are not left-padded .*padding_side='left'"),
    ([[0, 2, 1]], {}, r"attention_mask must hold only 1 \(a real token\) and 0 \(padding\)"),
    (None, dict(top_p=0.0, temperature=1.0), r"top_p must be in \(0, 1\], got 0.0"),
    (None, dict(top_p=1.5, temperature=1.0), r"top_p must be in \(0, 1\], got 1.5"),
    (None, dict(eos_token_id=[]), r"eos_token_id must be None, a token id or a non-empty list of them"),
    (None, dict(eos_token_id=[1, "2"]), r"eos_token_id must be None, a token id or a non-empty list"),
    (None, dict(pad_token_id=-1), r"pad_token_id must be None or a token id, got -1"),
])
def test_generate_refuses_bad_batches(ref, mask, kwargs, message):
    a = _build("llama")
    kwargs = dict(kwargs, rng=jax.random.key(0)) if "temperature" in kwargs else kwargs
    with pytest.raises(ValueError, match=message):
        generate(a.module, a.params, jnp.ones((1, 3), jnp.int32), attention_mask=mask, max_new_tokens=2, **kwargs)


def test_model_refuses_a_mask_of_another_shape_and_cudnn_refuses_padding():
    a = _build("qwen3")
    with pytest.raises(ValueError, match=r"attention_mask\[1, 2\] must have input_ids' shape \[1, 3\]"):
        a.module.apply({"params": a.params}, jnp.ones((1, 3), jnp.int32), attention_mask=jnp.ones((1, 2)))
    hopper = dict(backend="gpu", compute_capability="9.0")
    cfg = a.module.config
    assert attention_implementation(cfg, jnp.bfloat16, **hopper) == "cudnn"
    assert attention_implementation(cfg, jnp.bfloat16, padded=True, **hopper) == "xla"
    with pytest.raises(ValueError, match=r"the inputs are padded \(an attention_mask is given\)"):
        attention_implementation(dataclasses.replace(cfg, attention_implementation="cudnn"), jnp.bfloat16,
                                 padded=True, **hopper)

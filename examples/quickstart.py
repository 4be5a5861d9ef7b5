"""Quickstart: LoRA on a small Llama-style model, end to end, in about half a minute on a laptop CPU.

  1. build a model from a config (random weights stand in for a pretrained checkpoint);
  2. choose which layers get adapters (LoraConfig) and create them (init_lora);
  3. train the adapters alone on a toy task: continue a fixed repeating token pattern;
  4. merge them into the weights for inference, and check what should hold:
     merged == unmerged, the base params untouched, adapter off == base model.

Run from the repository root:  python examples/quickstart.py [--steps 40] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM, causal_lm_loss

VOCAB, SEQ, BATCH, PERIOD = 256, 64, 8, 12


def pattern_batch(pattern: np.ndarray, rng: np.random.Generator) -> jnp.ndarray:
    """``BATCH`` windows of the endlessly repeated ``pattern``, each starting at a random phase."""
    starts = rng.integers(0, len(pattern), size=(BATCH, 1))
    return jnp.asarray(pattern[(starts + np.arange(SEQ)) % len(pattern)], dtype=jnp.int32)


def loss_fn(model, ids):
    # make_train_step hands us `model(*args)` == apply(base, lora, *args).
    return causal_lm_loss(model(ids), ids)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, adapters and data")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    # 1. The base model. Any flax.linen module works; this one uses Hugging Face's layer names
    #    (model/layers_0/self_attn/q_proj, ...), which the "attention"/"mlp" presets recognise.
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=344,
                                         num_hidden_layers=2, num_attention_heads=4))
    key_model, key_lora = jax.random.split(jax.random.key(args.seed))
    rng = np.random.default_rng(args.seed)
    pattern = rng.permutation(VOCAB)[:PERIOD]          # the task: tokens that always follow each other
    eval_ids = pattern_batch(pattern, rng)              # a fixed batch to measure the loss on
    base = model.init(key_model, eval_ids)["params"]    # frozen from here on
    base_before = jax.tree.map(np.array, base)          # a host copy, to check nothing writes to it

    # 2. Adapters on all seven projections of every decoder layer ("attention", "mlp" presets) and
    #    on the output head (a glob on its path): this base is random, not pretrained, and its
    #    frozen head (std 0.02) could not produce confident logits on its own.
    #    scale = alpha / rank = 2. B starts at zero, so the adapted model starts equal to the base.
    config = lora_jax.LoraConfig(rank=8, alpha=16, targets=("attention", "mlp", "lm_head"))
    lora = lora_jax.init_lora(model, base, config, eval_ids, rng=key_lora)
    lora_jax.summary(base, lora, config)

    # `apply(base, lora, ids)` runs the model with the adapters; `apply(base, None, ids)` without.
    apply = lora_jax.lora_apply(model, config)
    eval_loss = jax.jit(lambda lora_params: causal_lm_loss(apply(base, lora_params, eval_ids), eval_ids))

    # 3. Train. The step differentiates the adapters only: no gradient is ever formed for `base`.
    #    It is jitted and donates `lora` and `opt_state` (so use the returned ones).
    tx = optax.adamw(3e-3)
    step = lora_jax.make_train_step(apply, loss_fn, tx)
    opt_state = tx.init(lora)
    loss_before = float(eval_loss(lora))
    print(f"\nbase model loss on the pattern: {loss_before:.4f}  (uniform guess: ln {VOCAB} = {np.log(VOCAB):.4f})")
    for i in range(1, args.steps + 1):
        lora, opt_state, metrics = step(lora, opt_state, base, pattern_batch(pattern, rng))
        if i == 1 or i % 10 == 0 or i == args.steps:
            print(f"step {i:4d}  train loss {float(metrics['loss']):.4f}  grad norm {float(metrics['grad_norm']):.4f}")
    loss_after = float(eval_loss(lora))
    print(f"eval loss: before {loss_before:.4f} -> after {loss_after:.4f}")

    # 4. Merge: W + scale * A @ B, in float32. The result is an ordinary params tree for the
    #    unmodified module: zero inference overhead, no lora_jax needed to run it.
    merged = lora_jax.merge(base, lora, config)
    logits_lora = apply(base, lora, eval_ids)
    logits_merged = model.apply({"params": merged}, eval_ids)
    print(f"\nmerged vs unmerged: max |logit diff| {float(jnp.max(jnp.abs(logits_merged - logits_lora))):.3g} "
          f"(max |logit| {float(jnp.max(jnp.abs(logits_lora))):.3g})")
    print(f"merged model loss: {float(causal_lm_loss(logits_merged, eval_ids)):.4f}")

    # The base params were never modified: not by training, not by merging.
    same = [np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(base))]
    print(f"base params bitwise unchanged: {sum(same)}/{len(same)} arrays")

    # With no adapters, the adapted apply is exactly the base module.
    off = apply(base, None, eval_ids)
    plain = model.apply({"params": base}, eval_ids)
    print(f"adapter off == base model: bitwise equal {bool(jnp.array_equal(off, plain))}, "
          f"max |diff| {float(jnp.max(jnp.abs(off - plain))):.3g}")
    print(f"\ndone in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()

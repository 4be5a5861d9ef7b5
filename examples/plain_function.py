"""LoRA on a plain JAX function of a params dict (no Flax): adapt, train a few steps, merge, check.

  1. a two-layer MLP written as a function ``mlp(params, x)`` of a nested dict, "pretrained" on
     one regression target (a few hundred Adam steps, here, in a second);
  2. a new target; adapters on both weight matrices (``init_lora_fn``), trained with optax while
     the params stay frozen (``lora_apply_fn`` adds ``scale * A @ B`` to the weights inside the
     traced function: the universal way, which forms each delta densely);
  3. merged into the weights (``merge_fn``), checked against the unmerged function, and the
     frozen params checked bitwise unchanged.

The same works for haiku params and equinox modules (``layout="out_in"`` for ``W @ x`` weights).

Run from the repository root:  python examples/plain_function.py [--steps 200] [--seed 0]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from lora_jax.functional import init_lora_fn, lora_apply_fn, merge_fn

N_IN, HIDDEN, N_OUT = 16, 256, 4


def mlp(params, x):
    h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"][None])
    h = jnp.tanh(h @ params["mix"]["kernel"])
    return h @ params["out"]["kernel"]


def fit(loss, init, steps: int, lr: float):
    """``steps`` Adam updates of ``init`` under ``loss``; returns the result and the first/last loss."""
    tx = optax.adam(lr)

    @jax.jit
    def step(p, state):
        value, grads = jax.value_and_grad(loss)(p)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value

    p, state, first = init, tx.init(init), None
    for _ in range(steps):
        p, state, value = step(p, state)
        first = float(value) if first is None else first
    return p, first, float(loss(p))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="Adam steps for each phase (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    x = jnp.asarray(rng.normal(size=(256, N_IN)), jnp.float32)
    task_a, task_b = (jnp.asarray(rng.normal(size=(N_IN, N_OUT)), jnp.float32) for _ in range(2))

    init = {"hidden": {"kernel": jnp.asarray(rng.normal(size=(N_IN, HIDDEN)) / np.sqrt(N_IN), jnp.float32),
                       "bias": jnp.zeros(HIDDEN)},
            "mix": {"kernel": jnp.asarray(rng.normal(size=(HIDDEN, HIDDEN)) / np.sqrt(HIDDEN), jnp.float32)},
            "out": {"kernel": jnp.asarray(rng.normal(size=(HIDDEN, N_OUT)) / np.sqrt(HIDDEN), jnp.float32)}}
    mse = lambda y, target: jnp.mean((y - jnp.sin(x @ target)) ** 2)
    params, first, last = fit(lambda p: mse(mlp(p, x), task_a), init, args.steps, 1e-2)
    print(f"pretrained on task A: loss {first:.4f} -> {last:.4f}")
    frozen = jax.tree.map(np.asarray, params)

    config = lora_jax.LoraConfig(rank=4, alpha=8, targets=("hidden", "mix", "out"))
    lora = init_lora_fn(params, config, rng=jax.random.key(args.seed))
    apply = lora_apply_fn(mlp, config)
    print(f"adapters: {lora_jax.count_params(lora):,} trainable params for {lora_jax.count_params(params):,} "
          f"frozen (layers: {', '.join('/'.join(p) for p in lora_jax.adapter_paths(lora))})")
    lora, first, last = fit(lambda l: mse(apply(params, l, x), task_b), lora, args.steps, 1e-2)
    base_b = float(mse(mlp(params, x), task_b))
    print(f"LoRA on task B: loss {first:.4f} -> {last:.4f} (the frozen model's: {base_b:.4f})")

    merged = merge_fn(params, lora, config)
    worst = 0.0   # each merged weight against W + alpha/r * A @ B in float64 NumPy
    for name, node in lora.items():
        expected = np.asarray(params[name]["kernel"], np.float64) + config.scaling(name) * (
            np.asarray(node["a"], np.float64) @ np.asarray(node["b"], np.float64))
        worst = max(worst, float(np.max(np.abs(np.asarray(merged[name]["kernel"]) - expected))))
    print(f"merged weights vs W + scale * A @ B (float64): max |diff| {worst:.3g}")
    diff = float(jnp.max(jnp.abs(mlp(merged, x) - apply(params, lora, x))))
    print(f"merged model vs adapted function: max |diff| {diff:.3g} (the function merges the same way)")
    same = sum(np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(frozen)))
    print(f"frozen params bitwise unchanged: {same}/{len(jax.tree.leaves(frozen))} arrays")


if __name__ == "__main__":
    main()

"""NNX quickstart: LoRA adapters inside a ``flax.nnx`` model, trained with ``nnx.Optimizer``, then merged.

  1. build a small NNX model (random weights stand in for a pretrained one);
  2. attach adapters (lora_jax.nnx.attach): they live in the model as LoraParam Variables;
  3. train them alone with nnx.Optimizer(model, tx, wrt=LoraParam) inside nnx.jit, on a task
     the base cannot do: imitate a "fine-tuned" copy of itself whose weights moved by a low-rank delta;
  4. merge them into the weights and check what should hold:
     merged == unmerged, the base params untouched, a fresh adapter == base model.

Run from the repository root:  python examples/nnx_quickstart.py [--steps 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lora_jax
from lora_jax.nnx import LoraParam, attach, merge

IN, HIDDEN, OUT, BATCH = 16, 64, 4, 64


class MLP(nnx.Module):
    """Two hidden layers (in an nnx.List) and an output head."""

    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(IN, HIDDEN, rngs=rngs), nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)])
        self.head = nnx.Linear(HIDDEN, OUT, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = jax.nn.gelu(layer(x))
        return self.head(x)


def count(model, filt) -> int:
    return lora_jax.count_params(nnx.to_pure_dict(nnx.state(model, filt)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, adapters and data")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)

    # 1. The base model, and a "fine-tuned" teacher: the same weights plus a rank-2 change to
    #    every layer. The adapters (rank 4) can represent that change exactly.
    base = MLP(nnx.Rngs(args.seed))
    base_before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(base, nnx.Param)))  # a host copy
    teacher = nnx.clone(base)
    for layer in (*teacher.layers, teacher.head):
        n_in, n_out = layer.kernel.shape
        delta = rng.normal(size=(n_in, 2)) @ rng.normal(size=(2, n_out)) / np.sqrt(n_in)
        layer.kernel[...] = layer.kernel[...] + jnp.asarray(delta, jnp.float32)
    eval_x = jnp.asarray(rng.normal(size=(256, IN)), jnp.float32)
    eval_y = teacher(eval_x)

    # 2. Adapters on every Linear ("re:.*" matches every layer path: layers/0, layers/1, head).
    #    attach returns an adapted copy; `base` itself is left as it is. B starts at zero, so the
    #    adapted model starts equal to the base.
    config = lora_jax.LoraConfig(rank=4, alpha=8, targets="re:.*")
    model = attach(base, config, rngs=nnx.Rngs(params=args.seed + 1))
    print(f"fresh adapters == base model: bitwise equal {bool(jnp.array_equal(model(eval_x), base(eval_x)))}")
    trainable, frozen = count(model, LoraParam), count(model, nnx.Param)
    where = sorted({"/".join(map(str, path[:-1])) for path, _ in nnx.to_flat_state(nnx.state(model, LoraParam))})
    print(f"trainable params: {trainable:,} of {trainable + frozen:,} ({100 * trainable / (trainable + frozen):.1f}%); "
          f"adapters at {where}")

    # 3. Train. wrt=LoraParam: optimizer state for the adapters only; DiffState: gradients for them
    #    only (LoraParam is not an nnx.Param, so the base weights are never differentiated).
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=LoraParam)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return jnp.mean((model(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, LoraParam))(model)
        optimizer.update(model, grads)
        return loss

    eval_loss = nnx.jit(lambda model: jnp.mean((model(eval_x) - eval_y) ** 2))
    loss_before = float(eval_loss(model))
    xs = jnp.asarray(rng.normal(size=(args.steps, BATCH, IN)), jnp.float32)  # all batches, labelled at once
    ys = teacher(xs)
    for i in range(1, args.steps + 1):
        loss = train_step(model, optimizer, xs[i - 1], ys[i - 1])
        if i == 1 or i % 20 == 0 or i == args.steps:
            print(f"step {i:4d}  train loss {float(loss):.5f}")
    loss_after = float(eval_loss(model))
    print(f"eval loss: before {loss_before:.5f} -> after {loss_after:.5f}")

    # The base weights were never modified: not in the adapted model, not in `base`.
    after = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    same = [np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(base_before), after)]
    same += [np.array_equal(a, np.asarray(b)) for a, b in
             zip(jax.tree.leaves(base_before), jax.tree.leaves(nnx.to_pure_dict(nnx.state(base, nnx.Param))))]
    print(f"base params bitwise unchanged: {sum(same)}/{len(same)} arrays")

    # 4. Merge: W + scale * A @ B, in float32. The result is the plain MLP again (nnx.Linear, no
    #    LoraParam): zero inference overhead.
    merged = merge(model)
    y_lora, y_merged = model(eval_x), merged(eval_x)
    print(f"merged model: {type(merged.head).__name__} head, {count(merged, LoraParam)} adapter params left")
    print(f"merged vs unmerged: max |diff| {float(jnp.max(jnp.abs(y_merged - y_lora))):.3g} "
          f"(max |output| {float(jnp.max(jnp.abs(y_lora))):.3g})")
    print(f"\ndone in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
